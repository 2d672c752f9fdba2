"""Configuration validation: every mistake stops startup with a message naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ConfigError
from gateway.settings import load_settings, parse_duration

BASE: dict[str, Any] = {
    "oidc": {"issuer": "https://tenant.auth0.com/", "client_id": "abc", "client_secret": "s"},
    "routes": [{"prefix": "/api/", "upstream": "http://orders:8080/", "audience": "https://api"}],
}


def _with(path: str, value: Any) -> dict[str, Any]:
    import copy

    data = copy.deepcopy(BASE)
    target: Any = data
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target.setdefault(key, {})
    target[keys[-1]] = value
    return data


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30),
        ("5m", 300),
        ("8h", 28800),
        ("7d", 604800),
        (12, 12),
        ("1.5", 1.5),
    ],
)
def test_parse_duration_accepts_units(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["fast", "-1s", "10y", True, ""])
def test_parse_duration_refuses_garbage(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


INVALID = [
    ("routes.0.upstream", "orders:8080", "routes.0.upstream"),
    ("routes.0.audience", None, "routes.0"),
    ("routes.0.prefix", "api", "routes.0.prefix"),
    ("routes.0.prefix", "/api/../x/", "routes.0.prefix"),
    ("routes.0.timeout", "soon", "routes.0.timeout"),
    ("routes.0.unknown_key", 1, "routes.0.unknown_key"),
    ("oidc.issuer", "not a url", "oidc.issuer"),
    ("oidc.scopes", ["openid"], "oidc.scopes"),
    ("oidc.dialect", "okta", "oidc.dialect"),
    ("oidc.client_secret", None, "oidc.client_secret"),
    ("public_url", "https://app.example.com/sub", "public_url"),
    ("session.store", "postgres", "session.store"),
    ("session.secret_key", "short", "session.secret_key"),
    ("surprise", 1, "surprise"),
    ("routes.0.forward_identity_headers", ["Authorization"], "forward_identity_headers"),
    ("routes.0.forward_identity_headers", ["X-Forwarded-For"], "forward_identity_headers"),
    ("routes.0.forward_identity_headers", ["Accept"], "forward_identity_headers"),
]


@pytest.mark.parametrize(("path", "value", "named"), INVALID)
def test_load_settings_names_the_bad_field(
    tmp_path: Path, path: str, value: Any, named: str
) -> None:
    import yaml

    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(_with(path, value)))
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert named in info.value.message


def test_load_settings_refuses_duplicate_prefix() -> None:
    routes = BASE["routes"] * 2
    with pytest.raises(ConfigError, match=r"routes\.1\.prefix: duplicate"):
        load_settings(None, **{**BASE, "routes": routes})


def test_load_settings_refuses_reserved_prefix() -> None:
    routes = [{"prefix": "/auth/x/", "upstream": "http://a/", "auth": "none"}]
    with pytest.raises(ConfigError, match="reserved"):
        load_settings(None, **{**BASE, "routes": routes})


def test_load_settings_redis_needs_secret_key() -> None:
    with pytest.raises(ConfigError, match=r"session\.secret_key"):
        load_settings(None, **{**BASE, "session": {"store": "redis"}})


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(_with("oidc.client_secret", None)))
    monkeypatch.setenv("GATEWAY_OIDC__CLIENT_SECRET", "from-env")
    monkeypatch.setenv("GATEWAY_SESSION__SECRET_KEY", "k" * 32 + "," + "j" * 40)
    settings = load_settings(config)
    assert settings.oidc.client_secret is not None
    assert settings.oidc.client_secret.get_secret_value() == "from-env"
    assert [k.get_secret_value() for k in settings.session.secret_key] == ["k" * 32, "j" * 40]
    assert "from-env" not in repr(settings)


def test_load_settings_reports_bad_yaml(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("routes: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(config)
    config.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(config)
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "missing.yaml")


def test_example_configs_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_OIDC__CLIENT_SECRET", "example")
    root = Path(__file__).resolve().parents[2] / "config"
    for path in sorted(root.glob("*.yaml")):
        assert load_settings(path).routes, path


def test_a_route_names_the_identity_headers_it_forwards_in_any_case() -> None:
    route = {**BASE["routes"][0], "forward_identity_headers": ["X-HTTP-Method-Override"]}
    settings = load_settings(None, **{**BASE, "routes": [route]})
    assert settings.routes[0].forward_identity_headers == ["x-http-method-override"]
