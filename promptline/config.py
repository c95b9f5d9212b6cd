"""Typed, validated configuration: loaded once from YAML, overridable by a few env variables.

Each key is declared once below (type hint, default, one-line doc; see `config_keys`), and the
loader, docs/configuration.md and the JSON Schema (`promptline config schema`) come from those
declarations. Every error names the key path and the reason (`models[0].timeouts.idle: ...`), so
a bad file stops start-up with a message an SRE can act on. Unknown keys are errors too: a typo in
a quota must not silently leave the default in force. Rules that involve more than one key are
plain code in `_check_rules`, after every key passed its own checks.
"""

# key() and section() return dataclasses.field(...), as safe a default as field() itself.

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml

from promptline.config_keys import (
    Choice,
    Duration,
    DurationOrZero,
    Kind,
    Number,
    Text,
    env_list_overrides,
    env_overrides,
    key,
    section,
)
from promptline.config_keys import ConfigError as ConfigError
from promptline.config_keys import parse_duration as parse_duration
from promptline.config_keys import read as read_keys
from promptline.rules import BOUNDARIES, MAX_COALESCE_MS, MAX_MIN_CHARS, MODEL_NAME

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "local.yaml"
ENV_CONFIG_PATH = "PROMPTLINE_CONFIG"


def key_digest(api_key: str) -> bytes:
    """sha256 of an API key: what configs may store and what auth compares."""
    return hashlib.sha256(api_key.encode("utf-8")).digest()


# --- kinds of values with rules of their own ---------------------------------------------------

_HOST_PORT = r"\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}"


@dataclass(frozen=True)
class _Address(Text):
    """host:port (or [v6]:port), with the port in range."""

    def read(self, value: Any, path: str) -> str:
        address = super().read(value, path)
        port = int(address.rsplit(":", 1)[1])
        if port > 65535:
            raise ConfigError(f"{path}: port {port} is out of range")
        return address


@dataclass(frozen=True)
class _Regex(Text):
    """A regular expression (Python `re` syntax), compiled at load to catch mistakes."""

    def read(self, value: Any, path: str) -> str:
        pattern = super().read(value, path)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{path}: invalid regex: {exc}") from None
        return pattern

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "format": "regex"}


@dataclass(frozen=True)
class _ApiKey(Kind):
    """A plain key (hashed here, never kept) or `sha256:<64 hex>`; read as the sha256 digest."""

    @property
    def label(self) -> str:
        return "API key"

    def read(self, value: Any, path: str) -> bytes:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string, got {type(value).__name__}")
        if value.startswith("sha256:"):
            hexpart = value.removeprefix("sha256:")
            if not re.fullmatch(r"[0-9a-fA-F]{64}", hexpart):
                raise ConfigError(f"{path}: sha256: must be followed by 64 hex digits")
            return bytes.fromhex(hexpart)
        if len(value) < 4:
            raise ConfigError(f"{path}: an API key needs at least 4 characters")
        if not re.fullmatch(r"[\x21-\x7e]+", value):
            # What a Bearer header and gRPC metadata carry (promptline.auth.bearer_key).
            raise ConfigError(f"{path}: an API key is printable ASCII without spaces")
        return key_digest(value)

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "minLength": 4}


@dataclass(frozen=True)
class _Usd(Kind):
    """US dollars, read as an exact `Decimal`: a number (`0.15`) or a decimal string (`"0.15"`).
    At most `places` decimal places; `maximum` catches a typo (a price per token, not per
    million) before it bills anyone."""

    maximum: int
    places: int = 6
    positive: bool = False

    @property
    def label(self) -> str:
        return f"USD {'> 0' if self.positive else '>= 0'}, <= {self.maximum:,}"

    def read(self, value: Any, path: str) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{path}: must be an amount of US dollars like 0.15, got "
                              f"{type(value).__name__}")
        try:
            # A YAML float's shortest repr is the number as written (0.15, not 0.1499...).
            amount = Decimal(repr(value) if isinstance(value, float) else str(value).strip())
        except InvalidOperation:
            raise ConfigError(f"{path}: must be an amount of US dollars like 0.15, got "
                              f"{value!r}") from None
        if not amount.is_finite():
            raise ConfigError(f"{path}: must be a finite amount, got {value!r}")
        if amount < 0 or (self.positive and amount == 0):
            least = "greater than 0" if self.positive else "at least 0"
            raise ConfigError(f"{path}: must be {least}, got {value!r}")
        if amount > self.maximum:
            raise ConfigError(f"{path}: must be at most {self.maximum:,} (USD), got {value!r}")
        exponent = amount.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -self.places:
            raise ConfigError(f"{path}: at most {self.places} decimal places, got {value!r}")
        return amount

    def schema(self) -> dict[str, Any]:
        bound = {"exclusiveMinimum": 0} if self.positive else {"minimum": 0}
        return {"type": ["number", "string"], **bound, "maximum": self.maximum,
                "pattern": rf"^[0-9]+(\.[0-9]{{1,{self.places}}})?$"}

    def dump(self, value: Any) -> Any:
        return int(value) if value == value.to_integral_value() else float(value)


Name = Annotated[str, Text(MODEL_NAME,
                           "must be 1-128 letters, digits and . _ : / - (starting with a letter "
                           "or digit)", "name")]
Address = Annotated[str, _Address(_HOST_PORT, "must be host:port", "host:port")]
# A gRPC target: `dns:///` resolves every address behind the name; `ipv4:` lists replicas.
_IP_PORT = r"\d{1,3}(?:\.\d{1,3}){3}:\d{1,5}"
Target = Annotated[str, _Address(
    f"(?:dns:///)?{_HOST_PORT}|ipv4:{_IP_PORT}(?:,{_IP_PORT})*",
    "must be host:port, dns:///host:port or ipv4:ip:port,ip:port,...",
    "host:port, dns:///host:port or ipv4:ip:port,...")]
