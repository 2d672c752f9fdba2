"""A victim's latency while slow request bodies are open (review finding 2), as JSON.

    .venv/bin/python -m benchmarks.slow_bodies [--slow 1000] [--declared 100] [--hold 40]

Everything on loopback: the e2e suite's test IdP and upstreams, a ``python -m gateway run``
process with the e2e configuration (defaults otherwise), ``--slow`` connections that each send
``POST /public/upload`` with ``Content-Length: --declared`` and one byte of body, then nothing.
Once the gateway has taken them in, a logged-in user sends ``--victims`` GETs, one after the
other, alternately to ``/api/`` and ``/billing/`` (two other upstreams). The slow connections
close after ``--hold`` seconds at the latest; each victim's latency counts until its answer,
so a victim that waited for the slow senders to go shows it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time
from typing import Any

import httpx

from tests.e2e.gateway_harness import CSRF, gateway_config, start_upstreams
from tests.e2e.login import browser_login
from tests.e2e.processes import ROOT, GatewayProcess
from tests.e2e.servers import free_port, start_idp
from tests.e2e.slow_bodies import raise_fd_limit, slow_senders, wait_for_connections

SETTLE = 3.0


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit(4 * args.slow + 1024)
    with start_idp(at_ttl=600, rotate=False) as idp, start_upstreams(idp) as upstreams:
        port = free_port()
        gateway = GatewayProcess(gateway_config(idp, port, upstreams), port=port, env={})
        try:
            async with httpx.AsyncClient(timeout=args.hold + 30) as client:
                login = await browser_login(
                    client, f"{gateway.base_url}/auth/login?return_to=/", idp_issuer=idp.issuer
                )
                assert login.status_code == 302, login.text
                victims: list[dict[str, Any]] = []
                async with slow_senders(
                    gateway.base_url, "/public/upload", args.slow, declared=args.declared
                ) as senders:
                    await wait_for_connections(upstreams["public"], args.slow, at_most=SETTLE)
                    held = upstreams["public"].open_connections()
                    opened = time.monotonic()

                    async def victim_run() -> None:
                        for i in range(args.victims):
                            path = "/api/x" if i % 2 == 0 else "/billing/y"
                            started = time.perf_counter()
                            response = await client.get(gateway.base_url + path, headers=CSRF)
                            seconds = time.perf_counter() - started
                            victims.append(
                                {"path": path, "ms": round(seconds * 1000, 1),
                                 "status": response.status_code}
                            )  # fmt: skip

                    running = asyncio.ensure_future(victim_run())
                    # The slow senders stay until the victims are done or --hold has passed.
                    await asyncio.wait({running}, timeout=args.hold)
                    held_for = time.monotonic() - opened
                    await senders.close()
                await running
        finally:
            gateway.stop()
    latencies = [v["ms"] for v in victims]
    return {
        "commit": _commit(),
        "slow_connections": args.slow,
        "declared_body_bytes": args.declared,
        "upstream_connections_held_by_slow_senders": held,
        "slow_senders_open_s": round(held_for, 1),
        "victim_ms_p50": round(statistics.median(latencies), 1),
        "victim_ms_max": max(latencies),
        "victim_statuses": sorted({v["status"] for v in victims}),
        "victims": victims,
    }


def _commit() -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--slow", type=int, default=1000, help="slow connections")
    parser.add_argument("--declared", type=int, default=100, help="their Content-Length")
    parser.add_argument("--victims", type=int, default=10, help="victim requests")
    parser.add_argument(
        "--hold", type=float, default=40.0, help="seconds the slow connections stay at most"
    )
    args = parser.parse_args()
    if args.slow < 0 or args.victims < 1 or args.hold <= 0:
        parser.error("--slow must be 0 (a baseline) or more, --victims 1 or more, --hold > 0")
    print(json.dumps(asyncio.run(_measure(args)), indent=2))


if __name__ == "__main__":
    main()
