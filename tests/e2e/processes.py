"""Gateway and Redis as real OS processes, for the scale-out and fault tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

from .servers import free_port

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 60.0


class GatewayProcess:
    """``python -m gateway run`` on 127.0.0.1:<port> with a generated config file."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        port: int,
        env: dict[str, str],
        command: list[str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        """``command`` replaces ``python -m gateway`` (e.g. an installed ``gateway`` script)."""
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self._dir = tempfile.mkdtemp(prefix="gw-proc-")
        self.config_path = Path(self._dir) / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = Path(self._dir) / "gateway.log"
        self._log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            [
                *(command or [sys.executable, "-m", "gateway"]),
                "run",
                "--config",
                str(self.config_path),
                "--port",
                str(port),
            ],
            cwd=cwd,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError, ValueError):
                # The gateway's own answer: a port chosen by free_port() may have been taken
                # meanwhile by another loopback server of the run (an echo upstream answers 200
                # to every path), and then this process fails to bind and exits.
                answer = httpx.get(self.base_url + "/healthz", timeout=1)
                if answer.status_code == 200 and answer.json() == {"status": "ok"}:
                    time.sleep(0.2)
                    if self._proc.poll() is None:
                        return
            time.sleep(0.1)
        logs = self.logs()  # read before stop() removes the directory
        self.stop()
        raise RuntimeError(f"gateway on {self.base_url} did not start:\n{logs}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        """Signal the gateway process (SIGHUP: reload its configuration file)."""
        self._proc.send_signal(sig)

    def is_running(self) -> bool:
        return self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, requests in flight are cut (then ``stop`` cleans up)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)


SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"  # the machine's Redis (scripts/services starts it)


@contextlib.contextmanager
def redis_key_prefix(tag: str, url: str = SHARED_REDIS_URL) -> Iterator[str]:
    """A key prefix of this test alone on a shared Redis; its keys are deleted afterwards."""
    prefix = f"gwtest-{tag}-{uuid.uuid4().hex[:8]}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(match=prefix + "*"))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


class RedisProcess:
    """A private redis-server on an ephemeral port, without persistence (as in production tests
    of a Redis restart: the data is lost and the gateway must say login_required, not 500)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._start()

    def _start(self) -> None:
        self._proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.cli("PING") == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return result.stdout.strip()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers."""
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Kill and start again on the same port: every key is gone."""
        self._proc.kill()
        self._proc.wait(timeout=5)
        self._start()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGCONT)
        self._proc.kill()
        self._proc.wait(timeout=5)


@contextlib.contextmanager
def redis_process() -> Iterator[RedisProcess]:
    server = RedisProcess()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def gateway_processes(
    configs: list[dict[str, Any]], ports: list[int], env: dict[str, str]
) -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    try:
        for config, port in zip(configs, ports, strict=True):
            started.append(GatewayProcess(config, port=port, env=env))
        yield started
    finally:
        for process in reversed(started):
            process.stop()
