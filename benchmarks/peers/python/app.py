"""Benchmark peer: a BFF on Auth0's own Python SDK, as small as its docs make it.

FastAPI + auth0-fastapi (login, callback, the session; ``get_access_token(audience=...)`` for
each route's audience, the SDK's MRRT call) + a streaming httpx proxy
(``client.send(request, stream=True)`` relayed by a ``StreamingResponse``), on uvicorn with
uvloop and httptools, the gateway's server stack.

What was done to help it (benchmarks/README.md, "Peers"):

- a server-side session store in this process (the SDK's ``StateStore`` interface), holding
  the SDK's objects as they are, instead of the default encrypted cookie: wrk replays one
  cookie, so a cookie session would refresh on every request of a second audience. (The SDK's
  own ``StatefulStateStore`` keys every session by one fixed identifier, so all users would
  share the last login's session: this store gives each login its own random id.)
- one pooled ``httpx.AsyncClient`` for the upstream, built once; no access log.

Configuration (environment): PEER_DOMAIN (the IdP as ``host:port``: the SDK makes it
``https://``), PEER_CLIENT_ID, PEER_CLIENT_SECRET, PEER_SECRET, PEER_BASE_URL, PEER_UPSTREAM,
PEER_ROUTES (JSON: [{"prefix": "/api", "audience": "...", "scope": "..."}]),
PEER_LOGIN_AUDIENCE. ``python app.py --port P``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from typing import Any

import httpx
import uvicorn
from auth0_fastapi.auth.auth_client import AuthClient
from auth0_fastapi.config import Auth0Config
from auth0_fastapi.server.routes import register_auth_routes, router
from auth0_server_python.auth_types import StateData
from auth0_server_python.store.abstract import StateStore
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

COOKIE = "_a0_session"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
NOT_FORWARDED = HOP_BY_HOP | {"host", "cookie", "authorization"}


class MemoryStateStore(StateStore):  # type: ignore[misc]
    """Sessions in a dict keyed by a random id in the session cookie."""

    def __init__(self, expiration: int = 259200) -> None:
        self.sessions: dict[str, Any] = {}
        self.expiration = expiration

    async def set(
        self,
        identifier: str,
        state: Any,
        remove_if_exists: bool = False,
        options: dict[str, Any] | None = None,
    ) -> None:
        request, response = (options or {}).get("request"), (options or {}).get("response")
        session_id = request.cookies.get(COOKIE) if request is not None else None
        if not session_id or session_id not in self.sessions:
            session_id = secrets.token_urlsafe(32)
        if isinstance(state, dict):
            state = StateData.model_validate(state)
        self.sessions[session_id] = state
        if response is not None:
            response.set_cookie(COOKIE, session_id, httponly=True, max_age=self.expiration)

    async def get(self, identifier: str, options: dict[str, Any] | None = None) -> Any:
        request = (options or {}).get("request")
        session_id = request.cookies.get(COOKIE) if request is not None else None
        return self.sessions.get(session_id) if session_id else None

    async def delete(self, identifier: str, options: dict[str, Any] | None = None) -> None:
        request, response = (options or {}).get("request"), (options or {}).get("response")
        if request is not None:
            self.sessions.pop(request.cookies.get(COOKIE, ""), None)
        if response is not None:
            response.delete_cookie(COOKIE)

    async def delete_by_logout_token(
        self, claims: dict[str, Any], options: dict[str, Any] | None = None
    ) -> None:
        return None


def create_app() -> FastAPI:
    routes = json.loads(os.environ["PEER_ROUTES"])
    login_audience = os.environ["PEER_LOGIN_AUDIENCE"]
    upstream = os.environ["PEER_UPSTREAM"].rstrip("/")
    config = Auth0Config(
        domain=os.environ["PEER_DOMAIN"],
        client_id=os.environ["PEER_CLIENT_ID"],
        client_secret=os.environ["PEER_CLIENT_SECRET"],
        app_base_url=os.environ["PEER_BASE_URL"],
        secret=os.environ["PEER_SECRET"],
        audience=login_audience,
        # MRRT: default scopes per audience (the SDK's documented dict form), each the scope
        # the IdP answers with for that audience: the SDK reuses a token only when its answered
        # scope covers the requested one. The login asks for every scope (GET
        # /auth/login?scope=...: openid profile email offline_access and each route's).
        authorization_params={
            "scope": {r["audience"]: r["scope"] for r in routes},
            "prompt": "consent",
        },
    )
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    app.state.auth_client = auth_client = AuthClient(config, state_store=MemoryStateStore())
    register_auth_routes(router, config)
    app.include_router(router)
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(30.0),
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
    )

    def add_route(prefix: str, audience: str) -> None:
        async def proxy(request: Request, path: str) -> Response:
            store_options = {"request": request, "response": Response()}
            try:
                token = await auth_client.client.get_access_token(
                    audience=audience, store_options=store_options
                )
            except Exception as exc:  # the SDK's AccessTokenError and friends
                return JSONResponse({"error": "login_required", "detail": str(exc)}, 401)
            headers = [(k, v) for k, v in request.headers.items() if k not in NOT_FORWARDED]
            headers.append(("authorization", f"Bearer {token}"))
            url = f"{upstream}/{path}"
            if request.url.query:
                url += "?" + request.url.query
            has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
            upstream_request = client.build_request(
                request.method, url, headers=headers, content=request.stream() if has_body else None
            )
            try:
                answer = await client.send(upstream_request, stream=True)
            except httpx.HTTPError:
                return JSONResponse({"error": "upstream_unavailable"}, 502)
            return StreamingResponse(
                answer.aiter_raw(),
                status_code=answer.status_code,
                headers={k: v for k, v in answer.headers.items() if k not in HOP_BY_HOP},
                background=BackgroundTask(answer.aclose),
            )

        app.add_api_route(
            f"{prefix}/{{path:path}}",
            proxy,
            methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        )

    for route in routes:
        add_route(route["prefix"].rstrip("/"), route["audience"])
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        create_app(),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
