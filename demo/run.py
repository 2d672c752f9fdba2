"""The local demo in one command (``scripts/demo`` runs ``python -m demo.run``).

Starts the test OpenID Provider (``node tests/e2e/idp/server.mjs``) on 127.0.0.1:4000, the demo
APIs (:mod:`demo.apis`) on 127.0.0.1:8001-8003 and the gateway with ``config/demo.yaml`` on
127.0.0.1:8000, prints the URL to open, and stops everything on Ctrl-C or SIGTERM. Port 0 picks a
free port (the tests use that); the config's public URL, issuer and upstreams follow the ports.

The APIs and the gateway run under uvicorn in threads of this process, so one signal handler
stops them all; the IdP is a child process that also exits when our stdin pipe to it closes, so
even a killed launcher leaves no node process behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import uvicorn
import yaml
from starlette.types import ASGIApp

from gateway import create_app
from gateway.errors import ConfigError
from gateway.observability import configure_logging
from gateway.settings import Settings, load_settings

from .apis import DEMO_APIS, create_api

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config" / "demo.yaml"
IDP_DIR = REPO / "tests" / "e2e" / "idp"
HOST = "127.0.0.1"  # the IdP only accepts loopback redirect URIs; cookies compare hosts
# The demo IdP's client secret: a published test value (tests/e2e/idp/server.mjs), not a secret.
DEMO_CLIENT_SECRET = "bff-secret"
IDP_TOKEN_TTL = 300
STARTUP_TIMEOUT = 60.0


class DemoError(RuntimeError):
    """The demo cannot start; the message says why and what to do."""


def bind(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:port (0 = any free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise DemoError(f"cannot listen on {HOST}:{port} ({exc.strerror}): is it in use?") from exc
    return sock


def demo_settings(
    *,
    public_url: str,
    issuer: str,
    upstreams: dict[str, str],
    client_secret: str | None = None,
    config: Path = CONFIG,
) -> Settings:
    """config/demo.yaml with the public URL, issuer and upstreams (by route name) replaced.

    A relative ``static.directory`` is resolved against the repository, so the launcher works
    from any working directory. Each run gets a fresh session key.
    """
    data: dict[str, Any] = yaml.safe_load(config.read_text(encoding="utf-8"))
    oidc = {**data["oidc"], "issuer": issuer}
    if client_secret is not None:
        oidc["client_secret"] = client_secret
    routes = [
        {**route, "upstream": upstreams.get(route.get("name", ""), route["upstream"])}
        for route in data.get("routes", [])
    ]
    overrides: dict[str, Any] = {
        "public_url": public_url,
        "oidc": oidc,
        "routes": routes,
        "session": {**data.get("session", {}), "secret_key": [secrets.token_urlsafe(48)]},
    }
    static = data.get("static")
    if static is not None and not Path(static["directory"]).is_absolute():
        overrides["static"] = {**static, "directory": str(REPO / static["directory"])}
    return load_settings(config, **overrides)


class ServerThread:
    """uvicorn serving one app on an already-bound socket, from a daemon thread."""

    def __init__(self, app: ASGIApp, sock: socket.socket, **options: Any) -> None:
        config = {
            "log_config": None,  # logging is the launcher's (gateway.observability)
            "log_level": "warning",
            "access_log": False,
            "lifespan": "on",
            **options,
        }
        self.sock = sock
        self.url = f"http://{HOST}:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, **config))
        # Off the main thread uvicorn installs no signal handlers: the launcher owns them.
        self._thread = threading.Thread(target=self._server.run, args=([sock],), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise DemoError(f"the server for {self.url} did not start")
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self.sock.close()


class IdpServer:
    """The test OpenID Provider as a child process; its output goes to ``log_dir``."""

    def __init__(self, port: int, log_dir: Path) -> None:
        node = shutil.which("node")
        if node is None:
            raise DemoError("Node.js is needed for the demo's OpenID Provider: run scripts/install")
        if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
            print("installing the demo IdP's npm packages ...", flush=True)
            subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],  # noqa: S607
                cwd=IDP_DIR,
                check=True,
            )
        self.log = log_dir / "idp.log"
        self._ready = log_dir / "idp.out"
        env = {
            **os.environ,
            "IDP_PORT": str(port),
            "IDP_HOST": HOST,
            "IDP_AT_TTL": str(IDP_TOKEN_TTL),
            "IDP_EXIT_ON_STDIN_EOF": "1",
            "NODE_NO_WARNINGS": "1",
        }
        with open(self._ready, "wb") as out, open(self.log, "wb") as err:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed command
                [node, "server.mjs"],
                cwd=IDP_DIR,
                env=env,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
            )
        self.issuer = self._wait_ready()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            line = self._ready.read_text(encoding="utf-8", errors="replace")
            if line.endswith("\n"):
                return str(json.loads(line)["issuer"])
            if self._proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        tail = self.log.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise DemoError(f"the demo OpenID Provider did not start:\n{tail}")

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        if self._proc.stdin is not None:
            self._proc.stdin.close()


@dataclass
class DemoStack:
    """The running demo: where the gateway, the IdP and each API listen."""

    url: str
    issuer: str
    apis: dict[str, str]
    log_dir: Path
    parts: list[ServerThread | IdpServer] = field(default_factory=list, repr=False)

    @property
    def alive(self) -> bool:
        return all(part.alive for part in self.parts)


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise DemoError(f"the gateway at {url} did not become ready")


@contextlib.contextmanager
def start_demo(
    *,
    port: int = 8000,
    idp_port: int = 4000,
    api_ports: Sequence[int] = (8001, 8002, 8003),
    configure_logs: bool = False,
) -> Iterator[DemoStack]:
    """Start the IdP, the APIs and the gateway; stop them all on exit."""
    if len(api_ports) != len(DEMO_APIS):
        raise DemoError(f"give {len(DEMO_APIS)} API ports, got {len(api_ports)}")
    parts: list[ServerThread | IdpServer] = []
    sockets: list[socket.socket] = []
    with tempfile.TemporaryDirectory(prefix="mrrt-demo-") as tmp:
        try:
            # Every port first: a busy one fails before anything starts.
            for wanted in (port, *api_ports):
                sockets.append(bind(wanted))
            gateway_sock, api_socks = sockets[0], sockets[1:]
            parts.append(idp := IdpServer(idp_port, Path(tmp)))
            apis: dict[str, str] = {}
            for api, sock in zip(DEMO_APIS, api_socks, strict=True):
                app = create_api(api.name, issuer=idp.issuer, audience=api.audience)
                parts.append(server := ServerThread(app, sock))
                apis[api.name] = server.url + "/"
            url = f"http://{HOST}:{gateway_sock.getsockname()[1]}"
            settings = demo_settings(
                public_url=url,
                issuer=idp.issuer,
                upstreams=apis,
                client_secret=os.environ.get("GATEWAY_OIDC__CLIENT_SECRET", DEMO_CLIENT_SECRET),
            )
            if configure_logs:
                configure_logging(settings.log)
            app = create_app(settings)
            parts.append(ServerThread(app, gateway_sock, proxy_headers=False, server_header=False))
            _wait_ready(url)
            yield DemoStack(url=url, issuer=idp.issuer, apis=apis, log_dir=Path(tmp), parts=parts)
        finally:
            for part in reversed(parts):
                part.stop()
            for sock in sockets:
                sock.close()


def _banner(stack: DemoStack) -> str:
    apis = "\n".join(
        f"  {api.name:<8} {stack.apis[api.name]:<24} gateway {api.prefix:<10} aud {api.audience}"
        for api in DEMO_APIS
    )
    return f"""
