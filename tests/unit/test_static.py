"""The ``static`` setting: files served by the gateway, with configured routes winning."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from pydantic import ValidationError

from gateway import create_app
from gateway.settings import format_validation_error

from .conftest import make_settings

pytestmark = [pytest.mark.anyio]

INDEX = "<!doctype html><title>front</title><script src='/app.js'></script>"
SCRIPT = "console.log('front');"
DEFAULT_CSP = "default-src 'self'; frame-ancestors 'none'"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    (root / "docs").mkdir(parents=True)
    (root / "index.html").write_text(INDEX)
    (root / "app.js").write_text(SCRIPT)
    (root / "docs" / "index.html").write_text("<p>docs</p>")
    (tmp_path / "secret.txt").write_text("outside the site")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    return root


def _client(**overrides: Any) -> httpx.AsyncClient:
    app = create_app(make_settings(**overrides))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://testserver")


@pytest.fixture
async def client(site: Path, idp: respx.MockRouter) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(static={"path": "/", "directory": str(site)}) as http:
        yield http


async def test_static_index_served_with_headers(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.text == INDEX
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == DEFAULT_CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["etag"]


async def test_static_file_and_subdirectory_index(client: httpx.AsyncClient) -> None:
    script = await client.get("/app.js")
    docs = await client.get("/docs/")
    head = await client.head("/app.js")
    assert script.status_code == 200 and script.text == SCRIPT
    assert "javascript" in script.headers["content-type"]
    assert docs.status_code == 200 and docs.text == "<p>docs</p>"
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(SCRIPT))


async def test_static_not_modified_keeps_page_headers(client: httpx.AsyncClient) -> None:
    # A browser merges a 304's headers into its cached page: they must be the page's own.
    etag = (await client.get("/")).headers["etag"]
    revalidated = await client.get("/", headers={"If-None-Match": etag})
    assert revalidated.status_code == 304
    assert revalidated.headers["content-security-policy"] == DEFAULT_CSP


async def test_static_route_prefix_wins_under_static_path(client: httpx.AsyncClient) -> None:
    for path in ("/api/whoami", "/api", "/x/../api/whoami"):
        response = await client.get(path, headers={"Accept": "application/json"})
        assert response.status_code == 401, path
        assert response.json()["error"] == "login_required"


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("GET", "/missing.js", 404, "not_found"),
        ("GET", "/link.txt", 404, "not_found"),  # a symlink out of the directory
        ("GET", "/%2e%2e/secret.txt", 400, "invalid_path"),
        ("POST", "/", 404, "not_found"),  # files answer GET and HEAD only
    ],
)
async def test_static_refusals_render_json_errors(
    client: httpx.AsyncClient, method: str, path: str, status: int, error: str
) -> None:
    response = await client.request(method, path)
    assert response.status_code == status
    assert response.json()["error"] == error
    assert "outside the site" not in response.text


async def test_static_under_subpath_beats_shorter_catch_all_route(
    site: Path, idp: respx.MockRouter
) -> None:
    routes = [{"prefix": "/", "upstream": "http://127.0.0.1:9/", "auth": "none"}]
    static = {"path": "/app", "directory": str(site), "content_security_policy": ""}
    async with _client(routes=routes, static=static) as client:
        script = await client.get("/app/app.js")
        bare = await client.get("/app")
        other = await client.get("/other.js")
    assert script.status_code == 200 and script.text == SCRIPT
    assert "content-security-policy" not in script.headers
    assert bare.status_code in (301, 307) and bare.headers["location"].endswith("/app/")
    assert other.status_code == 502  # the catch-all route's upstream is down


async def test_static_absent_by_default_paths_go_to_proxy(idp: respx.MockRouter) -> None:
    async with _client() as client:
        response = await client.get("/index.html")
    assert response.status_code == 404 and response.json()["error"] == "not_found"


@pytest.mark.parametrize(
    ("static", "routes", "message"),
    [
        ({"directory": "/nonexistent/site"}, None, "static.directory: /nonexistent/site is not"),
        ({"directory": "."}, [], None),
        ({"path": "/auth/", "directory": "."}, [], "static.path: /auth/ is reserved"),
        ({"path": "/healthz", "directory": "."}, [], "static.path: /healthz/ is reserved"),
        ({"path": "app", "directory": "."}, [], "static.path: must be an absolute path"),
        ({"path": "/a/../b/", "directory": "."}, [], "static.path: must not contain"),
        ({"content_security_policy": "a\r\nb: c", "directory": "."}, [], "printable ASCII"),
        (
            {"path": "/api/", "directory": "."},
            None,
            "static.path: /api/ is also a route prefix",
        ),
    ],
)
def test_static_settings_validation(
    static: dict[str, Any], routes: list[Any] | None, message: str | None
) -> None:
    overrides: dict[str, Any] = {"static": static}
    if routes is not None:
        overrides["routes"] = routes
    if message is None:
        settings = make_settings(**overrides)
        assert settings.static is not None and settings.static.path == "/"
        return
    with pytest.raises(ValidationError) as caught:
        make_settings(**overrides)
    assert message in format_validation_error(caught.value)
