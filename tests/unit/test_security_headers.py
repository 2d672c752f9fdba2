"""The security-headers rule, as the dispatcher applies it: the gateway's own answers get the
headers, relayed ones keep theirs (gateway/security_headers.py, gateway/dispatch.py)."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from gateway.access_log import AccessLog
from gateway.dispatch import Dispatcher, OwnRoute
from gateway.errors import LoginRequired
from gateway.metrics import GatewayMetrics
from gateway.observability import RequestContext
from gateway.security_headers import own_answer_headers, own_path_headers
from gateway.settings import LogSettings

pytestmark = pytest.mark.anyio

JSON = (b"content-type", b"application/json")
HTML = (b"content-type", b"text/html; charset=utf-8")
ALWAYS = {b"x-content-type-options", b"referrer-policy", b"x-frame-options"}
CSP = b"content-security-policy"
HSTS = b"strict-transport-security"


def endpoint(status: int, headers: list[tuple[bytes, bytes]]) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    return app


class Proxy:
    """Stands in for the proxy: relays an upstream's answer, or raises what it is given."""

    def __init__(self, headers: list[tuple[bytes, bytes]], error: Exception | None = None):
        self.headers, self.error = headers, error

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, context: RequestContext, raw: str
    ) -> None:
        context.request_id = "r"
        if self.error is not None:
            raise self.error
        context.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        await send({"type": "http.response.body", "body": b""})


async def run(
    path: str,
    *,
    own: Any = None,
    proxy: Proxy | None = None,
    https: bool = False,
    root_path: str = "",
) -> dict[bytes, bytes]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def no_websockets(*args: Any) -> None:
        raise AssertionError

    dispatcher = Dispatcher(
        own={p: OwnRoute(None, own) for p in ("/auth/login", "/healthz", "/metrics", "/auth/me")},
        own_subtrees={},
        static=None,
        proxy=proxy or Proxy([JSON]),  # type: ignore[arg-type]
        websockets=no_websockets,
        access=AccessLog(metrics=GatewayMetrics(), settings=LogSettings.model_validate({})),
        https=https,
        error_headers=own_answer_headers(https=https),
    )
    scope = {
        "type": "http",
        "path": root_path + path,
        "raw_path": (root_path + path).encode(),
        "root_path": root_path,
        "method": "GET",
        "headers": [],
    }
    await dispatcher(scope, receive, send)
    return dict(sent[0]["headers"])


async def test_owned_paths_get_every_header_and_no_store() -> None:
    for path in ("/auth/login", "/healthz", "/metrics"):
        headers = await run(path, own=endpoint(302, [(b"cache-control", b"max-age=60")]))
        assert ALWAYS <= set(headers) and headers[CSP].startswith(b"default-src 'none'")
        assert headers[b"cache-control"] == b"no-store"
        assert HSTS not in headers and headers[b"x-request-id"]


async def test_gateway_errors_on_proxied_paths_get_the_headers() -> None:
    error = LoginRequired("no session", login_url="/auth/login")
    headers = await run("/api/x", proxy=Proxy([], error), https=True)
    assert ALWAYS | {CSP, HSTS} <= set(headers) and headers[b"cache-control"] == b"no-store"


async def test_relayed_upstream_answers_are_untouched() -> None:
    for path in ("/api/x", "/x/../api/x"):
        headers = await run(path, proxy=Proxy([JSON, (b"x-frame-options", b"SAMEORIGIN")]))
        assert headers == {b"content-type": b"application/json", b"x-frame-options": b"SAMEORIGIN"}


async def test_existing_values_win_and_html_gets_no_csp() -> None:
    headers = own_path_headers([HTML, (b"x-frame-options", b"SAMEORIGIN")], https=False)
    assert dict(headers)[b"x-frame-options"] == b"SAMEORIGIN" and CSP not in dict(headers)


async def test_https_adds_hsts_and_root_path_is_honoured() -> None:
    headers = await run("/auth/me", own=endpoint(200, [JSON]), https=True, root_path="/gw")
    assert headers[HSTS].startswith(b"max-age=")
    assert headers[b"cache-control"] == b"no-store"
