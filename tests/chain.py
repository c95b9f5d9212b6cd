"""Start the real chain in-process on ephemeral ports: llm_engine <- prompt <- edge_http."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import REGISTRY

from promptline.channels import insecure_channel
from promptline.config import Config, Targets
from promptline.v1 import llm_engine_pb2_grpc, prompt_pb2_grpc
from services.llm_engine.server import EngineServer, start_engine
from services.prompt.server import PromptServer, start_prompt


@dataclass
class Chain:
    """Handles to a running chain and stubs for its gRPC hops."""

    config: Config
    engine: EngineServer
    prompt: PromptServer
    edge: Any | None
    prompt_channel: grpc.aio.Channel
    engine_channel: grpc.aio.Channel

    @property
    def prompt_stub(self) -> prompt_pb2_grpc.PromptServiceStub:
        return prompt_pb2_grpc.PromptServiceStub(self.prompt_channel)

    @property
    def engine_stub(self) -> llm_engine_pb2_grpc.LlmEngineStub:
        return llm_engine_pb2_grpc.LlmEngineStub(self.engine_channel)

    @property
    def engine_streams(self) -> float:
        """Generate streams in flight (the engine's `promptline_active_streams` gauge)."""
        return REGISTRY.get_sample_value("promptline_active_streams",
                                         {"service": "llm_engine"}) or 0

    @property
    def edge_streams(self) -> float:
        """HTTP streams in flight at the edge."""
        return REGISTRY.get_sample_value("promptline_active_streams",
                                         {"service": "edge_http"}) or 0

    @property
    def base_url(self) -> str:
        assert self.edge is not None, "started without the edge"
        return f"http://127.0.0.1:{self.edge.port}"


@asynccontextmanager
async def running_chain(config: Config, *, with_edge: bool = True,
                        scheme: str = "") -> AsyncIterator[Chain]:
    """`scheme="dns:///"` makes each hop dial the next the way Kubernetes configs do."""
    engine = await start_engine(config, "127.0.0.1:0")
    engine_target = f"{scheme}127.0.0.1:{engine.port}"
    prompt = edge = None
    try:
        prompt_config = dataclasses.replace(
            config, targets=Targets(prompt="127.0.0.1:1", llm_engine=engine_target))
        prompt = await start_prompt(prompt_config, "127.0.0.1:0")
        prompt_target = f"{scheme}127.0.0.1:{prompt.port}"
        full = dataclasses.replace(
            config, targets=Targets(prompt=prompt_target, llm_engine=engine_target))
        if with_edge:
            from services.edge_http.app import start_edge

            edge = await start_edge(full, "127.0.0.1", 0)
        async with insecure_channel(prompt_target) as pch, insecure_channel(engine_target) as ech:
            yield Chain(full, engine, prompt, edge, pch, ech)
    finally:
        if edge is not None:
            await edge.stop()
        if prompt is not None:
            await prompt.stop(0.5)
        await engine.stop(0.5)


def chain_fixture(overrides: dict[str, Any] | None = None,
                  models: list[dict[str, Any]] | None = None) -> Any:
    """A test module's `chain` fixture: the whole chain, once per module, on
    `make_config(overrides, models=models)` and the session's Redis (`chain = chain_fixture(...)`
    at module level)."""
    import pytest

    from tests.conftest import make_config

    @pytest.fixture(scope="module")
    async def chain(redis_server: Any) -> AsyncIterator[Chain]:
        config = make_config(overrides, redis_url=redis_server.url, models=models)
        async with running_chain(config) as running:
            yield running

    return chain
