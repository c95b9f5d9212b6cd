"""Typed, validated configuration: loaded once from YAML, overridable by a few env variables.

Every error names the key path and the reason (`models[0].timeouts.idle: ...`), so a bad file
stops start-up with a message an SRE can act on. Unknown keys are errors too: a typo in a quota
must not silently leave the default in force.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "local.yaml"

# Env variables that override the file; the loader takes an injectable mapping for tests.
ENV_CONFIG_PATH = "PROMPTLINE_CONFIG"
ENV_OVERRIDES = {
    "PROMPTLINE_REDIS_URL": "redis_url",
    "PROMPTLINE_EDGE_HTTP_ADDR": "listen.edge_http",
    "PROMPTLINE_PROMPT_ADDR": "listen.prompt",
    "PROMPTLINE_LLM_ENGINE_ADDR": "listen.llm_engine",
    "PROMPTLINE_PROMPT_TARGET": "targets.prompt",
    "PROMPTLINE_LLM_ENGINE_TARGET": "targets.llm_engine",
}


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key and the reason."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any, path: str = "duration") -> float:
    """`150ms`, `30s`, `5m`, `1h`, `7d` (or a bare number of seconds) -> seconds as float."""
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected a duration like 150ms, 30s or 5m, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ConfigError(
                f"{path}: invalid duration {value!r} "
                "(use a number with ms, s, m, h or d: 150ms, 30s, 5m, 7d)"
            )
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ConfigError(f"{path}: duration must be positive, got {value!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class Quotas:
    """Requests per minute and tokens per minute; None means unlimited."""

    qpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-model stream timeouts, in seconds."""

    first_token: float = 60.0
    """Longest wait for the first token after the request was sent to the provider."""
    idle: float = 30.0
    """Longest gap between two tokens."""
    total: float = 300.0
    """Longest whole stream."""


@dataclass(frozen=True, slots=True)
class SimulatedSettings:
    """Knobs of the built-in simulated provider (local use, load tests, fault drills)."""

    ttft_ms: float = 150.0
    tokens_per_second: float = 40.0
    reply: str | None = None
    """Text to stream; None streams a built-in paragraph."""
    fail_after_tokens: int | None = None
    """After this many tokens the provider fails mid-stream (UPSTREAM_ERROR)."""
    stall_after_tokens: int | None = None
    """After this many tokens the provider goes silent (idle-timeout drill)."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One routable model."""

    name: str
    provider: str
    """"simulated" or "openai" (any OpenAI-compatible server)."""
    timeouts: Timeouts = field(default_factory=Timeouts)
    quotas: Quotas = field(default_factory=Quotas)
    simulated: SimulatedSettings = field(default_factory=SimulatedSettings)
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    """Resolved from `api_key_env` at load time; never logged."""
    api_key_env: str | None = None
    upstream_model: str | None = None
    """Model name sent to the provider; defaults to `name`."""
    proxy: str | None = field(default=None, repr=False)
    """HTTP(S) proxy for `base_url`: `proxy`, else the standard *_PROXY/NO_PROXY variables,
    resolved once at load (per request it measured ~0.9 ms). May carry credentials: not logged."""
    fallback: tuple[str, ...] = ()
    """Models tried in order, only before the first token."""
    context_window: int = 8192
    default_max_tokens: int = 1024


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """A tenant and the sha256 digests of its API keys (plain keys are hashed at load)."""

    name: str
    key_digests: tuple[bytes, ...] = field(repr=False)
    quotas: Quotas = field(default_factory=Quotas)
    admin: bool = False
    models: tuple[str, ...] | None = None
    """Models this tenant may use; None means all (others get PERMISSION_DENIED)."""

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class ModerationConfig:
    """Input/output moderation by blocked terms and prompt-injection patterns."""

    blocked_terms: tuple[str, ...] = ()
    injection_patterns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Listen:
    """Bind addresses (host:port) of the three servers."""

    edge_http: str = "127.0.0.1:8080"
    prompt: str = "127.0.0.1:50051"
    llm_engine: str = "127.0.0.1:50052"
    prompt_metrics: str = "127.0.0.1:9151"
    """Prometheus `/metrics` of the prompt service (the edge serves its own on edge_http)."""
    llm_engine_metrics: str = "127.0.0.1:9152"


