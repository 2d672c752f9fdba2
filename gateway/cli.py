"""Command line: ``gateway run`` serves, ``gateway check`` validates (exit 2 on bad config)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import sys
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
    check = sub.add_parser("check", help="validate the configuration and print the route table")
    check.add_argument(
        "--config", help="YAML file (default $GATEWAY_CONFIG, then config/gateway.yaml)"
    )
    check.add_argument("--online", action="store_true", help="also fetch discovery and JWKS")
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


async def _check_online(settings: Settings) -> None:
    import httpx

    from .oidc import OIDCClient

    async with httpx.AsyncClient(timeout=settings.oidc.http_timeout) as http:
        oidc = OIDCClient(settings, http)
        metadata = await oidc.metadata()
        await oidc.refresh_jwks()
        print(f"issuer ok: {metadata['issuer']}")
        print(f"token endpoint: {metadata['token_endpoint']}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"gateway: invalid configuration:\n{exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        print(f"configuration ok: {len(settings.routes)} routes, dialect {settings.oidc.dialect}")
        print(format_route_table(settings))
        if args.online:
            try:
                asyncio.run(_check_online(settings))
            except GatewayError as exc:
                print(f"gateway: {exc.error}: {exc.message}", file=sys.stderr)
                return EXIT_FAILED
        return EXIT_OK
    if args.command == "sessions":
        return manage_sessions(
            settings, args.action, sub=args.sub, sid=args.sid, handle=args.handle
        )
    return serve(settings, host=args.host, port=args.port, config=args.config)


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


def serve(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    config: str | None = None,
) -> int:
    """Run the gateway under uvicorn until interrupted."""
    import uvicorn

    from .app import create_app
    from .observability import configure_logging

    configure_logging(settings.log)
    # uvicorn refuses browser WebSocket messages over ws_max_size before the route's own limit
    # (websocket_max_message_bytes) is checked: let the largest route limit through.
    ws_limits = [r.websocket_max_message_bytes for r in settings.routes if r.websocket]
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
    uvicorn.run(
        app,
        host=host or settings.server.host,
        port=port if port is not None else settings.server.port,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=math.ceil(settings.server.graceful_timeout),
        ws_max_size=max([16 * 1024 * 1024, *ws_limits]) + 1,
        log_config=None,
        access_log=False,
    )
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
