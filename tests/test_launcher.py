"""`make run`'s launcher: the "try:" hint follows the loaded config and prints no secret."""

from __future__ import annotations

from promptline.launcher import try_hint
from tests.conftest import make_config


def test_hint_names_an_existing_model_and_the_tenant_not_its_key() -> None:
    config = make_config({
        "tenants": [{"name": "locked", "api_keys": ["locked-secret"], "models": []},
                    {"name": "team", "api_keys": ["team-secret-key"], "models": ["fast"]}],
    }, models=[{"name": "fast", "provider": "simulated"}])
    hint = try_hint(config, "http://127.0.0.1:9")
    assert "tenant 'team'" in hint and '"model": "fast"' in hint
    assert "http://127.0.0.1:9/v1/chat/stream" in hint
    assert "secret" not in hint and "dev-key" not in hint and '"sim"' not in hint


def test_no_hint_when_no_tenant_may_use_a_model() -> None:
    config = make_config({"tenants": [{"name": "t", "api_keys": ["k-123"], "models": []}]})
    assert try_hint(config, "http://x") == ""
