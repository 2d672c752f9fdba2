"""What a release carries: the version in one place and everywhere it is shown, the type marker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import gateway
from gateway.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_version_option_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"gateway {gateway.__version__}\n"


def test_changelog_has_unreleased_then_a_dated_section_for_the_version() -> None:
    headings = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert headings[0] == "[Unreleased]"
    assert any(
        re.fullmatch(rf"\[{re.escape(gateway.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}", h)
        for h in headings[1:]
    ), headings


def test_package_ships_the_type_marker() -> None:
    assert (ROOT / "gateway" / "py.typed").is_file()
