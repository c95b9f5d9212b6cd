"""The prompt registry: immutable, numbered versions of each tenant's prompts, and labels.

Keys (per tenant and prompt; `|` occurs in neither tenant names nor prompt ids, so keys are
unambiguous)::

    {pl:p|<tenant>|<prompt id>}:seq       string  the newest version number
    {pl:p|<tenant>|<prompt id>}:versions  hash    version number -> JSON record
    {pl:p|<tenant>|<prompt id>}:labels    hash    label -> version number

The hash tag `{pl:p|<tenant>|<prompt id>}` keeps one prompt's keys in one Redis Cluster slot, so
the scripts below may touch all of them atomically. A version number is assigned and its record
stored by one Lua script (INCR + HSETNX): concurrent creates get distinct numbers 1, 2, 3, ...
and nothing ever overwrites a stored version. Moving a label checks that the version exists and
sets the label in one script, so a label never points at a missing version. Prompts never
expire. Every Redis failure is UNAVAILABLE (retryable); the tenant is part of every key, so one
tenant can never read another's prompts.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.metrics import REDIS_ERRORS
from promptline.redis_store import RedisClient, is_store_failure
from promptline.response_format import ResponseFormat, check_response_format
from promptline.rules import check_max_tokens, check_temperature, invalid, is_model_name
from promptline.v1 import common_pb2, prompt_admin_pb2

from .templates import declared_variables

PROMPT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_MESSAGE_CHARS = 1000
MAX_AUTHOR_CHARS = 200
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
_MAX_VERSION = 2**32 - 1

# KEYS: seq, versions. ARGV: record JSON. Returns the new version number.
_CREATE_LUA = """
local n = redis.call('INCR', KEYS[1])
if redis.call('HSETNX', KEYS[2], n, ARGV[1]) == 0 then
  return redis.error_reply('version ' .. n .. ' already exists')
end
return n
"""

# KEYS: versions, labels. ARGV: label, version. Returns {ok(0/1), previous version or 0}.
_SET_LABEL_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 0 then return {0, 0} end
local previous = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {1, previous}
"""


@dataclass(frozen=True, slots=True)
class PromptDraft:
    """What a caller submits to create a version (validated by `PromptRegistry.create`)."""

    prompt_id: str
    template: str
    variables: tuple[str, ...] = ()
    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    message: str = ""
    author: str = ""
    response_format: common_pb2.ResponseFormat | None = None
    """As it came; checked by `PromptRegistry.create`."""
    json_validate: bool = False

    @classmethod
    def from_pb(cls, pb: prompt_admin_pb2.CreatePromptVersionRequest) -> PromptDraft:
        return cls(
            prompt_id=pb.prompt_id, template=pb.template, variables=tuple(pb.variables),
            model=pb.model, max_tokens=pb.max_tokens if pb.HasField("max_tokens") else None,
            temperature=pb.temperature if pb.HasField("temperature") else None,
            message=pb.message, author=pb.author,
            response_format=pb.response_format if pb.HasField("response_format") else None,
            json_validate=pb.json_validate)


@dataclass(frozen=True, slots=True)
class PromptVersion:
    """One stored, immutable version of a prompt."""

    prompt_id: str
    version: int
    template: str
    variables: tuple[str, ...]
    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    message: str = ""
    author: str = ""
    created_at_ms: int = 0
    labels: tuple[str, ...] = field(default=())
    """Labels pointing at this version when it was read."""
    response_format: ResponseFormat | None = None
    """Structured output for chats that set none (docs/json-mode.md)."""
    json_validate: bool = False
    """Chats that do not say check their reply against `response_format`."""

    def to_pb(self) -> prompt_admin_pb2.PromptVersion:
        return prompt_admin_pb2.PromptVersion(
            prompt_id=self.prompt_id, version=self.version, template=self.template,
            variables=self.variables, model=self.model, max_tokens=self.max_tokens,
            temperature=self.temperature, message=self.message, author=self.author,
            created_at_ms=self.created_at_ms, labels=self.labels,
            response_format=self.response_format.to_pb() if self.response_format else None,
            json_validate=self.json_validate)

    def _record(self) -> str:
        record: dict[str, Any] = {
            "template": self.template, "variables": list(self.variables), "model": self.model,
            "max_tokens": self.max_tokens, "temperature": self.temperature,
            "message": self.message, "author": self.author, "created_at_ms": self.created_at_ms,
        }
        if self.response_format is not None:  # absent: records stay as they were before
            record["response_format"] = self.response_format.record()
            record["json_validate"] = self.json_validate
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def _from_record(cls, prompt_id: str, version: int, raw: bytes | str) -> PromptVersion:
        data: dict[str, Any] = json.loads(raw)
        fmt = data.get("response_format")
        return cls(prompt_id=prompt_id, version=version, template=data["template"],
                   variables=tuple(data["variables"]), model=data.get("model") or "",
                   max_tokens=data.get("max_tokens"), temperature=data.get("temperature"),
                   message=data.get("message") or "", author=data.get("author") or "",
                   created_at_ms=int(data.get("created_at_ms") or 0),
                   response_format=ResponseFormat.from_record(fmt) if fmt else None,
                   json_validate=bool(data.get("json_validate")))


