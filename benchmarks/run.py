"""One command, one run, all on loopback: ``benchmarks/run`` (see benchmarks/README.md).

Starts an upstream (nginx where installed, else benchmarks/upstream.py) and the upload sink,
the bare proxy baseline, the e2e suite's OpenID Provider, and the gateway as its own process;
logs a user in; drives wrk; writes a markdown report (and the raw numbers as JSON beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from tests.e2e.servers import free_port, start_idp

from . import phases, stack
from .bench import LARGE, SMALL, Bench, check_route, login, session_headers
from .machine import CpuPlan, load1
from .peers.phase import run_peers
from .profile import profile_token_route
from .report import BARE, DPOP, NONE, TOKEN, Results, render
from .upstream import SMALL_JSON
from .wrk import wrk_binary

DPOP_COOKIE = "gw_dpop"
SECTIONS = [
    ("proxy", "Proxy overhead: direct, bare proxy, gateway", BARE),
    ("forward-auth", "nginx + forward-auth beside the gateway's own proxy", None),
    ("store", "Session store, access log, GC: token route", None),
    ("client", "Upstream HTTP client of a bare proxy (small JSON)", None),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per cell")
    parser.add_argument("--warmup", type=float, default=2, help="unrecorded seconds per cell")
    parser.add_argument(
        "--settle",
        type=float,
        default=1,
        help="idle seconds before each measurement (after the warm-up, if any): wrk stops "
        "mid-answer, and the target finishes relaying what it cut off (1 MiB x 64) first",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of the proxy grid per cell; the median run is recorded",
    )
    parser.add_argument("--connections", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument(
        "--bodies", default="small,large", help="small (207-byte JSON), large (1 MiB)"
    )
    parser.add_argument("--store-connections", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--economy-seconds", type=float, default=60)
    # 4, not 5: the provider's `exp` has whole seconds, so a token is due 14-15 s after it is
    # minted with skew 5 and a 60 s run sees a 5th exchange at its very end (benchmarks/README.md).
    parser.add_argument("--economy-skew", type=float, default=4)
    parser.add_argument("--economy-connections", type=int, default=64)
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--transfer-bytes", type=int, default=stack.ONE_GIB)
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument("--profile-out", help="also keep py-spy's raw collapsed stacks here")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated phases to leave out: transfers,proxy,client,profile,"
        "forward-auth,store,economy,peers,sessions,dpop (the DPoP gateway of the proxy grid)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every phase, tiny: 1 s cells, 1 connection, 16 MiB transfers, 1,000 sessions, "
        "a 3 s economy run, no profile (the smoke test runs this)",
    )
    parser.add_argument("--out", default="benchmarks/results.md", help="markdown report path")
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=0.0,
        help="first wait (polling every 30 s, at most --quiet-wait s) for a 1-minute load "
        "average below this; 0: start at once",
    )
    parser.add_argument("--quiet-wait", type=float, default=1800)
    return parser


def _apply_smoke(args: argparse.Namespace) -> None:
    if args.smoke:
        args.duration, args.warmup, args.settle, args.repeat = 1, 0, 0, 1
        args.connections = args.connections or [1]
        args.store_connections = args.store_connections or [1]
        args.economy_seconds, args.economy_connections = 3, 4
        args.sessions, args.transfer_bytes = 1000, 16 * 1024 * 1024
        args.skip = ",".join(filter(None, [args.skip, "profile"]))
    args.connections = args.connections or [1, 16, 64]
    args.store_connections = args.store_connections or [64]
    args.skip = set(filter(None, args.skip.split(",")))


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("uvicorn", "uvloop", "httptools", "starlette", "aiohttp"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    nginx = stack.nginx_binary()
    if nginx:
        found = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
        out["nginx"] = found.stderr.strip().rpartition("/")[2]
    found = subprocess.run([wrk_binary(), "-v"], capture_output=True, text=True, check=False)
    out["wrk"] = (found.stdout + found.stderr).split()[1] if found.stdout or found.stderr else "?"
    return out


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _congestion_control() -> str:
    """The kernel's TCP congestion control: on loopback BBR stalls some large answers for
    20-110 ms after heavy load, where cubic does not (benchmarks/README.md, "1 MiB p99")."""
    try:
        name = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "TCP congestion control unknown"
    return f"TCP congestion control {name}"


def _wait_for_quiet(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.quiet_wait
    while args.quiet_below and load1() >= args.quiet_below and time.monotonic() < deadline:
        print(f"load average {load1():.2f} >= {args.quiet_below}: waiting", flush=True)
        time.sleep(30)


def run(args: argparse.Namespace) -> Results:
    _wait_for_quiet(args)
    plan = CpuPlan.detect()
    results = Results(
        command="benchmarks/run " + shlex.join(sys.argv[1:]),
        machine=f"{_cpu_model()}, {plan.describe()}, {_congestion_control()}",
        started=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        load1_before=load1(),
        versions=_versions(),
    )
    if args.repeat > 1:
        results.notes.append(
            f"Proxy overhead rows: the median (by req/s) of {args.repeat} rounds per cell, "
            "targets interleaved, each round starting with another target. The ratios to the "
            "bare proxy (table and targets) are the medians of the per-round ratios: each "
            "gateway cell divided by the bare proxy's cell of the same round (at most a round "
            "apart), so they are not the ratios of the rows shown (each target's median round)."
        )
    bench = Bench(args=args, plan=plan, results=results)
    plan.pin_servers_here()  # every server started below inherits the server core
    skip = args.skip
    with contextlib.ExitStack() as stop:
        has_nginx = stack.nginx_binary() is not None
        sink, sink_pid = stop.enter_context(stack.python_server("upstream"))
        upstream, upstream_pid = (
            stop.enter_context(stack.nginx_upstream()) if has_nginx else (sink, sink_pid)
        )
        if not has_nginx:
            results.notes.append("nginx not installed: the upstream is benchmarks/upstream.py")
        bare, bare_pid = stop.enter_context(
            stack.python_server("bare_proxy", "--upstream", upstream)
        )
        urls = {"upstream": upstream, "sink": sink}
        idp = stop.enter_context(start_idp(at_ttl=3600))
        port = free_port()
        config = stack.gateway_config(idp, port=port, upstream=upstream, sink=sink)
        gateway = stop.enter_context(stack.gateway_process(config, port))
        pid = stack.gateway_pid(gateway)
        bench.headers = session_headers(asyncio.run(login(gateway.base_url, idp)))
        dpop_gateway = None
        if "dpop" not in skip:
            # The same configuration with tokens.dpop required (the test IdP binds tokens for
            # any client that sends a proof), its own cookie beside the first one's.
            dpop_port = free_port()
            dpop_config = stack.gateway_config(idp, port=dpop_port, upstream=upstream, sink=sink)
            dpop_config["tokens"] = {**dpop_config["tokens"], "dpop": "required"}
            dpop_config["session"] = {**dpop_config["session"], "cookie_name": DPOP_COOKIE}
            dpop_config["forward_auth"] = {"enabled": False}
            dpop_gateway = stop.enter_context(stack.gateway_process(dpop_config, dpop_port))
            cookie = asyncio.run(login(dpop_gateway.base_url, idp, cookie_name=DPOP_COOKIE))
            bench.headers["Cookie"] += f"; {DPOP_COOKIE}={cookie}"
            check_route(f"{dpop_gateway.base_url}/api/small.json", bench.headers, expect=SMALL_JSON)
        idp.reset_stats()
        for prefix in ("/api", "/pub"):
            check_route(f"{gateway.base_url}{prefix}/small.json", bench.headers, expect=SMALL_JSON)
        check_route(f"{bare}/small.json", bench.headers, expect=SMALL_JSON)
        time.sleep(1)
        phases.rss_now(bench, pid, "idle, after login and one request per route")
        if "transfers" not in skip:
            print("transfers", flush=True)
            download = "/api/1g.bin" if has_nginx else f"/sink/big?n={args.transfer_bytes}"
            if has_nginx and args.transfer_bytes != stack.ONE_GIB:
                download = f"/sink/big?n={args.transfer_bytes}"
            phases.transfers(
                bench, gateway.base_url, pid, size=args.transfer_bytes, download_path=download
            )
        if "proxy" not in skip:
            print("proxy overhead", flush=True)
            direct = "direct (nginx)" if has_nginx else "direct (python upstream)"
            targets: dict[str, tuple[str, tuple[int, ...]]] = {
                direct: (upstream, (upstream_pid,)),
                BARE: (bare, (bare_pid,)),
                NONE: (f"{gateway.base_url}/pub", (pid,)),
                TOKEN: (f"{gateway.base_url}/api", (pid,)),
            }
            if dpop_gateway is not None:
                targets[DPOP] = (f"{dpop_gateway.base_url}/api", (stack.gateway_pid(dpop_gateway),))
            phases.proxy_grid(bench, "proxy", targets, pid)
            phases.rss_now(bench, pid, "after the proxy runs")
            phases.exchanges_during(bench, idp, "proxy runs (one session, tokens live 1 h)")
        if "client" not in skip:
            print("upstream client", flush=True)
            phases.client_choice(bench, upstream, (bare, bare_pid))
        if "profile" not in skip:
            print("profile", flush=True)
            profile_token_route(bench, gateway.base_url, pid)
        if "forward-auth" not in skip and has_nginx:
            print("forward-auth", flush=True)
            phases.forward_auth(bench, gateway.base_url, pid, upstream)
        if "store" not in skip:
            print("session stores", flush=True)
            phases.store_comparison(bench, idp, (gateway.base_url, pid), urls)
        if "economy" not in skip:
            print("token economy", flush=True)
            phases.token_economy(bench, urls)
        if "peers" not in skip:
            print("peers: nginx, gateway, Node.js BFF, Python BFF", flush=True)
            run_peers(bench, upstream, sink)
    if "sessions" not in skip:
        print("sessions in memory", flush=True)
        phases.sessions_memory(bench)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.settle < 0 or args.warmup < 0 or args.duration <= 0:
        parser.error("--settle and --warmup must be >= 0, --duration > 0")
    _apply_smoke(args)
    if args.smoke:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
    results = run(args)
    text = render(results, SECTIONS)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results.to_json(), indent=1))
    print(f"\nwrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["LARGE", "SMALL", "main"]