# URLs may carry a password or a token (a proxy's, Redis's, a webhook's path): never echoed.
HttpUrl = Annotated[str, Text(r"https?://.+", "must be an http(s) URL", "http(s) URL",
                              secret=True)]
ProxyUrl = Annotated[str, Text(r"(?:https?://.+)?", 'must be an http(s) URL, or "" for none',
                               'http(s) URL or ""', secret=True)]
RedisUrl = Annotated[str, Text(r"(?:redis|rediss|unix)://.*",
                               "must start with redis://, rediss:// or unix://", "Redis URL",
                               secret=True)]
Provider = Annotated[str, Choice.of("simulated", "openai")]
Routing = Annotated[str, Choice.of("weighted", "least_busy", "lowest_latency")]
Boundary = Annotated[str, Choice.of(*BOUNDARIES)]
DEFAULT_COALESCE_MS = 100
"""Chosen from measurements (docs/performance.md, "Chunk shaping")."""
Regex = Annotated[str, _Regex(what="regular expression")]
PricePerMtok = Annotated[Decimal, _Usd(10_000)]
BudgetUsd = Annotated[Decimal, _Usd(1_000_000, positive=True)]
Period = Annotated[str, Choice.of("day", "week", "month")]
Share = Annotated[float, Number(0, 1)]
ApiKey = Annotated[bytes, _ApiKey()]


# --- the declarations ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Quotas:
    """Requests and tokens per minute, over a sliding window shared by all replicas (in Redis).
    A request needs room in both its tenant's and its model's quotas."""

    qpm: int | None = key(None, minimum=1, doc="requests per minute; null: unlimited")
    tpm: int | None = key(None, minimum=1,
                          doc="tokens per minute (prompt + completion); null: unlimited")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-model stream timeouts. Their errors: FIRST_TOKEN_TIMEOUT (retryable, before any token),
    STREAM_TIMEOUT (idle gap) and DEADLINE_EXCEEDED (whole stream), each ending the stream on
    every hop and cancelling the provider call."""

    first_token: Duration = key(60.0, doc="longest wait for the first token after the request "
                                          "was sent to the provider; at most `total`")
    idle: Duration = key(30.0, doc="longest gap between two tokens")
    total: Duration = key(300.0, doc="longest whole stream")


@dataclass(frozen=True, slots=True)
class StreamShaping:
    """Chunk shaping (`services/llm_engine/shaping.py`), done once in the engine so every hop
    carries fewer, larger frames. The first text is never held; after it, text is held at most
    `coalesce_ms`, sent earlier once `min_chars` are held, cut after the last `boundary`; the
    terminal frame flushes what is held. A request may override each field (`stream_options`
    over HTTP, `stream_shape` over gRPC)."""

    coalesce_ms: int = key(DEFAULT_COALESCE_MS, minimum=0, maximum=MAX_COALESCE_MS,
                           doc="longest hold after the first text, in ms; 0: shaping off")
    min_chars: int = key(0, minimum=0, maximum=MAX_MIN_CHARS,
                         doc="send early once this many characters are held; 0: never early")
    boundary: Boundary = key("none", doc="where an early frame is cut: `none`, `word` (after "
                                         "whitespace) or `line` (after a newline)")


@dataclass(frozen=True, slots=True)
class SimulatedSettings:
    """Knobs of the built-in simulated provider, for local use, load tests and fault drills: the
    fault knobs make staging drills of mid-stream errors and idle timeouts possible."""

    ttft_ms: float = key(150.0, minimum=0, doc="time to the first token, in milliseconds")
    tokens_per_second: float = key(40.0, minimum=0, doc="stream pace; 0: no pacing")
    reply: str | None = key(None, doc="text to stream; null: a built-in paragraph")
    fail_after_tokens: int | None = key(
        None, minimum=0,
        doc="after this many tokens the provider fails (UPSTREAM_ERROR); 0: before the first")
    stall_after_tokens: int | None = key(
        None, minimum=0, doc="after this many tokens the provider goes silent (idle-timeout drill)")


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """The circuit breaker of each deployment of the model's pool (docs/provider-pools.md),
    shared by every engine replica through Redis. A deployment that fails `failures` times
    within `window` (connect errors, 5xx, 429, first-token and idle timeouts) is ejected for
    `cooldown`, doubled on each repeat ejection up to `max_cooldown`; then a single live request
    probes it, and its first token brings the deployment back. While the healthy share of the
    pool is below `panic_threshold`, and always when no deployment is healthy, every deployment
    is used."""

    failures: int = key(5, minimum=1, doc="failures within `window` that eject a deployment")
    window: Duration = key(30.0, doc="how far back failures are counted")
    cooldown: Duration = key(10.0, doc="the first ejection's length; doubled on each repeat")
    max_cooldown: Duration = key(300.0, doc="the longest ejection; a deployment healthy this "
                                            "long after a recovery starts again at `cooldown`")
    panic_threshold: float = key(0.0, minimum=0, maximum=1,
                                 doc="healthy share of the pool below which every deployment "
                                     "is used; 0: only when none is healthy")


@dataclass(frozen=True, slots=True)
class Price:
    """What the model costs, in USD per million tokens, as exact decimals (at most 6 decimal
    places: one token then costs a whole number of pico-dollars). Each stream's cost is computed
    from its real usage and reported in `done` (docs/costs.md); a model without a price costs 0."""

    input_per_mtok: PricePerMtok = key(Decimal(0), doc="prompt tokens")
    output_per_mtok: PricePerMtok = key(Decimal(0), doc="completion tokens")
    cached_input_per_mtok: PricePerMtok | None = key(
        None, doc="prompt tokens the provider served from its prompt cache (OpenAI's "
                  "`cached_tokens`); null: `input_per_mtok`")


@dataclass(frozen=True, slots=True)
class DeploymentConfig:
    """One deployment of a model's pool: an endpoint serving the model, with its own key,
    weight and limits. A key left null takes the model's (`base_url`, `api_key_env`,
    `upstream_model`, `proxy`); a `simulated` mapping is laid over the model's, key by key. A
    model without `deployments` is a pool of one, named after the model, made of its own keys."""

    name: Name = key(doc="unique within the model; named in `start`, `done`, logs and metrics")
    base_url: HttpUrl | None = key(None, doc="the OpenAI-compatible endpoint (openai only); "
                                             "null: the model's")
    api_key: str | None = field(default=None, repr=False)
    """Resolved from `api_key_env` (this deployment's, else the model's) at load; never logged."""
    api_key_env: str | None = key(None, doc="env variable holding this deployment's provider "
                                            "key, read at start; null: the model's")
    upstream_model: str | None = key(None, doc="model name sent to this deployment; null: the "
                                               "model's `upstream_model`, else its `name`")
    proxy: ProxyUrl | None = key(None, repr=False,
                                 doc='HTTP(S) proxy for `base_url`; null: the model\'s; "": none. '
                                     "Never logged")
    weight: float = key(1.0, minimum=0, doc="share of the traffic under `routing: weighted`, "
                                            "and of the load under `least_busy`; above 0")
    max_concurrency: int | None = key(None, minimum=1,
                                      doc="most streams at once on each engine replica; null: "
                                          "no limit")
    rpm: int | None = key(None, minimum=1, doc="the provider's requests-per-minute limit, over "
                                               "every replica (Redis); null: none")
    tpm: int | None = key(None, minimum=1, doc="the provider's tokens-per-minute limit, over "
                                               "every replica, counted from usage; null: none")
    simulated: SimulatedSettings | None = key(
        None, doc="this deployment's knobs (provider `simulated`), over the model's")

    @property
    def limited(self) -> bool:
        """It has a limit to keep (the pool then checks room before each call)."""
        return bool(self.max_concurrency or self.rpm or self.tpm)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The model's exact response cache (docs/cache.md), in Redis, per tenant: a reply is stored
    under the model, the messages sent to it (after the managed prompt, history and context fit)
    and every generation parameter, and replayed to the same tenant's identical request within
    `ttl`, with no provider call and no TPM charge (a hit counts against the tenant's QPM). Only
    a reply that ended with `stop` or `length` and passed output moderation is stored; a replay
    passes output moderation again. `Cache-Control: no-cache` skips the lookup."""

    ttl: DurationOrZero = key(doc="how long a stored reply is replayed; 0: the cache is off")
    max_bytes: int = key(65536, minimum=1, doc="largest entry stored (the reply's UTF-8 text and "
                                               "its accounting); a larger reply is not stored")
    hit_cost_fraction: float = key(0.0, minimum=0, maximum=1,
                                   doc="what a hit costs, as a share of the stored reply's price")

    @property
    def enabled(self) -> bool:
        return self.ttl > 0


