"""The chat page in a real headless Chromium (Debian's `chromium`), against the real chain.

Needs a Chromium binary: /usr/bin/chromium, or the path in PROMPTLINE_CHROMIUM. Without one the
tests are skipped and the pytest summary says why (`.ci/run` installs it first). Playwright only
drives that binary; it never downloads a browser.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.prompt.feedback import record_key
from tests.chain import Chain, chain_fixture
from tests.conftest import BASE_CONFIG
from tests.eventually import eventually

CHROMIUM = os.environ.get("PROMPTLINE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"browser tests skipped: no Chromium at {CHROMIUM} (apt-get install chromium, "
                "or set PROMPTLINE_CHROMIUM to a Chromium binary)", allow_module_level=True)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
TIMEOUT_MS = 15_000  # generous: anything here should take well under a second or two

TYPEWRITER_REPLY = ("Tokens arrive one by one and the page appends each of them as it comes, "
                    "so the reply grows in front of the reader like a typewriter.")
FLAKY_REPLY = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima"
TENANTS = [
    *BASE_CONFIG["tenants"],
    {"name": "browser-qpm1", "api_keys": ["browser-qpm1-key"], "quotas": {"qpm": 1}},
]
MODELS = [
    {"name": "typewriter", "provider": "simulated",
     "simulated": {"ttft_ms": 50, "tokens_per_second": 40, "reply": TYPEWRITER_REPLY}},
    {"name": "flaky", "provider": "simulated",
     "simulated": {"ttft_ms": 0, "tokens_per_second": 200, "fail_after_tokens": 8,
                   "reply": FLAKY_REPLY}},
    {"name": "slow", "provider": "simulated",
     "simulated": {"ttft_ms": 0, "tokens_per_second": 5, "reply": "tick " * 200}},
]


chain = chain_fixture({"tenants": TENANTS}, MODELS)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Any, chain: Chain) -> AsyncIterator[Any]:
    """A fresh page (own storage) with every request it makes recorded in `page.urls`."""
    context = await browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    tab = await context.new_page()
    tab.urls = []
    tab.on("request", lambda request: tab.urls.append(request.url))
    try:
        yield tab
    finally:
        await context.close()


async def open_chat(page: Any, chain: Chain, key: str = "dev-key", model: str = "sim") -> None:
    await page.goto(f"{chain.base_url}/")
    await page.fill("#api-key", key)
    await page.wait_for_selector("#model option[value=sim]", state="attached")
    await page.select_option("#model", model)


async def send(page: Any, text: str) -> None:
    await page.fill("#prompt", text)
    await page.click("#send")


LAST = ".message.assistant >> nth=-1"


async def test_page_loads_with_models_and_no_external_requests(page: Any, chain: Chain) -> None:
    response = await page.goto(f"{chain.base_url}/")
    assert response.status == 200
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert await page.title() == "Promptline chat"
    assert await page.is_disabled("#model")
    await page.fill("#api-key", "dev-key")
    await page.wait_for_selector("#model option[value=sim]", state="attached")
    options = await page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert options == ["sim", "typewriter", "flaky", "slow"]
    # the key survives a reload (browser storage), and the models come back with it
    await page.reload()
    assert await page.input_value("#api-key") == "dev-key"
    await page.wait_for_selector("#model option[value=sim]", state="attached")
    assert all(url.startswith(chain.base_url) for url in page.urls), page.urls


async def test_bad_key_is_explained(page: Any, chain: Chain) -> None:
    await page.goto(f"{chain.base_url}/")
    await page.fill("#api-key", "wrong-key")
    await page.wait_for_selector("#status.problem")
    assert "invalid API key" in await page.text_content("#status")


async def test_typewriter_stream_renders_progressively(page: Any, chain: Chain) -> None:
    await open_chat(page, chain, model="typewriter")
    # Record the reply's length at every DOM change, as a reader would see it.
    await page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const texts = document.querySelectorAll('.message.assistant .text');
            if (texts.length) window.lengths.push(texts[texts.length - 1].textContent.length);
        }).observe(document.getElementById('transcript'),
                   {childList: true, subtree: true, characterData: true});
    }""")
    await send(page, "Hello")
    await page.wait_for_selector(".message.assistant[data-state=done]")
    lengths = await page.evaluate("window.lengths")
    partial = {n for n in lengths if 0 < n < len(TYPEWRITER_REPLY)}
    assert len(partial) >= 2, lengths  # text grew in steps, not in one piece
    assert lengths == sorted(lengths)
    assert await page.text_content(f"{LAST} >> .text") == TYPEWRITER_REPLY
    assert "completion tokens" in await page.text_content(f"{LAST} >> .usage")
    assert await page.query_selector(".cutoff") is None
    assert await page.is_enabled("#send") and await page.is_disabled("#stop")
    assert await page.text_content(".message.user .text") == "Hello"


