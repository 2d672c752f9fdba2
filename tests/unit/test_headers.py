"""Header policy (gateway/headers.py): the one pass over a request's headers, and answers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from multidict import istr

from gateway import headers as headers_module
from gateway.headers import (
    RequestHeaderPlan,
    add_forwarding,
    build_upstream_headers,
    filter_response_headers,
    forwarded_site,
    joined_cookie,
    read_headers,
    scan_request_headers,
)

WANTED = frozenset({b"cookie", b"content-length", b"x-csrf"})
GATEWAY_COOKIES = frozenset({b"gw_session"})
Scanned = tuple[int, dict[bytes, str], list[tuple[str, str]]]
REQUEST = [
    (b"host", b"app.example.com"),
    (b"X-CSRF", b"1"),
    (b"x-csrf", b"2"),
    (b"cookie", b"gw_session=secret; theme=dark"),
    (b"authorization", b"Bearer client-supplied"),
    (b"x-forwarded-for", b"6.6.6.6"),
    (b"x-request-id", b"client-id"),
    (b"connection", b"keep-alive, x-private"),
    (b"x-private", b"hop"),
    (b"accept", b"application/json"),
]


@pytest.fixture(params=["fresh plan", "warm plan"])
def scan(request: pytest.FixtureRequest) -> Callable[..., Scanned]:
    """``RequestHeaderPlan(**policy).scan(headers)``, with a plan that has seen nothing yet or
    one that scanned the same headers before (its decisions remembered)."""

    def scan(headers: list[tuple[bytes, bytes]], **policy: Any) -> Scanned:
        plan = RequestHeaderPlan(wanted=WANTED, gateway_cookies=GATEWAY_COOKIES, **policy)
        if request.param == "warm plan":
            plan.scan(headers)
        return plan.scan(headers)

    return scan


@pytest.fixture
def kept_names() -> Iterator[None]:
    """The module's kept upstream names, emptied for a test and put back after it."""
    saved = dict(headers_module._NAMES)
    headers_module._NAMES.clear()
    yield
    headers_module._NAMES.clear()
    headers_module._NAMES.update(saved)


def test_one_pass_finds_wanted_values_size_and_what_an_upstream_may_see(
    scan: Callable[..., Scanned],
) -> None:
    size, found, kept = scan(REQUEST, replace_request_id=True)
    assert size == sum(len(k) + len(v) for k, v in REQUEST)
    # The first value of each wanted header; names compared lower-cased, as for stripping.
    assert found == {b"x-csrf": "1", b"cookie": "gw_session=secret; theme=dark"}
    assert kept == [("x-csrf", "1"), ("x-csrf", "2"), ("accept", "application/json")]


def test_forward_cookies_keeps_all_but_the_gateways_own(scan: Callable[..., Scanned]) -> None:
    _, found, kept = scan(REQUEST, forward_cookies=True)
    assert found[b"cookie"] == "gw_session=secret; theme=dark"  # the session lookup sees it
    assert ("cookie", "theme=dark") in kept
    assert ("x-request-id", "client-id") in kept  # not replaced unless asked


def test_upstream_headers_are_the_clients_allowed_ones_then_the_gateways_own() -> None:
    built = build_upstream_headers(
        REQUEST,
        gateway_cookies=GATEWAY_COOKIES,
        client_ip="10.0.0.1",
        proto="https",
        host="app.example.com",
        bearer="at",
        request_id="rid",
    )
    assert built == [
        ("x-csrf", "1"),
        ("x-csrf", "2"),
        ("accept", "application/json"),
        ("x-forwarded-for", "10.0.0.1"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "app.example.com"),
        ("authorization", "Bearer at"),
        ("x-request-id", "rid"),
    ]


