from __future__ import annotations

import pytest

from gateway.errors import CSRFCheckFailed
from gateway.security import (
    check_csrf,
    format_cookie,
    read_cookie,
    tokens_equal,
    validate_return_to,
)

OPEN_REDIRECTS = [
    "//evil.example",
    "https://evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "%2F%2Fevil.example",
    "/%2F/evil.example",
    "/%5Cevil.example",
    "%252F%252Fevil.example",
    "javascript:alert(1)",
    "/ok\r\nSet-Cookie: x=1",
    "/ok%0d%0aSet-Cookie:%20x=1",
    "http:/evil.example",
    "",
    None,
    "/" + "a" * 5000,
]


@pytest.mark.parametrize("target", OPEN_REDIRECTS)
def test_validate_return_to_refuses_other_origins(target: str | None) -> None:
    assert validate_return_to(target) == "/"


@pytest.mark.parametrize("target", ["/", "/app", "/app/orders?id=1#top", "/a%20b"])
def test_validate_return_to_keeps_local_paths(target: str) -> None:
    assert validate_return_to(target) == target


ALLOWED = ["https://app.example.com"]


def _csrf(**kw: object) -> None:
    args: dict[str, object] = {
        "method": "POST",
        "header_value": "1",
        "expected_value": "1",
        "origin": "https://app.example.com",
        "sec_fetch_site": "same-origin",
        "allowed_origins": ALLOWED,
    }
    args.update(kw)
    check_csrf(**args)  # type: ignore[arg-type]


def test_check_csrf_accepts_same_origin_with_header() -> None:
    _csrf()
    _csrf(method="GET", origin=None, sec_fetch_site=None)


@pytest.mark.parametrize(
    "override",
    [
        {"header_value": None},
        {"header_value": "0"},
        {"origin": "https://evil.example"},
        {"origin": "null"},
        {"sec_fetch_site": "cross-site"},
        {"method": "GET", "header_value": None},
    ],
)
def test_check_csrf_refuses(override: dict[str, object]) -> None:
    with pytest.raises(CSRFCheckFailed):
        _csrf(**override)


def test_format_cookie_sets_security_attributes() -> None:
    cookie = format_cookie("__Host-gw", "v", https=True, max_age=10)
    assert "HttpOnly" in cookie and "Secure" in cookie and "Path=/" in cookie
    assert "SameSite=Lax" in cookie and "Max-Age=10" in cookie
    assert "Secure" not in format_cookie("gw", "v", https=False, max_age=None)


def test_read_cookie_tolerates_junk() -> None:
    assert read_cookie("a=1; gw=abc; b=2", "gw") == "abc"
    assert read_cookie("garbage;;==;gw", "gw") is None
    assert read_cookie(None, "gw") is None
    assert read_cookie("gw=" + "x" * 20000, "gw") is None


def test_tokens_equal_handles_none() -> None:
    assert tokens_equal("a", "a")
    assert not tokens_equal("a", "b")
    assert not tokens_equal(None, "a")
