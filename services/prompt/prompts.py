"""The prompt registry: immutable, numbered versions of each tenant's prompts, and labels.

Keys (per tenant and prompt; `|` occurs in neither tenant names nor prompt ids, so keys are
unambiguous)::

    {pl:p|<tenant>|<prompt id>}:seq       string  the newest version number
    {pl:p|<tenant>|<prompt id>}:versions  hash    version number -> JSON record
    {pl:p|<tenant>|<prompt id>}:labels    hash    label -> "3" or a split "3=90,4=10"
    {pl:p|<tenant>|<prompt id>}:labels_prev  hash label -> its state before the last move
    {pl:p|<tenant>|<prompt id>}:policy    hash    require_eval "1"/"0", min_pass_ppm
    {pl:p|<tenant>|<prompt id>}:evals:<n> list    eval runs of version n (JSON), newest first
    {pl:p|<tenant>|<prompt id>}:eval_best hash    version -> best pass rate (ppm) of a run
                                                  without regressions

The hash tag `{pl:p|<tenant>|<prompt id>}` keeps one prompt's keys in one Redis Cluster slot, so
the scripts below may touch all of them atomically. A version number is assigned and its record
stored by one Lua script (INCR + HSETNX): concurrent creates get distinct numbers 1, 2, 3, ...
and nothing ever overwrites a stored version. Moving a label checks that the version exists and
sets the label in one script, so a label never points at a missing version; the same script
keeps the label's previous state (a rollback swaps the two) and enforces the prompt's eval
policy, so a gate and the move it guards never race. A split label picks a version per
conversation (else per end user, else per request) by hashing (`pick_version`), the same on
every replica and after restarts. Prompts never
expire. Every Redis failure is UNAVAILABLE (retryable); the tenant is part of every key, so one
tenant can never read another's prompts.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from google.protobuf import json_format

from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.metrics import REDIS_ERRORS
from promptline.redis_store import RedisClient, is_store_failure, reply_text
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

MAX_SPLIT = 10
"""Versions one label may split between."""
MAX_EVAL_RUNS = 100
"""Eval runs kept per version (the newest)."""
PPM = 1_000_000

# KEYS: versions, labels, labels_prev, policy, eval_best. ARGV: label, encoded split,
# require_eval ("1"/"0"), then each version of the split. Returns {status, detail}: 1 moved
# (detail: the previous state or ""), 0 unknown version (detail: it), 2 a version new to the
# label without a passing eval (detail: "version:best ppm or -1:min ppm").
_SET_LABEL_LUA = """
for i = 4, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then return {0, ARGV[i]} end
end
local old = redis.call('HGET', KEYS[2], ARGV[1])
if ARGV[3] == '1' or redis.call('HGET', KEYS[4], 'require_eval') == '1' then
  local min = tonumber(redis.call('HGET', KEYS[4], 'min_pass_ppm') or '1000000')
  local serving = {}
  if old and not string.find(old, '=') then serving[old] = true end
  for v in string.gmatch(old or '', '([0-9]+)=') do serving[v] = true end
  for i = 4, #ARGV do
    if not serving[ARGV[i]] then
      local best = tonumber(redis.call('HGET', KEYS[5], ARGV[i]) or '-1')
      if best < min then return {2, ARGV[i] .. ':' .. best .. ':' .. min} end
    end
  end
end
if old ~= ARGV[2] then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  if old then redis.call('HSET', KEYS[3], ARGV[1], old) end
end
return {1, old or ''}
"""

# KEYS: labels, labels_prev. ARGV: label. Swaps the label's state with its previous one.
# Returns {1, now, was} or {0} without a previous state.
_ROLLBACK_LUA = """
local previous = redis.call('HGET', KEYS[2], ARGV[1])
if not previous then return {0} end
local now = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], previous)
if now then redis.call('HSET', KEYS[2], ARGV[1], now) end
return {1, previous, now or ''}
"""

# KEYS: versions, evals list, eval_best. ARGV: version, run JSON, pass ppm (-1: has
# regressions, never counts as passing), kept runs. Returns 0 for an unknown version, else 1.
_ADD_EVAL_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
local ppm = tonumber(ARGV[3])
if ppm >= tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '-1') then
  redis.call('HSET', KEYS[3], ARGV[1], ppm)
end
return 1
"""


