"""The peers of the gateway in one run: how each is installed, started and logged in to.

- ``node``: benchmarks/peers/node (express + express-openid-connect + http-proxy-middleware),
  its versions pinned by its package-lock.json, installed with ``npm ci`` on first use;
- ``python``: benchmarks/peers/python (FastAPI + auth0-fastapi + httpx), pinned with hashes in
  its requirements.txt, installed on first use into its own venv
  (benchmarks/peers/python/.venv), never into the project's;
- ``nginx``: ``proxy_pass`` with upstream keepalive, the ceiling per core.

Installation happens lazily (by ``benchmarks/run`` and the smoke test), not in scripts/install.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import venv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.servers import (
    API,
    BASIC_CLIENT_ID,
    BASIC_CLIENT_SECRET,
    BILLING,
    CLIENT_ID,
    CLIENT_SECRET,
    IdpProcess,
    free_port,
)

from ..stack import _workdir, run_nginx, stop_process, wait_listening

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE / "node"
PYTHON_DIR = HERE / "python"
PYTHON_VENV = PYTHON_DIR / ".venv"
INSTALL_TIMEOUT = 300.0
PEER_SECRET = "benchmark-peer-secret-benchmark-peer-secret-0123456789"
LOGIN_AUDIENCE = API
# The gateway's routes (benchmarks/stack.gateway_config): prefix, audience, scope.
ROUTES = [
    {"prefix": "/api", "audience": API, "scope": "read:orders"},
    {"prefix": "/billing", "audience": BILLING, "scope": "read:invoices"},
]


@dataclass(frozen=True)
class Peer:
    """A running peer: where it listens, its pid, the cookie its session lives in."""

    name: str
    base_url: str
    pid: int
    cookie: str


@contextlib.contextmanager
def _install_lock(name: str) -> Iterator[None]:
    path = Path(tempfile.gettempdir()) / f"mrrt-gateway-peer-{name}.lock"
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a benchmark and a test may race here
        yield


def _run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed in {cwd} (exit {done.returncode}):\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )


def ensure_node_peer() -> None:
    """``npm ci`` in benchmarks/peers/node unless its lock is installed already."""
    lock = (NODE_DIR / "package-lock.json").read_bytes()
    stamp = NODE_DIR / "node_modules" / ".installed-lock.sha256"
    digest = hashlib.sha256(lock).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found: Node.js runs the Node.js peer (scripts/install)")
    with _install_lock("node"):
        if stamp.exists() and stamp.read_text() == digest:
            return
        _run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], NODE_DIR)
        stamp.write_text(digest)


def python_peer_interpreter() -> Path:
    return PYTHON_VENV / "bin" / "python"


def ensure_python_peer() -> None:
    """Its own venv with exactly requirements.txt (hash-checked), unless already there."""
    lock = (PYTHON_DIR / "requirements.txt").read_bytes()
    stamp = PYTHON_VENV / "installed-lock.sha256"
    digest = hashlib.sha256(lock).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    with _install_lock("python"):
        if stamp.exists() and stamp.read_text() == digest:
            return
        shutil.rmtree(PYTHON_VENV, ignore_errors=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(PYTHON_VENV)
        python = str(python_peer_interpreter())
        _run(
            [
                python,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--require-hashes",
                "--no-deps",
                "-r",
                "requirements.txt",
            ],
            PYTHON_DIR,
        )
        stamp.write_text(digest)


def versions() -> str:
    """The peers' versions as installed (node, its packages; the Python peer's pins)."""
    found = []
    node = shutil.which("node")
    if node:
        done = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
        found.append(f"node {done.stdout.strip()}")
    for package in ("express", "express-openid-connect", "http-proxy-middleware"):
        manifest = NODE_DIR / "node_modules" / package / "package.json"
        if manifest.exists():
            found.append(f"{package} {json.loads(manifest.read_text())['version']}")
    pins = dict(
        line.split(" ", 1)[0].split("==")
        for line in (PYTHON_DIR / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith((" ", "#"))
    )
    for package in ("auth0-fastapi", "auth0-server-python", "fastapi", "httpx", "uvicorn"):
        if package in pins:
            found.append(f"{package} {pins[package]}")
    return ", ".join(found)


def _wait_ready(process: subprocess.Popen[str], port: int, what: str) -> None:
    try:
        wait_listening(port, process, what)
    except BaseException:
        stop_process(process)
        raise


@contextlib.contextmanager
def node_peer(idp: IdpProcess, upstream: str, *, env: dict[str, str]) -> Iterator[Peer]:
    """The Node.js peer on a free port, against ``idp`` (http or https) and ``upstream``."""
    ensure_node_peer()
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node not found")
    port = free_port()
    process = subprocess.Popen(
        [node, "server.js"],
        cwd=NODE_DIR,
        env={
            **os.environ,
            **env,
            "NODE_ENV": "production",
            "PORT": str(port),
            "ISSUER": idp.issuer,
            "CLIENT_ID": CLIENT_ID,
            "CLIENT_SECRET": CLIENT_SECRET,
            "SECRET": PEER_SECRET,
            "UPSTREAM": upstream,
            "ROUTES": json.dumps(ROUTES),
            "LOGIN_AUDIENCE": LOGIN_AUDIENCE,
        },
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    _wait_ready(process, port, "Node.js peer")
    try:
        yield Peer("Node.js BFF", f"http://127.0.0.1:{port}", process.pid, "appSession")
    finally:
        stop_process(process)


@contextlib.contextmanager
def python_peer(idp: IdpProcess, upstream: str, *, env: dict[str, str]) -> Iterator[Peer]:
    """The Python peer on a free port; ``idp`` must be served over https (the SDK's rule)."""
    if not idp.issuer.startswith("https://"):
        raise RuntimeError("auth0-server-python reaches its IdP over https only")
    ensure_python_peer()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(python_peer_interpreter()), "app.py", "--port", str(port)],
        cwd=PYTHON_DIR,
        env={
            **os.environ,
            **env,
            "PEER_DOMAIN": idp.issuer.removeprefix("https://"),
            "PEER_CLIENT_ID": BASIC_CLIENT_ID,  # the SDK authenticates with HTTP Basic
            "PEER_CLIENT_SECRET": BASIC_CLIENT_SECRET,
            "PEER_SECRET": PEER_SECRET,
            "PEER_BASE_URL": base_url,
            "PEER_UPSTREAM": upstream,
            "PEER_ROUTES": json.dumps(ROUTES),
            "PEER_LOGIN_AUDIENCE": LOGIN_AUDIENCE,
        },
        stdin=subprocess.DEVNULL,
        text=True,
    )
    _wait_ready(process, port, "Python peer")
    try:
        yield Peer("Python BFF", base_url, process.pid, "_a0_session")
    finally:
        stop_process(process)


_NGINX_PROXY_SITE = """upstream peer_upstream {{
    server {upstream};
    keepalive 64;
}}
server {{
    listen 127.0.0.1:{port};
    location /api/ {{
        proxy_pass http://peer_upstream/;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
    }}
}}
"""


@contextlib.contextmanager
def nginx_proxy(upstream: str) -> Iterator[tuple[str, int]]:
    """nginx ``proxy_pass`` (one worker, upstream keepalive) in front of ``upstream``."""
    directory = _workdir("bench-peer-nginx-")
    port = free_port()
    site = _NGINX_PROXY_SITE.format(upstream=upstream.removeprefix("http://"), port=port)
    try:
        with run_nginx(site, port, directory) as running:
            yield running
    finally:
        shutil.rmtree(directory, ignore_errors=True)
