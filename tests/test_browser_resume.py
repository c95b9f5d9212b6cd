"""The chat page resumes a reply after a dropped connection, in a real headless Chromium against
the real chain (docs/resume.md). A small TCP proxy between the browser and the edge cuts the
chat stream's socket in the middle of an event; the page must say "reconnecting…", resume with
`Last-Event-ID`, and end with exactly the undisturbed reply. Stop must use the cancel endpoint.

Needs a Chromium binary: the browser and its skip rule are tests/test_browser.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from promptline.devtools.sse_client import SseStream, without_comments
from tests.chain import Chain, running_chain
from tests.conftest import BASE_CONFIG, make_config
from tests.eventually import eventually
from tests.test_browser import TIMEOUT_MS, browser  # noqa: F401 - the fixture; its skip rule

REPLY = ("Every character of this reply must reach the page exactly once, even when the "
         "connection drops in the middle of it.")
TENANTS = [
    *BASE_CONFIG["tenants"],
    # No journal for this tenant's streams: a resume finds nothing (404) and the page gives up.
    {"name": "no-resume", "api_keys": ["no-resume-key"], "resume": {"ttl": 0}},
    # No grace: a dropped connection cancels the model at once (the default config's rule).
    {"name": "no-grace", "api_keys": ["no-grace-key"], "resume": {"grace": "0s"}},
]
MODELS = [
    {"name": "typist", "provider": "simulated",
     "simulated": {"ttft_ms": 50, "tokens_per_second": 40, "reply": REPLY},
     "stream": {"coalesce_ms": 0}},
    {"name": "slow", "provider": "simulated",
     "simulated": {"ttft_ms": 0, "tokens_per_second": 5, "reply": "tick " * 200}},
]
GRACE = "10s"  # far longer than any test: only an explicit Stop ends a stream early
LAST = ".message.assistant >> nth=-1"


class DroppingProxy:
    """A TCP proxy to the edge that, when armed, cuts the next chat stream's connection in the
    middle of the delta event after the first `after` ones (both sockets aborted: the browser
    sees a network error while reading the body)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut = asyncio.Event()
        self._armed: int | None = None
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def arm(self, after: int) -> None:
        self.cut.clear()
        self._armed = after

    async def __aenter__(self) -> DroppingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for transport in list(self._transports):
            transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            edge_r, edge_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        both = (client_w.transport, edge_w.transport)
        self._transports.update(both)
        watch: dict[str, Any] = {"after": None, "seen": bytearray()}
        tasks = {asyncio.create_task(self._up(client_r, edge_w, watch)),
                 asyncio.create_task(self._down(edge_r, client_w, watch))}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for transport in both:
                transport.abort()
                self._transports.discard(transport)

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  watch: dict[str, Any]) -> None:
        while data := await reader.read(65536):
            if self._armed is not None and b"POST /v1/chat/stream " in data:
                watch["after"], self._armed = self._armed, None  # this connection, once
            writer.write(data)
            await writer.drain()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    watch: dict[str, Any]) -> None:
        while data := await reader.read(65536):
            after = watch["after"]
            if after is not None:
                seen: bytearray = watch["seen"]
                offset = len(seen)
                seen += data
                at = -1
                for _ in range(after + 1):
                    at = seen.find(b"event: delta", at + 1)
                    if at < 0:
                        break
                if at >= 0:
                    # Cut in the middle of that event: its `event:` line went out, not its data.
                    writer.write(data[:max(0, at + len(b"event: delta") - offset)])
                    await writer.drain()
                    self.cut.set()
                    return
            writer.write(data)
            await writer.drain()


@pytest.fixture(scope="module")
async def chain(redis_server: Any) -> AsyncIterator[Chain]:
    config = make_config({"tenants": TENANTS, "resume": {"ttl": "1m", "grace": GRACE}},
                         redis_url=redis_server.url, models=MODELS)
    async with running_chain(config) as running:
        yield running


@pytest.fixture
async def proxy(chain: Chain) -> AsyncIterator[DroppingProxy]:
    assert chain.edge is not None
    async with DroppingProxy(chain.edge.port) as running:
        yield running


@pytest.fixture
async def page(browser: Any, chain: Chain) -> AsyncIterator[Any]:  # noqa: F811
    """A fresh page with every request it makes recorded in `page.requests` (method, url,
    headers)."""
    context = await browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    tab = await context.new_page()
    tab.requests = []
    tab.on("request", lambda r: tab.requests.append((r.method, r.url, r.headers)))
    try:
        yield tab
    finally:
        await context.close()


async def open_chat(page: Any, base_url: str, model: str, key: str = "dev-key") -> None:
    await page.goto(f"{base_url}/")
    await page.fill("#api-key", key)
    await page.wait_for_selector(f"#model option[value={model}]", state="attached")
    await page.select_option("#model", model)
    # Note every "reconnecting…" that ever shows, however briefly.
    await page.evaluate("""() => {
        window.reconnecting = 0;
        new MutationObserver((changes) => {
            for (const change of changes) for (const node of change.addedNodes)
                if (node.classList && node.classList.contains('reconnecting')
                    && node.textContent.includes('reconnecting…')) window.reconnecting++;
        }).observe(document.getElementById('transcript'), {childList: true, subtree: true});
    }""")


