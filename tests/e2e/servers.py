"""Real servers for the end-to-end tests: the test IdP, upstream APIs, ASGI runner.

Everything listens on 127.0.0.1 on an ephemeral port, so suites never collide.

* :func:`start_idp` spawns ``node tests/e2e/idp/server.mjs`` (oidc-provider).
* :func:`start_upstream` runs a JWT-verifying upstream API in a uvicorn thread.
* :func:`run_asgi` runs any ASGI app (e.g. the gateway) in a uvicorn thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from demo.apis import VERIFY_ERRORS, verify_bearer
from demo.apis import JwksCache as _JwksCache

__all__ = [
    "API",
    "BASIC_CLIENT_ID",
    "BASIC_CLIENT_SECRET",
    "BILLING",
    "CLIENT_ID",
    "CLIENT_SECRET",
    "IDP_DIR",
    "OUTSIDE",
    "PKJWT_CLIENT_ID",
    "POLICY",
    "RESOURCE_SCOPES",
    "IdpProcess",
    "ServerThread",
    "Upstream",
    "big_pattern",
    "ensure_idp_dependencies",
    "free_port",
    "reserve_socket",
    "run_asgi",
    "start_idp",
    "start_upstream",
]

IDP_DIR = Path(__file__).resolve().parent / "idp"

# Facts about the test IdP (kept in sync with idp/server.mjs).
API = "https://api.example.com"
BILLING = "https://billing.example.com"
OUTSIDE = "https://outside.example.com"
RESOURCE_SCOPES: dict[str, tuple[str, ...]] = {
    API: ("read:orders", "write:orders"),
    BILLING: ("read:invoices",),
    OUTSIDE: ("read:secrets",),
}
POLICY: tuple[str, ...] = (API, BILLING)
CLIENT_ID = "bff"  # client_secret_post
CLIENT_SECRET = "bff-secret"
BASIC_CLIENT_ID = "bff-basic"  # client_secret_basic
BASIC_CLIENT_SECRET = "bff-basic-secret"
PKJWT_CLIENT_ID = "bff-pkjwt"  # private_key_jwt, DPoP required (nonces), PAR required

STARTUP_TIMEOUT = 60.0
STARTUP_ATTEMPTS = 3  # the IdP's start is retried when it stalls (see IdpProcess)
NPM_TIMEOUT = 300.0


# --------------------------------------------------------------------------- ports


def free_port() -> int:
    """Return a currently free TCP port on 127.0.0.1 (racy; prefer reserve_socket)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reserve_socket() -> socket.socket:
    """Bind and listen on 127.0.0.1:0; pass the socket to :func:`run_asgi` later.

    Lets a test learn a server's port (e.g. to build the gateway's public URL or
    the IdP's back-channel URI) before the server exists, without a port race.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


# ----------------------------------------------------------------------- the IdP


def ensure_idp_dependencies() -> None:
    """Install the IdP's node_modules (``npm ci``) unless already present."""
    marker = IDP_DIR / "node_modules" / "oidc-provider" / "package.json"
    if marker.exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found on PATH; Node.js is needed for the e2e test IdP")
    lock_path = Path(tempfile.gettempdir()) / "mrrt-gateway-e2e-npm.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several pytest processes may race here
        if marker.exists():
            return
        cmd = [npm, "ci"] if (IDP_DIR / "package-lock.json").exists() else [npm, "install"]
        cmd += ["--no-audit", "--no-fund", "--loglevel=error"]
        done = subprocess.run(
            cmd, cwd=IDP_DIR, capture_output=True, text=True, timeout=NPM_TIMEOUT, check=False
        )
        if done.returncode != 0 or not marker.exists():
            raise RuntimeError(
                f"{' '.join(cmd)} failed in {IDP_DIR} (exit {done.returncode}):\n"
                f"{done.stdout}\n{done.stderr}"
            )


class IdpStalled(Exception):
    """The IdP process lives but has not said it is ready in time (its output is the message)."""


class IdpStartRetried(UserWarning):
    """A stalled IdP start was begun again (shown in pytest's summary, never an error)."""


