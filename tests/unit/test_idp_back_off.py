"""The IdP back-off both token brokers share (gateway/idp_back_off.py)."""

from __future__ import annotations

import pytest

from gateway.errors import IdentityProviderRateLimited, IdentityProviderUnavailable
from gateway.idp_back_off import CLIENT, IdpBackOff
from gateway.retry_after import MAX_RETRY_AFTER
from gateway.services import Services

from .conftest import make_settings

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_an_idp_failure_holds_every_exchange_back_until_its_retry_after() -> None:
    clock = Clock()
    back_off = IdpBackOff(clock)
    assert back_off.refusal("s1", "api", clock.now) is None
    back_off.record(IdentityProviderUnavailable("down", retry_after=10), "s1", "api", clock.now)
    for subject, audience in (("s1", "api"), ("s2", "billing"), (CLIENT, "api")):
        refusal = back_off.refusal(subject, audience, clock.now + 2.5)
        assert isinstance(refusal, IdentityProviderUnavailable)
        assert refusal.headers() == {"Retry-After": "8"} and refusal.message == "down"
    assert back_off.refusal("s2", "billing", clock.now + 10) is None


def test_a_shorter_failure_never_cuts_a_longer_back_off_short() -> None:
    clock = Clock()
    back_off = IdpBackOff(clock)
    back_off.record(IdentityProviderUnavailable("a", retry_after=30), "s1", "api", clock.now)
    back_off.record(IdentityProviderUnavailable("b", retry_after=2), CLIENT, "api", clock.now + 1)
    assert back_off.refusal("s3", "api", clock.now + 20) is not None
    assert back_off.refusal("s3", "api", clock.now + 30) is None


def test_a_429_holds_back_only_that_subject_for_that_audience() -> None:
    clock = Clock()
    back_off = IdpBackOff(clock)
    back_off.record(IdentityProviderRateLimited("slow down", retry_after=5), "s1", "api", clock.now)
    limited = back_off.refusal("s1", "api", clock.now + 1)
    assert isinstance(limited, IdentityProviderRateLimited)
    assert limited.headers() == {"Retry-After": "4"}
    assert back_off.refusal("s1", "billing", clock.now + 1) is None
    assert back_off.refusal("s2", "api", clock.now + 1) is None
    assert back_off.refusal(CLIENT, "api", clock.now + 1) is None
    assert back_off.refusal("s1", "api", clock.now + 5) is None


def test_an_absurd_retry_after_is_capped() -> None:
    clock = Clock()
    back_off = IdpBackOff(clock)
    back_off.record(IdentityProviderUnavailable("down", retry_after=10**9), "s", "a", clock.now)
    assert back_off.refusal("s", "a", clock.now + MAX_RETRY_AFTER - 1) is not None
    assert back_off.refusal("s", "a", clock.now + MAX_RETRY_AFTER) is None


async def test_both_brokers_of_a_gateway_share_one_back_off() -> None:
    services = Services(make_settings())
    try:
        assert services.broker._back_off is services.client_tokens._back_off
    finally:
        await services.idp_http.aclose()