@dataclass(frozen=True, slots=True)
class ResumeConfig:
    """Resumable streams (docs/resume.md): each SSE stream's frames are journaled in Redis for
    `ttl`, so a client that lost its connection resumes with `GET /v1/chat/stream/{id}` and
    `Last-Event-ID`. A dropped connection keeps the generation going for `grace` for a
    reconnecting reader; then it is cancelled down to the provider. An explicit Stop
    (`POST /v1/chat/stream/{id}/cancel`) always cancels at once."""

    ttl: DurationOrZero = key(300.0, maximum=86400,
                              doc="how long a stream's journal is kept after its last frame; "
                                  "0: no journal (resume answers 404)")
    grace: DurationOrZero = key(0.0, maximum=3600,
                                doc="how long a stream whose reader dropped goes on without "
                                    "one; 0: a dropped connection cancels at once")


@dataclass(frozen=True, slots=True)
class ResumeOverride:
    """`resume` for the streams of one model or tenant: each key given replaces the top-level
    `resume` one (a tenant's over a model's)."""

    ttl: DurationOrZero | None = key(None, maximum=86400, doc="`resume.ttl`; null: inherited")
    grace: DurationOrZero | None = key(None, maximum=3600,
                                       doc="`resume.grace`; null: inherited")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One routable model. `provider: simulated` is built in; `provider: openai` is any
    OpenAI-compatible server (OpenAI, vLLM, Ollama, ...) at `base_url`, with the key read at start
    from the environment variable `api_key_env`, or at each of its `deployments`, a pool balanced
    by `routing` with a breaker per deployment (docs/provider-pools.md). Retries and `fallback`
    models are tried only before the first token reached the client, never mid-stream."""

    name: Name = key(doc="the name clients send as `model`")
    provider: Provider = key(doc="`simulated` (built in) or `openai` (OpenAI-compatible)")
    timeouts: Timeouts = section(Timeouts)
    quotas: Quotas = section(Quotas, "this model's quotas, shared by all tenants")
    price: Price = section(Price)
    simulated: SimulatedSettings = section(SimulatedSettings)
    base_url: HttpUrl | None = key(None, doc="the OpenAI-compatible endpoint (openai only)")
    api_key: str | None = field(default=None, repr=False)
    """Resolved from `api_key_env` at load time; never logged."""
    api_key_env: str | None = key(None, doc="env variable holding the provider key, read at start")
    upstream_model: str | None = key(None, doc="model name sent to the provider; null: `name`")
    proxy: ProxyUrl | None = key(
        None, repr=False,
        doc="HTTP(S) proxy for `base_url`; null: `https_proxy`/`http_proxy`/`all_proxy` and "
            '`no_proxy` (either case) as read at start; "": none. May hold credentials: never '
            "logged")
    fallback: tuple[str, ...] = key((), doc="models tried in order, only before the first token")
    context_window: int = key(8192, minimum=16, doc="context size in tokens (prompt + reply)")
    default_max_tokens: int = key(1024, name="max_tokens", minimum=1,
                                  doc="`max_tokens` of requests that send none")
    stream: StreamShaping = section(StreamShaping)
    deployments: tuple[DeploymentConfig, ...] = key(
        (), doc="the model's pool (docs/provider-pools.md); empty: a pool of one, named after "
                "the model, made of the keys above")
    routing: Routing = key("weighted", doc="how a request picks a deployment: `weighted` (by "
                                           "`weight`), `least_busy` (fewest streams in flight on "
                                           "this replica, per weight) or `lowest_latency` "
                                           "(lowest decaying average of first-token time)")
    health: HealthConfig = section(HealthConfig)
    cache: CacheConfig | None = key(None, doc="the exact response cache (docs/cache.md); null: "
                                              "off")
    resume: ResumeOverride = section(ResumeOverride, "this model's streams' `resume` settings")

    @property
    def pool(self) -> tuple[DeploymentConfig, ...]:
        """The deployments (resolved at load); without any, the one the model's keys make."""
        return self.deployments or (DeploymentConfig(
            name=self.name, base_url=self.base_url, api_key=self.api_key,
            api_key_env=self.api_key_env, upstream_model=self.upstream_model, proxy=self.proxy,
            simulated=self.simulated if self.provider == "simulated" else None),)


