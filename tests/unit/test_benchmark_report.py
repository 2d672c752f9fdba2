"""benchmarks/report.py: the ratios to the bare proxy come from pairs of cells of one round."""

from __future__ import annotations

from benchmarks.report import BARE, NONE, Results, Row, paired_key, ratios, target_checks
from benchmarks.wrk import LoadResult


def _row(target: str, rps: float, p99: float, conns: int = 16) -> Row:
    load = LoadResult(
        requests=int(rps * 10),
        seconds=10.0,
        bytes=0,
        errors=0,
        non_2xx=0,
        p50_ms=1.0,
        p99_ms=p99,
        max_ms=p99,
    )
    return Row("proxy", target, "small JSON", conns, load, load1=0.5, foreign_cpu=0.0)


def _results() -> Results:
    return Results(command="x", machine="m", started="s", load1_before=0.5, versions={})


def test_ratios_are_medians_of_same_round_pairs_when_kept() -> None:
    results = _results()
    # Medians of the rows alone (bare 1,000, gateway 700) would say 0.70; the rounds say the
    # gateway ran at 0.9, 0.92 and 0.5 of the bare proxy measured beside it.
    results.rows += [_row(BARE, 1000, 10.0), _row(NONE, 700, 12.0)]
    results.paired[paired_key("proxy", NONE, BARE, "small JSON", 16)] = [
        (0.9, 1.1),
        (0.92, 1.0),
        (0.5, 2.0),
    ]
    assert ratios(results, "proxy", NONE, BARE, "small JSON", 16) == (0.9, 1.1, 3)
    # Pairs are per baseline: against another target the rows are all there is.
    assert ratios(results, "proxy", NONE, NONE, "small JSON", 16) == (1.0, 1.0, 1)
    checks, ok = target_checks(results, "proxy")
    assert "| 16 | 0.90 | >= 0.9 | yes |" in checks and ok


def test_ratios_fall_back_to_the_recorded_rows() -> None:
    results = _results()
    results.rows += [_row(BARE, 1000, 10.0, 64), _row(NONE, 800, 14.0, 64)]
    assert ratios(results, "proxy", NONE, BARE, "small JSON", 64) == (0.8, 1.4, 1)
    checks, ok = target_checks(results, "proxy")
    assert "| 64 | 0.80 | >= 0.9 | **no** |" in checks and not ok
    assert ratios(results, "proxy", NONE, BARE, "1 MiB", 64) is None


def test_wrk_corrected_p99_ratio_is_shown_beside_the_per_request_one() -> None:
    results = _results()
    results.rows += [_row(BARE, 1000, 10.0), _row(NONE, 950, 11.0)]
    results.paired[paired_key("proxy", NONE, BARE, "small JSON", 16)] = [
        (0.95, 1.1, 2.5),
        (0.96, 1.0, 3.0),
        (0.94, 1.2, 1.0),
    ]
    checks, ok = target_checks(results, "proxy")
    assert "| 1.10x (wrk's: 2.50x) | <= 1.3x | yes |" in checks
    assert ok
    # Pairs of an older run (two ratios) still read.
    results.paired[paired_key("proxy", NONE, BARE, "small JSON", 16)] = [(0.95, 1.1)]
    checks, _ = target_checks(results, "proxy")
    assert "| 1.10x | <= 1.3x | yes |" in checks


def test_pair_ratios_carry_wrk_p99_only_where_both_cells_have_it() -> None:
    from dataclasses import replace

    from benchmarks.report import pair_ratios

    base = replace(_row(BARE, 1000, 10.0).load, p99_wrk_ms=20.0)
    load = replace(_row(NONE, 900, 12.0).load, p99_wrk_ms=50.0)
    assert pair_ratios(load, base) == (0.9, 1.2, 2.5)
    assert pair_ratios(replace(load, p99_wrk_ms=None), base) == (0.9, 1.2)
