"""Structured output (`response_format`): its rules and the check of a finished reply, once.

The edge turns OpenAI's JSON shape into `common_pb2.ResponseFormat` (types only); what the values
mean is checked here, by the prompt service for every chat and prompt version and by the engine
for its own callers, so gRPC and HTTP callers get the same answers: INVALID_REQUEST at `connect`
naming the field (`response_format.json_schema.schema`, ...). A schema is a JSON Schema (draft
2020-12) object of at most `MAX_SCHEMA_BYTES`, nested at most `MAX_SCHEMA_DEPTH` deep, whose
`$ref`s point inside it (nothing is ever fetched).

`ResponseFormat.reply_error` is the engine's `json_validate` check of a finished reply: None when
it fits, else what failed (the JSON path and the rule). Regular expressions of a schema run on
model output, so they run with a time limit (`regex`, not `re`): a pattern that backtracks
for ever fails the check instead of stalling the engine.

Both checks can take long (a big schema's first check, a long reply), so coroutines call them
through `check_response_format` and `check_reply`, which run them on two threads of their own;
a checked schema is cached by its text.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import regex
from jsonschema import Draft202012Validator, SchemaError, ValidationError, validators
from jsonschema.exceptions import best_match
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from promptline.rules import invalid, json_kind
from promptline.v1 import common_pb2

TYPES = ("text", "json_object", "json_schema")
SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""OpenAI's rule for `json_schema.name`."""
MAX_SCHEMA_BYTES = 65536
"""A schema travels in every request of a chat and is checked on each hop: kept like a template."""
MAX_SCHEMA_DEPTH = 32
"""Nesting of the schema's JSON; deeper ones would only exhaust recursion in the checks."""
MAX_DESCRIPTION_CHARS = 4096
CHECK_BUDGET = 0.5
"""Seconds the regular expressions of one reply check may take together."""
MAX_SHOWN = 160
"""Characters of a failed check's message kept (it may quote the model's output)."""


@dataclass(frozen=True, slots=True, eq=False)
class ResponseFormat:
    """A validated response format; `schema` is the parsed `schema_text` (json_schema only)."""

    type: str
    name: str = ""
    schema_text: str = ""
    schema: Mapping[str, Any] | None = None
    strict: bool = False
    description: str = ""

    @property
    def is_json(self) -> bool:
        return self.type != "text"

    def to_pb(self) -> common_pb2.ResponseFormat:
        return common_pb2.ResponseFormat(type=self.type, name=self.name, schema=self.schema_text,
                                         strict=self.strict, description=self.description)

    def texts(self) -> list[str]:
        """What of it the model reads as text (name, description, every string in the schema,
        keys included): input moderation checks these as it checks the messages."""
        out = [self.name, self.description]
        todo: list[Any] = [self.schema]
        while todo:
            node = todo.pop()
            if isinstance(node, str):
                out.append(node)
            elif isinstance(node, dict):
                out += [key for key in node if isinstance(key, str)]
                todo += node.values()
            elif isinstance(node, list):
                todo += node
        return [text for text in out if text]

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's `response_format` object, as the chat-completions API takes it."""
        if self.type != "json_schema":
            return {"type": self.type}
        spec: dict[str, Any] = {"name": self.name}
        if self.description:
            spec["description"] = self.description
        spec["schema"] = self.schema
        if self.strict:
            spec["strict"] = True
        return {"type": "json_schema", "json_schema": spec}

    def record(self) -> dict[str, Any]:
        """The fields as stored with a prompt version (`from_record` reads them back)."""
        return {"type": self.type, "name": self.name, "schema": self.schema_text,
                "strict": self.strict, "description": self.description}

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> ResponseFormat:
        """A stored format, checked when it was stored: read back without checking again."""
        text = data.get("schema") or ""
        return cls(data.get("type") or "text", data.get("name") or "", text,
                   json.loads(text) if text else None, bool(data.get("strict")),
                   data.get("description") or "")

    @classmethod
    def trusted(cls, pb: common_pb2.ResponseFormat) -> ResponseFormat:
        """A format from a hop that checked it (a stored prompt version), without checking."""
        return cls.from_record({"type": pb.type, "name": pb.name, "schema": pb.schema,
                                "strict": pb.strict, "description": pb.description})

    def reply_error(self, text: str, finish_reason: str = "stop") -> str | None:
        """Why the finished reply `text` does not fit this format; None when it does."""
        if not self.is_json:
            return None
        cut = (" (the reply was cut at max_tokens)" if finish_reason == "length" else "")
        try:
            value = json.loads(text, parse_constant=_not_json)
        except json.JSONDecodeError as exc:
            return (f"the reply is not valid JSON{cut}: {exc.msg} at line {exc.lineno} "
                    f"column {exc.colno}")
        except ValueError as exc:  # NaN, Infinity, an integer of more than 4300 digits
            return f"the reply is not valid JSON{cut}: {_short(str(exc))}"
        except RecursionError:
            return f"the reply is not valid JSON{cut}: nested too deeply"
        if self.type == "json_object" or self.schema is None:
            if not isinstance(value, dict):
                return f"the reply is JSON but not an object ({json_kind(value)}){cut}"
            return None
        failure = _schema_failure(self.schema_text, value)
        return None if failure is None else f"the reply does not match the schema{cut}: {failure}"