@dataclass(frozen=True, slots=True)
class Budget:
    """A spending budget for a calendar period in UTC (docs/costs.md). Admission reserves each
    request's worst case (prompt + `max_tokens` at the model's price) atomically with the quotas,
    in Redis; the end of the stream reconciles it to the real cost. A request that does not fit
    is BUDGET_EXCEEDED (HTTP 429, `Retry-After` = the period's reset). A change applies to
    streams that start after a reload."""

    usd: BudgetUsd = key(doc="the budget for one period, in USD")
    period: Period = key("month", doc="`day`, `week` (from Monday) or `month`, in UTC")
    alerts: tuple[Share, ...] = key(
        (0.5, 0.8, 1.0), doc="shares of `usd` whose crossing raises one credit alert per period "
                             "(a log line, a metric, the webhook of `alerts`); ascending, > 0")


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """A tenant: who may call, with which keys and quotas. Keys are compared as sha256 digests in
    constant time and never logged; a ConfigMap should hold only digests
    (`printf %s "$KEY" | sha256sum`)."""

    name: Name = key(doc="tenant name")
    key_digests: tuple[ApiKey, ...] = key(
        name="api_keys", min_items=1, empty="at least one API key is required", repr=False,
        doc="plain keys or `sha256:<64 hex>` digests (plain keys are hashed at load); a key "
            "belongs to one tenant only")
    quotas: Quotas = section(Quotas, "this tenant's quotas")
    admin: bool = key(False, doc="may create prompt versions and move labels (any key of a "
                                 "tenant may read its prompts and conversations)")
    models: tuple[str, ...] | None = key(
        None, doc="models this tenant may use (others: PERMISSION_DENIED); null: all")
    budget: Budget | None = key(None, doc="the tenant's spending budget; null: none")
    key_budget: Budget | None = key(None, doc="a budget each API key of the tenant has of its "
                                              "own; null: none")
    user_budget: Budget | None = key(None, doc="a budget each end user (the request's `user`) "
                                               "has of its own; null: none")
    resume: ResumeOverride = section(ResumeOverride, "this tenant's streams' `resume` settings")

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class ModerationConfig:
    """Input and output moderation. Blocked terms match as case-folded substrings of the input
    (MODERATION_BLOCKED before any provider call) and of the reply (MODERATION_BLOCKED
    mid-stream, the provider call cancelled; a tail as long as the longest term is held back so
    no part of a blocked term reaches the client). Injection patterns are searched, ignoring
    case, in the input only."""

    blocked_terms: tuple[str, ...] = key((), doc="terms that block a request or a reply")
    injection_patterns: tuple[Regex, ...] = key(
        (), doc="prompt-injection regexes that block a request")


@dataclass(frozen=True, slots=True)
class Listen:
    """Bind addresses (host:port) of the three servers and of the services' Prometheus
    endpoints (the edge serves its `/metrics` on `edge_http`). Changing one needs a restart."""

    edge_http: Address = key("127.0.0.1:8080", env="PROMPTLINE_EDGE_HTTP_ADDR",
                             doc="the HTTP/SSE edge")
    prompt: Address = key("127.0.0.1:50051", env="PROMPTLINE_PROMPT_ADDR",
                          doc="the prompt service (gRPC)")
    llm_engine: Address = key("127.0.0.1:50052", env="PROMPTLINE_LLM_ENGINE_ADDR",
                              doc="the LLM engine (gRPC)")
    prompt_metrics: Address = key("127.0.0.1:9151", doc="the prompt service's `/metrics`")
    llm_engine_metrics: Address = key("127.0.0.1:9152", doc="the LLM engine's `/metrics`")


@dataclass(frozen=True, slots=True)
class Targets:
    """Where each hop dials the next; absent: the `listen` addresses (one machine). A
    `dns:///host:port` target resolves every address behind the name (a Kubernetes headless
    Service), an `ipv4:ip:port,ip:port` target names the replicas; calls are spread over them
    round-robin, and one that is down gets none. Servers ask clients to reconnect every 5 minutes
    so new replicas get traffic. Changing one needs a restart."""

    prompt: Target = key(default_from="listen.prompt", env="PROMPTLINE_PROMPT_TARGET",
                         doc="where the edge dials the prompt service")
    llm_engine: Target = key(default_from="listen.llm_engine",
                             env="PROMPTLINE_LLM_ENGINE_TARGET",
                             doc="where the prompt service dials the LLM engine")


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    """HTTP edge. Response headers are held until the prompt service admitted the request or the
    first token arrived (at most `header_hold`), so an early error is a real HTTP status; after
    that, errors travel as SSE `error` events."""

    max_body_bytes: int = key(1 << 20, minimum=1024, doc="larger request bodies get 413")
    header_hold: Duration = key(3.0, doc="longest wait for the start frame before headers are "
                                         "sent anyway")
    heartbeat: Duration = key(15.0, doc="an SSE comment is sent after this much silence, so "
                                        "proxies keep the connection open")
    request_timeout: Duration = key(600.0, doc="cap on a whole HTTP request; becomes the gRPC "
                                               "deadline (each hop passes on the rest)")


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """LLM-engine retries of a retryable provider error before the first token (never after):
    exponential backoff with full jitter, at least the provider's retry-after, within the
    request's deadline. Then the `fallback` models, each with the same retries."""

    max_attempts: int = key(2, minimum=1, doc="attempts per model, the first one included")
    backoff_base: Duration = key(0.2, doc="the first backoff's upper bound; doubles per attempt")
    backoff_max: Duration = key(2.0, doc="longest backoff; a longer retry-after is not waited for")


