"""`make run`'s launcher: its "try:" hint follows the loaded config and prints no secret; the
prompt service runs without a configured Redis only through it."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from promptline.config import ConfigError
from promptline.devtools.launcher import try_hint, unusable_listen_addresses
from services.prompt.server import start_prompt
from tests.conftest import BASE_CONFIG, make_config


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


@pytest.fixture
def held_port() -> Iterator[str]:
    """A port something else listens on (as a second `make run` would find its own)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield f"127.0.0.1:{held.getsockname()[1]}"


def test_a_taken_listen_address_is_named_with_its_key_and_variable(held_port: str) -> None:
    config = make_config({"listen": {"edge_http": held_port, "prompt_metrics": held_port,
                                     "llm_engine": "127.0.0.1:0"}})
    taken = unusable_listen_addresses(config)
    assert taken[:2] == [
        f"{held_port} (listen.edge_http, $PROMPTLINE_EDGE_HTTP_ADDR): Address already in use",
        f"{held_port} (listen.prompt_metrics): Address already in use"]
    assert unusable_listen_addresses(make_config({"listen": {
        name: "127.0.0.1:0" for name in ("edge_http", "prompt", "llm_engine", "prompt_metrics",
                                         "llm_engine_metrics")}})) == []


def test_make_run_with_a_taken_port_stops_before_starting_anything(
        held_port: str, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**BASE_CONFIG, "listen": {"edge_http": held_port}}))
    proc = subprocess.run([sys.executable, "-m", "promptline.devtools.launcher"],
                          capture_output=True, text=True, timeout=60,
                          env={"PROMPTLINE_CONFIG": str(path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1, proc.stderr
    assert f"{held_port} (listen.edge_http" in proc.stderr
    assert "another `make run`" in proc.stderr
    assert "Redis" not in proc.stderr and "Traceback" not in proc.stderr  # nothing was started
