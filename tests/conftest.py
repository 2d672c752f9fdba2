"""Shared fixtures: the anyio backend; app/settings factories live in tests/unit/conftest.py."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _hypothesis_profiles() -> None:
    """CI explores the same examples every run (a red CI must be reproducible); a developer's
    run explores new ones."""
    import os

    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")


_hypothesis_profiles()
