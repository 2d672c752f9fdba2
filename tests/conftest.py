"""Shared fixtures: the anyio backend; app/settings factories live in tests/unit/conftest.py."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
