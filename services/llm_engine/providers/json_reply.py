"""The simulated model's JSON answers: a small object for `json_object`, and for `json_schema` a
minimal instance of the schema.

The instance has the required properties of each object, nothing optional, and the simplest value
of each type within its bounds. The subset honoured: `type` (a list takes its first non-null
type), `properties` / `required`, `const`, `enum`, `$ref` inside the schema, `anyOf` / `oneOf`
(the first non-null branch), `allOf` (merged), strings (`minLength`, `maxLength`, common
`format`s), numbers and integers (`minimum`, `maximum`, the exclusive ones, `multipleOf`), arrays
(`minItems`, `items`, `prefixItems`), booleans and null. `pattern` and the rest are not: a schema
that needs them may get an instance that does not match (`json_validate` then says so). Sizes
are capped so that no schema makes a huge reply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from promptline.response_format import ResponseFormat, ref_resolver

MAX_NODES = 256
"""Values in one instance: a schema of arrays of arrays still gets a short reply (with
MAX_STRING, at most ~16 KiB)."""
MAX_DEPTH = 16
MAX_ITEMS = 16
MAX_STRING = 64
_FORMATS = {
    "date-time": "2025-01-01T00:00:00Z", "date": "2025-01-01", "time": "00:00:00Z",
    "email": "user@example.com", "uri": "https://example.com/", "hostname": "example.com",
    "uuid": "00000000-0000-4000-8000-000000000000", "ipv4": "192.0.2.1", "ipv6": "2001:db8::1",
    "duration": "P1D",
}


def json_reply(fmt: ResponseFormat, reply: str | None, default: str) -> str:
    """What the simulated model answers under `fmt`: a configured `reply` that is JSON as it is
    (so a drill can make it break the schema), else generated JSON."""
    if reply is not None:
        try:
            json.loads(reply)
            return reply
        except ValueError:
            pass
    if fmt.type == "json_schema" and fmt.schema is not None:
        value = _Instance(fmt.schema).of(fmt.schema, 0, "")
    else:
        value = {"reply": reply if reply is not None else default}
    return json.dumps(value, ensure_ascii=False)


class _Instance:
    """One generation: the schema's `$ref` lookup and the budget of values left."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self._lookup: Callable[[str], Any] = ref_resolver(root)
        self._left = MAX_NODES

    def of(self, schema: Any, depth: int, name: str) -> Any:
        self._left -= 1
        if not isinstance(schema, dict) or depth > MAX_DEPTH or self._left <= 0:
            return None
        schema = self._flatten(schema, depth)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[0]
        kind = _type_of(schema)
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth, name)
        if kind == "string":
            return _string(schema, name)
        if kind in ("integer", "number"):
            return _number(schema, kind == "integer")
        if kind == "boolean":
            return False
        return {} if depth == 0 and kind is None else None

    def _flatten(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        """The schema with its `$ref`, `allOf` and first `anyOf` / `oneOf` branch merged in."""
        for _ in range(MAX_DEPTH - depth + 1):  # a $ref cycle ends here
            ref = schema.get("$ref")
            target = self._lookup(ref) if isinstance(ref, str) else None
            parts = [p for p in schema.get("allOf") or () if isinstance(p, dict)]
            branch = _first_branch(schema)
            if not isinstance(target, dict) and not parts and branch is None:
                return schema
            merged = {k: v for k, v in schema.items()
                      if k not in ("$ref", "allOf", "anyOf", "oneOf")}
            for part in (*((target,) if isinstance(target, dict) else ()), *parts,
                         *((branch,) if branch is not None else ())):
                merged = _merge(merged, part)
            schema = merged
        return schema

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = [k for k in schema.get("required") or () if isinstance(k, str)]
        wanted = _int_or(schema.get("minProperties"), 0)
        names = [*required, *(k for k in properties if k not in required)]
        out: dict[str, Any] = {}
        for key in names:
            if key not in required and len(out) >= wanted:
                break
            if self._left <= 0:
                break
            out[key] = self.of(properties.get(key, {}), depth + 1, key)
        return out

    def _array(self, schema: dict[str, Any], depth: int, name: str) -> list[Any]:
        prefix = [p for p in schema.get("prefixItems") or () if isinstance(p, dict | bool)]
        items = schema.get("items", {})
        count = min(MAX_ITEMS, _int_or(schema.get("minItems"), 0))
        return [self.of(prefix[i] if i < len(prefix) else items, depth + 1, name)
                for i in range(count) if self._left > 0]


def _first_branch(schema: dict[str, Any]) -> dict[str, Any] | None:
    for key in ("anyOf", "oneOf"):
        branches = [b for b in schema.get(key) or () if isinstance(b, dict)]
        if branches:
            not_null = [b for b in branches if b.get("type") != "null"]
            return (not_null or branches)[0]
    return None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra`'s keywords added to `base`'s; properties merged, required united."""
    merged = {**extra, **base}
    if isinstance(base.get("properties"), dict) and isinstance(extra.get("properties"), dict):
        merged["properties"] = {**extra["properties"], **base["properties"]}
    if isinstance(base.get("required"), list) and isinstance(extra.get("required"), list):
        merged["required"] = list(dict.fromkeys([*base["required"], *extra["required"]]))
    return merged


def _type_of(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if isinstance(k, str)]
        kind = next((k for k in kinds if k != "null"), kinds[0] if kinds else None)
    if isinstance(kind, str):
        return kind
    if any(k in schema for k in ("properties", "required", "additionalProperties")):
        return "object"
    if any(k in schema for k in ("items", "prefixItems", "minItems")):
        return "array"
    if any(k in schema for k in ("minLength", "maxLength", "format", "pattern")):
        return "string"
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        return "number"
    return None


def _string(schema: dict[str, Any], name: str) -> str:
    fmt = schema.get("format")
    text = _FORMATS.get(fmt, "") if isinstance(fmt, str) else ""
    text = text or name or "example"
    shortest = min(MAX_STRING, _int_or(schema.get("minLength"), 0))
    longest = _int_or(schema.get("maxLength"), MAX_STRING)
    if len(text) < shortest:
        text += "x" * (shortest - len(text))
    return text[:max(shortest, min(longest, MAX_STRING))]


def _number(schema: dict[str, Any], integer: bool) -> int | float:
    """0 when the bounds allow it, else the nearest allowed value (a multiple of `multipleOf`)."""
    step = 1 if integer else 0
    low = _finite(schema.get("minimum"))
    high = _finite(schema.get("maximum"))
    if (x := _finite(schema.get("exclusiveMinimum"))) is not None:
        low = max(low, x + step) if low is not None else x + step
    if (x := _finite(schema.get("exclusiveMaximum"))) is not None:
        high = min(high, x - step) if high is not None else x - step
    value: float = 0
    if low is not None and value < low:
        value = low
    if high is not None and value > high:
        value = high
    if not integer and value in (schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")):
        value = (low + high) / 2 if low is not None and high is not None else value + (
            1 if value == schema.get("exclusiveMinimum") else -1)
    multiple = _finite(schema.get("multipleOf"))
    if multiple and multiple > 0:
        value = math.ceil(value / multiple) * multiple
    if integer:
        return math.ceil(value)
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else value


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else default