RedisMode = Annotated[str, Choice.of("standalone", "cluster", "sentinel")]


@dataclass(frozen=True, slots=True)
class SentinelConfig:
    """Redis Sentinel (`redis_mode: sentinel`): the master is found through the sentinels, and
    found again after a failover without a restart. The master's password, database and TLS
    come from `redis_url` (`rediss://:password@host/0?ssl_ca_certs=...`; the host there is not
    used)."""

    master: str = key("mymaster", env="PROMPTLINE_REDIS_SENTINEL_MASTER",
                      doc="the name the sentinels monitor the master under")
    nodes: tuple[Address, ...] = key((), env="PROMPTLINE_REDIS_SENTINEL_NODES",
                                     doc="the sentinels, `host:port` (env: comma-separated)")
    password: str | None = key(
        None, env="PROMPTLINE_REDIS_SENTINEL_PASSWORD", repr=False,
        doc="the sentinels' own password (their `requirepass`), if they have one; the data "
            "nodes' is in `redis_url`. Never logged")
    tls: bool = key(False, doc="reach the sentinels over TLS, with `redis_url`'s `ssl_*` "
                               "query arguments (CA, client certificate)")


@dataclass(frozen=True, slots=True)
class QuotaPolicy:
    """What quotas do when Redis is slow or down. Every quota round trip is bounded by
    `redis_timeout`. `fail_closed` rejects the request with UNAVAILABLE (retryable): no quota is
    ever overrun. `fail_open` admits it unchecked, with a warning log and a metric: Redis
    trouble does not become an outage, at the price of unenforced quotas meanwhile. `local`
    (degraded mode) has each prompt-service replica enforce limit / `replicas` in its own memory
    with the same window until Redis answers again: one warning per outage,
    `promptline_quota_degraded` = 1 meanwhile."""

    on_redis_error: Annotated[str, Choice.of("fail_closed", "fail_open", "local")] = key(
        "fail_closed", doc="what admission does when a quota check fails")
    redis_timeout: Duration = key(0.25, doc="longest wait for one quota round trip to Redis")
    replicas: int = key(1, minimum=1, doc="prompt-service replicas sharing the budgets: with "
                                          "`local`, each enforces limit / replicas")

    @property
    def fail_open(self) -> bool:
        return self.on_redis_error == "fail_open"


@dataclass(frozen=True, slots=True)
class PromptsConfig:
    """The prompt registry: versioned templates with labels, stored in Redis."""

    max_template_bytes: int = key(65536, minimum=1, maximum=1 << 20,
                                  doc="largest template a version may hold (UTF-8 bytes)")


@dataclass(frozen=True, slots=True)
class ConversationsConfig:
    """Conversation memory in Redis, per tenant: the history a request with a
    `conversation_id` continues."""

    ttl: Duration = key(7 * 86400.0, minimum=1,
                        doc="a conversation expires this long after its last exchange")
    max_messages: int = key(200, minimum=2, doc="most messages kept per conversation; older ones "
                                                "are dropped on append")


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    """Credit alerts (docs/costs.md): each budget threshold crossed raises one alert per period
    over every replica (deduplicated in Redis): a log line, `promptline_budget_alerts_total`, and
    with `webhook_url` a POST of a JSON event signed with HMAC-SHA256 of the body
    (`X-Promptline-Signature: sha256=<hex>`), sent from a bounded queue off the request path,
    retried with backoff; failures count in `promptline_alert_webhook_failures_total`."""

    webhook_url: HttpUrl | None = key(None, repr=False,
                                      doc="where each alert is POSTed; null: none. Never logged")
    webhook_secret_env: str | None = key(None, doc="env variable holding the signing secret, "
                                                   "read at start; required with `webhook_url`")
    webhook_secret: str | None = field(default=None, repr=False)
    """Resolved from `webhook_secret_env` at load; never logged."""
    webhook_timeout: Duration = key(5.0, maximum=60, doc="longest wait for one delivery attempt")
    webhook_attempts: int = key(5, minimum=1, maximum=20,
                                doc="attempts per alert, the first included")
    webhook_backoff: Duration = key(1.0, maximum=60, doc="wait before the first retry; doubles "
                                                         "on each retry, up to 1 minute")


@dataclass(frozen=True, slots=True)
class UsageConfig:
    """Usage records behind `GET /v1/usage` (docs/costs.md): per tenant and UTC hour, requests,
    errors, tokens and cost by model, API key and end user, written with each stream's
    settlement."""

    retention: Duration = key(90 * 86400.0, minimum=3600, maximum=400 * 86400,
                              doc="how long an hour's usage is kept, and the longest range a "
                                  "query may ask for")


