"""The floor of every benchmark: a functions-framework function that imports only what it must
and answers 204 at once. Served exactly like the real functions (bench/common.py)."""

import functions_framework


@functions_framework.http
def noop(request):
    return "", 204
