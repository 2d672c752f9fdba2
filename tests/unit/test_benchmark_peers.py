"""benchmarks/peers: the verdict per cell (ahead only with more req/s, a lower p99 and no error
of the gateway's own; a peer's errors shown with their rate) and the run's local CA."""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

from cryptography import x509

from benchmarks.bench import Bench
from benchmarks.machine import CpuPlan
from benchmarks.peers.phase import GATEWAY, NODE, PYTHON, SECTION, _key, report_lines
from benchmarks.peers.tls import make_local_tls
from benchmarks.report import Results, Row
from benchmarks.wrk import LoadResult


def _row(target: str, rps: float, p99: float, *, non_2xx: int = 0) -> Row:
    load = LoadResult(
        requests=int(rps * 10),
        seconds=10.0,
        bytes=int(rps * 10) * 300,
        errors=0,
        non_2xx=non_2xx,
        p50_ms=1.0,
        p99_ms=p99,
        max_ms=p99,
    )
    row = Row(SECTION, target, "small JSON", 16, load, load1=0.5, foreign_cpu=0.0, cpu_us=90)
    row.rss_mib = 80.0
    return row


def _bench(gateway_errors: int = 0) -> Bench:
    args = argparse.Namespace(
        bodies="small", connections=[16], economy_connections=64, economy_seconds=60
    )
    results = Results(command="x", machine="m", started="s", load1_before=0.5, versions={})
    results.rows += [
        _row(GATEWAY, 6000, 10.0, non_2xx=gateway_errors),
        _row(NODE, 3000, 30.0),
        _row(PYTHON, 500, 200.0, non_2xx=50),
    ]
    results.paired[_key(NODE, "small JSON", 16)] = [(2.0, 0.3), (1.9, 0.4), (2.1, 0.35)]
    results.paired[_key(PYTHON, "small JSON", 16)] = [(12.0, 0.05), (0.9, 1.2), (13.0, 0.06)]
    return Bench(args=args, plan=CpuPlan.detect(), results=results)


def _verdicts(lines: list[str]) -> dict[str, str]:
    return {
        line.split(" | ")[0].lstrip("| "): line.rstrip(" |").rsplit("| ", 1)[1]
        for line in lines
        if line.startswith("| ") and "small JSON | 16 | " in line and line.count("|") == 8
    }


def test_peers_report_ahead_by_medians_of_rounds_and_shows_a_peers_error_rate() -> None:
    lines = report_lines(_bench(), {}, [], [], 20)
    verdicts = _verdicts(lines)
    # One bad round does not decide: the medians are 12.0 and 0.06 against the Python BFF.
    assert verdicts == {NODE: "yes", PYTHON: "yes"}
    assert any(PYTHON in line and "| 1.0% |" in line for line in lines)


def test_peers_report_gateway_with_errors_is_never_ahead() -> None:
    verdicts = _verdicts(report_lines(_bench(gateway_errors=1), {}, [], [], 20))
    assert verdicts == {NODE: "**no**", PYTHON: "**no**"}


def test_local_ca_signs_a_certificate_for_loopback(tmp_path: Path) -> None:
    tls = make_local_tls(tmp_path)
    ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    ssl.create_default_context(cafile=str(tls.ca))
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.cert, tls.key)
    assert tls.key.stat().st_mode & 0o077 == 0
