"""The release as a user gets it: the sdist and the wheel built from the sources, the wheel (not
editable) installed with the lock's runtime dependencies into a fresh venv, and the installed
``gateway`` command checked, started against the test IdP and used for a login and one proxied
request. Nothing of the repository is importable from there (the process runs elsewhere)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import gateway

from .gateway_harness import CSRF, gateway_config, start_upstreams
from .login import browser_login
from .processes import GatewayProcess
from .servers import API, CLIENT_SECRET, IdpProcess, free_port

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
EXAMPLE_CONFIG = ROOT / "config" / "gateway.yaml"
SESSION_KEY = "wheel-test-key-wheel-test-key-wheel-test-key"
STEP_TIMEOUT = 240.0  # one build or install step; pip answers from its cache after scripts/install


@dataclass
class Release:
    sdist: Path
    wheel: Path
    venv: Path
    workdir: Path  # a folder outside the repository: the cwd of every installed command

    @property
    def gateway_command(self) -> Path:
        return self.venv / "bin" / "gateway"

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return _run([str(self.gateway_command), *args], cwd=self.workdir, env=env)


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would point Python at the repository or the test
    venv, or configure the gateway behind the test's back."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "COVERAGE_PROCESS_START")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("GATEWAY_")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def _run(
    argv: list[str], *, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv,
        cwd=cwd,
        env=env if env is not None else _clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    tmp = tmp_path_factory.mktemp("release")
    dist, workdir, venv = tmp / "dist", tmp / "work", tmp / "venv"
    workdir.mkdir()
    # The sdist, then the wheel built from the unpacked sdist (python -m build does both), with
    # the lock's hatchling: no build isolation, nothing fetched unpinned.
    _run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        cwd=workdir,
    )
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    # A fresh venv from the base interpreter (no system or test-venv packages): the lock's
    # runtime dependencies, hash-checked, then the wheel alone.
    base_python = Path(getattr(sys, "_base_executable", sys.executable))
    _run([str(base_python), "-m", "venv", str(venv)], cwd=workdir)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _run([*pip, "--require-hashes", "-r", str(RUNTIME_LOCK)], cwd=workdir)
    _run([*pip, "--no-deps", str(wheel)], cwd=workdir)
    yield Release(sdist=sdist, wheel=wheel, venv=venv, workdir=workdir)


def test_sdist_and_wheel_carry_the_version_and_the_type_marker(release: Release) -> None:
    version = gateway.__version__
    assert release.wheel.name == f"mrrt_gateway-{version}-py3-none-any.whl"
    assert release.sdist.name == f"mrrt_gateway-{version}.tar.gz"
    with zipfile.ZipFile(release.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"mrrt_gateway-{version}.dist-info/METADATA").decode()
    assert "gateway/py.typed" in names and "gateway/cli.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "demo/"))]
    # The ranges of pyproject.toml, not the lock's pins, go to library users.
    assert "Requires-Dist: pydantic<3,>=2.6" in metadata
    with tarfile.open(release.sdist) as sdist:
        members = {m.name.partition("/")[2] for m in sdist.getmembers()}
    assert {"gateway/py.typed", "pyproject.toml", "requirements/runtime.txt"} <= members
    assert not [m for m in members if m.startswith((".venv/", "tests/", ".git/"))]


def test_installed_wheel_is_not_the_repository(release: Release) -> None:
    done = _run(
        [str(release.venv / "bin" / "python"), "-c", "import gateway; print(gateway.__file__)"],
        cwd=release.workdir,
    )
    location = Path(done.stdout.strip())
    assert location.is_relative_to(release.venv / "lib"), location
    assert (location.parent / "py.typed").is_file()


def test_installed_gateway_prints_its_version_and_checks_the_example_config(
    release: Release,
) -> None:
    assert release.run("--version").stdout.strip() == f"gateway {gateway.__version__}"
    done = release.run(
        "check",
        "--config",
        str(EXAMPLE_CONFIG),
        env=_clean_env(GATEWAY_OIDC__CLIENT_SECRET="example-secret"),
    )
    assert done.stdout.startswith("configuration ok: ")
    assert "example-secret" not in done.stdout + done.stderr


@pytest.mark.anyio
async def test_installed_gateway_logs_in_and_proxies_with_the_routes_audience(
    release: Release, idp: IdpProcess
) -> None:
    port = free_port()
    env = {"GATEWAY_OIDC__CLIENT_SECRET": CLIENT_SECRET, "GATEWAY_SESSION__SECRET_KEY": SESSION_KEY}
    with start_upstreams(idp) as upstreams:
        config = gateway_config(idp, port, upstreams)
        del config["oidc"]["client_secret"], config["session"]["secret_key"]  # from env only
        process = GatewayProcess(
            config,
            port=port,
            env=env,
            command=[str(release.gateway_command)],
            cwd=release.workdir,
        )
        try:
            async with httpx.AsyncClient(base_url=process.base_url, timeout=30) as client:
                login = await browser_login(
                    client, f"{process.base_url}/auth/login?return_to=/", idp_issuer=idp.issuer
                )
                orders = await client.get("/api/orders", headers=CSRF)
            logs = process.logs()
        finally:
            process.stop()
        assert login.status_code == 302, login.text
        assert orders.status_code == 200, orders.text
        assert orders.json()["aud"] == API
        seen = upstreams["api"].requests[-1]
        assert seen["aud"] == API and seen["headers"]["authorization"].startswith("Bearer ")
        assert "cookie" not in seen["headers"]
        for secret in (CLIENT_SECRET, SESSION_KEY):
            assert secret not in logs