Split = tuple[tuple[int, int], ...]
"""A label's state: (version, weight) pairs by version; weights are percents adding up to 100."""


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
    split: Split = ()
    """The split of the label it was read by, when that label splits; else empty."""

    def to_pb(self) -> prompt_admin_pb2.PromptVersion:
        return prompt_admin_pb2.PromptVersion(
            prompt_id=self.prompt_id, version=self.version, template=self.template,
            variables=self.variables, model=self.model, max_tokens=self.max_tokens,
            temperature=self.temperature, message=self.message, author=self.author,
            created_at_ms=self.created_at_ms, labels=self.labels,
            response_format=self.response_format.to_pb() if self.response_format else None,
            json_validate=self.json_validate, split=dict(self.split))

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
    """Each label's version (a split label's heaviest)."""
    latest_version: int
    next_before_version: int
    splits: dict[str, Split] = field(default_factory=dict)
    """The labels that split, with their weights."""


@dataclass(frozen=True, slots=True)
class LabelMove:
    """A label's state after a move or rollback, and before it."""

    split: Split
    previous: Split


@dataclass(frozen=True, slots=True)
class PromptPolicy:
    """What moving a label of a prompt needs."""

    require_eval: bool = False
    min_pass_rate: float = 1.0

    def to_pb(self, prompt_id: str) -> prompt_admin_pb2.PromptPolicy:
        return prompt_admin_pb2.PromptPolicy(prompt_id=prompt_id, require_eval=self.require_eval,
                                             min_pass_rate=self.min_pass_rate)


def check_split(weights: Mapping[int, int], path: str = "split") -> Split:
    """A split from the wire, by version; INVALID_REQUEST naming the field otherwise."""
    if not weights:
        raise invalid(f"{path} must name at least one version")
    if len(weights) > MAX_SPLIT:
        raise invalid(f"{path} may name at most {MAX_SPLIT} versions, got {len(weights)}")
    for version, weight in weights.items():
        if not 1 <= version <= _MAX_VERSION:
            raise invalid(f"{path} keys must be version numbers (1 or more), got {version}")
        if not 1 <= weight <= 100:
            raise invalid(f"{path}.{version} must be a weight from 1 to 100, got {weight}")
    total = sum(weights.values())
    if total != 100:
        raise invalid(f"{path} weights must add up to 100, got {total}")
    return tuple(sorted(weights.items()))


def encode_split(split: Split) -> str:
    """"3" for a single version (as labels were stored before splits), else "3=90,4=10"."""
    if len(split) == 1:
        return str(split[0][0])
    return ",".join(f"{v}={w}" for v, w in split)


def decode_split(raw: bytes | str) -> Split:
    text = reply_text(raw)
    if "=" not in text:
        return ((int(text), 100),)
    pairs = (part.split("=", 1) for part in text.split(","))
    return tuple((int(v), int(w)) for v, w in pairs)


def heaviest(split: Split) -> int:
    """The version with the largest weight, the lowest number on a tie."""
    return min(split, key=lambda pair: (-pair[1], pair[0]))[0]


