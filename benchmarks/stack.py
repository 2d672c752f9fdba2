"""The servers of a benchmark run, all on loopback: upstreams, nginx fronts, proxies, gateways.

The gateway is a separate ``python -m gateway run`` process with a generated config (the e2e
suite's :class:`tests.e2e.processes.GatewayProcess`); nginx renders the documented
``config/integrations/nginx.conf`` as the forward-auth e2e test does.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.e2e.processes import ROOT, GatewayProcess
from tests.e2e.servers import API, BILLING, CLIENT_ID, CLIENT_SECRET, IdpProcess, free_port
from tests.e2e.test_forward_auth import TEMPLATE, render

from .upstream import ONE_MIB, SMALL_JSON

STARTUP_TIMEOUT = 20.0
SESSION_SECRET = "benchmark-session-secret-benchmark-session-secret"
FORWARD_AUTH_SECRET = "benchmark-forward-auth-secret-benchmark-secret"
GATEWAY_ENV = {
    "GATEWAY_OIDC__CLIENT_SECRET": CLIENT_SECRET,
    "GATEWAY_SESSION__SECRET_KEY": SESSION_SECRET,
    "GATEWAY_FORWARD_AUTH__SECRET": FORWARD_AUTH_SECRET,
}
ONE_GIB = 1024 * ONE_MIB

_NGINX_MAIN = """daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
{user}
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/site.conf;
}}
"""

_UPSTREAM_SITE = """server {{
    listen 127.0.0.1:{port};
    root {tmp}/www;
    location = /small.json {{
        default_type application/json;
        return 200 '{small}';
    }}
    location / {{ default_type application/octet-stream; }}
}}
"""

_PLAIN_LOCATION = """
    # Benchmark only: bare nginx proxy_pass with keepalive, no auth subrequest.
    location /plain/ {
        proxy_pass http://api_upstream/;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
    }
"""


def wait_listening(port: int, process: subprocess.Popen[Any], what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on {port} within {STARTUP_TIMEOUT:.0f}s")


def stop_process(process: subprocess.Popen[Any], *, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def _worker_user() -> str:
    if os.geteuid() != 0:
        return ""
    nobody = pwd.getpwnam("nobody")
    return f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"


@contextlib.contextmanager
def run_nginx(site: str, port: int, directory: Path) -> Iterator[tuple[str, int]]:
    """nginx (one worker, no access log) serving ``site`` (an http{}-level config)."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx not found")
    (directory / "site.conf").write_text(site)
    (directory / "nginx.conf").write_text(_NGINX_MAIN.format(tmp=directory, user=_worker_user()))
    command = [binary, "-p", str(directory), "-c", str(directory / "nginx.conf")]
    process = subprocess.Popen(
        [*command, "-e", str(directory / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, process, "nginx")
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        stop_process(process)


def _workdir(prefix: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)  # nginx workers (nobody) traverse it
    return directory


@contextlib.contextmanager
def nginx_upstream() -> Iterator[tuple[str, int]]:
    """nginx answering /small.json (207 bytes), /1m.bin and /1g.bin (sparse: zeros)."""
    directory = _workdir("bench-upstream-")
    www = directory / "www"
    www.mkdir(mode=0o755)
    (www / "1m.bin").write_bytes(bytes(ONE_MIB))
    with (www / "1g.bin").open("wb") as handle:
        handle.truncate(ONE_GIB)
    for path in www.iterdir():
        path.chmod(0o644)
    port = free_port()
    site = _UPSTREAM_SITE.format(port=port, tmp=directory, small=SMALL_JSON.decode())
    try:
        with run_nginx(site, port, directory) as running:
            yield running
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def nginx_forward_auth(
    gateway_url: str, upstream_url: str, *, auth_cache: bool
) -> Iterator[tuple[str, int]]:
    """nginx from the documented forward-auth config in front of ``upstream_url`` (for both of
    its routes), the gateway answering the subrequests; plus ``/plain/``, no auth at all."""
    directory = _workdir("bench-front-")
    port = free_port()
    upstream = upstream_url.removeprefix("http://")
    conf = render(
        TEMPLATE.read_text(),
        {
            "LISTEN": f"127.0.0.1:{port}",
            "GATEWAY": gateway_url.removeprefix("http://"),
            "FORWARD_AUTH_SECRET": FORWARD_AUTH_SECRET,
            "SESSION_COOKIE": "gw_session",
            "AUTH_CACHE": "mrrt_auth" if auth_cache else "off",
            "AUTH_CACHE_DIR": str(directory / "auth-cache"),
            "API_SERVER": upstream,
            "BILLING_SERVER": upstream,
        },
    )
    listen = f"    listen 127.0.0.1:{port};\n"
    if listen not in conf:
        raise RuntimeError("the documented nginx config changed its listen line")
    conf = conf.replace(listen, listen + _PLAIN_LOCATION, 1)
    try:
        with run_nginx(conf, port, directory) as running:
            yield running
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def python_server(module: str, *args: str) -> Iterator[tuple[str, int]]:
    """``python -m benchmarks.<module> --port P ...``; yields (base URL, pid)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", f"benchmarks.{module}", "--port", str(port), *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, process, module)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        stop_process(process)


def gateway_config(
    idp: IdpProcess,
    *,
    port: int,
    upstream: str,
    sink: str,
    skew: float = 10,
    store: dict[str, Any] | None = None,
    access_log: bool = False,
) -> dict[str, Any]:
    """Routes: api and billing (token routes on the upstream), pub (auth: none), sink (token
    route on the upload sink). Logs at warning, so the access log is off unless asked for."""
    upstream, sink = upstream.rstrip("/") + "/", sink.rstrip("/") + "/"
    return {
        "public_url": f"http://127.0.0.1:{port}",
        "oidc": {
            "issuer": idp.issuer,
            "client_id": CLIENT_ID,
            "dialect": "rfc8707",
            "prompt": "consent",
        },
        "session": store or {"store": "memory"},
        "tokens": {"skew": skew},
        "forward_auth": {"enabled": True},
        "log": {"level": "info" if access_log else "warning"},
        "routes": [
            {
                "name": "api",
                "prefix": "/api/",
                "upstream": upstream,
                "audience": API,
                "scopes": ["read:orders"],
            },
            {
                "name": "billing",
                "prefix": "/billing/",
                "upstream": upstream,
                "audience": BILLING,
                "scopes": ["read:invoices"],
            },
            {"name": "pub", "prefix": "/pub/", "upstream": upstream, "auth": "none"},
            {
                "name": "sink",
                "prefix": "/sink/",
                "upstream": sink,
                "audience": API,
                "scopes": ["read:orders"],
            },
        ],
    }


@contextlib.contextmanager
def gateway_process(
    config: dict[str, Any], port: int, *, env: dict[str, str] | None = None
) -> Iterator[GatewayProcess]:
    process = GatewayProcess(config, port=port, env={**GATEWAY_ENV, **(env or {})})
    try:
        yield process
    finally:
        process.stop()


def gateway_pid(process: GatewayProcess) -> int:
    """The gateway's pid (for RSS and py-spy): GatewayProcess keeps its Popen private."""
    return int(process._proc.pid)
