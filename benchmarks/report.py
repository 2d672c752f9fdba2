"""Results of one run and their markdown form (the tables in benchmarks/README.md)."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from .wrk import LoadResult

BARE = "bare proxy"
TOKEN = "gateway, token route (cache hit)"
NONE = "gateway, `auth: none` route"
DPOP = "gateway, DPoP token route (cache hit, a proof per request)"
# (target, baseline, body, minimum throughput ratio); p99 may be at most P99_FACTOR x bare.
TARGETS = (
    (TOKEN, BARE, "small JSON", 0.85),
    (TOKEN, BARE, "1 MiB", 0.95),
    (NONE, BARE, "small JSON", 0.90),
    (NONE, BARE, "1 MiB", 0.90),
    # Issue 20: a DPoP proof (an ES256 signature) per request costs at most a fifth.
    (DPOP, TOKEN, "small JSON", 0.80),
)
# Targets compared with another than the bare proxy, round by round (phases.proxy_grid).
PAIRED = ((DPOP, TOKEN),)
P99_FACTOR = 1.3
CHECKED_CONNECTIONS = (16, 64)


@dataclass
class Row:
    section: str
    target: str
    body: str
    connections: int
    load: LoadResult
    load1: float  # 1-minute load average when the cell started
    foreign_cpu: float  # % of one core used by processes outside the benchmark meanwhile
    cpu_us: float | None = None  # CPU time of the measured server(s) per request
    rss_mib: float | None = None  # peak RSS of the measured servers' process trees


@dataclass
class Results:
    command: str
    machine: str
    started: str
    load1_before: float
    versions: dict[str, str]
    rows: list[Row] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # paired_key(...) -> per round (req/s ratio, p99 ratio[, ratio of wrk's corrected p99s])
    # of a target to a baseline measured in the same round (--repeat): cells at most a round
    # apart, so that the machine's drift between rounds cancels out of each ratio.
    paired: dict[str, list[tuple[float, ...]]] = field(default_factory=dict)

    def find(self, section: str, target: str, body: str, connections: int) -> Row | None:
        for row in self.rows:
            if (row.section, row.target, row.body, row.connections) == (
                section,
                target,
                body,
                connections,
            ):
                return row
        return None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for row, raw in zip(self.rows, data["rows"], strict=True):
            raw["load"]["rps"] = round(row.load.rps, 1)
        return data


def paired_key(section: str, target: str, base: str, body: str, connections: int) -> str:
    return f"{section}|{target}|{base}|{body}|{connections}"


def pair_ratios(load: LoadResult, base: LoadResult) -> tuple[float, ...]:
    """One round's (req/s ratio, p99 ratio[, ratio of wrk's corrected p99s where both have
    one]) of a target's cell to the baseline's."""
    pair: tuple[float, ...] = (load.rps / base.rps, load.p99_ms / base.p99_ms)
    if load.p99_wrk_ms and base.p99_wrk_ms:
        pair += (load.p99_wrk_ms / base.p99_wrk_ms,)
    return pair


def _round_ratios(
    results: Results, section: str, target: str, base: str, body: str, conns: int
) -> list[tuple[float, ...]]:
    """The per-round :func:`pair_ratios` of ``target`` to ``base`` where the run kept them,
    else the one pair of the recorded rows ([] where either row is missing)."""
    pairs = results.paired.get(paired_key(section, target, base, body, conns))
    if pairs:
        return pairs
    row = results.find(section, target, body, conns)
    baseline = results.find(section, base, body, conns)
    if row is None or baseline is None:
        return []
    return [pair_ratios(row.load, baseline.load)]


def ratios(
    results: Results, section: str, target: str, base: str, body: str, conns: int
) -> tuple[float, float, int] | None:
    """(req/s ratio, p99 ratio, rounds) of ``target`` to ``base``: the medians of the per-round
    ratios where the run kept them (so not, in general, the ratio of the rows shown, which are
    each target's median round), else the ratio of the recorded rows."""
    pairs = _round_ratios(results, section, target, base, body, conns)
    if not pairs:
        return None
    return (
        statistics.median(p[0] for p in pairs),
        statistics.median(p[1] for p in pairs),
        len(pairs),
    )


def wrk_p99_ratio(
    results: Results, section: str, target: str, base: str, body: str, conns: int
) -> float | None:
    """As :func:`ratios`' p99 ratio, of wrk's corrected p99s (None where a round lacks one)."""
    pairs = _round_ratios(results, section, target, base, body, conns)
    if not pairs or any(len(p) < 3 for p in pairs):
        return None
    return statistics.median(p[2] for p in pairs)


def _num(value: float) -> str:
    return f"{value:,.0f}"


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def table(results: Results, section: str, *, ratio_to: str | None = None) -> str:
    """One row per (target, body, connections) of a section; ratios to ``ratio_to``."""
    head = "| target | body | conns | req/s | p50 ms | p99 ms | wrk p99 ms |"
    rule = "|---|---|---:|---:|---:|---:|---:|"
    if ratio_to:
        head += " req/s vs bare | p99 vs bare |"
        rule += "---:|---:|"
    head += " server CPU µs/req | load1 | foreign CPU |"
    rule += "---:|---:|---:|"
    lines = [head, rule]
    for row in (r for r in results.rows if r.section == section):
        cells = [
            row.target,
            row.body,
            str(row.connections),
            _num(row.load.rps),
            _ms(row.load.p50_ms),
            _ms(row.load.p99_ms),
            _ms(row.load.p99_wrk_ms) if row.load.p99_wrk_ms is not None else "",
        ]
        if ratio_to:
            found = ratios(results, section, row.target, ratio_to, row.body, row.connections)
            if found is None or row.target == ratio_to:
                cells += ["", ""]
            else:
                cells += [f"{found[0]:.2f}", f"{found[1]:.2f}x"]
        cpu = f"{row.cpu_us:,.0f}" if row.cpu_us is not None else ""
        cells += [cpu, f"{row.load1:.2f}", f"{row.foreign_cpu:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_checks(results: Results, section: str) -> tuple[str, bool]:
    """The issue's targets, as a table of ratios with a verdict per cell."""
    lines = [
        "| check | conns | measured | target | ok |",
        "|---|---:|---:|---:|:-:|",
    ]
    all_ok = True
    for target, base_name, body, minimum in TARGETS:
        for conns in CHECKED_CONNECTIONS:
            found = ratios(results, section, target, base_name, body, conns)
            if found is None:
                continue
            ratio, p99, _ = found
            ok_rps, ok_p99 = ratio >= minimum, p99 <= P99_FACTOR
            all_ok = all_ok and ok_rps and ok_p99
            lines.append(
                f"| {target} / {base_name}, req/s, {body} | {conns} | {ratio:.2f} | >= {minimum} | "
                f"{'yes' if ok_rps else '**no**'} |"
            )
            wrk_p99 = wrk_p99_ratio(results, section, target, base_name, body, conns)
            beside = f" (wrk's: {wrk_p99:.2f}x)" if wrk_p99 is not None else ""
            lines.append(
                f"| {target} / {base_name}, p99, {body} | {conns} | {p99:.2f}x{beside} | "
                f"<= {P99_FACTOR}x | {'yes' if ok_p99 else '**no**'} |"
            )
    return "\n".join(lines), all_ok


def economy_expected(duration: float, at_ttl: float, skew: float) -> int:
    """ceil(duration / (lifetime - effective skew)); tokens.py clamps skew to half the life."""
    return math.ceil(duration / (at_ttl - min(skew, at_ttl / 2)))


def render(results: Results, sections: list[tuple[str, str, str | None]]) -> str:
    """The whole report: header, then each (section id, title, ratio baseline) table, then
    the facts the run collected (RSS, exchanges, memory, profile)."""
    out = [
        "# Benchmark results",
        "",
        f"- command: `{results.command}`",
        f"- started: {results.started}; 1-minute load average before: {results.load1_before:.2f}",
        f"- machine: {results.machine}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in results.versions.items()),
        "- `load1`: 1-minute load average as the cell started (the benchmark's own processes "
        "count in it); `foreign CPU`: CPU used meanwhile by processes outside the benchmark, "
        "in % of one core.",
        "- p50 / p99: of the answers measured, one per request; `wrk p99`: wrk's own figure, "
        "which adds for every slow answer the requests a client sending at the run's mean "
        "pace would have queued behind it (coordinated-omission correction; "
        "benchmarks/wrk.py).",
        "",
    ]
    for section, title, ratio_to in sections:
        if not any(r.section == section for r in results.rows):
            continue
        out += [f"## {title}", "", table(results, section, ratio_to=ratio_to), ""]
        if ratio_to:
            checks, ok = target_checks(results, section)
            out += [
                f"Targets ({'all met' if ok else 'NOT all met'}):",
                "",
                checks,
                "",
            ]
    for title, lines in results.facts.items():
        out += [f"## {title}", "", *lines, ""]
    if results.notes:
        out += ["## Notes", "", *(f"- {n}" for n in results.notes), ""]
    return "\n".join(out)
