"""The phases of a run; each adds rows or facts to ``bench.results``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time

from tests.e2e.processes import ROOT, RedisProcess
from tests.e2e.servers import API, BILLING, free_port, start_idp

from . import stack
from .bench import LARGE, SMALL, Bench, check_route, login, session_headers
from .machine import RssSampler, mib, rss_bytes
from .report import BARE, PAIRED, TOKEN, Row, economy_expected, pair_ratios, paired_key
from .upstream import SMALL_JSON
from .wrk import check_clean, run_wrk


def transfers(bench: Bench, gateway_url: str, pid: int, *, size: int, download_path: str) -> None:
    """A large upload and a large download through the token route; the gateway's RSS
    growth (peak during the transfer minus RSS just before) must stay under 16 MiB."""
    sampler = RssSampler(pid, interval=0.05)
    lines = ["| transfer | size | MiB/s | RSS before | peak RSS | growth | target |"]
    lines.append("|---|---:|---:|---:|---:|---:|---|")
    headers = [f"{k}: {v}" for k, v in bench.headers.items()]
    try:
        for mode, url in (
            ("upload", f"{gateway_url}/sink/upload"),
            ("download", f"{gateway_url}{download_path}"),
        ):
            time.sleep(0.5)
            before = sampler.reset()
            command = [sys.executable, "-m", "benchmarks.transfer", mode, url, str(size)]
            for header in headers:
                command += ["-H", header]
            done = subprocess.run(
                [*bench.plan.load_prefix(), *command],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
            )
            result = json.loads(done.stdout)
            if result["status"] != 200 or result["bytes"] != size:
                raise RuntimeError(f"{mode} through the gateway failed: {result}")
            growth = sampler.peak - before
            ok = growth < 16 * 1024 * 1024
            lines.append(
                f"| {mode} (token route) | {mib(size):,.0f} MiB | {result['mib_per_s']:,.0f} | "
                f"{mib(before):.1f} MiB | {mib(sampler.peak):.1f} MiB | {mib(growth):.1f} MiB | "
                f"< 16 MiB: {'yes' if ok else '**no**'} |"
            )
            print(f"  {mode} {mib(size):.0f} MiB: RSS growth {mib(growth):.1f} MiB", flush=True)
    finally:
        sampler.stop()
    bench.results.facts["Large bodies: gateway RSS while streaming"] = lines


Targets = dict[str, tuple[str, tuple[int, ...]]]  # name -> (URL prefix, server pids)


def median_row(rows: list[Row]) -> Row:
    """The run with the median req/s (``--repeat`` runs of one cell)."""
    return sorted(rows, key=lambda row: row.load.rps)[len(rows) // 2]


def proxy_grid(bench: Bench, section: str, targets: Targets, pid: int | None) -> None:
    """Every target at every connection count, small and large bodies; targets interleaved
    per cell so that drift in the background load hits them alike, ``--repeat`` rounds per
    cell (each starting with another target), the median run recorded, and each round's
    ratio of a target to the bare proxy of the same round (the ratios reported). ``pid``: the
    gateway, whose peak RSS is recorded."""
    sampler = RssSampler(pid) if pid is not None else None
    names = list(targets)
    try:
        for body in bench.bodies:
            for connections in bench.args.connections:
                runs: dict[str, list[Row]] = {name: [] for name in names}
                for turn in range(bench.args.repeat):
                    # Each round starts with another target: no target always follows another.
                    shift = turn % len(names)
                    for target in names[shift:] + names[:shift]:
                        url, pids = targets[target]
                        runs[target].append(
                            bench.measure(
                                section, target, body, url, connections, pids=pids, record=False
                            )
                        )
                for target in names:
                    bench.results.rows.append(median_row(runs[target]))
                    bases = [BARE] if target != BARE else []
                    bases += [b for t, b in PAIRED if t == target]
                    for base_name in bases:
                        if base_name not in runs:
                            continue
                        key = paired_key(section, target, base_name, body, connections)
                        bench.results.paired[key] = [
                            pair_ratios(row.load, base.load)
                            for row, base in zip(runs[target], runs[base_name], strict=True)
                        ]
    finally:
        if sampler is not None:
            sampler.stop()
    if sampler is not None:
        bench.results.facts.setdefault("Gateway RSS", []).append(
            f"- peak under load ({section}): {mib(sampler.peak):.1f} MiB"
        )


def client_choice(bench: Bench, upstream: str, aiohttp_proxy: tuple[str, int]) -> None:
    """The bare proxy on aiohttp's client and on httpx's: the numbers behind forwarding with
    aiohttp (gateway/proxy.py) while the IdP calls keep httpx."""
    with stack.python_server("bare_proxy", "--upstream", upstream, "--client", "httpx") as (
        url,
        pid,
    ):
        targets: Targets = {
            "bare proxy, aiohttp client": (aiohttp_proxy[0], (aiohttp_proxy[1],)),
            "bare proxy, httpx client": (url, (pid,)),
        }
        for connections in bench.args.connections:
            for target, (base, pids) in targets.items():
                bench.measure("client", target, SMALL, base, connections, pids=pids)


def store_comparison(
    bench: Bench, idp: stack.IdpProcess, memory: tuple[str, int], urls: dict[str, str]
) -> None:
    """Token route at 64 connections: memory store (the main gateway), Redis store (a second
    gateway on a private redis-server), and the memory store with the access log on."""
    section = "store"
    redis = RedisProcess()
    try:
        variants = {
            "gateway, redis store": {
                "store": {
                    "store": "redis",
                    "redis_url": redis.url,
                    "redis_key_prefix": "bench:",
                }
            },
            "gateway, memory store, access log on": {"access_log": True},
        }
        gateways: dict[str, tuple[str, tuple[int, ...]]] = {
            "gateway, memory store": (memory[0], (memory[1],))
        }
        redis_pid = int(redis._proc.pid)  # its server CPU counts for its row
        with contextlib.ExitStack() as stop:
            for name, options in variants.items():
                port = free_port()
                config = stack.gateway_config(
                    idp, port=port, upstream=urls["upstream"], sink=urls["sink"], **options
                )
                process = stop.enter_context(stack.gateway_process(config, port))
                pids = (stack.gateway_pid(process), *([redis_pid] if "redis" in name else []))
                gateways[name] = (process.base_url, pids)
            cookies = {url: asyncio.run(login(url, idp)) for url, _ in gateways.values()}
            for url, cookie in cookies.items():
                check_route(f"{url}/api/small.json", session_headers(cookie), expect=SMALL_JSON)
            for body in bench.bodies:
                for connections in bench.args.store_connections:
                    for name, (url, pids) in gateways.items():
                        bench.measure(
                            section,
                            name,
                            body,
                            f"{url}/api",
                            connections,
                            headers=session_headers(cookies[url]),
                            pids=pids,
                        )
    finally:
        redis.stop()


def forward_auth(bench: Bench, gateway_url: str, gateway_pid: int, upstream_url: str) -> None:
    """nginx in front (the documented config), with and without its auth cache, beside bare
    nginx proxy_pass and the gateway's own proxy; same upstream, same session. Server CPU
    counts nginx and the gateway answering its subrequests."""
    with (
        stack.nginx_forward_auth(gateway_url, upstream_url, auth_cache=False) as (plain, p1),
        stack.nginx_forward_auth(gateway_url, upstream_url, auth_cache=True) as (cached, p2),
    ):
        check_route(f"{plain}/api/small.json", bench.headers, expect=SMALL_JSON)
        check_route(f"{cached}/api/small.json", bench.headers, expect=SMALL_JSON)
        targets: Targets = {
            "nginx proxy_pass (bare nginx)": (f"{plain}/plain", (p1,)),
            "nginx + forward-auth (no auth cache)": (f"{plain}/api", (p1, gateway_pid)),
            "nginx + forward-auth (auth cache 10 s)": (f"{cached}/api", (p2, gateway_pid)),
            TOKEN: (f"{gateway_url}/api", (gateway_pid,)),
        }
        proxy_grid(bench, "forward-auth", targets, None)


def token_economy(bench: Bench, urls: dict[str, str]) -> None:
    """64 connections for ``economy_seconds`` on one session and two routes with 20 s access
    tokens: the provider must see exactly ceil(duration / (20 - skew)) exchanges per audience."""
    at_ttl, skew, seconds = 20, bench.args.economy_skew, bench.args.economy_seconds
    expected = economy_expected(seconds, at_ttl, skew)
    with start_idp(at_ttl=at_ttl, rotate=True) as idp:
        port = free_port()
        config = stack.gateway_config(
            idp, port=port, upstream=urls["upstream"], sink=urls["sink"], skew=skew
        )
        with stack.gateway_process(config, port) as gateway:
            headers = session_headers(asyncio.run(login(gateway.base_url, idp)))
            idp.reset_stats()
            timeline = _ExchangeTimeline(idp)
            try:
                result = run_wrk(
                    gateway.base_url,
                    ["/api/small.json", "/billing/small.json"],
                    connections=bench.args.economy_connections,
                    seconds=seconds,
                    headers=headers,
                    prefix=bench.plan.load_prefix(),
                )
            finally:
                timeline.stop()
            check_clean(result, expect_body=len(SMALL_JSON), label="token economy")
            stats = idp.stats()
    seen = stats["refresh_by_resource"]
    ok = seen.get(API) == expected and seen.get(BILLING) == expected
    bench.results.facts["Token economy under load"] = [
        f"- access tokens live {at_ttl} s (rotating refresh tokens), `tokens.skew` {skew:g} s "
        f"(effective {min(skew, at_ttl / 2):g} s), {bench.args.economy_connections} connections "
        f"for {result.seconds:.1f} s on one session, two routes (two audiences), "
        f"{result.requests:,} requests ({result.rps:,.0f} req/s)",
        f"- expected exchanges per audience: ceil({seconds:g} / ({at_ttl} - "
        f"{min(skew, at_ttl / 2):g})) = {expected}",
        f"- seen at the provider (`/__stats`): {API}: {seen.get(API, 0)}, "
        f"{BILLING}: {seen.get(BILLING, 0)}; refresh-token grants in all: "
        f"{stats['grants']['refresh_token']}; refresh errors: {stats['refresh_errors'] or 'none'}",
        f"- exchanges seen at (s after the load started, polled every 0.25 s): "
        f"{timeline.describe()}",
        f"- result: {'exactly the minimum' if ok else '**not the minimum**'}",
    ]
    print(f"  token economy: expected {expected} per audience, saw {seen}", flush=True)


class _ExchangeTimeline:
    """Polls the provider's counters in a thread: when each exchange happened."""

    def __init__(self, idp: stack.IdpProcess) -> None:
        self._idp = idp
        self._started = time.monotonic()
        self._seen: dict[str, int] = {}
        self.events: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            with contextlib.suppress(Exception):
                counts = self._idp.stats()["refresh_by_resource"]
                for audience, count in counts.items():
                    for _ in range(count - self._seen.get(audience, 0)):
                        self.events.append((time.monotonic() - self._started, audience))
                    self._seen[audience] = count

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def describe(self) -> str:
        short = {API: "api", BILLING: "billing"}
        text = ", ".join(f"{t:.1f} ({short.get(a, a)})" for t, a in self.events) or "none"
        gaps = [
            later - earlier
            for audience in short
            for earlier, later in zip(
                [t for t, a in self.events if a == audience],
                [t for t, a in self.events if a == audience][1:],
                strict=False,
            )
        ]
        if gaps:
            text += f"; shortest gap between two exchanges of one audience: {min(gaps):.1f} s"
        return text