async def check_response_format(pb: common_pb2.ResponseFormat,
                                path: str = "response_format") -> ResponseFormat:
    """`parse_response_format` off the event loop: checking a schema the first time takes about
    a millisecond per subschema (draft 2020-12's metaschema), so up to seconds for a big one."""
    if pb.type != "json_schema":
        return parse_response_format(pb, path)  # no schema: nothing slow
    return await asyncio.get_running_loop().run_in_executor(
        _CHECKS, parse_response_format, pb, path)


async def check_reply(fmt: ResponseFormat, text: str, finish_reason: str = "stop"
                      ) -> str | None:
    """`fmt.reply_error` off the event loop (a long reply, a slow pattern)."""
    return await asyncio.get_running_loop().run_in_executor(
        _CHECKS, fmt.reply_error, text, finish_reason)


# Two threads: schema checks never hold the event loop, nor take every thread of the default
# executor (token counting uses it) when many arrive at once; more wait their turn.
_CHECKS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="response-format")


def parse_response_format(pb: common_pb2.ResponseFormat,
                          path: str = "response_format") -> ResponseFormat:
    """Check a response format from the wire; INVALID_REQUEST naming the field otherwise. A
    schema not checked before may take long: in a coroutine, use `check_response_format`."""
    kind = pb.type
    if kind not in TYPES:
        raise invalid(f"{path}.type must be one of {', '.join(TYPES)}, got {kind[:40]!r}")
    spec = f"{path}.json_schema"
    if kind != "json_schema":
        if pb.name or pb.schema or pb.strict or pb.description:
            raise invalid(f"{spec} is only allowed with type json_schema")
        return ResponseFormat(kind)
    if not pb.name:
        raise invalid(f"{spec}.name is required")
    if not SCHEMA_NAME.fullmatch(pb.name):
        raise invalid(f"{spec}.name must be 1-64 characters of letters, digits, _ and -")
    if len(pb.description) > MAX_DESCRIPTION_CHARS:
        raise invalid(f"{spec}.description must be at most {MAX_DESCRIPTION_CHARS} characters")
    if not pb.schema:
        raise invalid(f"{spec}.schema is required (a JSON Schema object)")
    size = len(pb.schema.encode("utf-8"))
    if size > MAX_SCHEMA_BYTES:  # before the cache, which would keep the text
        raise invalid(f"{spec}.schema is {size} bytes of JSON; at most {MAX_SCHEMA_BYTES} are "
                      "allowed")
    schema, problem = _checked_schema(pb.schema)
    if problem:
        raise invalid(f"{spec}.schema {problem}")
    assert schema is not None
    return ResponseFormat(kind, pb.name, pb.schema, schema, pb.strict, pb.description)


@lru_cache(maxsize=64)
def _checked_schema(text: str) -> tuple[dict[str, Any] | None, str]:
    """(the schema, "") or (None, what is wrong with it) for a text of at most MAX_SCHEMA_BYTES;
    cached, as a chat sends the same schema on every turn and two hops check it (64 of them:
    a few MiB at worst). Callers never mutate the dict."""
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError):
        return None, "is not valid JSON"
    if not isinstance(schema, dict):
        return None, f"must be a JSON Schema object, got {json_kind(schema)}"
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        return None, f"is nested more than {MAX_SCHEMA_DEPTH} levels deep"
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as err:
        return None, f"is not a valid JSON Schema at {err.json_path}: {_short(err.message)}"
    except RecursionError:  # a metaschema walk of a pathological shape
        return None, "is not a valid JSON Schema: nested too deeply"
    problem = _unresolved_ref(schema)
    if problem:
        return None, problem
    for where, pattern in _patterns(schema, "$"):
        try:
            regex.compile(pattern)
        except (regex.error, ValueError, OverflowError):
            return None, f"has a pattern the validator cannot run at {where}"
    return schema, ""


def _depth(value: Any) -> int:
    """How deep `value` nests (a scalar: 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level > MAX_SCHEMA_DEPTH:
                break
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def _walk(value: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object in `value` with its JSON path (the depth is bounded by `_depth`)."""
    if isinstance(value, dict):
        yield where, value
        for key, child in value.items():
            yield from _walk(child, f"{where}.{key}")
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _walk(child, f"{where}[{i}]")