class IdpProcess:
    """A running ``idp/server.mjs``; also a context manager that stops it."""

    def __init__(
        self,
        *,
        at_ttl: int = 60,
        rotate: bool = False,
        backchannel_uri: str | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
        pkjwt_jwks: dict[str, Any] | None = None,
    ) -> None:
        ensure_idp_dependencies()
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node not found on PATH; Node.js is needed for the e2e test IdP")
        env = dict(os.environ)
        env.update(
            IDP_AT_TTL=str(at_ttl),
            IDP_ROTATE="1" if rotate else "0",
            IDP_BACKCHANNEL_URI=backchannel_uri or "",
            IDP_EXIT_ON_STDIN_EOF="1",
            NODE_NO_WARNINGS="1",
            # The client bff-pkjwt (private_key_jwt, DPoP with nonces, PAR): see server.mjs.
            IDP_PKJWT_JWKS=json.dumps(pkjwt_jwks) if pkjwt_jwks else "",
        )
        self.at_ttl = at_ttl
        self.rotate = rotate
        self.backchannel_uri = backchannel_uri
        self._log: collections.deque[str] = collections.deque(maxlen=2000)
        # A start normally takes under two seconds even on a loaded machine, yet once in a
        # few hundred CI starts node stalled for a minute before listening. A stalled start
        # is killed and begun again (its stage lines go to the log and a warning), so one
        # slow node process does not fail the test that needed an IdP.
        deadline = time.monotonic() + startup_timeout
        ready: dict[str, Any] = {}
        attempt_timeout = max(startup_timeout / STARTUP_ATTEMPTS, 1.0)
        for attempt in range(1, STARTUP_ATTEMPTS + 1):
            self._spawn(node, env)
            try:
                ready = self._wait_ready(min(attempt_timeout, deadline - time.monotonic()))
                break
            except IdpStalled as stalled:
                self.stop()
                if attempt == STARTUP_ATTEMPTS or time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"test IdP not ready within {startup_timeout:.0f}s "
                        f"({attempt} attempts):\n{self.logs()}"
                    ) from stalled
                warnings.warn(
                    f"test IdP start {attempt} stalled; starting again. Its output:\n{stalled}",
                    IdpStartRetried,
                    stacklevel=2,
                )
                self._log.append(f"[harness] start {attempt} stalled; starting again")
            except BaseException:
                self.stop()
                raise
        self.issuer: str = ready["issuer"]
        self.port: int = int(ready["port"])
        self._http = httpx.Client(base_url=self.issuer, timeout=10.0)

    def _spawn(self, node: str, env: dict[str, str]) -> None:
        self._ready: queue.Queue[dict[str, Any]] = queue.Queue()
        # stdin stays open: the IdP exits when it closes, so a killed pytest
        # never leaves a node process behind.
        self._proc = subprocess.Popen(
            [node, "server.mjs"],
            cwd=IDP_DIR,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self._readers = [
            # Each reader keeps its own process's pipe and queue: a stalled start's reader
            # never feeds a later start.
            threading.Thread(
                target=self._read_stdout,
                args=(self._proc.stdout, self._ready),
                name="idp-stdout",
                daemon=True,
            ),
            threading.Thread(
                target=self._read_stderr, args=(self._proc.stderr,), name="idp-stderr", daemon=True
            ),
        ]
        for reader in self._readers:
            reader.start()

    # -- output handling
    def _read_stdout(self, stdout: IO[str] | None, ready: queue.Queue[dict[str, Any]]) -> None:
        assert stdout is not None
        for line in stdout:
            self._log.append(f"[stdout] {line.rstrip()}")
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    data = json.loads(line)
                    if isinstance(data, dict) and "issuer" in data:
                        ready.put(data)

    def _read_stderr(self, stderr: IO[str] | None) -> None:
        assert stderr is not None
        for line in stderr:
            self._log.append(line.rstrip())

    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self._ready.get(timeout=0.05)
            except queue.Empty:
                if self._proc.poll() is not None:
                    for reader in self._readers:
                        reader.join(timeout=1)
                    raise RuntimeError(
                        f"test IdP exited with code {self._proc.returncode} before it was "
                        f"ready:\n{self.logs()}"
                    ) from None
        raise IdpStalled(self.logs())

    def logs(self) -> str:
        """The IdP's recent output (stderr and stdout), for error messages."""
        return "\n".join(self._log)

    # -- test endpoints
    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    def stats(self) -> dict[str, Any]:
        """The counters served at ``GET /__stats``."""
        response = self._http.get("/__stats")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def reset_stats(self) -> None:
        """Zero the counters (``POST /__stats/reset``)."""
        self._http.post("/__stats/reset").raise_for_status()

    def rotate_dpop_nonce(self) -> None:
        """Make every DPoP nonce issued so far stale (``POST /__dpop/rotate``)."""
        self._http.post("/__dpop/rotate").raise_for_status()

    # -- lifecycle
    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def pause(self) -> None:
        """Freeze the IdP (SIGSTOP): connections are accepted by the kernel, nothing answers."""
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._proc.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the process (kill after ``timeout``) and release its pipes."""
        proc = self._proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused IdP would not see the SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=timeout)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        http = getattr(self, "_http", None)
        if http is not None:
            http.close()

    def __enter__(self) -> IdpProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        issuer = getattr(self, "issuer", "?")
        return f"IdpProcess(issuer={issuer!r}, at_ttl={self.at_ttl}, rotate={self.rotate})"


def start_idp(
    *,
    at_ttl: int = 60,
    rotate: bool = False,
    backchannel_uri: str | None = None,
    startup_timeout: float = STARTUP_TIMEOUT,
    pkjwt_jwks: dict[str, Any] | None = None,
) -> IdpProcess:
    """Start the test IdP and wait until it is ready (use as a context manager);
    ``pkjwt_jwks`` registers the client ``bff-pkjwt`` with that public JWKS."""
    return IdpProcess(
        at_ttl=at_ttl,
        rotate=rotate,
        backchannel_uri=backchannel_uri,
        startup_timeout=startup_timeout,
        pkjwt_jwks=pkjwt_jwks,
    )


# --------------------------------------------------------------- ASGI in a thread


class ServerThread:
    """uvicorn serving an ASGI app from a daemon thread on 127.0.0.1."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        sock: socket.socket | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
        **uvicorn_options: Any,
    ) -> None:
        self._sock = sock if sock is not None else reserve_socket()
        self.port: int = int(self._sock.getsockname()[1])
        self.base_url = f"http://127.0.0.1:{self.port}"
        options: dict[str, Any] = {
            "log_level": "warning",
            "access_log": False,
            "lifespan": "auto",
            "ws": "none",
            "timeout_graceful_shutdown": 2,
        }
        options.update(uvicorn_options)
        self._server = uvicorn.Server(uvicorn.Config(app, **options))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"ASGI server on {self.base_url} did not start within "
                    f"{startup_timeout:.0f}s" + (f": {self._error!r}" if self._error else "")
                ) from self._error
            time.sleep(0.01)

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as exc:  # reported by the starter / stop()
            self._error = exc

    def open_connections(self) -> int:
        """Client connections uvicorn holds open right now (read from its thread's state)."""
        return len(self._server.server_state.connections)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit, wait for the thread, close the socket."""
        self._server.should_exit = True
        self._thread.join(timeout=timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=timeout)
        self._sock.close()


@contextlib.contextmanager
def run_asgi(
    app: ASGIApp,
    *,
    sock: socket.socket | None = None,
    **uvicorn_options: Any,
) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (ephemeral port, or ``sock``); yield its base URL.

    The base URL has no trailing slash: ``http://127.0.0.1:PORT``. Lifespan
    events run (``lifespan="auto"``); extra keyword arguments go to uvicorn.Config.
    """
    server = ServerThread(app, sock=sock, **uvicorn_options)
    try:
        yield server.base_url
    finally:
        server.stop()


