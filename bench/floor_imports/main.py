"""The cold-start floor of one function: a functions-framework function that imports exactly the
third-party packages that function must use, the way it uses them, and answers 204 at once.

Which packages is `FLOOR_IMPORTS` (comma-separated names from `IMPORTS`), set per function by
bench/coldstart.py (`FLOORS`). What the function spends beyond this floor is its own code, its
configuration and its first request's work (the first database connection included).
Served exactly like the real functions (bench/common.py).
"""

import importlib
import os

import functions_framework

# What "using" each package costs at import: the modules and entry points the functions reach. httpx
# imports its transport package (httpcore, with h11) only when a client is built, which every
# function that uses httpx does; building one (an SSL context, the CA bundle) is work, not imports.
IMPORTS = {
    "pydantic": (("pydantic", ("BaseModel", "Field", "TypeAdapter")),),
    "psycopg": (("psycopg", ("connect",)),),
    "psycopg_pool": (("psycopg_pool", ("ConnectionPool",)),),
    "jwt": (("jwt", ("decode", "PyJWKClient")),),
    "httpx": (("httpx", ("Client",)), ("httpcore", ("ConnectionPool",))),
}

for name in filter(None, os.environ.get("FLOOR_IMPORTS", "").split(",")):
    for module, attributes in IMPORTS[name]:
        loaded = importlib.import_module(module)
        for attribute in attributes:
            getattr(loaded, attribute)


@functions_framework.http
def floor(request):
    return "", 204
