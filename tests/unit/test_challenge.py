"""An upstream's WWW-Authenticate, read for its Bearer challenge (gateway/challenge.py).

RFC 9110 §11.6.1: several challenges in one value, ``name=token`` and ``name="quoted"``
parameters (with backslash escapes), token68 schemes such as ``Negotiate <blob>``; only the
Bearer challenge matters, and nothing an upstream sends makes the parser raise.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.challenge import BearerChallenge, bearer_challenge

MFA = "http://schemas.openid.net/pape/policies/2007/06/multi-factor"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (['Bearer error="invalid_token"'], BearerChallenge("invalid_token")),
        (["Bearer error=invalid_token"], BearerChallenge("invalid_token")),
        (['bearer ERROR="invalid_token"'], BearerChallenge("invalid_token")),  # case-insensitive
        (
            ['Bearer realm="api", error="invalid_token", error_description="expired"'],
            BearerChallenge("invalid_token"),
        ),
        (['Bearer error = "invalid_token" , realm = api'], BearerChallenge("invalid_token")),
        (["Bearer"], BearerChallenge(None)),
        (['Bearer realm="api"'], BearerChallenge(None)),
        # several challenges in one value; Bearer is not the first
        (['Basic realm="x", Bearer error="invalid_token"'], BearerChallenge("invalid_token")),
        (
            ['Basic realm="a, b", charset=UTF-8, Bearer error="invalid_token"'],
            BearerChallenge("invalid_token"),
        ),
        # token68 schemes, and schemes without parameters, before the Bearer challenge
        (['Negotiate abc123==, Bearer error="invalid_token"'], BearerChallenge("invalid_token")),
        (
            ['Negotiate YII+/a.b_c~d, Bearer error="invalid_token"'],
            BearerChallenge("invalid_token"),
        ),
        (['Negotiate, Bearer error="invalid_token"'], BearerChallenge("invalid_token")),
        (['Bearer error="invalid_token", Negotiate abc=='], BearerChallenge("invalid_token")),
        (["Bearer, Basic realm=x"], BearerChallenge(None)),
        # several header values: the first Bearer challenge wins
        (['Basic realm="x"', 'Bearer error="invalid_token"'], BearerChallenge("invalid_token")),
        (
            ['Bearer error="insufficient_scope"', 'Bearer error="invalid_token"'],
            BearerChallenge("insufficient_scope"),
        ),
        # quoted strings with escapes
        (['Bearer error="invalid\\_token"'], BearerChallenge("invalid_token")),
        (
            ['Bearer realm="a \\"quoted\\" realm, with comma", error="invalid_token"'],
            BearerChallenge("invalid_token"),
        ),
        # a repeated parameter: the first counts
        (['Bearer error="invalid_token", error="other"'], BearerChallenge("invalid_token")),
        # no Bearer challenge at all
        (['Basic realm="x"'], None),
        (["Negotiate"], None),
        ([], None),
        ([""], None),
        (["Bearerx error=invalid_token"], None),
        (['DPoP error="invalid_token"'], None),
        (["Bearer error=invalid_token" + " " * 4096], None),  # over the size read
    ],
)
def test_bearer_challenge(values: list[str], expected: BearerChallenge | None) -> None:
    assert bearer_challenge(values) == expected


def test_rfc_9470_step_up_challenge() -> None:
    challenge = bearer_challenge(
        [
            'Bearer error="insufficient_user_authentication", '
            f'error_description="A different authentication level is required", '
            f'acr_values="{MFA} urn:hw", max_age="300"'
        ]
    )
    assert challenge == BearerChallenge(
        "insufficient_user_authentication", acr_values=(MFA, "urn:hw"), max_age=300
    )
    assert challenge.step_up and not challenge.invalid_token
    assert bearer_challenge(['Bearer error="invalid_token"']) == BearerChallenge("invalid_token")
    assert BearerChallenge("invalid_token").invalid_token


@pytest.mark.parametrize(
    ("params", "acr_values", "max_age"),
    [
        ("max_age=300", (), 300),  # a bare token
        ('max_age="0"', (), 0),
        ('max_age="-5"', (), None),  # not a number of seconds: ignored
        ('max_age="5.5"', (), None),
        ('max_age="12345678901"', (), None),  # 11 digits
        ('max_age="9999999999"', (), 10 * 365 * 86400),  # capped at ten years
        ('max_age="٣"', (), None),  # a digit to isdigit, not ASCII
        ('acr_values=""', (), None),
        ('acr_values="  a   b "', ("a", "b"), None),
        ('acr_values="a é"', (), None),  # one malformed value drops them all
        ("acr_values=" + "a" * 257, (), None),  # too long
        ('acr_values="' + " ".join(f"v{i}" for i in range(20)) + '"', None, None),
    ],
)
def test_step_up_parameters_are_checked(
    params: str, acr_values: tuple[str, ...] | None, max_age: int | None
) -> None:
    challenge = bearer_challenge([f'Bearer error="insufficient_user_authentication", {params}'])
    assert challenge is not None and challenge.error == "insufficient_user_authentication"
    # A step-up only when it names what it wants (else the upstream's 401 is relayed).
    assert challenge.step_up == bool(challenge.acr_values or challenge.max_age is not None)
    if acr_values is None:  # at most 16 values are read
        assert challenge.acr_values == tuple(f"v{i}" for i in range(16))
    else:
        assert challenge.acr_values == acr_values
    assert challenge.max_age == max_age


TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcXYZ"
FRAGMENTS = [
    *TOKEN_CHARS,
    *' ,="\\\t',
    "é",
    "\x00",
    "\n",
    "Bearer ",
    "error=",
    "invalid_token",
    "insufficient_user_authentication",
    "acr_values=",
    "max_age=",
]
HEADER_TEXT = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)


@given(values=st.lists(HEADER_TEXT, max_size=3))
def test_property_garbage_never_raises(values: list[str]) -> None:
    challenge = bearer_challenge(values)
    assert challenge is None or isinstance(challenge, BearerChallenge)
    if challenge is not None:
        assert all(" " not in v and v for v in challenge.acr_values)
        assert challenge.max_age is None or 0 <= challenge.max_age <= 10 * 365 * 86400


@given(values=st.lists(st.text(max_size=200), max_size=3))
def test_property_any_text_never_raises(values: list[str]) -> None:
    bearer_challenge(values)


QUOTABLE = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=0, max_size=40
)


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(realm=QUOTABLE, description=QUOTABLE, other=st.sampled_from(["Basic", "Negotiate abc=="]))
def test_property_quoted_parameters_never_hide_the_error(
    realm: str, description: str, other: str
) -> None:
    """Whatever a quoted parameter holds (commas, quotes, backslashes, ``error=``), the Bearer
    challenge's own error is read, and a challenge before it does not hide it."""
    value = (
        f"{other}, Bearer realm={_quoted(realm)}, error_description={_quoted(description)}, "
        'error="invalid_token"'
    )
    assert bearer_challenge([value]) == BearerChallenge("invalid_token")
