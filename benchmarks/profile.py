"""A py-spy profile of the gateway under load, summarised: where the CPU time goes.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``); this groups
the samples by the library the innermost frame is in (self time) and by a few gateway functions
(inclusive time), which is what benchmarks/README.md summarises.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .bench import SMALL, Bench
from .wrk import run_wrk

# Inclusive time of these frames (qualified name as py-spy prints it, and a file fragment).
# Stacks that py-spy caught only in part (common with coroutines) count where they show.
_INCLUSIVE = (
    (
        "Dispatcher.__call__ (the way in: request id, metrics, access line)",
        "Dispatcher.__call__",
        "gateway/dispatch.py",
    ),
    ("Authorizer.authorize (session, CSRF, token)", "Authorizer.authorize", "authorize.py"),
    ("ProxyEndpoint.handle (the proxy's work)", "ProxyEndpoint.handle", "proxy_endpoint.py"),
    ("SessionManager.current (cookie -> session)", "SessionManager.current", "manager.py"),
    ("TokenBroker.cached_token (cached token)", "TokenBroker.cached_token", "tokens.py"),
    ("TokenBroker.access_token (token due or missing)", "TokenBroker.access_token", "tokens.py"),
    ("check_csrf", "check_csrf", "gateway/security.py"),
    ("RequestHeaderPlan.scan (request headers)", "RequestHeaderPlan.scan", "gateway/headers.py"),
    ("add_forwarding", "add_forwarding", "gateway/headers.py"),
    ("filter_response_headers", "filter_response_headers", "gateway/headers.py"),
    ("AiohttpUpstreamClient.send (aiohttp request)", "AiohttpUpstreamClient.send", "proxy.py"),
    ("GatewayMetrics.observe_request", "GatewayMetrics.observe_request", "metrics.py"),
    (
        "ProxyEndpoint._relay_rest (bodies longer than one read)",
        "ProxyEndpoint._relay_rest",
        "proxy_endpoint.py",
    ),
    # Not on the way of a proxied request: should stay at 0.
    ("Starlette Router", "Router.app", "starlette/routing.py"),
)
_LIBRARIES = (
    "gateway",
    "aiohttp",
    "yarl",
    "multidict",
    "uvicorn",
    "starlette",
    "prometheus_client",
    "asyncio",
    "uvloop",
    "cachetools",
    "logging",
)


def _frames(stack: str) -> list[str]:
    return [f for f in stack.split(";") if f]


def _library(frame: str) -> str:
    location = frame[frame.rfind("(") + 1 :] if "(" in frame else frame
    for name in _LIBRARIES:
        if f"/{name}/" in location or location.startswith(f"{name}/"):
            return name
    if "site-packages" not in location and "/lib/python" in location:
        return "python stdlib"
    return "other"


def summarise(raw: str) -> list[str]:
    samples: list[tuple[list[str], int]] = []
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples.append((_frames(stack), int(count)))
    total = sum(n for _, n in samples) or 1
    by_library: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, count in samples:
        leaf = frames[-1]
        by_library[_library(leaf)] += count
        by_function[leaf.split(" (")[0] + " (" + _library(leaf) + ")"] += count
        for label, function, path in _INCLUSIVE:
            if any(f.startswith(function + " (") and path in f for f in frames):
                inclusive[label] += count
    lines = [f"{total:,} samples of the gateway process (idle samples excluded).", ""]
    lines += ["| self time by library | share |", "|---|---:|"]
    lines += [f"| {k} | {100 * v / total:.1f}% |" for k, v in by_library.most_common()]
    lines += ["", "| inclusive time | share |", "|---|---:|"]
    lines += [f"| {label} | {100 * inclusive[label] / total:.1f}% |" for label, _, _ in _INCLUSIVE]
    lines += ["", "| hottest functions (self) | share |", "|---|---:|"]
    lines += [f"| `{k}` | {100 * v / total:.1f}% |" for k, v in by_function.most_common(15)]
    return lines


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def profile_token_route(bench: Bench, gateway_url: str, pid: int) -> None:
    """Profile the token route at 64 connections (small JSON) for ``profile_seconds``."""
    binary = py_spy()
    if binary is None:
        bench.results.notes.append("py-spy not installed: no profile (pip install py-spy)")
        return
    seconds = bench.args.profile_seconds
    output = Path(tempfile.mkdtemp(prefix="bench-profile-")) / "gateway.txt"
    load = threading.Thread(
        target=run_wrk,
        args=(gateway_url, ["/api/small.json"]),
        kwargs={
            "connections": 64,
            "seconds": seconds + 3,
            "headers": bench.headers,
            "prefix": bench.plan.load_prefix(),
        },
        daemon=True,
    )
    load.start()
    command = [binary, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200"]
    command += ["--nonblocking", "--format", "raw", "--output", str(output)]
    done = subprocess.run(
        [*bench.plan.load_prefix(), *command],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    load.join(timeout=seconds + 60)
    if done.returncode != 0 or not output.exists():
        bench.results.notes.append(f"py-spy failed ({done.returncode}): {done.stderr[-300:]}")
        return
    raw = output.read_text()
    if bench.args.profile_out:
        Path(bench.args.profile_out).write_text(raw)
    title = f"Profile: token route, {SMALL}, 64 connections, {seconds} s (py-spy)"
    bench.results.facts[title] = summarise(raw)
