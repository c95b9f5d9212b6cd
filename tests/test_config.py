"""Config loading: every documented key, durations, env overrides and bad files."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest

from promptline.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    key_digest,
    load_config,
    parse_config,
    parse_duration,
)

FULL = """
redis_url: redis://127.0.0.1:6390/2
listen: {edge_http: 0.0.0.0:9080, prompt: 0.0.0.0:9051, llm_engine: 0.0.0.0:9052}
targets: {prompt: prompt.svc:50051, llm_engine: engine.svc:50052}
tenants:
  - name: dev
    api_keys: [dev-key, "sha256:%s"]
    admin: true
    models: [sim, gpt-4o-mini]
    quotas: {qpm: 600, tpm: 200000}
models:
  - name: sim
    provider: simulated
    simulated:
      ttft_ms: 150
      tokens_per_second: 40
      reply: "text to stream"
      fail_after_tokens: 7
      stall_after_tokens: null
    quotas: {qpm: 6000, tpm: 2000000}
    timeouts: {first_token: 60s, idle: 30s, total: 5m}
    context_window: 4096
    max_tokens: 512
  - name: gpt-4o-mini
    provider: openai
    base_url: https://example.invalid/v1
    api_key_env: OPENAI_API_KEY
    upstream_model: gpt-4o-mini-2024-07-18
    fallback: [gpt-4o]
  - name: gpt-4o
    provider: openai
    base_url: https://example.invalid/v1
moderation:
  blocked_terms: [forbidden-word]
  injection_patterns: ["(?i)ignore previous instructions"]