def test_a_connection_header_cannot_drop_the_gateways_own_headers_or_hide_the_cookie(
    scan: Callable[..., Scanned],
) -> None:
    hostile = [
        (b"connection", b"x-request-id, authorization, cookie, x-forwarded-for"),
        (b"cookie", b"gw_session=secret; theme=dark"),
    ]
    _, found, kept = scan(hostile, forward_cookies=True, replace_request_id=True)
    assert found[b"cookie"] == "gw_session=secret; theme=dark"  # the session is still found
    assert kept == []  # the listed cookie header is hop-by-hop: not forwarded
    out = add_forwarding(
        kept,
        client_ip="10.0.0.1",
        site=forwarded_site("https", "gw"),
        bearer="at",
        request_id="rid",
    )
    assert [name for name, _ in out] == [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "authorization",
        "x-request-id",
    ]


def test_answers_lose_hop_by_hop_headers_our_cookies_and_the_upstreams_date() -> None:
    headers = [
        (b"Date", b"Thu, 26 Nov 2026 10:00:00 GMT"),
        (b"Content-Type", b"application/json"),
        (b"Connection", b"close"),
        (b"Set-Cookie", b"gw_session=forged; Path=/"),
        (b"Set-Cookie", b"theme=light"),
        (b"X-Request-ID", b"upstream-id"),
    ]
    out = filter_response_headers(headers, gateway_cookies=GATEWAY_COOKIES, request_id=b"rid")
    assert out == [
        (b"content-type", b"application/json"),
        (b"set-cookie", b"theme=light"),
        (b"x-request-id", b"rid"),
    ]


@pytest.mark.usefixtures("kept_names")
def test_names_for_the_forwarder_are_kept_as_istr_bounded_in_number_and_length() -> None:
    headers_module._NAMES.clear()
    many = [(f"x-custom-{i}".encode(), b"v") for i in range(2 * headers_module._NAMES_MAX)]
    _, _, out = scan_request_headers(many, wanted=WANTED, gateway_cookies=GATEWAY_COOKIES)
    assert [name for name, _ in out] == [f"x-custom-{i}" for i in range(len(many))]
    assert all(isinstance(name, istr) for name, _ in out)  # no case folding in aiohttp
    assert len(headers_module._NAMES) == headers_module._NAMES_MAX
    _, _, again = scan_request_headers(many[-1:], wanted=WANTED, gateway_cookies=GATEWAY_COOKIES)
    assert again[0][0] is out[-1][0]  # the newest names are the kept ones
    headers_module._NAMES.clear()
    long_name = b"x-" + b"n" * 200  # a long name is forwarded but never kept
    _, _, out = scan_request_headers(
        [(long_name, b"v")], wanted=WANTED, gateway_cookies=GATEWAY_COOKIES
    )
    assert out == [(long_name.decode(), "v")] and headers_module._NAMES == {}


def test_a_flood_of_junk_names_does_not_keep_real_names_from_being_remembered() -> None:
    """Before: the first 512 names a plan saw were kept for good, so a client sending junk
    names first put every later request's real names on the slow path forever."""
    plan = RequestHeaderPlan(wanted=WANTED, gateway_cookies=GATEWAY_COOKIES)
    junk = [(f"x-junk-{i}".encode(), b"v") for i in range(3 * headers_module._NAMES_MAX)]
    plan.scan(junk)
    plan.scan(REQUEST)
    decisions = plan._decisions
    assert len(decisions) == headers_module._NAMES_MAX
    assert all(name in decisions for name, _ in REQUEST if len(name) <= 64)


def test_every_cookie_field_is_read_as_one_cookie_header() -> None:
    """HTTP/2 may carry each cookie in a field of its own (RFC 9113 §8.2.3)."""
    split = [(b"cookie", b"a=1"), (b"x-other", b"y"), (b"cookie", b"gw_session=tok")]
    assert read_headers(split, frozenset({b"cookie", b"x-other"})) == {
        b"cookie": "a=1; gw_session=tok",
        b"x-other": "y",
    }
    assert joined_cookie(split) == "a=1; gw_session=tok" and joined_cookie([]) is None
    plan = RequestHeaderPlan(wanted=frozenset({b"cookie"}), gateway_cookies=GATEWAY_COOKIES)
    _, found, _ = plan.scan(split)
    assert found[b"cookie"] == "a=1; gw_session=tok"


