"""Instructions per request of each whole server process (uvicorn included), counted by valgrind.

    .venv/bin/python -m benchmarks.server_instructions [--requests 1000] [--warmup 100]

req/s on a shared VM moves by 10-30% between identical cells; an instruction count does not.
Each server (the bare proxy, the gateway) runs twice under callgrind against the same upstream
and IdP: once serving the warm-up requests, once serving warm-up + ``--requests``; the
difference divided by ``--requests`` is what one request costs that process, from the socket
read to the last byte written, upstream call included. The client sends what wrk sends in the
benchmark (the session cookie and ``X-CSRF: 1``), one request at a time on one connection, from
outside valgrind. Instructions are not time (cache misses and the kernel do not count), but
their ratio is the CPU-bound ratio of req/s without the noise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import aiohttp
import httpx
import yaml

from tests.e2e.processes import ROOT
from tests.e2e.servers import free_port, start_idp

from . import stack
from .bench import login, session_headers
from .upstream import SMALL_JSON

STARTUP_TIMEOUT = 300.0  # python under valgrind starts ~50x slower
# The bare proxy gets a cookie shaped like the gateway's session cookie, as under wrk
# (session_headers adds the cookie's name).
_BARE_COOKIE = "a" * 43 + "." + "b" * 43
_COLLECTED = re.compile(rb"Collected : (\d+)")


def _valgrind(command: list[str], log: BinaryIO) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        # The same hash seed in both runs of a server: the same start-up work to subtract.
        env={**os.environ, **stack.GATEWAY_ENV, "PYTHONHASHSEED": "0"},
    )


def _wait_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """One probe that waits long enough (the first request under valgrind is slow), so that
    both runs of a server serve the same requests."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=60).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 200 under valgrind (see {log})")


async def _drive(url: str, count: int, headers: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as client:
        for _ in range(count):
            async with client.get(url, headers=headers) as response:
                body = await response.read()
            if response.status != 200 or body != SMALL_JSON:
                raise RuntimeError(f"{url}: {response.status} {body[:80]!r}")


@contextlib.contextmanager
def _counted(command: list[str], probe: str, directory: Path) -> Iterator[list[int]]:
    """Run ``command`` under callgrind; after the block, stop it and put its total in the
    yielded list."""
    log = directory / f"valgrind-{time.monotonic_ns()}.log"
    total: list[int] = []
    with log.open("wb") as output:
        process = _valgrind(command, output)
        try:
            _wait_up(probe, process, log)
            yield total
        finally:
            stack.stop_process(process, timeout=120)  # callgrind writes its totals on exit
    found = _COLLECTED.search(log.read_bytes())
    if found is None:
        raise RuntimeError(f"no instruction count in {log}")
    total.append(int(found.group(1)))


def count(args: argparse.Namespace) -> dict[str, int]:
    """Instructions per request: bare proxy, gateway `auth: none` route, gateway token route."""
    per_request: dict[str, int] = {}
    with contextlib.ExitStack() as stop:
        directory = Path(stop.enter_context(tempfile.TemporaryDirectory(prefix="instr-")))
        upstream, _ = stop.enter_context(
            stack.nginx_upstream() if stack.nginx_binary() else stack.python_server("upstream")
        )
        idp = stop.enter_context(start_idp(at_ttl=3600))
        port = free_port()
        config = directory / "gateway.yaml"
        config.write_text(
            yaml.safe_dump(stack.gateway_config(idp, port=port, upstream=upstream, sink=upstream))
        )
        base = f"http://127.0.0.1:{port}"
        gateway = [sys.executable, "-m", "gateway", "run", "--config", str(config)]
        gateway += ["--port", str(port)]
        bare_port = free_port()
        bare = [sys.executable, "-m", "benchmarks.bare_proxy", "--port", str(bare_port)]
        bare += ["--upstream", upstream]
        kinds = {
            "bare proxy": (bare, f"http://127.0.0.1:{bare_port}", "/small.json", "/small.json"),
            "gateway, `auth: none` route": (gateway, base, "/pub/small.json", "/healthz"),
            "gateway, token route (cache hit)": (gateway, base, "/api/small.json", "/healthz"),
        }
        for name, (command, origin, path, probe) in kinds.items():
            totals = []
            for requests in (args.warmup, args.warmup + args.requests):
                with _counted(command, origin + probe, directory) as total:
                    cookie = asyncio.run(login(origin, idp)) if command is gateway else _BARE_COOKIE
                    asyncio.run(_drive(origin + path, requests, session_headers(cookie)))
                totals.append(total[0])
            per_request[name] = (totals[1] - totals[0]) // args.requests
            print(f"{name}: {per_request[name]:,} instructions per request", flush=True)
    return per_request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    if args.requests < 1 or args.warmup < 0:
        parser.error("--requests must be at least 1 and --warmup at least 0")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    results = count(args)
    bare = results["bare proxy"]
    for name, value in results.items():
        if name != "bare proxy":
            print(f"{name}: {bare / value:.3f} of the bare proxy (+{value - bare:,})")


if __name__ == "__main__":
    main()
