"""Drive load with wrk (Debian's package) and read its numbers back as JSON.

wrk runs with one thread (it is pinned to one core: more threads would only contend), the
session cookie and anti-CSRF header passed with ``-H``, and a Lua ``done`` hook that prints
the summary and the latency histogram as one JSON line. Several paths are requested
round-robin by a Lua ``request`` hook (only then: the hook costs wrk time per request).

Latency percentiles are per request: wrk 4 "corrects for coordinated omission" before its
``done`` hook (and its own printout) sees the histogram. It takes the mean time between two
answers on a connection (run time / (requests / connections)) as the interval at which a
client would have sent, and for every answer that took n >= 2 intervals it adds one answer
each of n - 1, n - 2, ... intervals (down to just over one): the requests such a client
would have queued behind it. On a closed-loop run at full speed that interval is the service
time itself (0.5 ms for 1 MiB at one connection), so one 90 ms stall became ~180 answers, and
two of them among 8,000 answers moved the p99 from ~1 ms to ~70 ms (benchmarks/README.md,
"1 MiB p99").
:func:`per_request` undoes the correction exactly; wrk's figure is kept as ``p99_wrk_ms``.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# ``#latency`` is the number of distinct values in wrk's histogram, ``latency(i)`` the i-th
# (ascending) and how many answers took it, after wrk's correction.
_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  local cells = {}
  for i = 1, #latency do
    local value, count = latency(i)
    cells[i] = string.format('[%d,%d]', value, count)
  end
  io.write(string.format(
    '\\n@@WRK {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d,"p99_us":%d,"max_us":%d,"histogram":[%s]}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(99), latency.max, table.concat(cells, ',')))
end
"""

_ROUND_ROBIN = """
local paths = {}
local n = 0
init = function(args) paths = args end
request = function()
  n = n + 1
  return wrk.format(nil, paths[(n % #paths) + 1])
end
"""


class LoadError(RuntimeError):
    """wrk failed, or some answers were errors: the numbers would lie."""


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    bytes: int
    errors: int
    non_2xx: int
    p50_ms: float  # per request (wrk's correction undone)
    p99_ms: float  # per request
    max_ms: float
    p99_wrk_ms: float | None = None  # wrk's own p99, corrected for coordinated omission

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_request(self) -> float:
        return self.bytes / self.requests if self.requests else 0.0


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk not found: apt-get install wrk (scripts/install does)")
    return found


def run_wrk(
    base_url: str,
    paths: list[str],
    *,
    connections: int,
    seconds: float,
    headers: dict[str, str] | None = None,
    prefix: list[str] | None = None,
    timeout: float = 10.0,
) -> LoadResult:
    """``connections`` keep-alive connections for ``seconds`` on ``paths`` (round-robin)."""
    script = _DONE + (_ROUND_ROBIN if len(paths) > 1 else "")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
        script_path = handle.name
    command = [
        *(prefix or []),
        wrk_binary(),
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout:g}s",
        "-s",
        script_path,
    ]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    command.append(base_url + paths[0])
    if len(paths) > 1:
        command += ["--", *paths]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    finally:
        Path(script_path).unlink(missing_ok=True)
    marker = next((ln for ln in done.stdout.splitlines() if ln.startswith("@@WRK ")), None)
    if done.returncode != 0 or marker is None:
        raise LoadError(f"wrk failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr}")
    data = json.loads(marker.removeprefix("@@WRK "))
    errors = data["connect"] + data["read"] + data["write"] + data["timeout"]
    recorded = per_request(
        data["histogram"],  # [[µs, answers], ...]
        requests=data["requests"],
        duration_us=data["duration_us"],
        connections=connections,
    )
    return LoadResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        bytes=data["bytes"],
        errors=errors,
        non_2xx=data["status"],
        p50_ms=percentile(recorded, 50) / 1000,
        p99_ms=percentile(recorded, 99) / 1000,
        max_ms=data["max_us"] / 1000,
        p99_wrk_ms=data["p99_us"] / 1000,
    )


def per_request(
    histogram: Iterable[Sequence[int]], *, requests: int, duration_us: int, connections: int
) -> list[tuple[int, int]]:
    """wrk's corrected histogram ``[(µs, answers)]`` back to the answers it measured.

    wrk added, for each answer of n >= 2 intervals, one answer at every n - k * interval
    (k >= 1) above one interval. So a corrected count at m > interval is the measured count at
    m plus the corrected count at m + interval, and the measured count is the difference.
    Raises :class:`LoadError` where that goes negative (not wrk 4's correction, then).
    """
    corrected = {value: count for value, count in histogram}
    per_connection = requests // connections if connections else 0
    interval = duration_us // per_connection if per_connection else 0
    if interval <= 0:  # wrk corrected nothing
        return sorted(corrected.items())
    measured = []
    for value, count in sorted(corrected.items()):
        original = count - corrected.get(value + interval, 0) if value > interval else count
        if original < 0:
            raise LoadError(
                f"wrk's latency histogram is not what its correction (interval {interval} µs) "
                f"leaves: {count} answers at {value} µs, {corrected[value + interval]} at "
                f"{value + interval} µs"
            )
        if original:
            measured.append((value, original))
    if sum(count for _, count in measured) > requests:
        raise LoadError(f"wrk's latency histogram holds more answers than its {requests}")
    return measured


def percentile(histogram: list[tuple[int, int]], p: float) -> int:
    """The p-th percentile of an ascending ``[(value, count)]``, ranked as wrk ranks."""
    total = sum(count for _, count in histogram)
    rank = math.floor(p / 100 * total + 0.5 + 0.5)  # C's round(x + 0.5), x >= 0
    seen = 0
    for value, count in histogram:
        seen += count
        if seen >= rank:
            return value
    return histogram[-1][0] if histogram else 0


def check_clean(result: LoadResult, *, expect_body: int, label: str) -> None:
    """Refuse a run with errors, non-2xx answers or bodies of the wrong size (a fast 401
    would look like a fast proxy)."""
    if result.requests == 0:
        raise LoadError(f"{label}: no request completed")
    if result.non_2xx or result.errors:
        raise LoadError(
            f"{label}: {result.non_2xx} non-2xx answers, {result.errors} socket errors "
            f"of {result.requests} requests"
        )
    if result.bytes_per_request < expect_body:
        raise LoadError(
            f"{label}: {result.bytes_per_request:.0f} bytes per answer, expected more than "
            f"{expect_body} (body)"
        )
