"""Check JSON answers against `docs/openapi.json`: the subset of JSON Schema 2020-12 it uses.

Why not `jsonschema`: it is not a dependency of the project, and the OpenAPI document uses a
small, fixed subset (type, enum, const, properties/required/additionalProperties, items,
anyOf/oneOf/allOf, local `$ref`, numeric and length bounds, pattern). Checking that subset here
keeps the demo and the tests able to prove "the document describes what the functions answer"
with no extra install. Unknown keywords are ignored, as JSON Schema says (annotations).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


class SchemaMismatch(ValueError):
    """The instance does not match; the message names the JSON path and the rule."""


def _resolve(ref: str, root: Mapping[str, Any]) -> Mapping[str, Any]:
    if not ref.startswith("#/"):
        raise SchemaMismatch(f"only local $ref are supported, not {ref}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def errors(instance: Any, schema: Mapping[str, Any] | bool, root: Mapping[str, Any], path: str = "$") -> list[str]:
    """Every mismatch of `instance` against `schema` (empty: it matches)."""
    if schema is True:
        return []
    if schema is False:
        return [f"{path}: no value is allowed here"]
    if "$ref" in schema:
        found = errors(instance, _resolve(schema["$ref"], root), root, path)
        if found:
            return found
    problems: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_TYPES[k](instance) for k in kinds):
            return [f"{path}: expected {' or '.join(kinds)}, got {type(instance).__name__} {_short(instance)}"]
    if "const" in schema and instance != schema["const"]:
        problems.append(f"{path}: expected {schema['const']!r}, got {_short(instance)}")
    if "enum" in schema and instance not in schema["enum"]:
        problems.append(f"{path}: {_short(instance)} is not one of {schema['enum']}")
    if isinstance(instance, dict):
        problems += _object(instance, schema, root, path)
    if isinstance(instance, list):
        if "items" in schema:
            for index, item in enumerate(instance):
                problems += errors(item, schema["items"], root, f"{path}[{index}]")
        if "maxItems" in schema and len(instance) > schema["maxItems"]:
            problems.append(f"{path}: more than {schema['maxItems']} items")
        if "minItems" in schema and len(instance) < schema["minItems"]:
            problems.append(f"{path}: fewer than {schema['minItems']} items")
    if isinstance(instance, str):
        if "minLength" in schema and len(instance) < schema["minLength"]:
            problems.append(f"{path}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(instance) > schema["maxLength"]:
            problems.append(f"{path}: longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            problems.append(f"{path}: {_short(instance)} does not match {schema['pattern']}")
    if _TYPES["number"](instance):
        if "minimum" in schema and instance < schema["minimum"]:
            problems.append(f"{path}: {instance} < {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            problems.append(f"{path}: {instance} > {schema['maximum']}")
    for sub in schema.get("allOf", []):
        problems += errors(instance, sub, root, path)
    if "anyOf" in schema and not any(not errors(instance, sub, root, path) for sub in schema["anyOf"]):
        problems.append(f"{path}: matches none of anyOf ({_closest(instance, schema['anyOf'], root, path)})")
    if "oneOf" in schema:
        matching = sum(1 for sub in schema["oneOf"] if not errors(instance, sub, root, path))
        if matching != 1:
            detail = _closest(instance, schema["oneOf"], root, path) if matching == 0 else f"{matching} match"
            problems.append(f"{path}: must match exactly one of oneOf ({detail})")
    return problems


def _object(instance: dict[str, Any], schema: Mapping[str, Any], root: Mapping[str, Any], path: str) -> list[str]:
    problems = [
        f"{path}: missing required property {name!r}" for name in schema.get("required", []) if name not in instance
    ]
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for name, value in instance.items():
        if name in properties:
            problems += errors(value, properties[name], root, f"{path}.{name}")
        elif extra is False:
            problems.append(f"{path}: property {name!r} is not documented")
        elif isinstance(extra, dict):
            problems += errors(value, extra, root, f"{path}.{name}")
    return problems


def _closest(instance: Any, options: list[Any], root: Mapping[str, Any], path: str) -> str:
    found = min((errors(instance, sub, root, path) for sub in options), key=len)
    return "; ".join(found[:3])


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate(instance: Any, schema: Mapping[str, Any], root: Mapping[str, Any]) -> None:
    """Raise SchemaMismatch listing every problem, if any."""
    found = errors(instance, schema, root)
    if found:
        raise SchemaMismatch("; ".join(found[:10]))


def response_schema(spec: Mapping[str, Any], path: str, method: str, status: int) -> Mapping[str, Any] | None:
    """The JSON schema the document gives for this answer; None when it documents no body.

    Raises SchemaMismatch when the document does not list the path, method or status at all.
    """
    operation = spec.get("paths", {}).get(path, {}).get(method.lower())
    if operation is None:
        raise SchemaMismatch(f"{method.upper()} {path} is not documented")
    responses = operation.get("responses", {})
    response = responses.get(str(status)) or responses.get(f"{str(status)[0]}XX") or responses.get("default")
    if response is None:
        raise SchemaMismatch(f"{method.upper()} {path} does not document status {status}")
    if "$ref" in response:
        response = _resolve(response["$ref"], spec)
    content = response.get("content")
    if not content:
        return None
    return content.get("application/json", {}).get("schema")


def check_response(spec: Mapping[str, Any], path: str, method: str, status: int, body: Any) -> None:
    """Raise SchemaMismatch unless `body` is what the document says `method path` answers with `status`."""
    schema = response_schema(spec, path, method, status)
    if schema is None:
        if body not in (None, b"", ""):
            raise SchemaMismatch(f"{method.upper()} {path} -> {status} documents no body, got {_short(body)}")
        return
    try:
        validate(body, schema, spec)
    except SchemaMismatch as exc:
        raise SchemaMismatch(f"{method.upper()} {path} -> {status}: {exc}") from None
