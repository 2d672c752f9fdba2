"""Command line: ``gateway run`` serves, ``gateway check`` validates (exit 2 on bad config),
``gateway keys`` prints the public JWKS of the private_key_jwt keys."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence

from . import __version__
from .allocator import keep_freed_memory
from .errors import ConfigError, GatewayError
from .settings import Settings, load_settings

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve the gateway with uvicorn")
    run.add_argument(
        "--config", help="YAML file (default $GATEWAY_CONFIG, then config/gateway.yaml)"
    )
    run.add_argument("--host", help="bind address (default server.host)")
    run.add_argument("--port", type=int, help="bind port (default server.port)")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the port (default 1; more than 1 needs session.store redis)",
    )
    check = sub.add_parser("check", help="validate the configuration and print the route table")
    check.add_argument(
        "--config", help="YAML file (default $GATEWAY_CONFIG, then config/gateway.yaml)"
    )
    check.add_argument(
        "--online",
        action="store_true",
        help="also fetch discovery and JWKS, and one client token per client route",
    )
    keys = sub.add_parser(
        "keys", help="print the public JWKS of oidc.private_key(_file), to register at the IdP"
    )
    keys.add_argument(
        "--config", help="YAML file (default $GATEWAY_CONFIG, then config/gateway.yaml)"
    )
    sessions = sub.add_parser(
        "sessions", help="list or end a user's sessions (through the shared session store)"
    )
    sessions.add_argument("action", choices=("list", "revoke"))
    sessions.add_argument(
        "--config", help="YAML file (default $GATEWAY_CONFIG, then config/gateway.yaml)"
    )
    sessions.add_argument("--sub", help="the user (OIDC sub)")
    sessions.add_argument("--sid", help="revoke: the IdP session (OIDC sid) instead")
    sessions.add_argument("--id", dest="handle", help="revoke: only this session (from list)")
    return parser


def print_public_jwks(settings: Settings) -> int:
    """The public half of the client-authentication keys, as a JWKS on stdout."""
    from .client_auth import configured_keys
    from .client_keys import public_jwks

    try:
        keys = configured_keys(settings.oidc)
    except ValueError as exc:
        print(f"gateway: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not keys:
        print(
            "gateway: no private key: set GATEWAY_OIDC__PRIVATE_KEY or oidc.private_key_file",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    print(json.dumps(public_jwks(keys), indent=2))
    return EXIT_OK


def format_route_table(settings: Settings) -> str:
    """The route table as aligned text."""
    rows = [("NAME", "PREFIX", "UPSTREAM", "AUTH", "AUDIENCE", "SCOPES")]
    for r in sorted(settings.routes, key=lambda r: r.prefix):
        rows.append(
            (r.name, r.prefix, r.upstream, r.auth, r.audience or "-", " ".join(r.scopes) or "-")
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


async def _check_online(settings: Settings) -> bool:
    """Discovery and JWKS, then one client token per (audience, scopes) of the client routes,
    each reported on its own line; False when any of them failed."""
    import httpx

    from .dpop import DPoP
    from .oidc import OIDCClient
    from .sessions import MemorySessionStore
    from .tokens import checked_token

    secret = (
        settings.session.secret_key[0].get_secret_value() if settings.session.secret_key else ""
    )
    dpop = DPoP(
        settings.tokens.dpop,
        store=MemorySessionStore(idle_timeout=60),
        client_secret=secret or "gateway check",
    )
    async with httpx.AsyncClient(timeout=settings.oidc.http_timeout) as http:
        oidc = OIDCClient(settings, http, dpop=dpop)
        metadata = await oidc.metadata()
        await oidc.refresh_jwks()
        print(f"issuer ok: {metadata['issuer']}")
        print(f"token endpoint: {metadata['token_endpoint']}")
        par = metadata.get("pushed_authorization_request_endpoint")
        uses_par = settings.oidc.par != "off" and isinstance(par, str)
        print(f"pushed authorization requests: {'on' if uses_par else 'off'}")
        print(f"DPoP: {'on' if dpop.active else 'off'} (tokens.dpop {settings.tokens.dpop})")
        ok = True
        asked: set[tuple[str, tuple[str, ...]]] = set()
        for route in settings.routes:
            if route.auth not in ("client", "user_or_client") or route.audience is None:
                continue
            key = (route.audience, tuple(route.scopes))
            if key in asked:
                continue
            asked.add(key)
            try:
                dpop_key = dpop.client_key if dpop.active else None
                answer = await oidc.client_credentials(
                    audience=route.audience, scopes=route.scopes, dpop_key=dpop_key
                )
                token = checked_token(
                    answer,
                    audience=route.audience,
                    scopes=route.scopes,
                    now=time.time(),
                    allow_opaque=settings.tokens.allow_opaque,
                    dpop_jkt=dpop_key.jkt if dpop_key is not None else None,
                    dpop_required=dpop.required,
                )
            except GatewayError as exc:
                ok = False
                print(f"client token for route {route.name}: FAILED {exc.error}: {exc.message}")
                continue
            lifetime = int(token.expires_at - token.issued_at)
            print(
                f"client token for route {route.name}: ok (audience {route.audience}, "
                f"scope {token.scope or '-'}, expires in {lifetime} s)"
            )
        return ok


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"gateway: invalid configuration:\n{exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "keys":
        return print_public_jwks(settings)
    if args.command == "check":
        print(f"configuration ok: {len(settings.routes)} routes, dialect {settings.oidc.dialect}")
        print(format_route_table(settings))
        if args.online:
            try:
                ok = asyncio.run(_check_online(settings))
            except GatewayError as exc:
                print(f"gateway: {exc.error}: {exc.message}", file=sys.stderr)
                return EXIT_FAILED
            return EXIT_OK if ok else EXIT_FAILED
        return EXIT_OK
    if args.command == "sessions":
        return manage_sessions(
            settings, args.action, sub=args.sub, sid=args.sid, handle=args.handle
        )
    if args.workers < 1:
        print("gateway: --workers must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    if args.workers > 1:
        problem = workers_problem(settings)
        if problem is not None:
            print(f"gateway: invalid configuration:\n{problem}", file=sys.stderr)
            return EXIT_CONFIG
        if args.config is not None:  # each worker loads the same file
            os.environ["GATEWAY_CONFIG"] = args.config
    return serve(settings, host=args.host, port=args.port, config=args.config, workers=args.workers)


def manage_sessions(
    settings: Settings,
    action: str,
    *,
    sub: str | None,
    sid: str | None = None,
    handle: str | None = None,
) -> int:
    """``gateway sessions list|revoke``: the admin API's actions, through the store (Redis:
    the sessions every instance shares; ended everywhere through the session events)."""
    if settings.session.store != "redis":
        print(
            "gateway: the memory store lives inside the running gateway process; "
            "use its admin API (admin.port) instead",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if action == "list" and not sub:
        print("gateway: sessions list needs --sub", file=sys.stderr)
        return EXIT_CONFIG
    if action == "revoke" and not (sub or sid):
        print("gateway: sessions revoke needs --sub or --sid", file=sys.stderr)
        return EXIT_CONFIG
    try:
        print(asyncio.run(_manage_sessions(settings, action, sub, sid, handle)))
    except GatewayError as exc:
        print(f"gateway: {exc.error}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


async def _manage_sessions(
    settings: Settings, action: str, sub: str | None, sid: str | None, handle: str | None
) -> str:
    import json

    from .services import Services

    services = Services(settings)
    try:
        admin = services.session_admin
        if action == "list" and sub:
            return json.dumps({"sessions": [s.to_json() for s in await admin.list_sessions(sub)]})
        return json.dumps({"ended": await admin.revoke(sub=sub, sid=sid, handle=handle)})
    finally:
        await services.shutdown()


def workers_problem(settings: Settings) -> str | None:
    """Why ``settings`` cannot run in several worker processes, or None."""
    if settings.session.store != "redis":
        return (
            "session.store: --workers > 1 needs the redis store (each worker process would "
            "keep its own memory store: a session created by one would be unknown to the others)"
        )
    if settings.metrics.enabled and settings.metrics.port is not None:
        return "metrics.port: one port cannot be bound by several workers; leave it unset"
    return None


def worker_app() -> object:
    """The app of one worker process (``--workers`` > 1): uvicorn imports and calls this."""
    from .app import create_app
    from .observability import configure_logging

    settings = load_settings(None)
    configure_logging(settings.log)
    # SIGHUP: uvicorn's supervisor restarts the workers, each reading the file again.
    app = create_app(settings, settings_source=lambda: load_settings(None))
    gc.collect()
    gc.freeze()
    keep_freed_memory()
    return app


def serve(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    config: str | None = None,
    workers: int = 1,
) -> int:
    """Run the gateway under uvicorn until interrupted (``workers`` processes, see above)."""
    import uvicorn

    from .app import create_app
    from .observability import configure_logging

    configure_logging(settings.log)
    # uvicorn refuses browser WebSocket messages over ws_max_size before the route's own limit
    # (websocket_max_message_bytes) is checked: let the largest route limit through.
    ws_limits = [r.websocket_max_message_bytes for r in settings.routes if r.websocket]
    options: dict[str, object] = {
        "host": host or settings.server.host,
        "port": port if port is not None else settings.server.port,
        "proxy_headers": False,
        "server_header": False,
        "timeout_graceful_shutdown": math.ceil(settings.server.graceful_timeout),
        "ws_max_size": max([16 * 1024 * 1024, *ws_limits]) + 1,
        "log_config": None,
        "access_log": False,
    }
    if workers > 1:
        # Each worker builds its own app (its own store client, caches and invalidation
        # connection) from the same configuration: worker_app.
        uvicorn.run("gateway.cli:worker_app", factory=True, workers=workers, **options)  # type: ignore[arg-type]
        return EXIT_OK
    # SIGHUP reads the file (and the environment) again: reload.py.
    app = create_app(settings, settings_source=lambda: load_settings(config))
    # Everything built so far lives as long as the process: move it out of the collector's
    # reach, so full collections stay short (p99 51 -> 12 ms at 16 connections, see
    # benchmarks/README.md). Here, not in the app: an embedding app decides for itself.
    gc.collect()
    gc.freeze()
    # Freed body buffers stay in the heap for the next body (no page faults per request, see
    # gateway/allocator.py).
    if not keep_freed_memory():
        logging.getLogger("gateway").info(
            "heap allocator left as it is (set by the environment, or not glibc)"
        )
    uvicorn.run(app, **options)  # type: ignore[arg-type]
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
