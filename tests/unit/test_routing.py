from __future__ import annotations

import pytest

from gateway import routing
from gateway.errors import InvalidPath
from gateway.own_paths import is_owned_path
from gateway.proxy_endpoint import proxied_path
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
    # Slashes merge before dot segments resolve, as in nginx, Traefik, Go and Envoy (review
    # finding 1): the empty segment is not what `..` pops.
    ("/api//../billing/leak", "/billing/leak"),
    ("/api/x//..//y", "/api/y"),
    ("//api/orders", "/api/orders"),
    ("/api//orders", "/api/orders"),
    ("/api/orders//", "/api/orders/"),
    ("/api/.//orders", "/api/orders"),
    ("//", "/"),
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


def _linear_match(routes: list[RouteSettings], path: str) -> str | None:
    """The definition: the longest prefix that the path starts with, or equals without its
    trailing slash."""
    matching = [r for r in routes if path.startswith(r.prefix) or path == r.prefix[:-1]]
    return max(matching, key=lambda r: len(r.prefix)).name if matching else None


def test_route_table_lookup_by_first_segment_agrees_with_the_longest_prefix_rule() -> None:
    routes = [
        API,
        API_V2,
        STATUS,
        KEEP,
        RouteSettings(prefix="/api/v2/admin/", upstream="http://a.internal/", auth="none"),
        RouteSettings(prefix="/apiv/", upstream="http://b.internal/", auth="none"),
        *(
            RouteSettings(prefix=f"/svc{i}/", upstream=f"http://s{i}.internal/", auth="none")
            for i in range(40)
        ),
    ]
    with_root = [*routes, RouteSettings(prefix="/", upstream="http://root.internal/", auth="none")]
    paths = [
        "/", "/api", "/api/", "/api/v2", "/api/v2/", "/api/v2/admin", "/api/v2/admin/x",
        "/api/v2x", "/api/v1/items", "/apiv", "/apiv/x", "/apix", "/status", "/status/ok",
        "/keep/a/b", "/keep", "/svc7/x", "/svc39", "/svc40/x", "/other/x", "/a", "//x",
    ]  # fmt: skip
    for table_routes in (routes, with_root):
        table = RouteTable(table_routes)
        for path in paths:
            found = table.match(path)
            assert (found.name if found else None) == _linear_match(table_routes, path), path


@pytest.mark.parametrize(
    "raw",
    [
        *(raw for raw, _ in NORMALISED),
        *REFUSED,
        "/api/orders/17",
        "/api/a b",
        "/api/.hidden",
        "/api/a\\b",
        "/api/\x7f",
        "/api/\x1f",
        "/api/caf\xe9",
        "/api/\x85",
        "//double",
        "/api//orders",
        "/api/orders//",
        "",
    ],
)
def test_the_shortcut_for_normal_paths_equals_resolving_them(raw: str) -> None:
    """normalize_path returns an already-normal path as it is: never any other."""
    try:
        expected: str | type[InvalidPath] = routing._resolve(raw)
    except InvalidPath:
        expected = InvalidPath
    for normalise in (normalize_path, proxied_path):
        try:
            got: str | type[InvalidPath] = normalise(raw)
        except InvalidPath:
            got = InvalidPath
        assert got == expected


@pytest.mark.parametrize("raw", ["/%61uth/me", "/x/../metrics", "/api/%2e%2e/healthz", "/./auth/"])
def test_a_path_that_only_normalises_to_an_own_path_is_never_proxied(raw: str) -> None:
    assert is_owned_path(normalize_path(raw))
    with pytest.raises(InvalidPath):
        proxied_path(raw)