@dataclass(frozen=True, slots=True)
class FeedbackConfig:
    """Request records, feedback and per-prompt stats (docs/prompt-lifecycle.md): each stream
    leaves a compact record per tenant, which `POST /v1/feedback` joins by request id; streams
    of a managed prompt also add to its hourly stats per version."""

    retention: Duration = key(30 * 86400.0, minimum=3600, maximum=400 * 86400,
                              doc="how long a request's record and a prompt's hourly stats are "
                                  "kept: feedback is taken this long after a request ended, and "
                                  "a stats query may span this long")


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One rule of a route: it holds when all its conditions do. A rule without conditions is
    the route's default: the last rule, and only the last, has none."""

    model: Name = key(doc="the model, or another route, this rule picks")
    max_prompt_tokens: int | None = key(
        None, minimum=1, doc="holds for prompts of at most this many tokens (the whole assembled "
                             "prompt, history included, before any is trimmed); null: any size")
    tenants: tuple[Name, ...] | None = key(
        None, min_items=1, empty="list at least one tenant, or leave the key out",
        doc="holds for these tenants only; null: every tenant")

    @property
    def is_default(self) -> bool:
        return self.max_prompt_tokens is None and self.tenants is None


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """A virtual model (docs/routes.md): a name a request (or a prompt version's default) sends
    as `model`, which the prompt service resolves per request, before anything model-specific,
    to a configured model: the first of `rules` that holds picks a model or another route. A
    tenant's `models` may list a route; that grants whatever the route picks. Changes apply to
    streams that start after a reload."""

    name: Name = key(doc="the name clients send as `model`; not a model's name")
    rules: tuple[RouteRule, ...] = key(
        min_items=1, empty="a route needs at least one rule",
        doc="tried in order; the first that holds decides")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration of one deployment."""

    tenants: tuple[TenantConfig, ...] = key(min_items=1, doc="who may call")
    models: tuple[ModelConfig, ...] = key(min_items=1, doc="what they may call")
    routes: tuple[RouteConfig, ...] = key(
        (), doc="virtual model names, each resolved per request to a model")
    redis_url: RedisUrl | None = key(
        None, env="PROMPTLINE_REDIS_URL", repr=False,  # it may hold the password
        doc="`redis://`, `rediss://` or `unix://`; required by the prompt service (null: `make "
            "run` starts a local Redis and passes it in), except with sentinel. Cluster: any one "
            "node. A password goes in it (`redis://:pass@host:6379/0`, percent-encoded), TLS "
            "settings as query arguments (`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, "
            "`ssl_cert_reqs`, `ssl_check_hostname`), in every mode. Needs a restart")
    redis_mode: RedisMode = key("standalone", env="PROMPTLINE_REDIS_MODE",
                                doc="`standalone`, `cluster` (nodes discovered from `redis_url`) "
                                    "or `sentinel` (`redis_sentinel`)")
    redis_sentinel: SentinelConfig = section(SentinelConfig)
    listen: Listen = section(Listen)
    targets: Targets | None = key(None, doc="where each hop dials the next")
    edge: EdgeConfig = section(EdgeConfig)
    retries: RetryConfig = section(RetryConfig)
    moderation: ModerationConfig = section(ModerationConfig)
    quota_policy: QuotaPolicy = section(QuotaPolicy)
    prompts: PromptsConfig = section(PromptsConfig)
    conversations: ConversationsConfig = section(ConversationsConfig)
    resume: ResumeConfig = section(ResumeConfig)
    alerts: AlertsConfig = section(AlertsConfig)
    usage: UsageConfig = section(UsageConfig)
    feedback: FeedbackConfig = section(FeedbackConfig)
    shutdown_grace: Duration = key(30.0, doc="on SIGTERM, how long open streams may finish")
    log_level: Annotated[str, Choice.of("DEBUG", "INFO", "WARNING", "ERROR", fold_case=True)] = (
        key("INFO", doc="log level of every service (any case)"))
    source: str = "<memory>"
    """Where the config was read from (not a key of the file)."""

    def model(self, name: str) -> ModelConfig | None:
        for model in self.models:
            if model.name == name:
                return model
        return None

    def model_label(self, name: str) -> str:
        """`name` as a metric label: a configured model's or route's name as it is, anything
        else `UNKNOWN_MODEL`, so made-up names in requests cannot add series without bound."""
        if not name or self.model(name) is not None or any(r.name == name for r in self.routes):
            return name
        return UNKNOWN_MODEL

    def resume_for(self, model: ModelConfig, tenant: TenantConfig) -> ResumeConfig:
        """The `resume` settings of a stream: the tenant's keys over the model's over the
        top-level ones."""
        ttl, grace = self.resume.ttl, self.resume.grace
        for override in (model.resume, tenant.resume):
            ttl = ttl if override.ttl is None else override.ttl
            grace = grace if override.grace is None else override.grace
        return ResumeConfig(ttl, grace)

    def idle_timeout(self, name: str) -> float:
        """The idle timeout a request naming `name` (a model or a route) may meet: a route's is
        the longest of the models it can pick; an unknown name gets the default."""
        model = self.model(name)
        if model is not None:
            return model.timeouts.idle
        route = next((r for r in self.routes if r.name == name), None)
        if route is None:
            return Timeouts().idle
        seen = {name}
        todo = [rule.model for rule in route.rules]
        longest = 0.0
        while todo:
            target = todo.pop()
            if target in seen:
                continue
            seen.add(target)
            if (found := self.model(target)) is not None:
                longest = max(longest, found.timeouts.idle)
            else:
                todo += [rule.model for r in self.routes if r.name == target for rule in r.rules]
        return longest or Timeouts().idle

    @property
    def prompt_target(self) -> str:
        return self.targets.prompt if self.targets else self.listen.prompt

    @property
    def llm_engine_target(self) -> str:
        return self.targets.llm_engine if self.targets else self.listen.llm_engine


UNKNOWN_MODEL = "(unknown)"
"""The metric label of a model name the config does not know (`Config.model_label`)."""

# Env variable -> the key it overrides, from the declarations' `env`.
ENV_OVERRIDES = env_overrides(Config)
ENV_LISTS = env_list_overrides(Config)
"""The overrides of list keys: their value is comma-separated."""


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """Load and validate the config: `path`, else $PROMPTLINE_CONFIG, else the local default."""
    env = os.environ if env is None else env
    chosen = Path(path or env.get(ENV_CONFIG_PATH) or DEFAULT_CONFIG_PATH)
    try:
        text = chosen.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{chosen}: cannot read config file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{chosen}: config file is not valid UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{chosen}: invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{chosen}: invalid YAML: nested too deeply") from None
    return parse_config(raw if raw is not None else {}, env=env, source=str(chosen))


def parse_config(raw: Any, env: Mapping[str, str] | None = None,
                 source: str = "<memory>") -> Config:
    """Validate an already-parsed mapping (what tests and `load_config` use)."""
    env = os.environ if env is None else env
    config = read_keys(Config, _with_inherited_knobs(_with_env_overrides(raw, env)))
    _check_rules(config)
    return replace(config, models=tuple(_with_environment(m, env) for m in config.models),
                   # a blank term would block every text
                   moderation=replace(config.moderation, blocked_terms=tuple(
                       t for t in config.moderation.blocked_terms if t.strip())),
                   alerts=replace(config.alerts, webhook_secret=env.get(
                       config.alerts.webhook_secret_env or "") or None),
                   source=source)


def _check_rules(config: Config) -> None:
    """The rules that involve more than one key."""
    if config.redis_mode == "sentinel" and not config.redis_sentinel.nodes:
        raise ConfigError("redis_sentinel.nodes: redis_mode sentinel needs at least one sentinel")
    if config.redis_mode == "cluster" and config.redis_url and config.redis_url.startswith(
            "unix://"):
        raise ConfigError("redis_url: a cluster is reached over TCP (redis:// or rediss://)")
    _unique([t.name for t in config.tenants], "tenants", "tenant name")
    _unique([m.name for m in config.models], "models", "model name")
    names = {m.name for m in config.models}
    _check_routes(config, names)
    routes = {r.name for r in config.routes}
    owners: dict[bytes, str] = {}
    for i, tenant in enumerate(config.tenants):
        for digest in tenant.key_digests:  # plain or sha256: the same key would be the last's
            if owners.setdefault(digest, tenant.name) != tenant.name:
                raise ConfigError(f"tenants[{i}].api_keys: a key of tenant {tenant.name!r} is "
                                  f"also a key of tenant {owners[digest]!r}; each key names "
                                  "one tenant")
        for j, allowed in enumerate(tenant.models or ()):
            if allowed not in names and allowed not in routes:
                raise ConfigError(f"tenants[{i}].models[{j}]: unknown model or route {allowed!r}")
        for name in ("budget", "key_budget", "user_budget"):
            _check_alerts(getattr(tenant, name), f"tenants[{i}].{name}.alerts")
    if config.alerts.webhook_url and not config.alerts.webhook_secret_env:
        raise ConfigError("alerts.webhook_secret_env: required with alerts.webhook_url (every "
                          "webhook is signed)")
    for i, model in enumerate(config.models):
        path = f"models[{i}]"
        for j, fb in enumerate(model.fallback):
            if fb not in names:
                raise ConfigError(f"{path}.fallback[{j}]: unknown model {fb!r}")
            if fb == model.name:
                raise ConfigError(f"{path}.fallback[{j}]: a model cannot fall back to itself")
        if model.provider == "openai":
            if not model.base_url and not model.deployments:
                raise ConfigError(f"{path}.base_url: an openai model needs an http(s) base_url")
        elif model.base_url or model.api_key_env or model.proxy is not None:
            raise ConfigError(f"{path}: base_url/api_key_env/proxy apply only to provider "
                              "'openai'")
        if model.timeouts.first_token > model.timeouts.total:
            raise ConfigError(f"{path}.timeouts.first_token: must not exceed timeouts.total")
        _check_pool(model, path)


def _check_alerts(budget: Budget | None, path: str) -> None:
    """Alert thresholds are shares above 0, each higher than the one before."""
    if budget is None:
        return
    for j, share in enumerate(budget.alerts):
        if share <= 0:
            raise ConfigError(f"{path}[{j}]: must be greater than 0, got {share:g}")
        if j and share <= budget.alerts[j - 1]:
            raise ConfigError(f"{path}[{j}]: must be greater than the one before "
                              f"({budget.alerts[j - 1]:g}), got {share:g}")


def _check_routes(config: Config, models: set[str]) -> None:
    """A route is a new name; its rules name known models, routes and tenants; it ends with its
    one default rule (so every request finds a model); no route leads back to itself."""
    _unique([r.name for r in config.routes], "routes", "route name")
    routes = {r.name for r in config.routes}
    tenants = {t.name for t in config.tenants}
    for i, route in enumerate(config.routes):
        path = f"routes[{i}]"
        if route.name in models:
            raise ConfigError(f"{path}.name: clashes with model {route.name!r}")
        last = len(route.rules) - 1
        for j, rule in enumerate(route.rules):
            where = f"{path}.rules[{j}]"
            if rule.model not in models and rule.model not in routes:
                raise ConfigError(f"{where}.model: unknown model or route {rule.model!r}")
            for k, tenant in enumerate(rule.tenants or ()):
                if tenant not in tenants:
                    raise ConfigError(f"{where}.tenants[{k}]: unknown tenant {tenant!r}")
            if rule.is_default and j < last:
                raise ConfigError(f"{path}.rules[{j + 1}]: never used: rules[{j}] has no "
                                  "condition, so it holds for every request")
        if not route.rules[last].is_default:
            raise ConfigError(f"{path}.rules[{last}]: the last rule must have no condition (the "
                              "route's default), so that every request finds a model")
    if cycle := _route_cycle(config.routes):
        (i, j), names = cycle
        raise ConfigError(f"routes[{i}].rules[{j}].model: cycle {' -> '.join(names)}")


def _route_cycle(routes: tuple[RouteConfig, ...]
                 ) -> tuple[tuple[int, int], list[str]] | None:
    """The first cycle of routes naming routes, in file order: the key of its first step
    (route index, rule index) and the names along it (`[a, b, a]`); None without one."""
    index = {r.name: i for i, r in enumerate(routes)}
    cleared: set[str] = set()  # leads to models only
    trail: list[tuple[str, int]] = []  # (route, rule taken) from the start of the walk

    def walk(name: str) -> tuple[tuple[int, int], list[str]] | None:
        names = [n for n, _ in trail]
        if name in names:
            at = names.index(name)
            return (index[name], trail[at][1]), [*names[at:], name]
        if name in cleared or name not in index:
            return None
        for j, rule in enumerate(routes[index[name]].rules):
            trail.append((name, j))
            found = walk(rule.model)
            trail.pop()
            if found:
                return found
        cleared.add(name)
        return None

    for route in routes:
        if found := walk(route.name):
            return found
    return None


def _check_pool(model: ModelConfig, path: str) -> None:
    """A model's deployments: unique names, weights above 0, keys that fit its provider."""
    seen: set[str] = set()
    for j, deployment in enumerate(model.deployments):
        where = f"{path}.deployments[{j}]"
        if deployment.name in seen:
            raise ConfigError(f"{where}.name: duplicate deployment name {deployment.name!r}")
        seen.add(deployment.name)
        if deployment.weight <= 0:
            raise ConfigError(f"{where}.weight: must be greater than 0, got {deployment.weight:g}")
        if model.provider == "openai":
            if not (deployment.base_url or model.base_url):
                raise ConfigError(f"{where}.base_url: an openai deployment needs an http(s) "
                                  "base_url (its own or the model's)")
            if deployment.simulated is not None:
                raise ConfigError(f"{where}.simulated: applies only to provider 'simulated'")
        elif (deployment.base_url or deployment.api_key_env
              or deployment.proxy is not None):
            raise ConfigError(f"{where}: base_url/api_key_env/proxy apply only to provider "
                              "'openai'")
    if model.health.cooldown > model.health.max_cooldown:
        raise ConfigError(f"{path}.health.max_cooldown: must be at least health.cooldown")


