"""The package's import graph has no cycle, TYPE_CHECKING imports included (STYLE.md: layers
point one way: pure policy and settings, IO adapters, services, ASGI endpoints, the root)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gateway"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str, name: str, *, is_package: bool, modules: set[str]) -> set[str]:
    """The gateway modules that the module ``name`` imports, wherever the import stands."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                # `from . import x` imports the module x; `from .m import y`, the module m.
                found.add(submodule if submodule in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {
        _module_name(p): _imports(
            p.read_text(encoding="utf-8"),
            _module_name(p),
            is_package=p.name == "__init__.py",
            modules=modules,
        )
        for p in paths
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_gateway_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 30 and "gateway.dispatch" in graph["gateway.app"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_sees_type_checking_imports_and_finds_a_cycle() -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .app import Gateway\n"
    modules = {"gateway.app", "gateway.proxy_endpoint"}
    imported = _imports(source, "gateway.proxy_endpoint", is_package=False, modules=modules)
    assert imported == {"gateway.app"}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lower_layers_never_import_the_endpoints_or_the_root() -> None:
    graph = import_graph()
    endpoints = {
        "gateway.app",
        "gateway.dispatch",
        "gateway.proxy_endpoint",
        "gateway.forward_auth",
        "gateway.auth_routes",
        "gateway.health",
        "gateway.websocket",
        "gateway.websocket.handshake",
        "gateway.admin",
        "gateway.traced_dispatch",
    }
    below = {
        "gateway.errors",
        "gateway.settings",
        "gateway.routing",
        "gateway.headers",
        "gateway.security",
        "gateway.own_paths",
        "gateway.oidc",
        "gateway.proxy",
        "gateway.tokens",
        "gateway.services",
        "gateway.authorize",
        "gateway.sessions.manager",
        "gateway.user_agent",
        "gateway.tracing",
        "gateway.session_admin",
        "gateway.reload",
    }
    for module in below:
        assert not graph[module] & endpoints, module