async def test_mid_stream_error_shows_message_request_id_and_cut_off(page: Any,
                                                                     chain: Chain) -> None:
    await open_chat(page, chain, model="flaky")
    await send(page, "Hello")
    turn = await page.wait_for_selector(".message.assistant[data-state=error]")
    assert await turn.get_attribute("data-code") == "UPSTREAM_ERROR"
    text = await page.text_content(f"{LAST} >> .text")
    assert text and FLAKY_REPLY.startswith(text) and len(text) < len(FLAKY_REPLY)
    assert await page.text_content(f"{LAST} >> .cutoff") == "cut off"
    notice = await page.text_content(f"{LAST} >> .notice-text")
    assert "the simulated provider failed" in notice
    request_id = await page.text_content(f"{LAST} >> .request-id code")
    assert request_id and request_id == await turn.get_attribute("data-request-id")
    assert await page.get_attribute(f"{LAST} >> .notice", "role") == "alert"


async def test_rate_limit_says_when_to_retry(page: Any, chain: Chain) -> None:
    await open_chat(page, chain, key="browser-qpm1-key", model="sim")
    await send(page, "first")
    await page.wait_for_selector(".message.assistant[data-state=done]")
    await send(page, "second")
    await page.wait_for_selector(".message.assistant[data-state=error]")
    notice = await page.text_content(f"{LAST} >> .notice-text")
    assert re.fullmatch(r"rate limited — try again in \d+ s", notice), notice
    assert await page.text_content(f"{LAST} >> .request-id code")
    assert await page.query_selector(f"{LAST} >> .cutoff") is None  # nothing was cut: no text
    assert await page.input_value("#prompt") == "second"  # ready to resend


async def test_blocked_message_is_explained(page: Any, chain: Chain) -> None:
    await open_chat(page, chain, model="sim")
    await send(page, "please say forbidden-word")
    await page.wait_for_selector(".message.assistant[data-state=error]")
    notice = await page.text_content(f"{LAST} >> .notice-text")
    assert notice == "this message was blocked by moderation"


async def test_stop_cancels_the_chain(page: Any, chain: Chain) -> None:
    await open_chat(page, chain, model="slow")
    await send(page, "count")
    await page.wait_for_selector(".message.assistant .text:not(:empty)")
    assert chain.engine_streams == 1  # 200 ticks at 5/s: far from done
    await page.click("#stop")
    await page.wait_for_selector(".message.assistant[data-state=stopped]")
    assert "stopped" in await page.text_content(f"{LAST} >> .notice-text")
    assert await page.text_content(f"{LAST} >> .cutoff") == "cut off"
    assert await page.is_enabled("#send") and await page.is_disabled("#stop")
    await eventually(lambda: chain.engine_streams == 0, within=10,
                     what="engine stream cancelled by Stop")


async def test_new_chat_during_a_stream_starts_empty(page: Any, chain: Chain) -> None:
    """The stopped stream ends after "New chat" reset the transcript: its partial reply must not
    become the new conversation's first message (it was sent to the model with the next one)."""
    await open_chat(page, chain, model="slow")
    await send(page, "count")
    await page.wait_for_selector(".message.assistant .text:not(:empty)")
    bodies: list[Any] = []
    page.on("request", lambda request: bodies.append(request.post_data_json)
            if request.method == "POST" and request.url.endswith("/v1/chat/stream") else None)
    await page.click("#new-chat")
    await page.wait_for_selector("#send:enabled")
    assert await page.input_value("#prompt") == ""  # the old text is not put back either
    await page.select_option("#model", "sim")
    await send(page, "fresh question")
    await page.wait_for_selector(".message.assistant[data-state=done]")
    assert [m["content"] for m in bodies[0]["messages"]] == ["fresh question"]


async def test_thumbs_send_feedback_and_the_latest_click_wins(page: Any, chain: Chain) -> None:
    await open_chat(page, chain)
    await send(page, "Hello")
    await page.wait_for_selector(".message.assistant[data-state=done]")
    rid = await page.get_attribute(LAST, "data-request-id")
    await page.click(f"{LAST} >> .thumb[data-score='-1']")
    await page.wait_for_selector(f"{LAST} >> .thumb[data-score='-1'][aria-pressed=true]")
    await page.click(f"{LAST} >> .thumb[data-score='1']")
    await page.wait_for_selector(f"{LAST} >> .thumb[data-score='1'][aria-pressed=true]")
    assert await page.get_attribute(f"{LAST} >> .thumb[data-score='-1']",
                                    "aria-pressed") == "false"
    assert await page.text_content(f"{LAST} >> .feedback-status") == "thanks"
    stored = await chain.prompt.redis.client.hget(record_key("dev", rid), "fs")
    assert stored == b"1000", stored  # the record's score, in thousandths: the last click
