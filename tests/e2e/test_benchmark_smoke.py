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

import httpx
import jwt
import pytest

from benchmarks.peers.phase import bff_stack, log_in

from .conftest import UpstreamFactory
from .servers import API, BILLING

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
        "## Peers: the gateway beside the BFFs teams would build instead",
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
    for target in (
        "nginx proxy_pass (ceiling)",
        "gateway, token route",
        "Node.js BFF (express-openid-connect)",
        "Python BFF (auth0-fastapi)",
    ):
        assert ("peers", target, "1 MiB") in targets
    for row in data["rows"]:
        load = row["load"]
        assert load["requests"] > 0 and load["errors"] == 0 and load["non_2xx"] == 0, row
        assert 0 < load["p50_ms"] <= load["p99_ms"], row
    # One exchange for the whole proxy phase: every load request was a cache hit.
    exchanges = data["facts"]["Token-endpoint calls at the provider"][0]
    assert exchanges.startswith("- proxy runs (one session, tokens live 1 h): 1 refresh-token")


def test_benchmark_peers_forward_each_route_with_its_audience(
    upstream_factory: UpstreamFactory,
) -> None:
    """The peers of ``benchmarks/run`` (benchmarks/peers/: the Node.js and the Python BFF,
    installed from their locks on first use) and the gateway beside them log a user in at the
    https test IdP and forward one request per route with a token for that route's audience."""
    upstream = upstream_factory(name="peers", require_auth=False)
    with bff_stack(upstream.base_url, upstream.base_url, at_ttl=60, skew=10) as (idp, targets):
        assert idp.issuer.startswith("https://")
        for target in targets.values():
            log_in(target, idp)
            for prefix, audience in (("/api", API), ("/billing", BILLING)):
                response = httpx.get(
                    f"{target.base_url}{prefix}/x?n=1", headers=target.headers, timeout=30
                )
                assert response.status_code == 200, (target.name, prefix, response.text[:300])
                record = response.json()
                assert (record["path"], record["query"]) == ("/x", "n=1"), target.name
                assert "cookie" not in record["headers"], target.name
                scheme, _, token = record["headers"]["authorization"].partition(" ")
                claims = jwt.decode(token, options={"verify_signature": False})
                assert scheme == "Bearer" and claims["iss"] == idp.issuer, target.name
                audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
                assert audience in audiences, (target.name, prefix, claims["aud"])
