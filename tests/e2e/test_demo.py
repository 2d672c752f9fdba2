"""scripts/demo, the README's first command: the whole stack starts, answers and stops.

Runs the real script (which execs ``python -m demo.run``) with every port set to 0, so the
launcher picks free ports and rewrites config/demo.yaml's public URL, issuer and upstreams.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from .gateway_harness import CSRF
from .login import browser_login
from .servers import API, BILLING, OUTSIDE

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "demo"
EPHEMERAL = ["--port", "0", "--idp-port", "0", "--api-ports", "0,0,0"]
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
_READY = re.compile(r"^mrrt-gateway demo ready: (http://127\.0\.0\.1:\d+)/$", re.MULTILINE)
_IDP = re.compile(r"^  IdP +(http://127\.0\.0\.1:\d+) ", re.MULTILINE)
_API = re.compile(r"^  (orders|billing|outside) +(http://127\.0\.0\.1:\d+/) ", re.MULTILINE)


@dataclass
class RunningDemo:
    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    url: str
    issuer: str
    apis: dict[str, str]

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")


def _is_listening(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((parts.hostname or "", parts.port or 80)) == 0


@contextlib.contextmanager
def run_demo(tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """scripts/demo as a child process; killed at the end if still running."""
    out, err = tmp_path / "demo.out", tmp_path / "demo.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [str(SCRIPT), *args],
            cwd=tmp_path,  # the script finds the repository itself
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def started_demo(tmp_path: Path) -> Iterator[RunningDemo]:
    with run_demo(tmp_path, *EPHEMERAL) as proc:
        out, err = tmp_path / "demo.out", tmp_path / "demo.err"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not (ready := _READY.search(text := out.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                logs = text + err.read_text(errors="replace")
                pytest.fail(f"scripts/demo did not start (exit {proc.poll()}):\n{logs}")
            time.sleep(0.1)
        idp = _IDP.search(text)
        assert idp is not None, text
        yield RunningDemo(
            proc=proc,
            stdout=out,
            stderr=err,
            url=ready.group(1),
            issuer=idp.group(1),
            apis=dict(_API.findall(text)),
        )


async def test_demo_script_starts_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    with started_demo(tmp_path) as demo:
        assert set(demo.apis) == {"orders", "billing", "outside"}
        async with httpx.AsyncClient(base_url=demo.url, timeout=30) as client:
            health = await client.get("/healthz")
            page = await client.get("/")
            script = await client.get("/app.js")
            login = await client.get("/auth/login", params={"return_to": "/"})
            anonymous = await client.get("/api/whoami", headers=CSRF)
            direct = await client.get(demo.apis["orders"] + "whoami")  # no token at the API
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "mrrt-gateway demo" in page.text and 'src="/app.js"' in page.text
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        assert script.status_code == 200 and "/auth/me" in script.text
        assert login.status_code == 302
        location = urlsplit(login.headers["location"])
        assert f"{location.scheme}://{location.netloc}" == demo.issuer
        query = parse_qs(location.query)
        assert query["redirect_uri"] == [f"{demo.url}/auth/callback"]
        assert set(query["resource"]) == {API, BILLING, OUTSIDE}
        assert anonymous.status_code == 401 and anonymous.json()["error"] == "login_required"
        assert direct.status_code == 401 and direct.json()["error"] == "invalid_token"

        # The rewritten upstreams are the launcher's APIs: log in and call two of them.
        async with httpx.AsyncClient(base_url=demo.url, timeout=30) as browser:
            done = await browser_login(
                browser, f"{demo.url}/auth/login?return_to=/", idp_issuer=demo.issuer
            )
            assert done.status_code == 302 and done.headers["location"] == "/"
            orders = await browser.get("/api/whoami", headers=CSRF)
            billing = await browser.get("/billing/whoami", headers=CSRF)
        assert orders.status_code == 200, orders.text
        seen = orders.json()
        assert (seen["api"], seen["aud"], seen["sub"], seen["path"]) == (
            "orders",
            API,
            "alice",
            "/whoami",
        )
        assert "read:orders" in seen["scope"].split()
        assert billing.status_code == 200 and billing.json()["aud"] == BILLING, billing.text

        started = time.monotonic()
        demo.proc.send_signal(signal.SIGTERM)
        assert demo.proc.wait(timeout=STOP_TIMEOUT) == 0, demo.output()
        stopped_in = time.monotonic() - started
        assert "demo stopped" in demo.output()
        for url in (demo.url, demo.issuer, *demo.apis.values()):
            assert not _is_listening(url), f"{url} still listening after the demo stopped"
        assert stopped_in < STOP_TIMEOUT


async def test_demo_script_busy_port_exits_2_with_message(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with run_demo(tmp_path, *EPHEMERAL, "--port", str(port)) as proc:
            assert proc.wait(timeout=STARTUP_TIMEOUT) == 2
    message = (tmp_path / "demo.err").read_text()
    assert f"cannot listen on 127.0.0.1:{port}" in message
    assert "Traceback" not in message
