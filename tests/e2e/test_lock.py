"""The lock: what scripts/install put into this venv is exactly requirements/dev.txt, the three
lock files agree with each other, and scripts/lock --check notices pyproject.toml moving away
from them (it resolves against the package index, as scripts/lock does)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "requirements"
UV = Path(sys.prefix) / "bin" / "uv"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)(?: ; ([^\\]+?))? *\\?$", re.M)


def pins(lock: str) -> dict[str, tuple[str, str | None]]:
    """Package name -> (version, marker) as the lock file pins them."""
    text = (LOCKS / f"{lock}.txt").read_text()
    return {canonicalize_name(m[1]): (m[2], m[3]) for m in _PIN.finditer(text)}


def test_every_pin_has_hashes_and_the_locks_agree_on_versions() -> None:
    dev, runtime, build = pins("dev"), pins("runtime"), pins("build")
    assert {"starlette", "redis", "pydantic", "uvicorn"} <= runtime.keys()
    assert {"pip", "hatchling", "build"} <= build.keys()
    # runtime.txt and build.txt are dev.txt's versions, so the tests run what ships.
    assert {name: dev[name] for name in runtime} == runtime
    assert {name: dev[name][0] for name in build} == {n: v[0] for n, v in build.items()}
    for lock in ("dev", "runtime", "build"):
        blocks = re.split(r"\n(?=[A-Za-z0-9])", (LOCKS / f"{lock}.txt").read_text())
        assert all("--hash=sha256:" in b for b in blocks if "==" in b.split("\n")[0]), lock


@pytest.mark.skipif(
    not (Path(sys.prefix) / "bin" / "uv").exists(), reason="not the venv of scripts/install"
)
def test_this_venv_holds_exactly_the_lock() -> None:
    wanted = {
        name: version
        for name, (version, marker) in pins("dev").items()
        if marker is None or Marker(marker).evaluate()
    }
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in distributions(path=[p for p in sys.path if p.startswith(sys.prefix)])
    }
    installed.pop(canonicalize_name("mrrt-gateway"), None)
    assert installed == wanted


@pytest.mark.e2e
def test_lock_check_fails_when_pyproject_and_the_lock_disagree(tmp_path: Path) -> None:
    assert UV.exists(), "uv missing: run scripts/install"
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "lock", tmp_path / "scripts" / "lock")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(LOCKS, tmp_path / "requirements")

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(tmp_path / "scripts" / "lock"), "--check"],
            env={**os.environ, "UV": str(UV)},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    agreed = check()
    assert agreed.returncode == 0, agreed.stdout + agreed.stderr
    pyproject = tmp_path / "pyproject.toml"
    version = pins("runtime")["redis"][0]
    text = pyproject.read_text()
    assert '"redis>=5.0,<9"' in text
    pyproject.write_text(text.replace('"redis>=5.0,<9"', f'"redis>=5.0,!={version}"'))
    moved = check()
    assert moved.returncode == 1, moved.stdout + moved.stderr
    assert f"-redis=={version}" in moved.stdout
    assert "run scripts/lock" in moved.stderr
