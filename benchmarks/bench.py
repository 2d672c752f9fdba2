"""The measuring context shared by every phase: options, CPU plan, results, one cell of load."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import httpx

from tests.e2e.login import browser_login
from tests.e2e.servers import IdpProcess

from .machine import CpuPlan, ForeignCpu, TreeRssSampler, cpu_seconds, load1, mib
from .report import Results, Row
from .upstream import ONE_MIB, SMALL_JSON
from .wrk import check_clean, run_wrk

SMALL, LARGE = "small JSON", "1 MiB"
BODIES = {SMALL: ("/small.json", len(SMALL_JSON)), LARGE: ("/1m.bin", ONE_MIB)}


@dataclass
class Bench:
    """Everything a phase needs to start load and record it."""

    args: argparse.Namespace
    plan: CpuPlan
    results: Results
    headers: dict[str, str] = field(default_factory=dict)  # cookie + anti-CSRF, for wrk

    @property
    def bodies(self) -> list[str]:
        chosen = set(self.args.bodies.split(","))
        return [name for key, name in (("small", SMALL), ("large", LARGE)) if key in chosen]

    def measure(
        self,
        section: str,
        target: str,
        body: str,
        url: str,
        connections: int,
        *,
        headers: dict[str, str] | None = None,
        pids: tuple[int, ...] = (),
        record: bool = True,
        strict: bool = True,
    ) -> Row:
        """Warm up, then one recorded wrk run of ``args.duration`` seconds on ``url + body``;
        ``pids``: the servers whose CPU time per request is recorded (with their children),
        and whose peak RSS (the process trees') is recorded. ``strict``: refuse a cell with
        any error; else record it with its error rate (the peers, benchmarks/peers/)."""
        path, size = BODIES[body]
        base, prefix = _split(url)
        used = headers if headers is not None else self.headers
        label = f"{target} / {body} / {connections} conns"
        if self.args.warmup > 0:
            warm = run_wrk(
                base,
                [prefix + path],
                connections=connections,
                seconds=self.args.warmup,
                headers=used,
                prefix=self.plan.load_prefix(),
            )
            if strict:
                check_clean(warm, expect_body=size, label=label + " (warm-up)")
        # The end of the last wrk run (this warm-up, or the cell before) cut answers off
        # mid-body; the target relays their rest to nobody for a moment. Not inside the
        # measurement (it cost the second of two back-to-back gateway cells 2-3x the p99 at
        # 1 MiB / 64 connections).
        time.sleep(self.args.settle)
        meter = ForeignCpu()
        started_load = load1()
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        rss = TreeRssSampler(pids) if pids else None
        try:
            result = run_wrk(
                base,
                [prefix + path],
                connections=connections,
                seconds=self.args.duration,
                headers=used,
                prefix=self.plan.load_prefix(),
            )
        finally:
            if rss is not None:
                rss.stop()
        foreign = meter.percent()
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
        cpu_us = 1e6 * cpu / result.requests if pids and result.requests else None
        if strict:
            check_clean(result, expect_body=size, label=label)
        row = Row(section, target, body, connections, result, started_load, foreign, cpu_us)
        row.rss_mib = mib(rss.peak) if rss is not None else None
        if record:
            self.results.rows.append(row)
        print(
            f"  {label:<62} {result.rps:>9,.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
            f"p99 {result.p99_ms:7.2f} ms (wrk {result.p99_wrk_ms or 0:7.2f})  "
            f"cpu {cpu_us or 0:5.0f} us/req  "
            f"load1 {started_load:.2f}  foreign {foreign:3.0f}%"
            + (
                f"  ERRORS: {result.errors} socket, {result.non_2xx} non-2xx"
                if result.errors or result.non_2xx
                else ""
            ),
            flush=True,
        )
        return row


def _split(url: str) -> tuple[str, str]:
    """``http://h:p/prefix`` -> (``http://h:p``, ``/prefix``)."""
    scheme, rest = url.split("://", 1)
    host, _, prefix = rest.partition("/")
    return f"{scheme}://{host}", ("/" + prefix).rstrip("/") if prefix else ""


async def login(base_url: str, idp: IdpProcess, *, cookie_name: str = "gw_session") -> str:
    """Log a browser in at a gateway; return its session cookie value."""
    async with httpx.AsyncClient(timeout=30) as client:
        response = await browser_login(
            client, f"{base_url}/auth/login?return_to=/", idp_issuer=idp.issuer
        )
        if response.status_code != 302:
            raise RuntimeError(f"login failed: {response.status_code} {response.text[:200]}")
        cookie = client.cookies.get(cookie_name)
    if not cookie:
        raise RuntimeError(f"login set no {cookie_name} cookie")
    return str(cookie)


def session_headers(cookie: str) -> dict[str, str]:
    return {"Cookie": f"gw_session={cookie}", "X-CSRF": "1"}


def check_route(url: str, headers: dict[str, str], *, expect: bytes) -> None:
    """One request through a route before load: 200 and the upstream's exact body."""
    response = httpx.get(url, headers=headers, timeout=30)
    if response.status_code != 200 or response.content != expect:
        raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")