def sessions_memory(bench: Bench) -> None:
    """100,000 sessions in the memory store, in fresh processes, without and with one cached
    access token each."""
    lines = ["| sessions | cached tokens | RSS before | RSS total | per session | target |"]
    lines.append("|---:|---|---:|---:|---:|---|")
    for tokens in (False, True):
        command = [sys.executable, "-m", "benchmarks.memory", "--count", str(bench.args.sessions)]
        done = subprocess.run(
            [*command, *(["--tokens"] if tokens else [])],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        data = json.loads(done.stdout)
        verdict = "< 300 MiB: " + ("yes" if data["rss_total_mib"] < 300 else "**no**")
        lines.append(
            f"| {data['sessions']:,} | {'one each' if tokens else 'none'} | "
            f"{data['rss_before_mib']} MiB | {data['rss_total_mib']} MiB | "
            f"{data['bytes_per_session']:,} B | {verdict if not tokens else '(for scale)'} |"
        )
        print(f"  {data}", flush=True)
    bench.results.facts["Sessions in the memory store"] = lines


def exchanges_during(bench: Bench, idp: stack.IdpProcess, label: str) -> None:
    stats = idp.stats()
    bench.results.facts.setdefault("Token-endpoint calls at the provider", []).append(
        f"- {label}: {stats['grants']['refresh_token']} refresh-token grants "
        f"({stats['refresh_by_resource']})"
    )


def rss_now(bench: Bench, pid: int, label: str) -> None:
    bench.results.facts.setdefault("Gateway RSS", []).append(
        f"- {label}: {mib(rss_bytes(pid)):.1f} MiB"
    )


__all__ = [
    "LARGE",
    "SMALL",
    "exchanges_during",
    "forward_auth",
    "proxy_grid",
    "rss_now",
    "sessions_memory",
    "store_comparison",
    "token_economy",
    "transfers",
]
