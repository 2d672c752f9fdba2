"""One round of the chaos soak (benchmarks/chaos.py): every event once, a few sessions."""

from __future__ import annotations

import pytest

from benchmarks.chaos import soak

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def test_chaos_round_loses_no_session_reuses_no_token_and_answers_no_500() -> None:
    report = await soak(duration=0, sessions=3, settle=2.0, rounds=1)
    summary = report.as_dict()
    assert report.lost_sessions == 0, summary
    assert report.refresh_reuse == 0, summary
    assert report.server_errors == 0, summary
    assert report.without_retry_after == 0, summary
    assert report.final_ok == report.sessions, summary
    assert sum(report.events.values()) == 5, summary