def _with_environment(model: ModelConfig, env: Mapping[str, str]) -> ModelConfig:
    """The provider key from `api_key_env`, and the proxy from the standard variables unless the
    file names one ("" for none): both read once, at load (per request it measured ~0.9 ms).
    The same for each deployment, after it took the model's keys where it has none."""
    proxy = model.proxy
    if proxy is None and model.base_url:
        proxy = env_proxy(model.base_url, env)
    api_key = env.get(model.api_key_env) if model.api_key_env else None
    deployments = tuple(_deployment_with_environment(model, d, env) for d in model.deployments)
    return replace(model, api_key=api_key or None, proxy=proxy or None, deployments=deployments)


def _deployment_with_environment(model: ModelConfig, deployment: DeploymentConfig,
                                 env: Mapping[str, str]) -> DeploymentConfig:
    """`deployment` with the model's keys where it has none, its key and proxy read (`model`
    as read from the file: a null proxy there still means the standard variables)."""
    base_url = deployment.base_url or model.base_url
    key_env = deployment.api_key_env or model.api_key_env
    proxy = deployment.proxy if deployment.proxy is not None else model.proxy
    if proxy is None and base_url:
        proxy = env_proxy(base_url, env)
    simulated = None
    if model.provider == "simulated":
        simulated = deployment.simulated or model.simulated
    return replace(deployment, base_url=base_url, api_key_env=key_env,
                   api_key=(env.get(key_env) if key_env else None) or None, proxy=proxy or None,
                   upstream_model=deployment.upstream_model or model.upstream_model,
                   simulated=simulated)