def test_a_plan_still_looks_at_connection_and_forwarded_cookie_values_once_names_are_known() -> (
    None
):
    plan = RequestHeaderPlan(
        wanted=WANTED,
        gateway_cookies=GATEWAY_COOKIES,
        forward_cookies=True,
        replace_request_id=True,
    )
    plan.scan(REQUEST)  # every name below is known to the plan from here on
    _, _, kept = plan.scan([(b"cookie", b"gw_session=s"), (b"connection", b"x-other")])
    assert kept == []
    _, _, kept = plan.scan([(b"cookie", b"a=1; gw_session=s"), (b"x-other", b"v")])
    assert kept == [("cookie", "a=1"), ("x-other", "v")]


def test_a_header_without_a_name_goes_nowhere(scan: Callable[..., Scanned]) -> None:
    for forward_cookies in (False, True):
        _, found, kept = scan(
            [(b"", b"theme=dark"), (b"accept", b"*/*")], forward_cookies=forward_cookies
        )
        assert kept == [("accept", "*/*")] and found == {}


@pytest.mark.usefixtures("kept_names")
def test_a_plan_remembers_a_bounded_number_of_names_as_spelled() -> None:
    plan = RequestHeaderPlan(wanted=WANTED, gateway_cookies=GATEWAY_COOKIES)
    many = [(f"X-Custom-{i}".encode(), b"v") for i in range(2 * headers_module._NAMES_MAX)]
    _, _, out = plan.scan(many)
    assert [name for name, _ in out] == [f"x-custom-{i}" for i in range(len(many))]
    assert plan.scan(many)[2] == out
    assert len(plan._decisions) == headers_module._NAMES_MAX
    fresh = RequestHeaderPlan(wanted=WANTED, gateway_cookies=GATEWAY_COOKIES)
    _, found, out = fresh.scan([(b"X-" + b"n" * 200, b"v"), (b"X-CSRF", b"1")])
    assert found == {b"x-csrf": "1"} and len(out) == 2
    assert list(fresh._decisions) == [b"X-CSRF"]  # a long name is decided, never kept


# Review finding 7: what upstreams behind a BFF tend to trust, as a client could send it.
IDENTITY_AND_OVERRIDE = [
    (b"X-Auth-Request-User", b"admin"),
    (b"X-Auth-Request-Email", b"admin@example.com"),
    (b"X-Forwarded-User", b"admin"),
    (b"Remote-User", b"admin"),
    (b"X-Original-URL", b"/admin"),
    (b"X-Rewrite-URL", b"/admin"),
    (b"True-Client-IP", b"10.0.0.1"),
    (b"X-Client-IP", b"10.0.0.1"),
    (b"X-Forwarded-Server", b"internal"),
    (b"X-Forwarded-Scheme", b"https"),
    (b"X-HTTP-Method-Override", b"DELETE"),
]


def test_client_identity_and_override_headers_never_reach_an_upstream_by_default(
    scan: Callable[..., Scanned],
) -> None:
    _, _, kept = scan([*IDENTITY_AND_OVERRIDE, (b"accept", b"*/*")])
    assert kept == [("accept", "*/*")]


def test_a_route_forwards_the_identity_headers_it_names_and_no_other(
    scan: Callable[..., Scanned],
) -> None:
    allowed = frozenset({b"x-http-method-override", b"x-forwarded-user"})
    _, _, kept = scan(IDENTITY_AND_OVERRIDE, forward_identity=allowed)
    assert kept == [("x-forwarded-user", "admin"), ("x-http-method-override", "DELETE")]


def test_expect_100_continue_is_not_forwarded(scan: Callable[..., Scanned]) -> None:
    # The client's server answers the expectation; an upstream that never sends 100 would
    # otherwise wait for a body the forwarder holds back (review finding 7).
    _, _, kept = scan([(b"Expect", b"100-continue"), (b"content-length", b"5")])
    assert kept == [("content-length", "5")]
