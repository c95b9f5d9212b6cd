"""`make run`'s launcher: its "try:" hint follows the loaded config and prints no secret; the
prompt service runs without a configured Redis only through it."""

from __future__ import annotations

import pytest

from promptline.config import ConfigError
from promptline.devtools.launcher import try_hint
from services.prompt.server import start_prompt
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


async def test_the_prompt_service_refuses_to_start_without_redis() -> None:
    # Only `make run` may run without a configured Redis: it starts one and passes it in.
    with pytest.raises(ConfigError, match="redis_url: required by the prompt service"):
        await start_prompt(make_config(), "127.0.0.1:0")
