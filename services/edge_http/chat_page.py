"""The browser chat page: `GET /` and its files under `/static/`.

Plain HTML, CSS and JavaScript shipped in `static/`; nothing is fetched from anywhere but this
edge, and the Content-Security-Policy says so to the browser too. The page talks to the same
public API as any client (`GET /v1/models`, `POST /v1/chat/stream`).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).with_name("static")
# Only this origin: no CDN, no inline script, no third-party connection.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_routes(app: web.Application) -> None:
    """Register `GET /` and `/static/...` on the edge application."""
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR, append_version=False)


async def index(request: web.Request) -> web.FileResponse:
    """The chat page."""
    return web.FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)
