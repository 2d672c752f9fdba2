from __future__ import annotations

import pytest

from gateway.errors import InvalidPath
from gateway.routing import RouteTable, normalize_path
from gateway.settings import RouteSettings

API = RouteSettings(prefix="/api/", upstream="http://orders.internal:8080/", audience="https://api")
API_V2 = RouteSettings(prefix="/api/v2/", upstream="http://v2.internal/base", audience="https://v2")
STATUS = RouteSettings(prefix="/status", upstream="http://status.internal/", auth="none")
KEEP = RouteSettings(
    prefix="/keep/", upstream="http://keep.internal/root/", auth="none", strip_prefix=False
)
TABLE = RouteTable([API, API_V2, STATUS, KEEP])

NORMALISED = [
    ("/api/orders", "/api/orders"),
    ("/api/./orders", "/api/orders"),
    ("/api/x/../orders", "/api/orders"),
    ("/api/%2e%2e/billing", "/billing"),
    ("/api/orders/.", "/api/orders/"),
    ("/api/orders/%41", "/api/orders/A"),
    ("/ap%69/orders", "/api/orders"),
    ("/api/a%20b%2Fc"[:-4] + "%7e%2d%5F", "/api/a%20b~-_"),
    ("/api/%e2%82%ac", "/api/%e2%82%ac"),
    ("/", "/"),
]


@pytest.mark.parametrize(("raw", "expected"), NORMALISED)
def test_normalize_path_resolves_dot_segments(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


REFUSED = [
    "/api/..%2f..%2fetc",
    "/api/a%2Fb",
    "/api/a%5cb",
    "/..",
    "/api/../../x",
    "/api/%00",
    "api",
]


@pytest.mark.parametrize("raw", REFUSED)
def test_normalize_path_refuses_escapes(raw: str) -> None:
    with pytest.raises(InvalidPath):
        normalize_path(raw)


def test_route_table_longest_prefix_wins() -> None:
    route = TABLE.match("/api/v2/items")
    assert route is not None and route.name == "api_v2"
    route = TABLE.match("/api/v1/items")
    assert route is not None and route.name == "api"


def test_route_table_matches_prefix_without_trailing_slash() -> None:
    route = TABLE.match("/api")
    assert route is not None and route.name == "api"
    assert TABLE.match("/apix") is None
    assert TABLE.match("/other") is None


def test_route_upstream_url_strips_prefix_and_keeps_query() -> None:
    api = TABLE.by_name("api")
    assert api is not None
    assert (
        api.upstream_url("/api/orders/1", "a=1&b=%20")
        == "http://orders.internal:8080/orders/1?a=1&b=%20"
    )
    assert api.upstream_url("/api", "") == "http://orders.internal:8080/"
    v2 = TABLE.by_name("api_v2")
    assert v2 is not None
    assert v2.upstream_url("/api/v2/items", "") == "http://v2.internal/base/items"


def test_route_upstream_url_keeps_prefix_when_configured() -> None:
    keep = TABLE.by_name("keep")
    assert keep is not None
    assert keep.upstream_url("/keep/a", "") == "http://keep.internal/root/keep/a"


def test_route_needs_token_only_for_user_auth() -> None:
    assert TABLE.match("/api/x").needs_token  # type: ignore[union-attr]
    assert not TABLE.match("/status/x").needs_token  # type: ignore[union-attr]
