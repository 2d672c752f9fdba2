from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main

GOOD = """
oidc: {issuer: "https://tenant.auth0.com/", client_id: abc}
routes:
  - {prefix: /api/, upstream: "http://orders:8080/", audience: "https://api", scopes: [read:orders]}
  - {prefix: /status/, upstream: "http://status/", auth: none}
"""


def test_check_prints_route_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_OIDC__CLIENT_SECRET", "s")
    config = tmp_path / "g.yaml"
    config.write_text(GOOD)
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "/api/" in out and "https://api" in out and "read:orders" in out and "/status/" in out


def test_check_invalid_config_exits_2_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_OIDC__CLIENT_SECRET", "s")
    config = tmp_path / "g.yaml"
    config.write_text(GOOD.replace('audience: "https://api", ', ""))
    assert main(["check", "--config", str(config)]) == 2
    assert "routes.0" in capsys.readouterr().err


def test_check_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_check_online_reports_unreachable_idp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_OIDC__CLIENT_SECRET", "s")
    config = tmp_path / "g.yaml"
    config.write_text(GOOD.replace("https://tenant.auth0.com/", "http://127.0.0.1:9/"))
    assert main(["check", "--config", str(config), "--online"]) == 1
    assert "idp_unavailable" in capsys.readouterr().err
