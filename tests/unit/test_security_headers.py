"""SecurityHeadersMiddleware: the gateway's own answers get the headers, relayed ones do not."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from gateway.security_headers import SecurityHeadersMiddleware, mark_relayed

pytestmark = pytest.mark.anyio

JSON = (b"content-type", b"application/json")
HTML = (b"content-type", b"text/html; charset=utf-8")
ALWAYS = {b"x-content-type-options", b"referrer-policy", b"x-frame-options"}
CSP = b"content-security-policy"


def endpoint(status: int, headers: list[tuple[bytes, bytes]], *, relayed: bool = False) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if relayed:
            mark_relayed()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    return app


async def run(
    app: Any, path: str, *, https: bool = False, root_path: str = ""
) -> dict[bytes, bytes]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "path": path, "root_path": root_path, "method": "GET"}
    await SecurityHeadersMiddleware(app, https=https)(scope, receive, send)
    return dict(sent[0]["headers"])


async def test_owned_paths_get_every_header_and_no_store() -> None:
    for path in ("/auth/login", "/auth/callback", "/healthz", "/readyz", "/metrics"):
        headers = await run(endpoint(302, [(b"cache-control", b"max-age=60")]), path)
        assert ALWAYS <= set(headers) and headers[CSP].startswith(b"default-src 'none'")
        assert headers[b"cache-control"] == b"no-store"
        assert b"strict-transport-security" not in headers


async def test_gateway_errors_on_proxied_paths_get_the_headers() -> None:
    headers = await run(endpoint(401, [JSON, (b"cache-control", b"no-store")]), "/api/x")
    assert ALWAYS | {CSP} <= set(headers)
    redirect = await run(endpoint(302, [(b"location", b"/auth/login")]), "/api/page")
    assert ALWAYS <= set(redirect)


async def test_relayed_upstream_answers_are_untouched() -> None:
    for path in ("/api/x", "/auth/../api/x"):
        headers = await run(endpoint(200, [JSON], relayed=True), path, https=True)
        assert headers == {b"content-type": b"application/json"}


async def test_static_pages_keep_their_own_headers() -> None:
    headers = await run(endpoint(200, [HTML, (b"x-frame-options", b"SAMEORIGIN")]), "/index.html")
    assert headers == {
        b"content-type": b"text/html; charset=utf-8",
        b"x-frame-options": b"SAMEORIGIN",
    }


async def test_existing_values_win_and_html_gets_no_csp() -> None:
    headers = await run(endpoint(200, [HTML, (b"x-frame-options", b"SAMEORIGIN")]), "/auth/page")
    assert headers[b"x-frame-options"] == b"SAMEORIGIN" and CSP not in headers


async def test_https_adds_hsts_and_root_path_is_honoured() -> None:
    headers = await run(endpoint(200, [JSON]), "/gw/auth/me", https=True, root_path="/gw")
    assert headers[b"strict-transport-security"].startswith(b"max-age=")
    assert headers[b"cache-control"] == b"no-store"


async def test_other_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def nothing(*args: Any) -> Any:
        return None

    await SecurityHeadersMiddleware(app)({"type": "websocket", "path": "/auth/x"}, nothing, nothing)
    await SecurityHeadersMiddleware(app)({"type": "lifespan"}, nothing, nothing)
    assert seen == ["websocket", "lifespan"]
