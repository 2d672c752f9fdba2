"""The operator's session API, on a listener of its own (``admin.port``, loopback by default).

* ``GET /admin/sessions?sub=...``: the user's sessions (handle, created, last seen, expiry,
  browser family; never a token or the cookie);
* ``DELETE /admin/sessions?sub=...`` (``&id=<handle>`` for one of them) or ``?sid=...`` (an IdP
  session): end them everywhere (``session_admin.py``); answers ``{"ended": n}``.

Every request needs ``Authorization: Bearer <GATEWAY_ADMIN__TOKEN>``, compared in constant
time over the whole header value. Off by default; never on the public port, so a route or the
gateway's own paths cannot shadow it, and a firewall can keep it to the operators' network.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import socket
from collections.abc import Iterator

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .errors import GatewayError
from .session_admin import SessionAdmin
from .settings import AdminSettings

logger = logging.getLogger("gateway.admin")

SESSIONS_PATH = "/admin/sessions"
_MAX_QUERY_VALUE = 1024
_START_TIMEOUT = 10.0


def _json(status: int, body: dict[str, object], **headers: str) -> Response:
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store", **headers})


class AdminEndpoint:
    """The admin API as an ASGI app (HTTP only)."""

    def __init__(self, admin: SessionAdmin, *, token: str) -> None:
        self._admin = admin
        # Compared as digests: equal length whatever the caller sends, so neither the token's
        # length nor its prefix shows in the time taken (hmac.compare_digest on the values).
        self._expected = hashlib.sha256(f"Bearer {token}".encode()).digest()

    def is_authorized(self, header: str | None) -> bool:
        """Whether ``header`` is exactly ``Bearer <admin token>`` (constant time)."""
        given = hashlib.sha256((header or "").encode("utf-8", "replace")).digest()
        return hmac.compare_digest(given, self._expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan and WebSocket: nothing to do here
        request = Request(scope, receive)
        response = await self._answer(request)
        await response(scope, receive, send)

    async def _answer(self, request: Request) -> Response:
        if not self.is_authorized(request.headers.get("authorization")):
            logger.warning("admin request refused: missing or wrong token")
            return _json(
                401,
                {"error": "unauthorized", "message": "admin token required"},
                **{"WWW-Authenticate": "Bearer"},
            )
        if request.url.path != SESSIONS_PATH:
            return _json(404, {"error": "not_found", "message": "no admin endpoint here"})
        params = request.query_params
        if any(len(v) > _MAX_QUERY_VALUE for v in params.values()):
            return _json(400, {"error": "invalid_request", "message": "a parameter is too long"})
        sub, sid, handle = params.get("sub"), params.get("sid"), params.get("id")
        try:
            if request.method == "GET":
                if not sub:
                    return _json(400, {"error": "invalid_request", "message": "sub is required"})
                sessions = await self._admin.list_sessions(sub)
                return _json(200, {"sessions": [s.to_json() for s in sessions]})
            if request.method == "DELETE":
                if not sub and not sid:
                    return _json(
                        400, {"error": "invalid_request", "message": "sub or sid is required"}
                    )
                if handle and not sub:
                    return _json(400, {"error": "invalid_request", "message": "id needs sub"})
                ended = await self._admin.revoke(sub=sub or None, sid=sid or None, handle=handle)
                return _json(200, {"ended": ended})
        except GatewayError as exc:  # the store unavailable: 503, said without secrets
            return _json(exc.status_code, {"error": exc.error, "message": exc.message})
        return _json(
            405, {"error": "method_not_allowed", "message": "GET or DELETE"}, Allow="GET, DELETE"
        )


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server inside a running process: the signals stay the main server's."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


class AdminListener:
    """The admin API served by a uvicorn server of its own, in the gateway's event loop (it
    uses the gateway's store and IdP client), started and stopped by the app's lifespan."""

    def __init__(self, endpoint: AdminEndpoint, settings: AdminSettings) -> None:
        self._endpoint = endpoint
        self._settings = settings
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.port: int | None = None  # the bound port (admin.port 0 picks one)

    async def start(self) -> None:
        port = self._settings.port
        if port is None or self._server is not None:
            return
        host = self._settings.host
        # Bound here, so that a port in use is an error of ours at startup.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self._endpoint,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
        )
        server = self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="admin-listener")
        ready = asyncio.ensure_future(server.ready.wait())
        await asyncio.wait(
            (ready, self._task), timeout=_START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        ready.cancel()
        if not server.started:
            sock.close()
            raise OSError(f"the admin listener on {host}:{self.port} did not start")
        logger.info("admin API on %s:%d", host, self.port)

    async def close(self) -> None:
        server, task = self._server, self._task
        self._server = self._task = None
        if server is not None and task is not None:
            server.should_exit = True
            await task
