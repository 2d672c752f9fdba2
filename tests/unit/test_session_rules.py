"""Claim rules and step-up (gateway/session_rules.py), and the settings that declare them.

A claim name is a top-level claim of that exact name first (URIs have dots), else a dotted path;
a list of wanted values means "any of"; a list-valued claim matches when it holds one of them;
values compare by type (``true`` is never ``1`` nor ``"true"``); anything missing or malformed
fails closed.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.routing import RouteTable
from gateway.session_rules import (
    SessionRules,
    Verdict,
    acr_satisfied,
    auth_time_satisfied,
    claim_value,
)
from gateway.settings import ClaimValue, RouteSettings

from .conftest import API, make_settings

NOW = 1_800_000_000.0
URI = "https://example.com/roles"


def rules(require: dict[str, Any] | None = None, **step_up: Any) -> SessionRules:
    """The compiled rules of an ``auth: user`` route declared with these settings."""
    route = RouteSettings(
        prefix="/r/",
        upstream="http://127.0.0.1:9/",
        audience=API,
        require=require or {},
        **step_up,
    )
    return SessionRules.of(route)


# -- claim names ------------------------------------------------------------------------------


def test_claim_value_exact_top_level_name_wins_over_the_dotted_path() -> None:
    claims = {"a.b": "top", "a": {"b": "nested"}}
    assert claim_value(claims, "a.b") == "top"
    assert claim_value({"a": {"b": "nested"}}, "a.b") == "nested"


def test_claim_value_uri_claim_is_read_whole() -> None:
    claims = {URI: ["admin"], "https://example": {"com/roles": ["nope"]}}
    assert claim_value(claims, URI) == ["admin"]


def test_claim_value_missing_and_nested_missing() -> None:
    missing = claim_value({}, "roles")
    assert missing is claim_value({"a": {}}, "a.b")
    assert claim_value({"a": "string"}, "a.b") is missing  # not an object: nothing inside
    assert claim_value({"a": ["b"]}, "a.b") is missing  # a list is not an object either
    assert claim_value({"a": {"b": None}}, "a.b") is None  # present, null
    assert claim_value({"app_metadata": {"plan": {"tier": "gold"}}}, "app_metadata.plan.tier") == (
        "gold"
    )


# -- matching ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("require", "claims", "allowed"),
    [
        ({"roles": "admin"}, {"roles": "admin"}, True),
        ({"roles": "admin"}, {"roles": "Admin"}, False),  # exact, case-sensitive
        ({"roles": "admin"}, {"roles": ["staff", "admin"]}, True),  # list-valued claim
        ({"roles": "admin"}, {"roles": ["staff"]}, False),
        ({"roles": "admin"}, {"roles": []}, False),
        ({"roles": ["admin", "staff"]}, {"roles": "staff"}, True),  # any of
        ({"roles": ["admin", "staff"]}, {"roles": ["x", "staff"]}, True),
        ({"roles": ["admin", "staff"]}, {"roles": ["x", "y"]}, False),
        ({"roles": "admin"}, {}, False),  # missing
        ({"roles": "admin"}, {"roles": None}, False),
        ({"roles": "admin"}, {"roles": {"admin": True}}, False),  # an object is no value
        ({"app_metadata.plan": "gold"}, {"app_metadata": {"plan": "gold"}}, True),
        ({"app_metadata.plan": "gold"}, {"app_metadata": {"plan": "free"}}, False),
        ({"app_metadata.plan": "gold"}, {"app_metadata": {}}, False),  # nested missing
        ({"app_metadata.plan": "gold"}, {"app_metadata": "gold"}, False),
        ({"app_metadata.plan": "gold"}, {"app_metadata.plan": "gold"}, True),  # exact key
        ({URI: "admin"}, {URI: ["admin"]}, True),
        ({URI: "admin"}, {"https://example": {"com/roles": "admin"}}, False),
        ({"email_verified": True}, {"email_verified": True}, True),
        ({"email_verified": True}, {"email_verified": 1}, False),  # bool is not int
        ({"email_verified": True}, {"email_verified": "true"}, False),  # nor str
        ({"email_verified": True}, {"email_verified": False}, False),
        ({"level": 1}, {"level": True}, False),  # int is not bool
        ({"level": 1}, {"level": "1"}, False),  # nor str
        ({"level": 1}, {"level": 1}, True),
        ({"level": 1}, {"level": 1.0}, True),  # numbers are numbers
        ({"level": 1}, {"level": [True, "1", 2]}, False),
        ({"level": "1"}, {"level": 1}, False),
        ({"flag": False}, {"flag": 0}, False),
        ({"flag": False}, {"flag": []}, False),
        ({"flag": False}, {}, False),  # a missing claim is not false
        ({"org_id": "org_1", "roles": "admin"}, {"org_id": "org_1", "roles": ["admin"]}, True),
        ({"org_id": "org_1", "roles": "admin"}, {"org_id": "org_2", "roles": ["admin"]}, False),
    ],
)
def test_claim_rules(require: dict[str, Any], claims: dict[str, Any], allowed: bool) -> None:
    compiled = rules(require)
    assert compiled.allows_claims(claims) is allowed
    expected = Verdict.ALLOWED if allowed else Verdict.FORBIDDEN
    assert compiled.verdict(claims, NOW) is expected


def test_rule_values_keep_their_yaml_types() -> None:
    """A YAML ``true`` stays a bool and ``1`` an int (the union is declared bool first)."""
    compiled = rules({"a": True, "b": 1, "c": "1", "d": [True, 2, "x", 1.5]})
    assert dict(compiled.require) == {
        "a": (True,),
        "b": (1,),
        "c": ("1",),
        "d": (True, 2, "x", 1.5),
    }
    assert [type(v) for v in dict(compiled.require)["d"]] == [bool, int, str, float]


SCALARS = st.one_of(
    st.booleans(),
    st.integers(-5, 5),
    st.floats(-5, 5, allow_nan=False),
    st.text(max_size=4),
)
CLAIM_VALUES = st.recursive(
    SCALARS | st.none(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)


def _typed(value: object) -> tuple[str, object]:
    kind = "bool" if isinstance(value, bool) else "str" if isinstance(value, str) else "number"
    return kind, value


@given(want=SCALARS, have=CLAIM_VALUES)
def test_property_a_scalar_rule_matches_only_an_equal_value_of_its_kind(
    want: ClaimValue, have: Any
) -> None:
    compiled = rules({"c": want})
    items = have if isinstance(have, list) else [have]
    expected = any(
        not isinstance(item, dict | list | type(None)) and _typed(item) == _typed(want)
        for item in items
    )
    assert compiled.allows_claims({"c": have}) is expected


@given(
    wanted=st.lists(SCALARS, min_size=1, max_size=4),
    have=CLAIM_VALUES,
)
def test_property_a_list_rule_is_any_of_its_values(wanted: list[ClaimValue], have: Any) -> None:
    any_of = rules({"c": wanted}).allows_claims({"c": have})
    assert any_of is any(rules({"c": want}).allows_claims({"c": have}) for want in wanted)


@given(claims=st.dictionaries(st.text(max_size=6), CLAIM_VALUES, max_size=5))
def test_property_matching_never_raises_and_a_missing_claim_never_matches(
    claims: dict[str, Any],
) -> None:
    claims.pop("absent", None)
    compiled = rules({"absent": [True, False, 0, "", 1.5], "absent.deeper": ""})
    assert compiled.allows_claims(claims) is False
    assert compiled.verdict(claims, NOW) is Verdict.FORBIDDEN


# -- step-up ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "verdict"),
    [
        ({"acr": "urn:mfa"}, Verdict.ALLOWED),
        ({"acr": "urn:hw"}, Verdict.ALLOWED),
        ({"acr": "urn:pwd"}, Verdict.STEP_UP_REQUIRED),
        ({}, Verdict.STEP_UP_REQUIRED),
        ({"acr": ["urn:mfa"]}, Verdict.STEP_UP_REQUIRED),  # not a string
        ({"acr": None}, Verdict.STEP_UP_REQUIRED),
    ],
)
def test_step_up_acr(claims: dict[str, Any], verdict: Verdict) -> None:
    assert rules(acr_values=["urn:mfa", "urn:hw"]).verdict(claims, NOW) is verdict


@pytest.mark.parametrize(
    ("auth_time", "verdict"),
    [
        (NOW - 599, Verdict.ALLOWED),
        (NOW - 600, Verdict.ALLOWED),
        (NOW - 601, Verdict.STEP_UP_REQUIRED),
        (int(NOW) - 10, Verdict.ALLOWED),
        (None, Verdict.STEP_UP_REQUIRED),  # missing
        ("1800000000", Verdict.STEP_UP_REQUIRED),  # malformed: a string
        (True, Verdict.STEP_UP_REQUIRED),  # malformed: a bool is no time
        ([NOW], Verdict.STEP_UP_REQUIRED),
        (float("nan"), Verdict.STEP_UP_REQUIRED),  # malformed: NaN compares false to all
        (float("inf"), Verdict.STEP_UP_REQUIRED),
        (float("-inf"), Verdict.STEP_UP_REQUIRED),
    ],
)
def test_step_up_max_age(auth_time: Any, verdict: Verdict) -> None:
    claims = {} if auth_time is None else {"auth_time": auth_time}
    assert rules(max_age="10m").verdict(claims, NOW) is verdict


def test_step_up_needs_both_acr_and_max_age_and_claims_come_first() -> None:
    compiled = rules({"roles": "admin"}, acr_values=["urn:mfa"], max_age=60)
    good = {"roles": ["admin"], "acr": "urn:mfa", "auth_time": NOW - 30}
    assert compiled.verdict(good, NOW) is Verdict.ALLOWED
    assert compiled.verdict({**good, "auth_time": NOW - 61}, NOW) is Verdict.STEP_UP_REQUIRED
    assert compiled.verdict({**good, "acr": "urn:pwd"}, NOW) is Verdict.STEP_UP_REQUIRED
    # A user who lacks the role would not gain it by logging in again: forbidden, not step-up.
    assert compiled.verdict({**good, "roles": [], "acr": "x"}, NOW) is Verdict.FORBIDDEN


def test_empty_rules() -> None:
    assert rules().empty and rules().verdict({}, NOW) is Verdict.ALLOWED
    assert not rules(max_age=0).empty
    assert rules(max_age=0).verdict({"auth_time": NOW}, NOW) is Verdict.ALLOWED


@pytest.mark.parametrize(
    ("acr", "asked", "ok"),
    [
        ("urn:mfa", [], True),
        (None, [], True),
        ("urn:mfa", ["urn:mfa"], True),
        ("urn:pwd", ["urn:mfa"], False),
        (None, ["urn:mfa"], False),
        (["urn:mfa"], ["urn:mfa"], False),
    ],
)
def test_acr_satisfied_at_the_callback(acr: Any, asked: list[str], ok: bool) -> None:
    assert acr_satisfied(acr, asked) is ok


@pytest.mark.parametrize(
    ("auth_time", "max_age", "ok"),
    [
        (None, None, True),
        (NOW - 100, 60, False),
        (NOW - 100, 60 + 40, True),
        (NOW - 129, 100, True),  # within the leeway (30 s)
        (NOW - 131, 100, False),
        (None, 100, False),
        ("x", 100, False),
        (True, 100, False),
        (float("nan"), 100, False),
        (float("inf"), 100, False),
    ],
)
def test_auth_time_satisfied_at_the_callback(auth_time: Any, max_age: Any, ok: bool) -> None:
    assert auth_time_satisfied(auth_time, max_age, NOW, 30) is ok


# -- settings ---------------------------------------------------------------------------------


def _route(**fields: Any) -> dict[str, Any]:
    return {"prefix": "/r/", "upstream": "http://127.0.0.1:9/", "audience": API, **fields}


@pytest.mark.parametrize("auth", ["none", "client", "user_or_client", "user_or_none"])
@pytest.mark.parametrize(
    "rule", [{"require": {"roles": "a"}}, {"acr_values": ["urn:mfa"]}, {"max_age": "5m"}]
)
def test_rules_and_step_up_only_with_auth_user(auth: str, rule: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="need auth user"):
        RouteSettings(**_route(auth=auth, **rule))
    assert RouteSettings(**_route(**rule)).auth == "user"


@pytest.mark.parametrize("auth", ["user", "client", "user_or_client", "user_or_none"])
def test_every_token_mode_needs_an_audience(auth: str) -> None:
    with pytest.raises(ValidationError, match=f"auth {auth} needs an audience"):
        RouteSettings(prefix="/r/", upstream="http://127.0.0.1:9/", auth=auth)
    assert RouteSettings(prefix="/r/", upstream="http://127.0.0.1:9/", auth="none").audience is None


@pytest.mark.parametrize(
    "require",
    [{"": "x"}, {".roles": "x"}, {"roles.": "x"}, {"x" * 257: "x"}, {"roles": []}],
)
def test_malformed_claim_rules_are_refused(require: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RouteSettings(**_route(require=require))


@pytest.mark.parametrize("acr", ["", "has space", "tab\there", "é"])
def test_malformed_acr_values_are_refused(acr: str) -> None:
    with pytest.raises(ValidationError, match="not an acr value"):
        RouteSettings(**_route(acr_values=[acr]))


def test_max_age_is_a_duration() -> None:
    assert RouteSettings(**_route(max_age="10m")).max_age == 600
    assert RouteSettings(**_route(max_age=30)).max_age == 30


@pytest.mark.parametrize("auth", ["client", "user_or_client"])
def test_client_modes_refused_without_client_credentials(auth: str) -> None:
    route = {"prefix": "/c/", "upstream": "http://127.0.0.1:9/", "audience": API, "auth": auth}
    with pytest.raises(ValidationError, match="needs client credentials"):
        make_settings(
            oidc={"token_endpoint_auth_method": "none", "client_secret": None}, routes=[route]
        )
    assert make_settings(routes=[route]).routes[0].auth == auth


def test_user_or_none_works_for_a_public_client() -> None:
    route = {"prefix": "/m/", "upstream": "http://127.0.0.1:9/", "audience": API}
    settings = make_settings(
        oidc={"token_endpoint_auth_method": "none", "client_secret": None},
        routes=[{**route, "auth": "user_or_none"}],
    )
    assert settings.routes[0].auth == "user_or_none"


@pytest.mark.parametrize("org", ["org_abc123", "acme", "Acme-Corp.eu", "a"])
def test_organization_names_accepted(org: str) -> None:
    settings = make_settings(oidc={"organization": org, "organizations": [org, "other"]})
    assert settings.oidc.allowed_organizations == [org, "other"]


@pytest.mark.parametrize("org", ["", "-acme", "acme corp", "acme/x", "a" * 65, "é", "acme&x=1"])
def test_organization_names_refused(org: str) -> None:
    with pytest.raises(ValidationError, match="not an organization"):
        make_settings(oidc={"organization": org})
    with pytest.raises(ValidationError, match="not an organization"):
        make_settings(oidc={"organizations": ["ok", org]})


def test_allowed_organizations_lists_the_default_first_without_duplicates() -> None:
    settings = make_settings(oidc={"organization": "org_b", "organizations": ["org_a", "org_b"]})
    assert settings.oidc.allowed_organizations == ["org_b", "org_a"]
    assert make_settings().oidc.allowed_organizations == []


def test_route_table_compiles_the_rules_of_each_route() -> None:
    settings = make_settings(
        routes=[
            _route(prefix="/a/", require={"roles": ["a", "b"]}, acr_values=["x"], max_age=60),
            _route(prefix="/b/", auth="user_or_none"),
        ]
    )
    table = RouteTable(settings.routes)
    a, b = table.by_name("a"), table.by_name("b")
    assert a is not None and b is not None
    assert a.rules == SessionRules(require=(("roles", ("a", "b")),), acr_values=("x",), max_age=60)
    assert b.rules.empty and b.needs_session and b.needs_token and b.mode == "user_or_none"
