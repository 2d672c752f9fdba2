"""Drive load with wrk (Debian's package) and read its numbers back as JSON.

wrk runs with one thread (it is pinned to one core: more threads would only contend), the
session cookie and anti-CSRF header passed with ``-H``, and a Lua ``done`` hook that prints
the summary and latency percentiles as one JSON line. Several paths are requested round-robin
by a Lua ``request`` hook (only then: the hook costs wrk time per request).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\n@@WRK {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
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
    p50_ms: float
    p99_ms: float
    max_ms: float

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
    return LoadResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        bytes=data["bytes"],
        errors=errors,
        non_2xx=data["status"],
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
    )


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