@dataclass(frozen=True, slots=True)
class VersionPage:
    """A page of versions (newest first) with every label of the prompt."""

    prompt_id: str
    versions: tuple[PromptVersion, ...]
    labels: dict[str, int]
    latest_version: int
    next_before_version: int


def validate_prompt_id(prompt_id: str) -> str:
    if not PROMPT_ID.fullmatch(prompt_id):
        raise invalid("prompt id must be 1-128 characters of letters, digits and . _ - "
                      "(starting with a letter or digit)")
    return prompt_id


def validate_label(label: str) -> str:
    if not LABEL.fullmatch(label):
        raise invalid("label must be 1-64 characters of letters, digits and . _ - "
                      "(starting with a letter or digit)")
    return label


def not_found(message: str) -> PromptlineError:
    return PromptlineError(ErrorCode.NOT_FOUND, message, stage=Stage.CONNECT)


@contextmanager
def store_errors(what: str) -> Iterator[None]:
    """Store failures (`is_store_failure`) become UNAVAILABLE (retryable), naming the
    operation; anything else (NOT_FOUND, a bug of ours) passes through."""
    try:
        yield
    except Exception as exc:
        if not is_store_failure(exc):
            raise
        REDIS_ERRORS.labels(what).inc()
        raise PromptlineError(ErrorCode.UNAVAILABLE, f"the {what} store is unavailable",
                              stage=Stage.CONNECT) from None


def _key(tenant: str, prompt_id: str, part: str) -> str:
    return f"{{pl:p|{tenant}|{prompt_id}}}:{part}"