@dataclass(frozen=True, slots=True)
class Targets:
    """Where each hop dials the next (`host:port` or `dns:///host:port`); defaults to the
    `listen` addresses (single machine)."""

    prompt: str
    llm_engine: str


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    """HTTP edge settings."""

    max_body_bytes: int = 1 << 20
    header_hold: float = 3.0
    """Longest time response headers are held waiting for the start frame."""
    heartbeat: float = 15.0
    """Idle interval after which an SSE comment is sent to keep proxies from closing."""
    request_timeout: float = 600.0
    """Cap on a whole HTTP request; becomes the gRPC deadline (each hop passes on the rest)."""


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """Engine retries before the first token: exponential backoff with full jitter."""

    max_attempts: int = 2
    backoff_base: float = 0.2
    backoff_max: float = 2.0


@dataclass(frozen=True, slots=True)
class QuotaPolicy:
    """How quotas behave when Redis is slow or down."""

    fail_open: bool = False
    """True: admit requests unchecked (with a warning and a metric); False: reject UNAVAILABLE."""
    redis_timeout: float = 0.25
    """Longest wait for one quota round trip to Redis."""


@dataclass(frozen=True, slots=True)
class PromptsConfig:
    """Limits of the prompt registry."""

    max_template_bytes: int = 65536
    """Largest template a version may hold (UTF-8 bytes)."""