def _with_inherited_knobs(raw: Any) -> Any:
    """`raw` with each deployment's `simulated` mapping laid over its model's, key by key (a
    null there keeps the model's value); the caller's mappings stay untouched. Anything not
    shaped as expected is left for the key reader to report."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("models"), list | tuple):
        return raw
    models: list[Any] = []
    for model in raw["models"]:
        base = model.get("simulated") if isinstance(model, Mapping) else None
        pool = model.get("deployments") if isinstance(model, Mapping) else None
        if isinstance(base, Mapping) and isinstance(pool, list | tuple):
            model = {**model, "deployments": [
                {**d, "simulated": {**base, **{k: v for k, v in d["simulated"].items()
                                               if v is not None}}}
                if isinstance(d, Mapping) and isinstance(d.get("simulated"), Mapping) else d
                for d in pool]}
        models.append(model)
    return {**raw, "models": models}


def _with_env_overrides(raw: Any, env: Mapping[str, str]) -> Any:
    """`raw` with the ENV_OVERRIDES that are set applied; the caller's mappings stay untouched."""
    overrides = [(var, dotted, env[var]) for var, dotted in ENV_OVERRIDES.items() if env.get(var)]
    if not overrides or not isinstance(raw, Mapping):
        return raw
    root = dict(raw)
    for var, dotted, value in overrides:
        node = root
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if child is not None and not isinstance(child, Mapping):
                raise ConfigError(f"{part}: must be a mapping (needed for ${var})")
            node[part] = node = dict(child or {})
        node[leaf] = ([part.strip() for part in value.split(",") if part.strip()]
                      if var in ENV_LISTS else value)
    return root


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`), as validated by the loader -> (host, port) for binding."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def env_proxy(url: str, env: Mapping[str, str]) -> str | None:
    """The proxy the standard variables give for `url` (`<scheme>_proxy`, then `all_proxy`,
    either case), or None when there is none or `no_proxy` names its host."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    for entry in (e.strip().lower().lstrip(".") for e in no_proxy.split(",")):
        if entry and (entry == "*" or host == entry or host.endswith("." + entry)):
            return None
    for name in (f"{parts.scheme}_proxy", "all_proxy"):
        if value := env.get(name) or env.get(name.upper()):
            return value
    return None


def _unique(names: list[str], path: str, what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"{path}: duplicate {what} {name!r}")
        seen.add(name)