async def send(page: Any, text: str) -> None:
    await page.fill("#prompt", text)
    await page.click("#send")


async def test_the_undisturbed_reply(chain: Chain) -> None:
    """What the browser tests compare with: the reply of a stream nobody cut."""
    async with aiohttp.ClientSession() as http, http.post(
            f"{chain.base_url}/v1/chat/stream", headers={"Authorization": "Bearer dev-key"},
            json={"model": "typist", "messages": [{"role": "user", "content": "Hi"}]}) as resp:
        events = without_comments(await SseStream(resp).rest())
    assert "".join(e.data["text"] for e in events if e.event == "delta") == REPLY


async def test_a_dropped_connection_resumes_without_losing_or_repeating_text(
        page: Any, chain: Chain, proxy: DroppingProxy) -> None:
    await open_chat(page, proxy.url, "typist")
    proxy.arm(after=5)
    await send(page, "Type for me")
    await asyncio.wait_for(proxy.cut.wait(), 10)
    await page.wait_for_selector(f"{LAST} >> .notice.reconnecting", state="attached")
    turn = await page.wait_for_selector(".message.assistant[data-state=done]")
    assert await page.text_content(f"{LAST} >> .text") == REPLY
    assert await page.evaluate("window.reconnecting") == 1
    assert await page.query_selector(f"{LAST} >> .notice") is None  # "reconnecting…" is gone
    assert await page.query_selector(".cutoff") is None
    assert "completion tokens" in await page.text_content(f"{LAST} >> .usage")
    request_id = await turn.get_attribute("data-request-id")
    posts = [(url, headers) for method, url, headers in page.requests
             if method == "POST" and url.endswith("/v1/chat/stream")]
    assert len(posts) == 1 and posts[0][1]["x-request-id"] == request_id  # the page's own id
    resumes = [headers for method, url, headers in page.requests
               if method == "GET" and url.endswith(f"/v1/chat/stream/{request_id}")]
    assert len(resumes) == 1 and int(resumes[0]["last-event-id"]) == 5
    # The conversation goes on from the whole reply.
    await send(page, "Again")
    await page.wait_for_selector(".message.assistant[data-state=done] >> nth=1")
    assert await page.text_content(f"{LAST} >> .text") == REPLY


async def test_a_reply_that_cannot_be_resumed_is_explained(page: Any, chain: Chain,
                                                           proxy: DroppingProxy) -> None:
    await open_chat(page, proxy.url, "typist", key="no-resume-key")
    proxy.arm(after=3)
    await send(page, "Type for me")
    turn = await page.wait_for_selector(".message.assistant[data-state=error]")
    assert await page.evaluate("window.reconnecting") == 1
    assert await turn.get_attribute("data-code") == "NOT_FOUND"
    notice = await page.text_content(f"{LAST} >> .notice-text")
    assert notice == "connection lost — the reply can no longer be resumed"
    text = await page.text_content(f"{LAST} >> .text")
    assert text and REPLY.startswith(text) and text != REPLY
    assert await page.text_content(f"{LAST} >> .cutoff") == "cut off"
    assert await page.is_enabled("#send") and await page.is_disabled("#stop")


async def test_a_drop_that_cancelled_the_model_is_not_shown_as_a_stop(
        page: Any, chain: Chain, proxy: DroppingProxy) -> None:
    """Without a grace the dropped connection cancelled the model; the resume replays that
    CANCELLED. The user pressed nothing, so the page says why, not "stopped"."""
    await open_chat(page, proxy.url, "slow", key="no-grace-key")
    proxy.arm(after=3)
    await send(page, "count")
    turn = await page.wait_for_selector(".message.assistant[data-state=error]")
    assert await turn.get_attribute("data-code") == "CANCELLED"
    notice = await page.text_content(f"{LAST} >> .notice-text")
    assert "stopped —" not in notice and "went away" in notice, notice
    assert await page.is_enabled("#send") and await page.is_disabled("#stop")


async def test_stop_uses_the_cancel_endpoint(page: Any, chain: Chain,
                                             proxy: DroppingProxy) -> None:
    await open_chat(page, proxy.url, "slow")
    await send(page, "count")
    await page.wait_for_selector(".message.assistant .text:not(:empty)")
    assert chain.engine_streams == 1  # 200 ticks at 5/s: far from done
    request_id = await page.get_attribute(LAST, "data-request-id")
    await page.click("#stop")
    await page.wait_for_selector(".message.assistant[data-state=stopped]")
    assert "stopped" in await page.text_content(f"{LAST} >> .notice-text")
    assert await page.text_content(f"{LAST} >> .cutoff") == "cut off"
    # Only the cancel ends it this soon: a dropped connection would leave it the 10 s grace.
    await eventually(lambda: chain.engine_streams == 0, within=3,
                     what="engine stream cancelled by the Stop's cancel request")
    cancels = [url for method, url, _ in page.requests if method == "POST"
               and url.endswith(f"/v1/chat/stream/{request_id}/cancel")]
    assert len(cancels) == 1
    assert not any(method == "GET" and "/v1/chat/stream/" in url
                   for method, url, _ in page.requests)  # a Stop is not a drop: no resume
    assert await page.is_enabled("#send") and await page.is_disabled("#stop")
