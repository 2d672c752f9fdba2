"""Header policy (gateway/headers.py): the one pass over a request's headers, and answers."""

from __future__ import annotations

from multidict import istr

from gateway import headers as headers_module
from gateway.headers import (
    RequestHeaderPlan,
    add_forwarding,
    build_upstream_headers,
    filter_response_headers,
    forwarded_site,
    scan_request_headers,
)

WANTED = frozenset({b"cookie", b"content-length", b"x-csrf"})
GATEWAY_COOKIES = frozenset({b"gw_session"})
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


def test_one_pass_finds_wanted_values_size_and_what_an_upstream_may_see() -> None:
    size, found, kept = scan_request_headers(
        REQUEST, wanted=WANTED, gateway_cookies=GATEWAY_COOKIES, replace_request_id=True
    )
    assert size == sum(len(k) + len(v) for k, v in REQUEST)
    # The first value of each wanted header; names compared lower-cased, as for stripping.
    assert found == {b"x-csrf": "1", b"cookie": "gw_session=secret; theme=dark"}
    assert kept == [("x-csrf", "1"), ("x-csrf", "2"), ("accept", "application/json")]


def test_forward_cookies_keeps_all_but_the_gateways_own() -> None:
    _, found, kept = scan_request_headers(
        REQUEST, wanted=WANTED, gateway_cookies=GATEWAY_COOKIES, forward_cookies=True
    )
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


def test_a_connection_header_cannot_drop_the_gateways_own_headers_or_hide_the_cookie() -> None:
    hostile = [
        (b"connection", b"x-request-id, authorization, cookie, x-forwarded-for"),
        (b"cookie", b"gw_session=secret; theme=dark"),
    ]
    _, found, kept = scan_request_headers(
        hostile,
        wanted=WANTED,
        gateway_cookies=GATEWAY_COOKIES,
        forward_cookies=True,
        replace_request_id=True,
    )
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


def test_names_for_the_forwarder_are_kept_as_istr_bounded_in_number_and_length() -> None:
    saved = dict(headers_module._NAMES)
    headers_module._NAMES.clear()
    try:
        many = [(f"x-custom-{i}".encode(), b"v") for i in range(2 * headers_module._NAMES_MAX)]
        _, _, out = scan_request_headers(many, wanted=WANTED, gateway_cookies=GATEWAY_COOKIES)
        assert [name for name, _ in out] == [f"x-custom-{i}" for i in range(len(many))]
        assert all(isinstance(name, istr) for name, _ in out)  # no case folding in aiohttp
        assert len(headers_module._NAMES) == headers_module._NAMES_MAX
        _, _, again = scan_request_headers(many, wanted=WANTED, gateway_cookies=GATEWAY_COOKIES)
        assert again == out and again[0][0] is out[0][0]  # the kept object, not a new one
        headers_module._NAMES.clear()
        long_name = b"x-" + b"n" * 200  # a long name is forwarded but never kept
        _, _, out = scan_request_headers(
            [(long_name, b"v")], wanted=WANTED, gateway_cookies=GATEWAY_COOKIES
        )
        assert out == [(long_name.decode(), "v")] and headers_module._NAMES == {}
    finally:
        headers_module._NAMES.clear()
        headers_module._NAMES.update(saved)


def test_a_plan_decides_each_name_once_as_spelled_and_answers_as_a_one_off_scan() -> None:
    plan = RequestHeaderPlan(
        wanted=WANTED,
        gateway_cookies=GATEWAY_COOKIES,
        forward_cookies=True,
        replace_request_id=True,
    )
    one_off = scan_request_headers(
        REQUEST,
        wanted=WANTED,
        gateway_cookies=GATEWAY_COOKIES,
        forward_cookies=True,
        replace_request_id=True,
    )
    assert plan.scan(REQUEST) == one_off
    assert plan.scan(REQUEST) == one_off  # the second time from remembered decisions
    # The value still decides for Connection and a forwarded Cookie, whatever was seen before.
    _, _, kept = plan.scan([(b"cookie", b"gw_session=s"), (b"Connection", b"x-other")])
    assert kept == []
    _, _, kept = plan.scan([(b"cookie", b"a=1"), (b"x-other", b"v")])
    assert kept == [("cookie", "a=1"), ("x-other", "v")]


def test_a_plan_remembers_a_bounded_number_of_names() -> None:
    plan = RequestHeaderPlan(wanted=WANTED, gateway_cookies=GATEWAY_COOKIES)
    many = [(f"X-Custom-{i}".encode(), b"v") for i in range(2 * headers_module._NAMES_MAX)]
    _, _, out = plan.scan(many)
    assert [name for name, _ in out] == [f"x-custom-{i}" for i in range(len(many))]
    _, _, again = plan.scan(many)
    assert again == out
    assert len(plan._decisions) == headers_module._NAMES_MAX
    fresh = RequestHeaderPlan(wanted=WANTED, gateway_cookies=GATEWAY_COOKIES)
    _, found, out = fresh.scan([(b"X-" + b"n" * 200, b"v"), (b"X-CSRF", b"1")])
    assert found == {b"x-csrf": "1"} and len(out) == 2
    assert list(fresh._decisions) == [b"X-CSRF"]  # a long name is decided, never kept