mrrt-gateway demo ready: {stack.url}/

  Open {stack.url}/ and press "Log in". The OpenID Provider accepts any user name and any
  password (the name becomes the token's `sub`); press "Continue" on its consent page. Then
  call each API: the page shows the audience each API received; "outside" is not in the
  client's policy, so the gateway answers 403.

  gateway  {stack.url}/  (config/demo.yaml)
  IdP      {stack.issuer}  (client bff / bff-secret: test values; log {stack.log_dir}/idp.log)
{apis}

Press Ctrl-C to stop.
"""


def _ports(value: str) -> list[int]:
    return [int(p) for p in value.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8000, help="gateway port (0 = any)")
    parser.add_argument("--idp-port", type=int, default=4000, help="OpenID Provider port")
    parser.add_argument(
        "--api-ports", type=_ports, default=[8001, 8002, 8003], help="orders,billing,outside"
    )
    args = parser.parse_args(argv)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)
    try:
        with start_demo(
            port=args.port, idp_port=args.idp_port, api_ports=args.api_ports, configure_logs=True
        ) as stack:
            print(_banner(stack), flush=True)
            while not stop.wait(0.5):
                # Ctrl-C reaches the IdP too (same process group): give our handler a moment.
                if not stack.alive and not stop.wait(1.0):
                    print("demo: a component stopped unexpectedly; shutting down", file=sys.stderr)
                    return 1
    except (DemoError, ConfigError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    print("demo stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
