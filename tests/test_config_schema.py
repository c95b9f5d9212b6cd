"""What is derived from the config key declarations: the JSON Schema, docs/configuration.md and
the `promptline config` verbs; the schema and the loader agree on shipped and broken files."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from promptline.cli import main
from promptline.config import ENV_OVERRIDES, Config, ConfigError, load_config, parse_config
from promptline.config_docs import DOCS_PATH, config_schema, render_docs
from promptline.config_keys import (
    AnyKind,
    List,
    Nullable,
    Section,
    declared,
    format_duration,
    parse_duration,
)
from tests.test_config import BASE, _with

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted([*ROOT.glob("config/*.yaml"), *ROOT.glob("k8s/**/promptline.yaml")])


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_committed_docs_match_the_declarations():
    assert DOCS_PATH.read_text(encoding="utf-8") == render_docs(), (
        "docs/configuration.md is stale: run `promptline config docs > docs/configuration.md`")


def test_docs_name_every_key():
    docs = render_docs()
    for path in _key_paths(Config, ""):
        assert f"| `{path}` |" in docs, path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_pass_schema_and_loader(validator, path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert list(validator.iter_errors(raw)) == []
    load_config(path, env={})


@pytest.mark.parametrize(("dotted", "value"), [
    ("edge", {"heartbeat": True}),
    ("edge", {"heartbeat": "15 seconds"}),
    ("edge", {"max_body_bytes": "1MiB"}),
    ("edge", {"max_body_bytes": 100}),
    ("tenants.0.quotas", {"qpm": "lots"}),
    ("tenants.0.quota", {"qpm": 5}),
    ("tenants.0.api_keys", []),
    ("tenants.0.admin", "yes"),
    ("models.0.provider", "llama"),
    ("models.0.timeouts", {"idle": "30x"}),
    ("models.0.simulated", {"ttft_ms": -1}),
    ("listen", {"prompt": "nowhere"}),
    ("targets", {"prompt": "dns:///no-port"}),
    ("redis_url", "localhost:6379"),
    ("quota_policy", {"on_redis_error": "shrug"}),
    ("prompts", {"max_template_bytes": 2 << 20}),
    ("log_level", "LOUD"),
    ("moderation", {"blocked_terms": "forbidden-word"}),
])
def test_wrong_values_are_rejected_by_schema_and_loader(validator, dotted, value):
    raw = _with(dotted, value)
    assert list(validator.iter_errors(raw)), f"the schema accepts {dotted}={value!r}"
    with pytest.raises(ConfigError):
        parse_config(raw, env={})


@pytest.mark.parametrize("raw", [
    {"tenants": BASE["tenants"]},
    {"models": BASE["models"]},
    {**BASE, "models": [{"name": "sim"}]},
    {**BASE, "tenants": [{"name": "dev"}]},
])
def test_missing_required_keys_are_rejected_by_schema_and_loader(validator, raw):
    assert [e.validator for e in validator.iter_errors(raw)] == ["required"]
    with pytest.raises(ConfigError, match="required"):
        parse_config(raw, env={})


def test_null_takes_the_default_in_schema_and_loader(validator):
    raw = {**BASE, "edge": {"heartbeat": None}, "shutdown_grace": None,
           "models": [{"name": "sim", "provider": "simulated", "simulated": None,
                       "timeouts": None}]}
    assert list(validator.iter_errors(raw)) == []
    config = parse_config(raw, env={})
    assert config.edge.heartbeat == 15 and config.shutdown_grace == 30
    assert config.models[0].timeouts.total == 300 and config.models[0].simulated.ttft_ms == 150


def test_schema_carries_docs_and_file_form_defaults():
    schema = config_schema()
    idle = schema["$defs"]["Timeouts"]["properties"]["idle"]
    assert idle["default"] == "30s" and idle["description"]
    policy = schema["$defs"]["QuotaPolicy"]["properties"]["on_redis_error"]
    assert policy["default"] == "fail_closed"
    assert schema["required"] == ["tenants", "models"]


def test_env_overrides_come_from_the_declarations():
    assert ENV_OVERRIDES == {
        "PROMPTLINE_REDIS_URL": "redis_url",
        "PROMPTLINE_REDIS_MODE": "redis_mode",
        "PROMPTLINE_REDIS_SENTINEL_MASTER": "redis_sentinel.master",
        "PROMPTLINE_REDIS_SENTINEL_NODES": "redis_sentinel.nodes",
        "PROMPTLINE_REDIS_SENTINEL_PASSWORD": "redis_sentinel.password",
        "PROMPTLINE_EDGE_HTTP_ADDR": "listen.edge_http",
        "PROMPTLINE_PROMPT_ADDR": "listen.prompt",
        "PROMPTLINE_LLM_ENGINE_ADDR": "listen.llm_engine",
        "PROMPTLINE_PROMPT_TARGET": "targets.prompt",
        "PROMPTLINE_LLM_ENGINE_TARGET": "targets.llm_engine",
    }


def test_a_list_override_is_comma_separated():
    config = parse_config({**BASE, "redis_mode": "sentinel"}, env={
        "PROMPTLINE_REDIS_SENTINEL_NODES": "127.0.0.1:26379, 127.0.0.1:26380,"})
    assert config.redis_sentinel.nodes == ("127.0.0.1:26379", "127.0.0.1:26380")


def test_sentinel_mode_needs_sentinels():
    with pytest.raises(ConfigError, match=r"redis_sentinel\.nodes"):
        parse_config({**BASE, "redis_mode": "sentinel"}, env={})


def test_env_override_leaves_the_callers_mapping_alone():
    raw = {**BASE, "listen": {"prompt": "127.0.0.1:7001"}}
    before = copy.deepcopy(raw)
    config = parse_config(raw, env={"PROMPTLINE_EDGE_HTTP_ADDR": "127.0.0.1:7000"})
    assert config.listen.edge_http == "127.0.0.1:7000" and config.listen.prompt == "127.0.0.1:7001"
    assert raw == before


def test_targets_default_to_the_listen_addresses():
    config = parse_config({**BASE, "listen": {"llm_engine": "127.0.0.1:7002"},
                           "targets": {"prompt": "prompt.svc:50051"}}, env={})
    assert config.prompt_target == "prompt.svc:50051"
    assert config.llm_engine_target == "127.0.0.1:7002"


@pytest.mark.parametrize("seconds", [0.15, 0.25, 1.5, 3, 30, 60, 300, 600, 3600, 7 * 86400])
def test_formatted_durations_read_back(seconds):
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def test_every_section_and_key_is_documented():
    for cls in _sections(Config):
        assert cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("), cls
        for k in declared(cls):
            assert k.spec.doc, f"{cls.__name__}.{k.attr}"


def test_cli_prints_schema_and_docs_without_a_key():
    out = io.StringIO()
    assert main(["config", "schema"], env={}, stdout=out) == 0
    assert json.loads(out.getvalue()) == config_schema()
    out = io.StringIO()
    assert main(["config", "docs"], env={}, stdout=out) == 0
    assert out.getvalue() == render_docs()




def _unwrap(kind: AnyKind) -> tuple[AnyKind, bool]:
    """The kind inside `| None` and lists, and whether a list was on the way."""
    listed = False
    while isinstance(kind, Nullable | List):
        listed = listed or isinstance(kind, List)
        kind = kind.inner if isinstance(kind, Nullable) else kind.item
    return kind, listed


def _sections(cls: type) -> list[type]:
    found = [cls]
    for k in declared(cls):
        kind, _ = _unwrap(k.kind)
        if isinstance(kind, Section):
            found += _sections(kind.cls)
    return found


def _key_paths(cls: type, prefix: str) -> list[str]:
    paths = []
    for k in declared(cls):
        kind, listed = _unwrap(k.kind)
        if isinstance(kind, Section):
            paths += _key_paths(kind.cls, f"{prefix}{k.name}{'[]' if listed else ''}.")
        else:
            paths.append(f"{prefix}{k.name}")
    return paths
