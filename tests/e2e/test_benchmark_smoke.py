"""The benchmark harness runs end to end (``benchmarks/run --smoke``), so it cannot rot.

Not a performance test: every phase runs, tiny (1 s cells, 1 connection, 16 MiB transfers,
1,000 sessions, a 3 s token-economy run), against real nginx, wrk, Redis, the test IdP and the
gateway as its own process; the report must hold every section with sane numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
SMOKE_TIMEOUT = 240


def test_benchmark_smoke_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = out.read_text()
    for title in (
        "## Proxy overhead: direct, bare proxy, gateway",
        "## nginx + forward-auth beside the gateway's own proxy",
        "## Session store, access log, GC: token route",
        "## Upstream HTTP client of a bare proxy (small JSON)",
        "## Gateway RSS",
        "## Large bodies: gateway RSS while streaming",
        "## Token-endpoint calls at the provider",
        "## Token economy under load",
        "## Sessions in the memory store",
    ):
        assert title in report, title
    assert "result: exactly the minimum" in report
    data = json.loads(out.with_suffix(".json").read_text())
    targets = {(row["section"], row["target"], row["body"]) for row in data["rows"]}
    for target in (
        "direct (nginx)",
        "bare proxy",
        "gateway, `auth: none` route",
        "gateway, token route (cache hit)",
    ):
        for body in ("small JSON", "1 MiB"):
            assert ("proxy", target, body) in targets
    assert ("store", "gateway, redis store", "small JSON") in targets
    assert ("forward-auth", "nginx + forward-auth (auth cache 10 s)", "small JSON") in targets
    for row in data["rows"]:
        load = row["load"]
        assert load["requests"] > 0 and load["errors"] == 0 and load["non_2xx"] == 0, row
        assert 0 < load["p50_ms"] <= load["p99_ms"], row
    # One exchange for the whole proxy phase: every load request was a cache hit.
    exchanges = data["facts"]["Token-endpoint calls at the provider"][0]
    assert exchanges.startswith("- proxy runs (one session, tokens live 1 h): 1 refresh-token")
