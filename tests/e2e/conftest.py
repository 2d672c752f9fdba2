"""Fixtures for the end-to-end tests: the test IdP and upstream APIs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .servers import IdpProcess, Upstream, start_idp, start_upstream

IdpFactory = Callable[..., IdpProcess]
UpstreamFactory = Callable[..., Upstream]


@pytest.fixture(scope="session")
def idp() -> Iterator[IdpProcess]:
    """The shared test IdP: access tokens live 60 s, refresh tokens never rotate.

    Its counters are shared by every test: call ``idp.reset_stats()`` first.
    """
    with start_idp(at_ttl=60, rotate=False) as process:
        yield process


@pytest.fixture
def idp_factory() -> Iterator[IdpFactory]:
    """Start extra IdPs: ``idp_factory(at_ttl=5, rotate=True, backchannel_uri=...)``.

    Each one is stopped when the test ends.
    """
    started: list[IdpProcess] = []

    def factory(**options: Any) -> IdpProcess:
        process = start_idp(**options)
        started.append(process)
        return process

    yield factory
    for process in reversed(started):
        process.stop()


@pytest.fixture
def upstream_factory() -> Iterator[UpstreamFactory]:
    """Start upstream APIs: ``upstream_factory(name=, issuer=, audience=, require_auth=True)``.

    Each one is stopped when the test ends.
    """
    started: list[Upstream] = []

    def factory(**options: Any) -> Upstream:
        upstream = start_upstream(**options)
        started.append(upstream)
        return upstream

    yield factory
    for upstream in reversed(started):
        upstream.stop()