# -------------------------------------------------------------------- upstreams


def _pattern(offset: int, size: int) -> bytes:
    """Bytes ``offset .. offset+size`` of the /big stream (byte i is ``i % 256``)."""
    start = offset % 256
    block = bytes(range(256)) * (size // 256 + 2)
    return block[start : start + size]


class Upstream:
    """An upstream API served from a uvicorn thread; records every request.

    With ``require_auth`` it demands ``Authorization: Bearer <JWT>`` signed
    (RS256) by ``issuer`` with ``aud`` containing ``audience``; otherwise it
    answers 401 ``{"error": "invalid_token", "detail": ...}``.

    Routes (any method unless noted); a JSON "record" is answered by default::

        /<anything>     record: upstream, method, path, query, aud, sub, scope,
                        headers (lower-cased names), body_len
        GET  /sse       3 server-sent events, 200 ms apart
        GET  /big?n=N   N streamed bytes; byte i is i % 256
        POST /upload    record; the body is counted while streaming, not kept
        GET  /slow?s=S  record after sleeping S seconds
        /status/CODE    record (no body for 204/304) with that status
        /challenge      401 with an RFC 9470 step-up challenge (acr_values
                        ``urn:test:mfa``, max_age 300)

    ``revoke_next_token()`` makes it refuse the next valid token it sees, and that token
    ever after, with ``401 WWW-Authenticate: Bearer error="invalid_token"`` (a token revoked
    before its expiry); ``refused_tokens`` counts those refusals.
    """

    def __init__(
        self,
        *,
        name: str,
        issuer: str | None = None,
        audience: str | None = None,
        require_auth: bool = True,
    ) -> None:
        if require_auth and (issuer is None or audience is None):
            raise ValueError("an authenticated upstream needs issuer and audience")
        self.name = name
        self.issuer = issuer
        self.audience = audience
        self.require_auth = require_auth
        self._jwks = _JwksCache(issuer) if issuer else None
        self._lock = threading.Lock()
        self._requests: list[dict[str, Any]] = []
        self._revoke_next = False
        self._revoked: set[str] = set()
        self.refused_tokens = 0
        self._server = ServerThread(self._build_app())
        self.base_url = self._server.base_url
        self.url = f"{self.base_url}/"

    # -- recorded requests
    @property
    def requests(self) -> list[dict[str, Any]]:
        """A snapshot of every request received so far (including rejected ones)."""
        with self._lock:
            return list(self._requests)

    def revoke_next_token(self) -> None:
        """Refuse the next valid token, and every later use of it (see the class doc)."""
        with self._lock:
            self._revoke_next = True

    def _refuses(self, token: str) -> bool:
        with self._lock:
            if self._revoke_next:
                self._revoke_next = False
                self._revoked.add(token)
            if token in self._revoked:
                self.refused_tokens += 1
                return True
            return False

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def _record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._requests.append(entry)

    # -- app
    async def _verify(self, request: Request) -> dict[str, Any]:
        assert self._jwks is not None and self.audience is not None
        return await verify_bearer(
            request.headers.get("authorization"), jwks=self._jwks, audience=self.audience
        )

    def _build_app(self) -> Starlette:
        async def handle(request: Request) -> Response:
            headers: dict[str, str] = {}
            for raw_name, raw_value in request.headers.raw:
                key, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
            entry: dict[str, Any] = {
                "upstream": self.name,
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "headers": headers,
                "aud": None,
                "sub": None,
                "scope": None,
                "body_len": 0,
                "status": 200,
            }
            if self.require_auth:
                try:
                    claims = await self._verify(request)
                except VERIFY_ERRORS as exc:
                    entry["status"] = 401
                    self._record(entry)
                    return JSONResponse(
                        {"error": "invalid_token", "detail": str(exc) or type(exc).__name__},
                        status_code=401,
                        headers={"www-authenticate": 'Bearer error="invalid_token"'},
                    )
                entry.update(
                    aud=claims.get("aud"), sub=claims.get("sub"), scope=claims.get("scope")
                )
                bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
                if self._refuses(bearer):
                    entry["status"] = 401
                    self._record(entry)
                    return JSONResponse(
                        {"error": "invalid_token", "detail": "revoked"},
                        status_code=401,
                        headers={"www-authenticate": 'Bearer error="invalid_token"'},
                    )
                if request.url.path == "/challenge":
                    entry["status"] = 401
                    self._record(entry)
                    return JSONResponse(
                        {"error": "insufficient_user_authentication"},
                        status_code=401,
                        headers={
                            "www-authenticate": 'Bearer error="insufficient_user_authentication"'
                            ', error_description="A stronger login is required"'
                            ', acr_values="urn:test:mfa", max_age="300"'
                        },
                    )
            body_len = 0
            async for chunk in request.stream():
                body_len += len(chunk)
            entry["body_len"] = body_len
            return await respond(request, entry)

        async def respond(request: Request, entry: dict[str, Any]) -> Response:
            path = request.url.path
            public = {k: v for k, v in entry.items() if k != "status"}
            if path == "/sse" and request.method == "GET":
                self._record(entry)
                return StreamingResponse(
                    sse_events(),
                    media_type="text/event-stream",
                    headers={"cache-control": "no-cache"},
                )
            if path == "/big" and request.method == "GET":
                size = int(request.query_params.get("n", "0"))
                self._record(entry)
                return StreamingResponse(
                    big_body(size),
                    media_type="application/octet-stream",
                    headers={"content-length": str(size)},
                )
            if path == "/slow":
                await asyncio.sleep(float(request.query_params.get("s", "1")))
            if path.startswith("/status/"):
                code = int(path.rsplit("/", 1)[1])
                entry["status"] = code
                self._record(entry)
                if code in (204, 304) or code < 200:
                    return Response(status_code=code)
                return JSONResponse(public, status_code=code)
            self._record(entry)
            return JSONResponse(public)

        async def sse_events() -> AsyncIterator[bytes]:
            for n in range(3):
                if n:
                    await asyncio.sleep(0.2)
                payload = json.dumps({"n": n, "sent_at": time.time(), "upstream": self.name})
                yield f"id: {n}\nevent: tick\ndata: {payload}\n\n".encode()

        async def big_body(size: int) -> AsyncIterator[bytes]:
            sent = 0
            while sent < size:
                chunk = _pattern(sent, min(65536, size - sent))
                sent += len(chunk)
                yield chunk

        methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
        return Starlette(routes=[Route("/{path:path}", handle, methods=methods)])

    def open_connections(self) -> int:
        """Connections (the gateway's, mostly) this upstream holds open right now."""
        return self._server.open_connections()

    # -- lifecycle
    def stop(self) -> None:
        """Stop the server thread."""
        self._server.stop()

    def __enter__(self) -> Upstream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Upstream(name={self.name!r}, url={self.url!r}, audience={self.audience!r})"


def start_upstream(
    *,
    name: str,
    issuer: str | None = None,
    audience: str | None = None,
    require_auth: bool = True,
) -> Upstream:
    """Start an upstream API (JWT-checking unless ``require_auth=False``)."""
    return Upstream(name=name, issuer=issuer, audience=audience, require_auth=require_auth)


def big_pattern(size: int) -> bytes:
    """The exact body ``GET /big?n=size`` streams, to compare downloads against."""
    return _pattern(0, size)


# ------------------------------------------------------------ WebSocket upstream

WS_SUBPROTOCOLS = ("chat.v2", "chat.v1")  # what the WebSocket upstream speaks, preferred first


class WebSocketUpstream:
    """A WebSocket upstream (and a long-running SSE source) that verifies the bearer token's
    signature and audience against the IdP's JWKS, like :class:`Upstream`.

    WebSocket paths (an upgrade without a valid token for ``audience`` is refused with 401)::

        /echo    echoes text and binary messages; the text ``close:<code>:<reason>`` makes it
                 close with that code and reason
        /ticks   sends ``tick <n>`` every ``interval`` seconds until closed

    The first of :data:`WS_SUBPROTOCOLS` that the client offers is accepted.
    ``GET /sse`` sends an event every ``interval`` seconds until the client leaves (``?n=N``:
    N events). ``connections`` records each accepted upgrade (path, query, aud, sub, exp,
    subprotocol, headers, and the close code the client sent), ``refused`` each refusal,
    ``ticks_sent`` every tick sent.
    """

    def __init__(
        self, *, issuer: str, audience: str, name: str = "ws", interval: float = 0.1
    ) -> None:
        self.name = name
        self.issuer = issuer
        self.audience = audience
        self.interval = interval
        self._jwks = _JwksCache(issuer)
        self._lock = threading.Lock()
        self.connections: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.ticks_sent = 0
        self.sse_open = 0
        self._server = ServerThread(self._build_app(), ws="websockets-sansio")
        self.base_url = self._server.base_url
        self.url = f"{self.base_url}/"

    def _build_app(self) -> Starlette:
        from starlette.routing import WebSocketRoute
        from starlette.websockets import WebSocket, WebSocketDisconnect

        async def websocket_endpoint(websocket: WebSocket) -> None:
            try:
                claims = await verify_bearer(
                    websocket.headers.get("authorization"), jwks=self._jwks, audience=self.audience
                )
            except VERIFY_ERRORS as exc:
                with self._lock:
                    self.refused.append(str(exc) or type(exc).__name__)
                await websocket.send_denial_response(
                    JSONResponse({"error": "invalid_token"}, status_code=401)
                )
                return
            offered = websocket.scope.get("subprotocols") or []
            chosen = next((p for p in WS_SUBPROTOCOLS if p in offered), None)
            entry: dict[str, Any] = {
                "path": websocket.url.path,
                "query": websocket.url.query,
                "aud": claims.get("aud"),
                "sub": claims.get("sub"),
                "exp": claims.get("exp"),
                "subprotocol": chosen,
                "headers": {k.lower(): v for k, v in websocket.headers.items()},
                "close_code": None,
                "close_reason": None,
            }
            with self._lock:
                self.connections.append(entry)
            await websocket.accept(subprotocol=chosen)
            if websocket.url.path == "/ticks":
                await ticks(websocket, entry)
            else:
                await echo(websocket, entry)

        async def echo(websocket: WebSocket, entry: dict[str, Any]) -> None:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    entry.update(close_code=message.get("code"), close_reason=message.get("reason"))
                    return
                text, data = message.get("text"), message.get("bytes")
                if text is not None and text.startswith("close:"):
                    _, code, reason = text.split(":", 2)
                    await websocket.close(int(code), reason)
                    return
                if text is not None:
                    await websocket.send_text(text)
                elif data is not None:
                    await websocket.send_bytes(data)

        async def ticks(websocket: WebSocket, entry: dict[str, Any]) -> None:
            async def send_ticks() -> None:
                n = 0
                while True:
                    await websocket.send_text(f"tick {n}")
                    with self._lock:
                        self.ticks_sent += 1
                    n += 1
                    await asyncio.sleep(self.interval)

            sender = asyncio.create_task(send_ticks())
            try:
                message = await websocket.receive()
                while message["type"] != "websocket.disconnect":
                    message = await websocket.receive()
                entry.update(close_code=message.get("code"), close_reason=message.get("reason"))
            except WebSocketDisconnect as exc:
                entry.update(close_code=exc.code)
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sender

        async def sse(request: Request) -> Response:
            try:
                await verify_bearer(
                    request.headers.get("authorization"), jwks=self._jwks, audience=self.audience
                )
            except VERIFY_ERRORS:
                return JSONResponse({"error": "invalid_token"}, status_code=401)
            limit = int(request.query_params.get("n", "0"))

            async def events() -> AsyncIterator[bytes]:
                with self._lock:
                    self.sse_open += 1
                try:
                    n = 0
                    while not limit or n < limit:
                        yield f"id: {n}\nevent: tick\ndata: {n}\n\n".encode()
                        n += 1
                        await asyncio.sleep(self.interval)
                finally:
                    with self._lock:
                        self.sse_open -= 1

            return StreamingResponse(
                events(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
            )

        return Starlette(
            routes=[
                Route("/sse", sse, methods=["GET"]),
                WebSocketRoute("/{path:path}", websocket_endpoint),
            ]
        )

    def stop(self) -> None:
        """Stop the server thread."""
        self._server.stop()

    def __enter__(self) -> WebSocketUpstream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"WebSocketUpstream(url={self.url!r}, audience={self.audience!r})"


def start_ws_upstream(
    *, issuer: str, audience: str, name: str = "ws", interval: float = 0.1
) -> WebSocketUpstream:
    """Start a JWT-checking WebSocket + long-SSE upstream (see :class:`WebSocketUpstream`)."""
    return WebSocketUpstream(issuer=issuer, audience=audience, name=name, interval=interval)
