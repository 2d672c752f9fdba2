"""The public surface is ``__all__`` (as httpx's tests/test_exported_members.py): a name
imported into a package's ``__init__`` is exported on purpose or not at all."""

from __future__ import annotations

from types import ModuleType

import pytest

import gateway
import gateway.sessions

PACKAGES = [gateway, gateway.sessions]
EXPORTED_DUNDERS = {"__version__"}
FUTURE_FEATURES = {"annotations"}  # left behind by ``from __future__ import annotations``


def _public_members(package: ModuleType) -> list[str]:
    # Submodules become attributes of their package once imported: not exports either.
    return sorted(
        name
        for name, value in vars(package).items()
        if (not name.startswith("_") or name in EXPORTED_DUNDERS)
        and name not in FUTURE_FEATURES
        and not isinstance(value, ModuleType)
    )


@pytest.mark.parametrize("package", PACKAGES, ids=lambda package: package.__name__)
def test_package_exports_exactly_its_public_members(package: ModuleType) -> None:
    assert package.__all__ == _public_members(package)


def test_gateway_star_import_gives_the_documented_entry_points() -> None:
    namespace: dict[str, object] = {}
    exec("from gateway import *", namespace)
    namespace.pop("__builtins__")
    assert sorted(namespace) == ["Settings", "__version__", "create_app", "load_settings"]
    assert namespace["create_app"] is gateway.app.create_app