edge: {max_body_bytes: 65536, header_hold: 2s, heartbeat: 10s, request_timeout: 15m}
retries: {max_attempts: 3, backoff_base: 100ms, backoff_max: 1s}
prompts: {max_template_bytes: 32768}
conversations: {ttl: 7d, max_messages: 100}
shutdown_grace: 45s
log_level: debug
""" % ("ab" * 32)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "promptline.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_every_documented_key(tmp_path):
    config = load_config(write(tmp_path, FULL), env={"OPENAI_API_KEY": "sk-secret"})
    assert config.redis_url == "redis://127.0.0.1:6390/2"
    assert config.listen.edge_http == "0.0.0.0:9080"
    assert config.prompt_target == "prompt.svc:50051"
    assert config.llm_engine_target == "engine.svc:50052"
    dev = config.tenants[0]
    assert dev.name == "dev" and dev.admin and dev.quotas.qpm == 600 and dev.quotas.tpm == 200000
    assert dev.key_digests == (key_digest("dev-key"), bytes.fromhex("ab" * 32))
    assert dev.may_use("sim") and not dev.may_use("gpt-4o")
    sim = config.model("sim")
    assert sim is not None
    assert sim.simulated.ttft_ms == 150 and sim.simulated.tokens_per_second == 40
    assert sim.simulated.reply == "text to stream" and sim.simulated.fail_after_tokens == 7
    assert sim.simulated.stall_after_tokens is None
    assert (sim.timeouts.first_token, sim.timeouts.idle, sim.timeouts.total) == (60, 30, 300)
    assert sim.quotas.tpm == 2_000_000 and sim.context_window == 4096
    assert sim.default_max_tokens == 512
    gpt = config.model("gpt-4o-mini")
    assert gpt is not None and gpt.api_key == "sk-secret" and gpt.fallback == ("gpt-4o",)
    assert gpt.upstream_model == "gpt-4o-mini-2024-07-18"
    assert "sk-secret" not in repr(gpt)  # keys never reach logs through repr
    assert config.moderation.blocked_terms == ("forbidden-word",)
    assert config.edge.header_hold == 2 and config.edge.request_timeout == 900
    assert config.edge.max_body_bytes == 65536 and config.edge.heartbeat == 10
    assert config.retries.max_attempts == 3 and config.retries.backoff_base == pytest.approx(0.1)
    assert config.shutdown_grace == 45 and config.log_level == "DEBUG"
    assert config.prompts.max_template_bytes == 32768
    assert config.conversations.ttl == 7 * 86400 and config.conversations.max_messages == 100


def test_shipped_local_config_has_dev_tenant_and_sim_model():
    config = load_config(env={})
    assert config.source == str(DEFAULT_CONFIG_PATH)
    assert key_digest("dev-key") in config.tenants[0].key_digests
    assert config.model("sim") is not None and config.redis_url is None
    assert config.listen.edge_http == "127.0.0.1:8080"
    assert config.listen.prompt == "127.0.0.1:50051"
    assert config.listen.llm_engine == "127.0.0.1:50052"


def test_env_selects_file_and_overrides(tmp_path):
    path = write(tmp_path, FULL)
    config = load_config(env={"PROMPTLINE_CONFIG": str(path),
                              "PROMPTLINE_REDIS_URL": "redis://10.0.0.1:6379/0",
                              "PROMPTLINE_EDGE_HTTP_ADDR": "127.0.0.1:0"})
    assert config.source == str(path)
    assert config.redis_url == "redis://10.0.0.1:6379/0"
    assert config.listen.edge_http == "127.0.0.1:0"


@pytest.mark.parametrize(("value", "seconds"), [
    ("150ms", 0.15), ("30s", 30), ("5m", 300), ("1h", 3600), ("1.5s", 1.5), (2, 2), (0.25, 0.25),
    ("7d", 7 * 86400),
])
def test_durations(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["30x", "", "fast", "-1s", "0s", True, "5 minutes"])
def test_bad_durations(value):
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(value, "models[0].timeouts.idle")


BASE = {"tenants": [{"name": "dev", "api_keys": ["dev-key"]}],
        "models": [{"name": "sim", "provider": "simulated"}]}


def _with(path: str, value: object) -> dict:
    raw = copy.deepcopy(BASE)
    node: object = raw
    *parents, leaf = path.split(".")
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]  # type: ignore[index]
    node[leaf] = value  # type: ignore[index]
    return raw


@pytest.mark.parametrize(("raw", "message"), [
    (_with("models.0.timeouts", {"idle": "30x"}), r"models\[0\]\.timeouts\.idle: invalid duration"),
    (_with("models.0.provider", "llama"),
     r"models\[0\]\.provider: must be 'simulated' or 'openai'"),
    (_with("tenants.0.api_keys", []), r"tenants\[0\]\.api_keys: at least one API key"),
    (_with("tenants.0.quotas", {"qpm": "lots"}), r"tenants\[0\]\.quotas\.qpm: must be a whole"),
    (_with("tenants.0.quota", {"qpm": 5}), r"tenants\[0\]\.quota: unknown key"),
    (_with("conversations", {"ttl": "7x"}), r"conversations\.ttl: invalid duration"),
    (_with("conversations", {"ttl": "500ms"}), r"conversations\.ttl: must be at least 1s"),
    (_with("conversations", {"max_messages": 1}),
     r"conversations\.max_messages: must be at least 2"),
    (_with("conversations", {"max_turns": 5}), r"conversations\.max_turns: unknown key"),
    (_with("prompts", {"max_template_bytes": 0}),
     r"prompts\.max_template_bytes: must be at least 1"),
    (_with("prompts", {"max_template_bytes": 2 << 20}),
     r"prompts\.max_template_bytes: must be at most 1048576"),
    (_with("models.0.fallback", ["gpt-9"]), r"models\[0\]\.fallback\[0\]: unknown model 'gpt-9'"),
    (_with("redis_url", "localhost:6379"), r"redis_url: must start with redis://"),
    (_with("tenants.0.models", ["gpt-9"]), r"tenants\[0\]\.models\[0\]: unknown model"),
    ({"tenants": [], "models": BASE["models"]}, r"tenants: must not be empty"),
    ({"tenants": BASE["tenants"]}, r"models: required"),
    (_with("models.0.timeouts", {"first_token": "10m", "total": "5m"}),
     r"models\[0\]\.timeouts\.first_token: must not exceed"),
    (_with("listen", {"prompt": "nowhere"}), r"listen\.prompt: must be host:port"),
    (_with("moderation", {"injection_patterns": ["(unclosed"]}),
     r"moderation\.injection_patterns\[0\]: invalid regex"),
    ({**BASE, "tenants": BASE["tenants"] * 2}, r"tenants: duplicate tenant name 'dev'"),
    (_with("models.0.base_url", "http://x"),
     r"models\[0\]: base_url/api_key_env/proxy apply only"),
    (_with("models.0.proxy", "http://proxy:3128"), r"models\[0\]: base_url/api_key_env/proxy"),
    ({**BASE, "models": [{"name": "o", "provider": "openai", "base_url": "https://x/v1",
                          "proxy": "proxy:3128"}]}, r"models\[0\]\.proxy: must be an http"),
    ({**BASE, "models": [{"name": "o", "provider": "openai"}]},
     r"models\[0\]\.base_url: an openai"),
    (_with("edge", {"request_timeout": float("inf")}),
     r"edge\.request_timeout: duration must be at most 365d"),  # was: every request a 504
    (_with("edge", {"heartbeat": float("nan")}), r"edge\.heartbeat: duration must be at most"),
    (_with("edge", {"request_timeout": "400d"}), r"edge\.request_timeout: duration must be at"),
    (_with("conversations", {"ttl": 10**400}), r"conversations\.ttl: duration must be at most"),
    ({**BASE, "models": [{"name": "o", "provider": "openai", "deployments": [
        {"name": "a", "base_url": "http://x/v1", "weight": 10**400}]}]},
     r"models\[0\]\.deployments\[0\]\.weight: must be a finite number"),
    ({**BASE, "tenants": [*BASE["tenants"], {"name": "copy", "api_keys": [
        "sha256:" + hashlib.sha256(b"dev-key").hexdigest()]}]},
     r"tenants\[1\]\.api_keys: a key of tenant 'copy' is also a key of tenant 'dev'"),
])
def test_bad_configs_name_key_and_reason(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, env={})


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", env={})
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "tenants: [unclosed\n"), env={})
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"tenants: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="config: must be a mapping"):
        load_config(write(tmp_path, "- just\n- a list\n"), env={})


def test_bad_config_stops_service_start_with_message(tmp_path):
    import subprocess
    import sys

    path = write(tmp_path, "tenants: []\nmodels: []\n")
    proc = subprocess.run([sys.executable, "-m", "services.llm_engine"], capture_output=True,
                          text=True, timeout=60, env={"PROMPTLINE_CONFIG": str(path),
                                                      "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "config error" in proc.stderr and "tenants: must not be empty" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("service", "key"), [("llm_engine", "llm_engine"),
                                                ("edge_http", "edge_http")])
def test_a_taken_port_stops_service_start_with_the_address(tmp_path, service, key):
    import socket
    import subprocess
    import sys

    import yaml

    with socket.socket() as held:  # SO_REUSEPORT: a server that set it too would share the port
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        address = f"127.0.0.1:{held.getsockname()[1]}"
        raw = {**BASE, "listen": {key: address, "llm_engine_metrics": "127.0.0.1:0"}}
        path = write(tmp_path, yaml.safe_dump(raw))
        proc = subprocess.run([sys.executable, "-m", f"services.{service}"], capture_output=True,
                              text=True, timeout=60, env={"PROMPTLINE_CONFIG": str(path),
                                                          "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1, proc.stderr
    assert "cannot start" in proc.stderr and address.rpartition(":")[2] in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dns_targets_accepted_and_checked():
    raw = {**BASE, "targets": {"prompt": "dns:///prompt-headless:50051",
                               "llm_engine": "engine:50052"}}
    config = parse_config(raw, env={})
    assert config.prompt_target == "dns:///prompt-headless:50051"
    with pytest.raises(ConfigError, match=r"targets\.prompt: must be host:port"):
        parse_config({**BASE, "targets": {"prompt": "dns:///no-port"}}, env={})


def _openai_model(env: dict[str, str], base_url: str = "https://api.example.com/v1",
                  **extra: object):
    raw = {**BASE, "models": [{"name": "o", "provider": "openai", "base_url": base_url,
                               **extra}]}
    return parse_config(raw, env=env).models[0]


@pytest.mark.parametrize(("env", "base_url", "expected"), [
    ({}, "https://api.example.com/v1", None),
    ({"HTTPS_PROXY": "http://corp:3128"}, "https://api.example.com/v1", "http://corp:3128"),
    ({"https_proxy": "http://lower:3128"}, "https://api.example.com/v1", "http://lower:3128"),
    ({"HTTPS_PROXY": "http://corp:3128"}, "http://vllm.local:8000/v1", None),
    ({"HTTP_PROXY": "http://plain:3128"}, "http://vllm.local:8000/v1", "http://plain:3128"),
    ({"ALL_PROXY": "http://any:3128"}, "http://vllm.local:8000/v1", "http://any:3128"),
    ({"HTTPS_PROXY": "http://corp:3128", "NO_PROXY": "localhost,.example.com"},
     "https://api.example.com/v1", None),
    ({"HTTPS_PROXY": "http://corp:3128", "no_proxy": "example.com"},
     "https://api.example.com/v1", None),
    ({"HTTPS_PROXY": "http://corp:3128", "NO_PROXY": "ample.com"},
     "https://api.example.com/v1", "http://corp:3128"),
    ({"HTTPS_PROXY": "http://corp:3128", "NO_PROXY": "*"}, "https://api.example.com/v1", None),
])
def test_model_proxy_from_the_standard_variables(env, base_url, expected):
    assert _openai_model(env, base_url).proxy == expected


def test_model_proxy_key_wins_and_empty_means_none():
    env = {"HTTPS_PROXY": "http://corp:3128"}
    assert _openai_model(env, proxy="http://u:secret@mine:8080").proxy == \
        "http://u:secret@mine:8080"
    assert _openai_model(env, proxy="").proxy is None
    assert "secret" not in repr(_openai_model(env, proxy="http://u:secret@mine:8080"))


@pytest.mark.parametrize(("raw", "where"), [
    ({**BASE, "models": [{"name": "o", "provider": "openai", "base_url": "https://x/v1",
                          "proxy": "socks5://alice:S3cretPw@proxy:1080"}]}, "models[0].proxy"),
    (_with("redis_url", "redis//:S3cretPw@10.0.0.5:6379/0"), "redis_url"),
    (_with("alerts", {"webhook_url": "hooks.example/T0/B0/S3cretPw",
                      "webhook_secret_env": "S"}), "alerts.webhook_url"),
])
def test_a_malformed_url_is_named_but_never_echoed(raw, where):
    """Proxy, Redis and webhook URLs carry passwords and tokens: the error (logged on a reload,
    printed at start) names the key and the rule, not the value."""
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env={})
    assert str(info.value).startswith(f"{where}: must ") and "S3cretPw" not in str(info.value)
    assert "not shown" in str(info.value)
