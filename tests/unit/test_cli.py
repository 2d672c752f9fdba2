from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import uvicorn

from gateway import cli, observability
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


def test_run_freezes_startup_objects_and_keeps_freed_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    fake_gc = types.SimpleNamespace(
        collect=lambda: calls.append("collect"), freeze=lambda: calls.append("freeze")
    )
    monkeypatch.setattr(cli, "gc", fake_gc)

    def keep_freed_memory() -> bool:
        calls.append("keep")
        return True

    monkeypatch.setattr(cli, "keep_freed_memory", keep_freed_memory)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(f"run:{kw['port']}"))
    monkeypatch.setattr(observability, "configure_logging", lambda settings: None)
    monkeypatch.setenv("GATEWAY_OIDC__CLIENT_SECRET", "s")
    config = tmp_path / "gateway.yaml"
    config.write_text(GOOD + 'session: {secret_key: "' + "k" * 48 + '"}\n')
    assert main(["run", "--config", str(config), "--port", "8123"]) == 0
    assert calls == ["collect", "freeze", "keep", "run:8123"]


def test_sessions_needs_the_shared_store_and_a_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_OIDC__CLIENT_SECRET", "s")
    memory = tmp_path / "memory.yaml"
    memory.write_text(GOOD)
    assert main(["sessions", "list", "--sub", "x", "--config", str(memory)]) == 1
    assert "admin API" in capsys.readouterr().err
    redis = tmp_path / "redis.yaml"
    redis.write_text(GOOD + 'session: {store: redis, secret_key: "' + "k" * 48 + '"}\n')
    assert main(["sessions", "list", "--config", str(redis)]) == 2
    assert main(["sessions", "revoke", "--config", str(redis)]) == 2
    assert "--sub" in capsys.readouterr().err


def test_run_several_workers_with_the_memory_store_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_OIDC__CLIENT_SECRET", "s")
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("must not serve"))
    config = tmp_path / "g.yaml"
    config.write_text(GOOD)
    assert main(["run", "--config", str(config), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "session.store" in err and "redis" in err


def test_run_several_workers_with_redis_hands_uvicorn_the_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_OIDC__CLIENT_SECRET", "s")
    monkeypatch.setenv("GATEWAY_SESSION__SECRET_KEY", "k" * 40)
    # Recorded so that teardown restores it (main sets it for the workers).
    monkeypatch.setenv("GATEWAY_CONFIG", "unset-by-teardown")
    calls: list[tuple[tuple[object, ...], dict[str, object]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: calls.append((a, k)))
    config = tmp_path / "g.yaml"
    config.write_text(GOOD + "session: {store: redis}\n")
    assert main(["run", "--config", str(config), "--workers", "3"]) == 0
    ((args, kwargs),) = calls
    assert args == ("gateway.cli:worker_app",)
    assert kwargs["workers"] == 3 and kwargs["factory"] is True
    assert os.environ["GATEWAY_CONFIG"] == str(config)  # each worker loads the same file