def pick_version(split: Split, prompt_id: str, label: str, key: str) -> int:
    """The version of `split` that serves `key` (a conversation id, an end user, a request id).

    sha256 of the prompt id, label and key, read as a number, picks a point in 0..9999 that falls
    in one version's share of the weights laid end to end by version number: the same on every
    replica and after restarts, and a change of weights moves only the keys at the borders.
    """
    if len(split) == 1:
        return split[0][0]
    digest = hashlib.sha256(f"{prompt_id}\x00{label}\x00{key}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") % 10_000
    edge = 0
    for version, weight in split:
        edge += weight * 100
        if point < edge:
            return version
    return split[-1][0]


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
        self._rollback = redis.register_script(_ROLLBACK_LUA)
        self._add_eval = redis.register_script(_ADD_EVAL_LUA)

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
                  label: str = "", sticky: str = "") -> PromptVersion:
        """A version by number, by label, or (neither) the latest; NOT_FOUND naming what is
        missing. A label that splits gives the version `pick_version` picks for `sticky` (a
        conversation id, end user or request id), or without one its heaviest version."""
        validate_prompt_id(prompt_id)
        if version and label:
            raise invalid("prompt takes either a version or a label, not both")
        if label:
            validate_label(label)
        split: Split = ()
        with store_errors("prompt"):
            if label:
                raw = await self._redis.hget(_key(tenant, prompt_id, "labels"), label)
                if raw is None:
                    await self._require_prompt(tenant, prompt_id)
                    raise not_found(f"prompt {prompt_id!r} has no label {label!r}")
                split = decode_split(raw)
                version = (pick_version(split, prompt_id, label, sticky) if sticky
                           else heaviest(split))
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
        pointing = sorted(reply_text(k) for k, v in labels.items()
                          if any(n == version for n, _ in decode_split(v)))
        return replace(found, labels=tuple(pointing), split=split if len(split) > 1 else ())

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
        states = {reply_text(k): decode_split(v) for k, v in raw_labels.items()}
        labels = {k: heaviest(v) for k, v in states.items()}
        versions = []
        for number, record in zip(numbers, records, strict=True):
            if record is not None:
                pointing = tuple(sorted(k for k, v in states.items()
                                        if any(n == number for n, _ in v)))
                versions.append(replace(PromptVersion._from_record(prompt_id, number, record),
                                        labels=pointing))
        oldest = numbers[-1] if numbers else 1
        return VersionPage(prompt_id, tuple(versions), labels, latest,
                           oldest if oldest > 1 else 0,
                           {k: v for k, v in states.items() if len(v) > 1})

    async def set_label(self, tenant: str, prompt_id: str, label: str, version: int) -> int:
        """Point `label` at one existing `version`; returns the previous version (0: new label;
        a split's heaviest)."""
        if not 1 <= version <= _MAX_VERSION:
            raise invalid("version must be a version number (1 or more)")
        move = await self.move_label(tenant, prompt_id, label, ((version, 100),),
                                     field_name="version")
        return heaviest(move.previous) if move.previous else 0

    async def move_label(self, tenant: str, prompt_id: str, label: str, split: Split, *,
                         require_eval: bool = False, field_name: str = "split") -> LabelMove:
        """Point `label` at the versions of a checked `split` (`check_split`), in one script
        that checks they exist, applies the eval gate and keeps the previous state.

        An unknown version is NOT_FOUND for a single `version` (as before splits) and
        INVALID_REQUEST naming `field_name`.N in a split; a version new to the label without a
        passing eval run, when the policy or `require_eval` wants one, is INVALID_REQUEST."""
        validate_prompt_id(prompt_id)
        validate_label(label)
        with store_errors("prompt"):
            status, detail = await self._set_label(
                keys=[_key(tenant, prompt_id, "versions"), _key(tenant, prompt_id, "labels"),
                      _key(tenant, prompt_id, "labels_prev"), _key(tenant, prompt_id, "policy"),
                      _key(tenant, prompt_id, "eval_best")],
                args=[label, encode_split(split), "1" if require_eval else "0",
                      *(str(v) for v, _ in split)])
            if int(status) == 0:
                await self._require_prompt(tenant, prompt_id)
                missing = reply_text(detail)
                if len(split) == 1 and field_name == "version":
                    raise not_found(f"prompt {prompt_id!r} has no version {missing}")
                raise invalid(f"{field_name}.{missing}: prompt {prompt_id!r} has no version "
                              f"{missing}")
        if int(status) == 2:
            version, best, least = reply_text(detail).split(":")
            had = ("no eval run without regressions" if int(best) < 0
                   else f"a best pass rate of {int(best) / PPM:g}")
            raise invalid(f"{field_name}: version {version} has no passing eval run (it has "
                          f"{had}; a label move needs a pass rate of at least "
                          f"{int(least) / PPM:g}); run `promptline prompts eval "
                          f"{prompt_id} --version {version}` first")
        previous = reply_text(detail)
        return LabelMove(split, decode_split(previous) if previous else ())

    async def rollback_label(self, tenant: str, prompt_id: str, label: str) -> LabelMove:
        """Swap the label's state with the one before its last move (a second rollback rolls
        forward again). Not gated by the eval policy: it restores a state that served."""
        validate_prompt_id(prompt_id)
        validate_label(label)
        with store_errors("prompt"):
            result = await self._rollback(
                keys=[_key(tenant, prompt_id, "labels"), _key(tenant, prompt_id, "labels_prev")],
                args=[label])
            if not int(result[0]):
                await self._require_prompt(tenant, prompt_id)
                if not await self._redis.hexists(_key(tenant, prompt_id, "labels"), label):
                    raise not_found(f"prompt {prompt_id!r} has no label {label!r}")
                raise invalid(f"rollback: label {label!r} of prompt {prompt_id!r} has no "
                              "previous state to roll back to")
        now, was = reply_text(result[1]), reply_text(result[2])
        return LabelMove(decode_split(now), decode_split(was) if was else ())

    async def add_eval(self, tenant: str, prompt_id: str, version: int,
                       run: prompt_admin_pb2.EvalRun) -> prompt_admin_pb2.EvalRun:
        """Validate and store an eval run's summary on an existing version."""
        validate_prompt_id(prompt_id)
        if not 1 <= version <= _MAX_VERSION:
            raise invalid("version must be a version number (1 or more)")
        _check_eval(run)
        stored = prompt_admin_pb2.EvalRun()
        stored.CopyFrom(run)
        stored.eval_id = uuid.uuid4().hex
        stored.prompt_id = prompt_id
        stored.version = version
        stored.created_at_ms = int(time.time() * 1000)
        stored.pass_rate = round(run.passed / run.cases, 6)
        stored.author = run.author or tenant
        # Rounded up, as the policy's threshold is rounded: 2 of 3 meets a min_pass_rate of 2/3.
        ppm = -1 if run.regressions else -(-run.passed * PPM // run.cases)
        record = json_format.MessageToJson(stored, preserving_proto_field_name=True, indent=None)
        with store_errors("prompt"):
            ok = await self._add_eval(
                keys=[_key(tenant, prompt_id, "versions"),
                      _key(tenant, prompt_id, f"evals:{version}"),
                      _key(tenant, prompt_id, "eval_best")],
                args=[version, record, ppm, MAX_EVAL_RUNS])
            if not int(ok):
                await self._require_prompt(tenant, prompt_id)
                raise not_found(f"prompt {prompt_id!r} has no version {version}")
        return stored

    async def list_evals(self, tenant: str, prompt_id: str, version: int
                         ) -> builtins.list[prompt_admin_pb2.EvalRun]:
        """The version's stored eval runs, newest first; NOT_FOUND for an unknown version."""
        await self.get(tenant, prompt_id, version)
        with store_errors("prompt"):
            raw = await self._redis.lrange(_key(tenant, prompt_id, f"evals:{version}"), 0, -1)
        return [json_format.Parse(reply_text(r), prompt_admin_pb2.EvalRun()) for r in raw]

    async def policy(self, tenant: str, prompt_id: str) -> PromptPolicy:
        """The prompt's policy for label moves; NOT_FOUND for an unknown prompt."""
        validate_prompt_id(prompt_id)
        with store_errors("prompt"):
            await self._require_prompt(tenant, prompt_id)
            raw = await self._redis.hgetall(_key(tenant, prompt_id, "policy"))
        fields = {reply_text(k): reply_text(v) for k, v in raw.items()}
        return PromptPolicy(require_eval=fields.get("require_eval") == "1",
                            min_pass_rate=int(fields.get("min_pass_ppm", PPM)) / PPM)

    async def set_policy(self, tenant: str, prompt_id: str, policy: PromptPolicy
                         ) -> PromptPolicy:
        """Replace the prompt's policy (the prompt must exist)."""
        validate_prompt_id(prompt_id)
        if not 0 <= policy.min_pass_rate <= 1:
            raise invalid(f"min_pass_rate must be between 0 and 1, got {policy.min_pass_rate}")
        ppm = round(policy.min_pass_rate * PPM)
        with store_errors("prompt"):
            await self._require_prompt(tenant, prompt_id)
            await self._redis.hset(_key(tenant, prompt_id, "policy"), mapping={
                "require_eval": "1" if policy.require_eval else "0", "min_pass_ppm": ppm})
        return PromptPolicy(policy.require_eval, ppm / PPM)

    async def _require_prompt(self, tenant: str, prompt_id: str) -> None:
        if not await self._redis.exists(_key(tenant, prompt_id, "seq")):
            raise not_found(f"unknown prompt {prompt_id!r}")


def _check_eval(run: prompt_admin_pb2.EvalRun) -> None:
    """An eval run's summary as a caller sent it; INVALID_REQUEST naming the field."""
    if not 1 <= run.cases <= 1_000_000:
        raise invalid(f"cases must be between 1 and 1000000, got {run.cases}")
    if run.passed > run.cases:
        raise invalid(f"passed must be at most cases ({run.cases}), got {run.passed}")
    if run.regressions > run.cases:
        raise invalid(f"regressions must be at most cases ({run.cases}), got {run.regressions}")
    if run.against_label:
        validate_label(run.against_label)
    if run.judge_model and not is_model_name(run.judge_model):
        raise invalid("judge_model must be a model name")
    if run.cases_sha256 and not re.fullmatch(r"[0-9a-f]{64}", run.cases_sha256):
        raise invalid("cases_sha256 must be 64 lower-case hex digits")
    if run.cost_usd and not re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,12})?", run.cost_usd):
        raise invalid(f"cost_usd must be a decimal number of USD, got {run.cost_usd[:40]!r}")
    if len(run.author) > MAX_AUTHOR_CHARS:
        raise invalid(f"author must be at most {MAX_AUTHOR_CHARS} characters")
    for name in ("first_token_p50_ms", "total_p50_ms"):
        if run.HasField(name) and getattr(run, name) < 0:
            raise invalid(f"{name} must not be negative")
