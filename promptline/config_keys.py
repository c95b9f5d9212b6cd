"""Config keys declared once, on frozen dataclasses, and everything derived from them.

A key is a dataclass field whose metadata holds a `Key` (made by `key()` or `section()`): the
field's type hint says what the file may hold, the field's default is the default, `doc` is the
one-line documentation. From these declarations alone this module reads a parsed YAML mapping
(`read`), writes the JSON Schema (`json_schema`) and the reference tables (`reference`), and
lists the environment overrides (`env_overrides`).

Type hints map to kinds of values: `bool`, `int`, `float`, `str`, `X | None`, `tuple[X, ...]`
(a YAML list), a config dataclass (a mapping, "section"), or `Annotated[T, <Kind>]` for values
with their own rules (`Duration`, host:port addresses, names...). Every error names the key path
and the reason: `models[0].timeouts.idle: invalid duration '30x' (...)`. Unknown keys are errors.
A key set to null is the same as a key left out: it takes its default.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import re
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")
_META = "promptline.config.key"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key and the reason."""


# --- durations --------------------------------------------------------------------------------

MAX_DURATION = 365 * 86400.0
"""No setting needs more than a year; far more (or .inf) overflows the deadlines built from it."""
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _as_float(value: int | float) -> float:
    """`value` as a float; an integer of hundreds of digits (no float holds it) as infinity."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def parse_duration(value: Any, path: str = "duration", *, allow_zero: bool = False) -> float:
    """`150ms`, `30s`, `5m`, `1h`, `7d` (or a bare number of seconds) -> seconds as float;
    `allow_zero` also takes 0 (a key whose 0 means "off")."""
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected a duration like 150ms, 30s or 5m, got {value!r}")
    if isinstance(value, int | float):
        seconds = _as_float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ConfigError(
                f"{path}: invalid duration {value!r} "
                "(use a number with ms, s, m, h or d: 150ms, 30s, 5m, 7d)"
            )
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ConfigError(f"{path}: duration must be {'0 or more' if allow_zero else 'positive'}"
                          f", got {value!r}")
    if not seconds <= MAX_DURATION:  # inf and nan too: a deadline that far overflows
        raise ConfigError(f"{path}: duration must be at most 365d, got {str(value)[:40]!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds -> the shortest exact spelling the loader reads back: 0.25 -> `250ms`, 300 -> `5m`.
    """
    ms = round(seconds * 1000)
    if ms == 0:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        unit_ms = round(_UNIT_SECONDS[unit] * 1000)
        if ms % unit_ms == 0:
            return f"{ms // unit_ms}{unit}"
    return f"{ms}ms"


# --- kinds of values --------------------------------------------------------------------------