class PromptRegistry:
    """Versioned prompts of every tenant, in Redis."""

    def __init__(self, redis: RedisClient, *, max_template_bytes: int = 65536) -> None:
        self._redis = redis
        self.max_template_bytes = max_template_bytes
        self._create = redis.register_script(_CREATE_LUA)
        self._set_label = redis.register_script(_SET_LABEL_LUA)

    async def create(self, tenant: str, draft: PromptDraft) -> PromptVersion:
        """Validate `draft` and store it as the prompt's next version."""
        validate_prompt_id(draft.prompt_id)
        if not draft.template.strip():
            raise invalid("template must not be empty")
        size = len(draft.template.encode("utf-8"))
        if size > self.max_template_bytes:
            raise invalid(f"template is {size} bytes; at most {self.max_template_bytes} "
                          "are allowed (prompts.max_template_bytes)")
        variables = declared_variables(draft.template, draft.variables)
        if draft.model and not is_model_name(draft.model):
            raise invalid("model must be a configured model name")
        if draft.max_tokens is not None:
            check_max_tokens(draft.max_tokens)
        if draft.temperature is not None:
            check_temperature(draft.temperature)
        if len(draft.message) > MAX_MESSAGE_CHARS:
            raise invalid(f"message must be at most {MAX_MESSAGE_CHARS} characters")
        if len(draft.author) > MAX_AUTHOR_CHARS:
            raise invalid(f"author must be at most {MAX_AUTHOR_CHARS} characters")
        fmt = (await check_response_format(draft.response_format)
               if draft.response_format is not None else None)
        if fmt is not None and not fmt.is_json:
            fmt = None  # "text" is no format
        if draft.json_validate and fmt is None:
            raise invalid("json_validate needs a response_format of type json_object or "
                          "json_schema")
        record = PromptVersion(
            prompt_id=draft.prompt_id, version=0, template=draft.template, variables=variables,
            model=draft.model, max_tokens=draft.max_tokens, temperature=draft.temperature,
            message=draft.message, author=draft.author or tenant,
            created_at_ms=int(time.time() * 1000), response_format=fmt,
            json_validate=draft.json_validate)
        with store_errors("prompt"):
            number = await self._create(
                keys=[_key(tenant, draft.prompt_id, "seq"),
                      _key(tenant, draft.prompt_id, "versions")],
                args=[record._record()])
        return replace(record, version=int(number))

    async def get(self, tenant: str, prompt_id: str, version: int = 0,
                  label: str = "") -> PromptVersion:
        """A version by number, by label, or (neither) the latest; NOT_FOUND naming what is
        missing."""
        validate_prompt_id(prompt_id)
        if version and label:
            raise invalid("prompt takes either a version or a label, not both")
        if label:
            validate_label(label)
        with store_errors("prompt"):
            if label:
                raw = await self._redis.hget(_key(tenant, prompt_id, "labels"), label)
                if raw is None:
                    await self._require_prompt(tenant, prompt_id)
                    raise not_found(f"prompt {prompt_id!r} has no label {label!r}")
                version = int(raw)
            elif not version:
                raw = await self._redis.get(_key(tenant, prompt_id, "seq"))
                if raw is None:
                    raise not_found(f"unknown prompt {prompt_id!r}")
                version = int(raw)
            record = await self._redis.hget(_key(tenant, prompt_id, "versions"), str(version))
            if record is None:
                await self._require_prompt(tenant, prompt_id)
                raise not_found(f"prompt {prompt_id!r} has no version {version}")
            labels = await self._redis.hgetall(_key(tenant, prompt_id, "labels"))
        found = PromptVersion._from_record(prompt_id, version, record)
        pointing = sorted(_text(k) for k, v in labels.items() if int(v) == version)
        return replace(found, labels=tuple(pointing))

    async def list(self, tenant: str, prompt_id: str, page_size: int = 0,
                   before_version: int = 0) -> VersionPage:
        """Versions newest first, `page_size` at a time, older than `before_version` if set."""
        validate_prompt_id(prompt_id)
        size = page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise invalid(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
        with store_errors("prompt"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(_key(tenant, prompt_id, "seq"))
                pipe.hgetall(_key(tenant, prompt_id, "labels"))
                raw_latest, raw_labels = await pipe.execute()
            if raw_latest is None:
                raise not_found(f"unknown prompt {prompt_id!r}")
            latest = int(raw_latest)
            top = min(latest, before_version - 1) if before_version else latest
            numbers = list(range(top, max(0, top - size), -1))
            records = (await self._redis.hmget(_key(tenant, prompt_id, "versions"),
                                               [str(n) for n in numbers])) if numbers else []
        labels = {_text(k): int(v) for k, v in raw_labels.items()}
        versions = []
        for number, record in zip(numbers, records, strict=True):
            if record is not None:
                pointing = tuple(sorted(k for k, v in labels.items() if v == number))
                versions.append(replace(PromptVersion._from_record(prompt_id, number, record),
                                        labels=pointing))
        oldest = numbers[-1] if numbers else 1
        return VersionPage(prompt_id, tuple(versions), labels, latest,
                           oldest if oldest > 1 else 0)

    async def set_label(self, tenant: str, prompt_id: str, label: str, version: int) -> int:
        """Point `label` at an existing `version`; returns the previous version (0: new label)."""
        validate_prompt_id(prompt_id)
        validate_label(label)
        if not 1 <= version <= _MAX_VERSION:
            raise invalid("version must be a version number (1 or more)")
        with store_errors("prompt"):
            ok, previous = await self._set_label(
                keys=[_key(tenant, prompt_id, "versions"), _key(tenant, prompt_id, "labels")],
                args=[label, version])
            if not int(ok):
                await self._require_prompt(tenant, prompt_id)
                raise not_found(f"prompt {prompt_id!r} has no version {version}")
        return int(previous)

    async def _require_prompt(self, tenant: str, prompt_id: str) -> None:
        if not await self._redis.exists(_key(tenant, prompt_id, "seq")):
            raise not_found(f"unknown prompt {prompt_id!r}")


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