@dataclass(frozen=True, slots=True)
class ConversationsConfig:
    """Conversation memory in Redis."""

    ttl: float = 7 * 86400.0
    """A conversation expires this long after its last append (seconds)."""
    max_messages: int = 200
    """Most messages kept per conversation; older ones are dropped from Redis on append."""


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration of one deployment."""

    tenants: tuple[TenantConfig, ...]
    models: tuple[ModelConfig, ...]
    redis_url: str | None = None
    listen: Listen = field(default_factory=Listen)
    targets: Targets | None = None
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    retries: RetryConfig = field(default_factory=RetryConfig)
    moderation: ModerationConfig = field(default_factory=ModerationConfig)
    quota_policy: QuotaPolicy = field(default_factory=QuotaPolicy)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    conversations: ConversationsConfig = field(default_factory=ConversationsConfig)
    shutdown_grace: float = 30.0
    log_level: str = "INFO"
    source: str = "<memory>"

    def model(self, name: str) -> ModelConfig | None:
        for model in self.models:
            if model.name == name:
                return model
        return None

    @property
    def prompt_target(self) -> str:
        return self.targets.prompt if self.targets else self.listen.prompt

    @property
    def llm_engine_target(self) -> str:
        return self.targets.llm_engine if self.targets else self.listen.llm_engine


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
    return parse_config(raw if raw is not None else {}, env=env, source=str(chosen))


def parse_config(raw: Any, env: Mapping[str, str] | None = None,
                 source: str = "<memory>") -> Config:
    """Validate an already-parsed mapping (what tests and `load_config` use)."""
    env = os.environ if env is None else env
    root = _mapping(raw, "config")
    _apply_env_overrides(root, env)
    _known(root, "", {"redis_url", "listen", "targets", "tenants", "models", "moderation", "edge",
                      "retries", "quota_policy", "prompts", "conversations", "shutdown_grace",
                      "log_level"})

    tenants = tuple(_tenant(t, f"tenants[{i}]") for i, t in
                    enumerate(_list(root.get("tenants"), "tenants", required=True)))
    _unique([t.name for t in tenants], "tenants", "tenant name")
    models = tuple(_model(m, f"models[{i}]", env) for i, m in
                   enumerate(_list(root.get("models"), "models", required=True)))
    _unique([m.name for m in models], "models", "model name")
    names = {m.name for m in models}
    for i, tenant in enumerate(tenants):
        for j, allowed in enumerate(tenant.models or ()):
            if allowed not in names:
                raise ConfigError(f"tenants[{i}].models[{j}]: unknown model {allowed!r}")
    for i, model in enumerate(models):
        for j, fb in enumerate(model.fallback):
            if fb not in names:
                raise ConfigError(f"models[{i}].fallback[{j}]: unknown model {fb!r}")
            if fb == model.name:
                raise ConfigError(f"models[{i}].fallback[{j}]: a model cannot fall back to itself")

    redis_url = _opt_str(root.get("redis_url"), "redis_url")
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("redis_url: must start with redis://, rediss:// or unix://")

    listen_raw = _mapping(root.get("listen", {}), "listen")
    _known(listen_raw, "listen", {"edge_http", "prompt", "llm_engine", "prompt_metrics",
                                  "llm_engine_metrics"})
    listen = Listen(**{k: _address(v, f"listen.{k}") for k, v in listen_raw.items()})
    targets = None
    if "targets" in root:
        targets_raw = _mapping(root["targets"], "targets")
        _known(targets_raw, "targets", {"prompt", "llm_engine"})
        targets = Targets(
            prompt=_target(targets_raw.get("prompt", listen.prompt), "targets.prompt"),
            llm_engine=_target(targets_raw.get("llm_engine", listen.llm_engine),
                                "targets.llm_engine"),
        )

    edge_raw = _mapping(root.get("edge", {}), "edge")
    _known(edge_raw, "edge", {"max_body_bytes", "header_hold", "heartbeat", "request_timeout"})
    defaults = EdgeConfig()
    edge = EdgeConfig(
        max_body_bytes=_int(edge_raw.get("max_body_bytes", defaults.max_body_bytes),
                            "edge.max_body_bytes", minimum=1024),
        header_hold=_dur(edge_raw.get("header_hold"), "edge.header_hold", defaults.header_hold),
        heartbeat=_dur(edge_raw.get("heartbeat"), "edge.heartbeat", defaults.heartbeat),
        request_timeout=_dur(edge_raw.get("request_timeout"), "edge.request_timeout",
                             defaults.request_timeout),
    )

    retries_raw = _mapping(root.get("retries", {}), "retries")
    _known(retries_raw, "retries", {"max_attempts", "backoff_base", "backoff_max"})
    rdef = RetryConfig()
    retries = RetryConfig(
        max_attempts=_int(retries_raw.get("max_attempts", rdef.max_attempts),
                          "retries.max_attempts", minimum=1),
        backoff_base=_dur(retries_raw.get("backoff_base"), "retries.backoff_base",
                          rdef.backoff_base),
        backoff_max=_dur(retries_raw.get("backoff_max"), "retries.backoff_max", rdef.backoff_max),
    )

    mod_raw = _mapping(root.get("moderation", {}), "moderation")
    _known(mod_raw, "moderation", {"blocked_terms", "injection_patterns"})
    patterns = _str_list(mod_raw.get("injection_patterns"), "moderation.injection_patterns")
    for i, pattern in enumerate(patterns):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"moderation.injection_patterns[{i}]: invalid regex: {exc}") from None
    moderation = ModerationConfig(
        blocked_terms=tuple(t for t in _str_list(mod_raw.get("blocked_terms"),
                                                 "moderation.blocked_terms") if t.strip()),
        injection_patterns=patterns,
    )

    qp_raw = _mapping(root.get("quota_policy", {}), "quota_policy")
    _known(qp_raw, "quota_policy", {"on_redis_error", "redis_timeout"})
    on_error = qp_raw.get("on_redis_error", "fail_closed")
    if on_error not in ("fail_open", "fail_closed"):
        raise ConfigError("quota_policy.on_redis_error: must be fail_open or fail_closed")
    quota_policy = QuotaPolicy(
        fail_open=on_error == "fail_open",
        redis_timeout=_dur(qp_raw.get("redis_timeout"), "quota_policy.redis_timeout", 0.25),
    )

    prompts_raw = _mapping(root.get("prompts", {}), "prompts")
    _known(prompts_raw, "prompts", {"max_template_bytes"})
    prompts = PromptsConfig(max_template_bytes=_int(
        prompts_raw.get("max_template_bytes", PromptsConfig().max_template_bytes),
        "prompts.max_template_bytes", minimum=1))
    if prompts.max_template_bytes > 1 << 20:
        raise ConfigError("prompts.max_template_bytes: must be at most 1048576 (1 MiB), got "
                          f"{prompts.max_template_bytes}")

    conv_raw = _mapping(root.get("conversations", {}), "conversations")
    _known(conv_raw, "conversations", {"ttl", "max_messages"})
    cdef = ConversationsConfig()
    conversations = ConversationsConfig(
        ttl=_dur(conv_raw.get("ttl"), "conversations.ttl", cdef.ttl),
        max_messages=_int(conv_raw.get("max_messages", cdef.max_messages),
                          "conversations.max_messages", minimum=2),
    )
    if conversations.ttl < 1:
        raise ConfigError(f"conversations.ttl: must be at least 1s, got {conv_raw.get('ttl')!r}")

    log_level = str(root.get("log_level", "INFO")).upper()
    if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("log_level: must be one of DEBUG, INFO, WARNING, ERROR")

    return Config(
        tenants=tenants,
        models=models,
        redis_url=redis_url,
        listen=listen,
        targets=targets,
        edge=edge,
        retries=retries,
        moderation=moderation,
        quota_policy=quota_policy,
        prompts=prompts,
        conversations=conversations,
        shutdown_grace=_dur(root.get("shutdown_grace"), "shutdown_grace", 30.0),
        log_level=log_level,
        source=source,
    )


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`), as validated by the loader -> (host, port) for binding."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def key_digest(api_key: str) -> bytes:
    """sha256 of an API key: what configs may store and what auth compares."""
    return hashlib.sha256(api_key.encode("utf-8")).digest()


def _apply_env_overrides(root: dict[str, Any], env: Mapping[str, str]) -> None:
    for var, dotted in ENV_OVERRIDES.items():
        value = env.get(var)
        if not value:
            continue
        node = root
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{part}: must be a mapping (needed for ${var})")
        node[leaf] = value


def _tenant(raw: Any, path: str) -> TenantConfig:
    data = _mapping(raw, path)
    _known(data, path, {"name", "api_keys", "quotas", "admin", "models"})
    name = _name(data.get("name"), f"{path}.name")
    keys = _str_list(data.get("api_keys"), f"{path}.api_keys")
    if not keys:
        raise ConfigError(f"{path}.api_keys: at least one API key is required")
    digests = []
    for i, key in enumerate(keys):
        if key.startswith("sha256:"):
            hexpart = key.removeprefix("sha256:")
            if not re.fullmatch(r"[0-9a-fA-F]{64}", hexpart):
                raise ConfigError(
                    f"{path}.api_keys[{i}]: sha256: must be followed by 64 hex digits")
            digests.append(bytes.fromhex(hexpart))
        elif len(key) < 4:
            raise ConfigError(f"{path}.api_keys[{i}]: an API key needs at least 4 characters")
        else:
            digests.append(key_digest(key))
    admin = data.get("admin", False)
    if not isinstance(admin, bool):
        raise ConfigError(f"{path}.admin: must be true or false")
    models = _str_list(data["models"], f"{path}.models") if "models" in data else None
    return TenantConfig(name=name, key_digests=tuple(digests),
                        quotas=_quotas(data.get("quotas"), f"{path}.quotas"), admin=admin,
                        models=models)


def _model(raw: Any, path: str, env: Mapping[str, str]) -> ModelConfig:
    data = _mapping(raw, path)
    _known(data, path, {"name", "provider", "simulated", "quotas", "timeouts", "base_url",
                        "api_key_env", "upstream_model", "fallback", "context_window",
                        "max_tokens", "proxy"})
    name = _name(data.get("name"), f"{path}.name")
    provider = data.get("provider")
    if provider not in ("simulated", "openai"):
        raise ConfigError(f"{path}.provider: must be 'simulated' or 'openai', got {provider!r}")
    base_url = _opt_str(data.get("base_url"), f"{path}.base_url")
    api_key_env = _opt_str(data.get("api_key_env"), f"{path}.api_key_env")
    if provider == "openai":
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{path}.base_url: an openai model needs an http(s) base_url")
    elif base_url or api_key_env or "proxy" in data:
        raise ConfigError(f"{path}: base_url/api_key_env/proxy apply only to provider 'openai'")
    proxy = _opt_str(data.get("proxy"), f"{path}.proxy")
    if proxy and not proxy.startswith(("http://", "https://")):
        raise ConfigError(f"{path}.proxy: must be an http(s) URL, or \"\" for none")
    if "proxy" not in data and base_url:
        proxy = env_proxy(base_url, env)

    t_raw = _mapping(data.get("timeouts", {}), f"{path}.timeouts")
    _known(t_raw, f"{path}.timeouts", {"first_token", "idle", "total"})
    tdef = Timeouts()
    timeouts = Timeouts(
        first_token=_dur(t_raw.get("first_token"), f"{path}.timeouts.first_token",
                         tdef.first_token),
        idle=_dur(t_raw.get("idle"), f"{path}.timeouts.idle", tdef.idle),
        total=_dur(t_raw.get("total"), f"{path}.timeouts.total", tdef.total),
    )
    if timeouts.first_token > timeouts.total:
        raise ConfigError(f"{path}.timeouts.first_token: must not exceed timeouts.total")

    s_raw = _mapping(data.get("simulated") or {}, f"{path}.simulated")
    _known(s_raw, f"{path}.simulated", {"ttft_ms", "tokens_per_second", "reply",
                                        "fail_after_tokens", "stall_after_tokens"})
    sdef = SimulatedSettings()
    simulated = SimulatedSettings(
        ttft_ms=_number(s_raw.get("ttft_ms", sdef.ttft_ms), f"{path}.simulated.ttft_ms",
                        minimum=0),
        tokens_per_second=_number(s_raw.get("tokens_per_second", sdef.tokens_per_second),
                                  f"{path}.simulated.tokens_per_second", minimum=0),
        reply=_opt_str(s_raw.get("reply"), f"{path}.simulated.reply"),
        fail_after_tokens=_opt_int(s_raw.get("fail_after_tokens"),
                                   f"{path}.simulated.fail_after_tokens"),
        stall_after_tokens=_opt_int(s_raw.get("stall_after_tokens"),
                                    f"{path}.simulated.stall_after_tokens"),
    )

    api_key = None
    if api_key_env:
        api_key = env.get(api_key_env) or None
    return ModelConfig(
        name=name,
        provider=provider,
        timeouts=timeouts,
        quotas=_quotas(data.get("quotas"), f"{path}.quotas"),
        simulated=simulated,
        base_url=base_url,
        api_key=api_key,
        api_key_env=api_key_env,
        upstream_model=_opt_str(data.get("upstream_model"), f"{path}.upstream_model"),
        proxy=proxy or None,
        fallback=_str_list(data.get("fallback"), f"{path}.fallback"),
        context_window=_int(data.get("context_window", 8192), f"{path}.context_window",
                            minimum=16),
        default_max_tokens=_int(data.get("max_tokens", 1024), f"{path}.max_tokens", minimum=1),
    )


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


def _quotas(raw: Any, path: str) -> Quotas:
    data = _mapping(raw or {}, path)
    _known(data, path, {"qpm", "tpm"})
    return Quotas(qpm=_opt_int(data.get("qpm"), f"{path}.qpm", minimum=1),
                  tpm=_opt_int(data.get("tpm"), f"{path}.tpm", minimum=1))


# --- small typed readers: each raises ConfigError naming the path -----------------------------


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: must be a mapping, got {type(value).__name__}")
    return dict(value)


def _known(data: Mapping[str, Any], path: str, allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _list(value: Any, path: str, required: bool = False) -> list[Any]:
    if value is None:
        if required:
            raise ConfigError(f"{path}: required, must be a non-empty list")
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{path}: must be a list, got {type(value).__name__}")
    if required and not value:
        raise ConfigError(f"{path}: must not be empty")
    return value


def _str_list(value: Any, path: str) -> tuple[str, ...]:
    items = _list(value, path)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ConfigError(f"{path}[{i}]: must be a string, got {type(item).__name__}")
    return tuple(items)


def _name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", value):
        raise ConfigError(f"{path}: required; letters, digits and . _ : / - (got {value!r})")
    return value


def _opt_str(value: Any, path: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{path}: must be a string, got {type(value).__name__}")
    return value


def _int(value: Any, path: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: must be a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{path}: must be at least {minimum}, got {value}")
    return value


def _opt_int(value: Any, path: str, minimum: int = 0) -> int | None:
    return None if value is None else _int(value, path, minimum)


def _number(value: Any, path: str, minimum: float = 0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}: must be a number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{path}: must be at least {minimum}, got {value}")
    return float(value)


def _dur(value: Any, path: str, default: float) -> float:
    return default if value is None else parse_duration(value, path)


def _target(value: Any, path: str) -> str:
    """`host:port`, or `dns:///host:port` to resolve every address behind a name (a headless
    Service) and spread calls over them round-robin."""
    if isinstance(value, str) and value.startswith("dns:///"):
        _address(value.removeprefix("dns:///"), path)
        return value
    return _address(value, path)


def _address(value: Any, path: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}", value):
        raise ConfigError(f"{path}: must be host:port, got {value!r}")
    port = int(value.rsplit(":", 1)[1])
    if port > 65535:
        raise ConfigError(f"{path}: port {port} is out of range")
    return value


def _unique(names: list[str], path: str, what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"{path}: duplicate {what} {name!r}")
        seen.add(name)