class Kind:
    """How one kind of scalar value is read, shown in the docs and described in the schema."""

    @property
    def label(self) -> str:
        """What the value is, for the docs' type column and "required" errors."""
        raise NotImplementedError

    def read(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        """A value as the file would spell it (for defaults in the docs and the schema)."""
        return value


def _limits(minimum: float | None, maximum: float | None, show: Callable[[Any], str] = str) -> str:
    if minimum is not None and maximum is not None:
        return f" {show(minimum)}-{show(maximum)}"
    if minimum is not None:
        return f" >= {show(minimum)}"
    return f" <= {show(maximum)}" if maximum is not None else ""


def _check_limits(number: float, value: Any, path: str, minimum: float | None,
                  maximum: float | None, show: Callable[[Any], str] = str) -> None:
    if minimum is not None and number < minimum:
        raise ConfigError(f"{path}: must be at least {show(minimum)}, got {value!r}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{path}: must be at most {show(maximum)}, got {value!r}")


def _range_schema(minimum: float | None, maximum: float | None) -> dict[str, Any]:
    return {k: v for k, v in (("minimum", minimum), ("maximum", maximum)) if v is not None}


@dataclass(frozen=True, slots=True)
class Bool(Kind):
    @property
    def label(self) -> str:
        return "boolean"

    def read(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be true or false, got {value!r}")
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


@dataclass(frozen=True, slots=True)
class Int(Kind):
    minimum: float | None = None  # a `Key` limit: any number, compared as it is
    maximum: float | None = None

    @property
    def label(self) -> str:
        return "integer" + _limits(self.minimum, self.maximum)

    def read(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: must be a whole number, got {value!r}")
        _check_limits(value, value, path, self.minimum, self.maximum)
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "integer", **_range_schema(self.minimum, self.maximum)}


@dataclass(frozen=True, slots=True)
class Number(Kind):
    minimum: float | None = None
    maximum: float | None = None

    @property
    def label(self) -> str:
        return "number" + _limits(self.minimum, self.maximum)

    def read(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: must be a number, got {value!r}")
        number = _as_float(value)
        if not math.isfinite(number):
            raise ConfigError(f"{path}: must be a finite number, got {str(value)[:40]!r}")
        _check_limits(value, value, path, self.minimum, self.maximum)
        return number

    def schema(self) -> dict[str, Any]:
        return {"type": "number", **_range_schema(self.minimum, self.maximum)}

    def dump(self, value: Any) -> Any:
        return int(value) if float(value).is_integer() else value


@dataclass(frozen=True, slots=True)
class DurationKind(Kind):
    """`150ms`, `30s`, `5m`, `1h`, `7d` or a number of seconds; read as float seconds.
    `allow_zero`: 0 is taken too (the key's "off")."""

    minimum: float | None = None
    maximum: float | None = None
    allow_zero: bool = False

    @property
    def label(self) -> str:
        return (("duration or 0" if self.allow_zero else "duration")
                + _limits(self.minimum, self.maximum, format_duration))

    def read(self, value: Any, path: str) -> float:
        seconds = parse_duration(value, path, allow_zero=self.allow_zero)
        _check_limits(seconds, value, path, self.minimum, self.maximum, format_duration)
        return seconds

    def schema(self) -> dict[str, Any]:
        # `pattern` applies to the string form, `exclusiveMinimum` to the number form.
        bound = {"minimum": 0} if self.allow_zero else {"exclusiveMinimum": 0}
        return {"type": ["string", "number"], "pattern": _DURATION.pattern, **bound}

    def dump(self, value: Any) -> Any:
        return format_duration(value)


@dataclass(frozen=True, slots=True)
class Text(Kind):
    """A string, optionally matching `pattern` (whole string); `reason` says what it must be."""

    pattern: str | None = None
    reason: str = ""
    what: str = "string"
    secret: bool = False
    """A value that may hold a credential (a URL's password or token): never in a message."""

    @property
    def label(self) -> str:
        return self.what

    def read(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string, got {type(value).__name__}")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            got = (f"a value of {len(value)} characters, not shown (it may hold a credential)"
                   if self.secret else repr(value))
            raise ConfigError(f"{path}: {self.reason}, got {got}")
        return value

    def schema(self) -> dict[str, Any]:
        if self.pattern is None:
            return {"type": "string"}
        return {"type": "string", "pattern": f"^(?:{self.pattern})$"}


@dataclass(frozen=True, slots=True)
class Choice(Kind):
    """One of a few words; `values` maps each word to what the attribute holds."""

    values: Mapping[str, Any]
    fold_case: bool = False  # `debug` reads as `DEBUG`

    @classmethod
    def of(cls, *words: str, fold_case: bool = False) -> Choice:
        return cls({w: w for w in words}, fold_case)

    @property
    def label(self) -> str:
        return _or(list(self.values))

    def read(self, value: Any, path: str) -> Any:
        word = value.upper() if self.fold_case and isinstance(value, str) else value
        if not isinstance(word, str) or word not in self.values:
            raise ConfigError(f"{path}: must be {_or([repr(w) for w in self.values])}, "
                              f"got {value!r}")
        return self.values[word]

    def schema(self) -> dict[str, Any]:
        words = list(self.values)
        return {"enum": words + [w.lower() for w in words] if self.fold_case else words}

    def dump(self, value: Any) -> Any:
        return next(word for word, held in self.values.items() if held == value)


def _or(words: Sequence[str]) -> str:
    if len(words) <= 2:
        return " or ".join(words)
    return f"one of {', '.join(words[:-1])} or {words[-1]}"


Duration = Annotated[float, DurationKind()]
DurationOrZero = Annotated[float, DurationKind(allow_zero=True)]


# --- composite kinds: handled by the walker, which carries the root's values ------------------


@dataclass(frozen=True, slots=True)
class Section:
    """A nested mapping, read into the config dataclass `cls`."""

    cls: type[DataclassInstance]
    label = "mapping"


@dataclass(frozen=True, slots=True)
class List:
    """A YAML list, read into a tuple."""

    item: AnyKind
    min_items: int = 0
    empty: str = "must not be empty"

    @property
    def label(self) -> str:
        return ("non-empty " if self.min_items else "") + f"list of {self.item.label}s"


@dataclass(frozen=True, slots=True)
class Nullable:
    """`X | None`: the attribute may hold None (what a null gives, as such keys default to it)."""

    inner: AnyKind

    @property
    def label(self) -> str:
        return self.inner.label


AnyKind = Kind | Section | List | Nullable


# --- declarations -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Key:
    """What one attribute is in the file; see `key()`."""

    doc: str
    name: str | None = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    min_items: int = 0
    empty: str = "must not be empty"
    default_from: str | None = None
    env: str | None = None


def key(default: Any = MISSING, *, doc: str, name: str | None = None,
        minimum: float | None = None, maximum: float | None = None, min_items: int = 0,
        empty: str = "must not be empty", default_from: str | None = None, env: str | None = None,
        repr: bool = True) -> Any:
    """A config key: a dataclass field plus what the loader, docs and schema need.

    No `default` and no `default_from` makes the key required. `name` is the file's key when it
    differs from the attribute; `minimum`/`maximum` bound numbers and durations; `min_items`
    (with the reason `empty`) bounds lists; `default_from` ("listen.prompt") takes an absent
    key's value from an attribute path of the root, read earlier; `env` names the variable that
    overrides the key (not inside lists).
    """
    spec = Key(doc, name, default is MISSING and default_from is None, minimum, maximum,
               min_items, empty, default_from, env)
    return dataclasses.field(default=default, repr=repr, metadata={_META: spec})


def section(cls: type[DataclassInstance], doc: str | None = None) -> Any:
    """A nested section whose absent keys take their defaults; `doc` defaults to the class's."""
    spec = Key(doc or _summary(cls))
    return dataclasses.field(default_factory=cls, metadata={_META: spec})


@dataclass(frozen=True, slots=True)
class Declared:
    """A key as the walker sees it: attribute, declaration, kind and dataclass default."""

    attr: str
    spec: Key
    kind: AnyKind
    field: dataclasses.Field[Any]

    @property
    def name(self) -> str:
        return self.spec.name or self.attr

    @property
    def has_default(self) -> bool:
        return not self.spec.required and self.spec.default_from is None

    def default(self) -> Any:
        if self.field.default_factory is not MISSING:
            return self.field.default_factory()
        return self.field.default


@functools.cache
def declared(cls: type[DataclassInstance]) -> tuple[Declared, ...]:
    """The keys of a config dataclass, in declaration order; fields without a `Key` (derived at
    load, like a secret read from the environment) are not in the file."""
    hints = get_type_hints(cls, include_extras=True)
    keys = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_META)
        if spec is not None:
            keys.append(Declared(f.name, spec, _kind(hints[f.name], spec), f))
    return tuple(keys)


def _kind(hint: Any, spec: Key) -> AnyKind:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        (inner,) = (a for a in args if a is not type(None))
        return Nullable(_kind(inner, spec))
    if origin is tuple:
        return List(_kind(args[0], Key(spec.doc)), spec.min_items, spec.empty)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return Section(hint)
    if origin is Annotated:
        scalar = next(a for a in args[1:] if isinstance(a, Kind))
    else:
        scalar = {bool: Bool(), int: Int(), float: Number(), str: Text()}[hint]
    if spec.minimum is None and spec.maximum is None:
        return scalar
    # Only the numeric kinds have limits: a limit on another kind fails here, at import.
    if not isinstance(scalar, Int | Number | DurationKind):
        raise TypeError(f"{type(scalar).__name__} takes no minimum or maximum")
    return dataclasses.replace(scalar, minimum=spec.minimum, maximum=spec.maximum)


# --- the walker -------------------------------------------------------------------------------


def read(cls: type[T], raw: Any) -> T:
    """Read the parsed file into the config dataclass `cls`, checking every key on the way."""
    return _section(cls, raw, "", None)


def _section(cls: type[T], raw: Any, path: str, root: dict[str, Any] | None) -> T:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path or 'config'}: must be a mapping, got {type(raw).__name__}")
    keys = declared(cls)
    allowed = sorted(k.name for k in keys)
    for name in raw:
        if name not in allowed:
            raise ConfigError(f"{_join(path, name)}: unknown key (allowed: {', '.join(allowed)})")
    values: dict[str, Any] = {}
    root = values if root is None else root
    for k in keys:
        where = _join(path, k.name)
        value = raw.get(k.name)
        if value is not None:
            values[k.attr] = _value(k.kind, value, where, root)
        elif k.spec.required:
            raise ConfigError(f"{where}: required ({k.kind.label})")
        elif k.spec.default_from is not None:
            values[k.attr] = _attribute(root, k.spec.default_from)
        else:
            values[k.attr] = k.default()
    return cls(**values)


def _value(kind: AnyKind, value: Any, path: str, root: dict[str, Any]) -> Any:
    if isinstance(kind, Section):
        return _section(kind.cls, value, path, root)
    if isinstance(kind, Nullable):
        return _value(kind.inner, value, path, root)
    if isinstance(kind, List):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: must be a list, got {type(value).__name__}")
        if len(value) < kind.min_items:
            raise ConfigError(f"{path}: {kind.empty}")
        return tuple(_value(kind.item, item, f"{path}[{i}]", root)
                     for i, item in enumerate(value))
    return kind.read(value, path)


def _attribute(root: dict[str, Any], dotted: str) -> Any:
    first, *rest = dotted.split(".")
    value = root[first]
    for part in rest:
        value = getattr(value, part)
    return value


def _join(path: str, name: object) -> str:
    return f"{path}.{name}" if path else str(name)


def _summary(cls: type) -> str:
    """The first sentence of the class docstring."""
    text = " ".join((cls.__doc__ or "").split())
    return text.split(". ", 1)[0].rstrip(".") + "."


def env_overrides(cls: type[DataclassInstance]) -> dict[str, str]:
    """Environment variable -> dotted key, from the `env` of the keys of `cls` and its sections."""
    found: dict[str, str] = {}
    for k in declared(cls):
        if k.spec.env:
            found[k.spec.env] = k.name
        inner = k.kind.inner if isinstance(k.kind, Nullable) else k.kind
        if isinstance(inner, Section):
            found.update({var: f"{k.name}.{dotted}"
                          for var, dotted in env_overrides(inner.cls).items()})
    return found


def env_list_overrides(cls: type[DataclassInstance]) -> frozenset[str]:
    """The environment variables of `env_overrides(cls)` whose key is a list."""
    found: set[str] = set()
    for k in declared(cls):
        inner = k.kind.inner if isinstance(k.kind, Nullable) else k.kind
        if k.spec.env and isinstance(inner, List):
            found.add(k.spec.env)
        if isinstance(inner, Section):
            found |= env_list_overrides(inner.cls)
    return frozenset(found)


# --- JSON Schema ------------------------------------------------------------------------------


def json_schema(cls: type[DataclassInstance], *, title: str) -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of the file `cls` reads; sections are `$defs`."""
    defs: dict[str, Any] = {}
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title,
              **_object_schema(cls, defs)}
    schema["$defs"] = dict(sorted(defs.items()))
    return schema


def _object_schema(cls: type[DataclassInstance], defs: dict[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for k in declared(cls):
        prop = _kind_schema(k.kind, defs)
        if not k.spec.required:
            prop = _nullable(prop)  # null means "the default"
        properties[k.name] = {**prop, "description": k.spec.doc}
        if k.has_default and not isinstance(k.kind, Section):
            properties[k.name]["default"] = _dump(k.kind, k.default())
    required = [k.name for k in declared(cls) if k.spec.required]
    return {"type": "object", "description": " ".join((cls.__doc__ or "").split()),
            "properties": properties, **({"required": required} if required else {}),
            "additionalProperties": False}


def _kind_schema(kind: AnyKind, defs: dict[str, Any]) -> dict[str, Any]:
    if isinstance(kind, Section):
        name = kind.cls.__name__
        if name not in defs:
            defs[name] = _object_schema(kind.cls, defs)
        return {"$ref": f"#/$defs/{name}"}
    if isinstance(kind, Nullable):
        return _nullable(_kind_schema(kind.inner, defs))
    if isinstance(kind, List):
        items = {"type": "array", "items": _kind_schema(kind.item, defs)}
        return {**items, "minItems": kind.min_items} if kind.min_items else items
    return kind.schema()


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if {"type": "null"} in schema.get("anyOf", ()):
        return schema
    if "enum" in schema:
        return {**schema, "enum": [*schema["enum"], None]}
    if "type" not in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    types_ = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return schema if "null" in types_ else {**schema, "type": [*types_, "null"]}


def _dump(kind: AnyKind, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(kind, Nullable):
        return _dump(kind.inner, value)
    if isinstance(kind, List):
        return [_dump(kind.item, item) for item in value]
    assert isinstance(kind, Kind), "a section's defaults are its keys' defaults"
    return kind.dump(value)


# --- reference tables -------------------------------------------------------------------------


def reference(cls: type[DataclassInstance], root_title: str = "Top-level keys") -> str:
    """Markdown: one heading per section (its class docstring as prose) and a table of its keys."""
    return "\n".join(_reference(cls, "", root_title, 2)).rstrip() + "\n"


def _reference(cls: type[DataclassInstance], prefix: str, title: str, level: int, note: str = ""
               ) -> Iterator[str]:
    """Top-level sections get `##` headings like the root's own keys, nested ones `###`."""
    keys = declared(cls)
    yield f"{'#' * level} {title}"
    yield ""
    if prefix:
        yield inspect.cleandoc(cls.__doc__ or "") + note
        yield ""
    rows = [k for k in keys if not isinstance(_section_of(k.kind), Section)]
    if rows:
        yield "| key | type | default | meaning |"
        yield "|---|---|---|---|"
        for k in rows:
            yield (f"| `{prefix}{k.name}` | {_cell(k.kind.label)} | {_cell(_default_cell(k))} "
                   f"| {_cell(k.spec.doc)} |")
        yield ""
    for k in keys:
        inner = _section_of(k.kind)
        if isinstance(inner, Section):
            listed = _is_list(k.kind)
            path = f"{prefix}{k.name}" + ("[]" if listed else "")
            note = f" `{k.name}` is a list of these" if listed else ""
            if k.spec.min_items:
                note += f", at least {k.spec.min_items}"
            yield from _reference(inner.cls, f"{path}.", f"`{path}`", 3 if prefix else 2,
                                  note + "." if note else "")


def _section_of(kind: AnyKind) -> AnyKind:
    """The section a key holds, through `| None` and lists (else the kind itself)."""
    while isinstance(kind, Nullable | List):
        kind = kind.inner if isinstance(kind, Nullable) else kind.item
    return kind


def _is_list(kind: AnyKind) -> bool:
    return isinstance(kind.inner if isinstance(kind, Nullable) else kind, List)


def _default_cell(k: Declared) -> str:
    if k.spec.required:
        return "required"
    if k.spec.default_from is not None:
        return f"`{k.spec.default_from}`"
    value = _dump(k.kind, k.default())
    return f"`{value if isinstance(value, str) else json.dumps(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