def ref_resolver(schema: Mapping[str, Any]) -> Callable[[str], Any]:
    """A lookup of the schema's own `$ref`s: the subschema, or None when it points nowhere."""
    resolver = Registry().with_resource(_BASE, DRAFT202012.create_resource(schema)).resolver(
        base_uri=_BASE)

    def lookup(ref: str) -> Any:
        if not ref.startswith("#"):
            return None
        try:
            return resolver.lookup(ref).contents
        except Unresolvable:
            return None

    return lookup


_BASE = "urn:promptline:response-format"


def _unresolved_ref(schema: dict[str, Any]) -> str:
    """What is wrong with the first `$ref` or `$dynamicRef` that does not resolve inside the
    schema (or a nested `$id`, which would move where they resolve), else ""."""
    lookup = ref_resolver(schema)
    for where, node in _walk(schema, "$"):
        if where != "$" and "$id" in node:
            return f"has a nested $id at {where} (only the root may have one)"
        for keyword in ("$ref", "$dynamicRef"):
            ref = node.get(keyword)
            if not isinstance(ref, str):
                continue
            if not ref.startswith("#"):
                return (f"has a {keyword} outside the schema at {where} (only #... refs are "
                        "supported)")
            if lookup(ref) is None:
                return f"has a {keyword} that points nowhere at {where}: {_short(ref)!r}"
    return ""


def _patterns(schema: dict[str, Any], where: str) -> Iterator[tuple[str, str]]:
    for path, node in _walk(schema, where):
        if isinstance(node.get("pattern"), str):
            yield f"{path}.pattern", node["pattern"]
        if isinstance(node.get("patternProperties"), dict):
            for pattern in node["patternProperties"]:
                yield f"{path}.patternProperties", pattern


# --- the reply check -------------------------------------------------------------------------

_deadline: ContextVar[float] = ContextVar("response_format_deadline", default=0.0)


def _search(pattern: str, text: str) -> bool:
    """`re.search` with the check's time budget: out of time counts as no match."""
    remaining = _deadline.get() - time.monotonic()
    if remaining <= 0:
        raise _OutOfTime
    try:
        # concurrent: the GIL is released while it matches (the engine checks in a thread)
        return regex.search(pattern, text, timeout=remaining, concurrent=True) is not None
    except TimeoutError:
        raise _OutOfTime from None


class _OutOfTime(Exception):
    """The schema's regular expressions used up CHECK_BUDGET."""


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any
             ) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{_short(instance)!r} does not match {_short(pattern)!r}")


def _pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any,
                        schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, allowed: Any, instance: Any, schema: Any
                           ) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [key for key in instance if key not in properties
              and not any(_search(p, key) for p in patterns)]
    if validator.is_type(allowed, "object"):
        for key in extras:
            yield from validator.descend(instance[key], allowed, path=key)
    elif not allowed and extras:
        names = ", ".join(repr(key) for key in sorted(extras))
        yield ValidationError(f"additional properties are not allowed ({_short(names)})")


_Validator = validators.extend(Draft202012Validator, {  # type: ignore[no-untyped-call]
    "pattern": _pattern, "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties})


_NOTHING_REMOTE: Registry[Any] = Registry()
"""What the validator may look up beyond the schema itself: nothing, and nothing is fetched (an
empty registry's retrieval fails; jsonschema's default would open any URL a reference names,
with no timeout)."""


@lru_cache(maxsize=32)
def _validator(schema_text: str) -> Any:
    schema, problem = _checked_schema(schema_text)
    assert schema is not None, problem
    return _Validator(schema, registry=_NOTHING_REMOTE)


def _schema_failure(schema_text: str, value: Any) -> str | None:
    """The most relevant reason `value` does not match, with its path and rule; None: it does."""
    token = _deadline.set(time.monotonic() + CHECK_BUDGET)
    try:
        error = best_match(_validator(schema_text).iter_errors(value))
    except _OutOfTime:
        return f"its patterns took longer than {CHECK_BUDGET:g} s to check (rule pattern)"
    except Unresolvable:
        return "a $ref of the schema does not resolve (rule $ref)"
    except RecursionError:
        return "the reply or the schema is nested too deeply to check"
    except OverflowError:  # multipleOf against 1e400 (infinity) or a number of 4,000 digits
        return "a number in the reply is too large to check (rule multipleOf)"
    finally:
        _deadline.reset(token)
    if error is None:
        return None
    return f"at {error.json_path}: {_short(error.message)} (rule {error.validator})"


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _short(text: str) -> str:
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."
