"""End to end with a real nginx: nginx proxies, the gateway answers its auth subrequests.

nginx runs from config/integrations/nginx.conf (placeholders filled in, one extra route built
from its /billing/ block) on loopback, in front of the real upstreams; the gateway and the IdP
are the e2e suite's. Only the gateway's /auth/login is used directly: everything else goes
through nginx.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest

from .dpop_upstream import DPoPUpstream
from .gateway_harness import CSRF, GatewayUnderTest, run_gateway, start_upstreams
from .servers import API, BILLING, IdpProcess, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

TEMPLATE = Path(__file__).resolve().parents[2] / "config" / "integrations" / "nginx.conf"
SECRET = "e2e-forward-auth-secret-e2e-forward-auth-secret"
STARTUP_TIMEOUT = 30.0
BIND_ATTEMPTS = 3
_PLACEHOLDER = re.compile(r"\$\{([A-Z_]+)\}")

# The process-level settings the documented file leaves to the main nginx.conf.
_MAIN = """daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
{user}
events {{ worker_connections 512; }}
http {{
    log_format mrrt '$uri $status $upstream_cache_status';
    access_log {tmp}/access.log mrrt;
    log_subrequest on;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/mrrt-gateway.conf;
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise RuntimeError("nginx not found: apt-get install nginx-light (scripts/install does)")
    return found


def render(template: str, values: dict[str, str]) -> str:
    """Fill the ``${NAME}`` placeholders (what envsubst with an explicit list does)."""
    missing = set(_PLACEHOLDER.findall(template)) - set(values)
    assert not missing, f"placeholders without a value: {missing}"
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def with_route_like_billing(conf: str, *, prefix: str, route: str, upstream: str) -> str:
    """Add a location built from the documented /billing/ one (how a user adds a route)."""
    block = re.search(r"\n    location /billing/ \{\n.*?\n    \}\n", conf, re.DOTALL)
    assert block is not None, "the documented config lost its /billing/ location"
    text = block.group(0)
    new = text.replace("location /billing/", f"location {prefix}")
    new = new.replace("set $mrrt_route billing;", f'set $mrrt_route "{route}";')
    new = re.sub(r"proxy_pass [^;]+;", f"proxy_pass {upstream};", new)
    host = upstream.removeprefix("http://").partition("/")[0]
    new, hosts = re.subn(r"proxy_set_header Host [^;]+;", f"proxy_set_header Host {host};", new)
    assert hosts == 1, "the documented /billing/ location lost its Host line"
    return conf.replace(text, text + new)


@dataclass
class NginxUnderTest:
    base_url: str
    directory: Path

    def auth_cache_statuses(self) -> list[str]:
        """The cache status of every auth subrequest so far (from the access log)."""
        lines = (self.directory / "access.log").read_text().splitlines()
        return [line.split()[2] for line in lines if line.startswith("/_mrrt_auth ")]


def _wait_listening(port: int, process: subprocess.Popen[bytes], directory: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = (
                (directory / "error.log").read_text() if (directory / "error.log").exists() else ""
            )
            raise RuntimeError(f"nginx exited with {process.returncode}:\n{log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nginx did not listen on {port} within {STARTUP_TIMEOUT:.0f}s")


def _worker_user() -> str:
    """As root, nginx's workers drop to an unprivileged user (and the tests run as root here)."""
    if os.geteuid() != 0:
        return ""
    nobody = pwd.getpwnam("nobody")
    return f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"


def with_path_matching(conf: str) -> str:
    """Every location lets the gateway match X-Original-URI (``set $mrrt_route "";``, the
    alternative the documented config describes) instead of naming its route."""
    matched = re.sub(r"set \$mrrt_route [a-z_]+;", 'set $mrrt_route "";', conf)
    assert matched != conf, "the documented config lost its `set $mrrt_route` lines"
    return matched


def _write_config(
    directory: Path,
    gw: GatewayUnderTest,
    *,
    port: int,
    secret: str,
    auth_cache: str,
    path_matching: bool = False,
    servers: dict[str, str] | None = None,
) -> None:
    """``servers``: another base URL for the api or billing location than the gateway's own
    upstream of that name."""
    servers = {name: gw.upstreams[name].base_url for name in ("api", "billing")} | (servers or {})
    values = {
        "LISTEN": f"127.0.0.1:{port}",
        "GATEWAY": gw.base_url.removeprefix("http://"),
        "FORWARD_AUTH_SECRET": secret,
        "SESSION_COOKIE": gw.settings.session.cookie_name,
        "AUTH_CACHE": auth_cache,
        "AUTH_CACHE_DIR": str(directory / "auth-cache"),
        "API_SERVER": servers["api"].removeprefix("http://"),
        "BILLING_SERVER": servers["billing"].removeprefix("http://"),
    }
    conf = render(TEMPLATE.read_text(), values)
    if path_matching:
        conf = with_path_matching(conf)
    # /outside/ binds no route name: the gateway matches X-Original-URI (the other mode).
    conf = with_route_like_billing(
        conf, prefix="/outside/", route="", upstream=gw.upstreams["outside"].url
    )
    (directory / "mrrt-gateway.conf").write_text(conf)
    (directory / "nginx.conf").write_text(_MAIN.format(tmp=directory, user=_worker_user()))


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)  # fast shutdown; the master stops its workers
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextlib.contextmanager
def run_nginx(
    gw: GatewayUnderTest,
    *,
    secret: str = SECRET,
    auth_cache: str = "off",
    path_matching: bool = False,
    servers: dict[str, str] | None = None,
) -> Iterator[NginxUnderTest]:
    """nginx (``daemon off``) on an ephemeral loopback port, its own prefix, pid and logs."""
    directory = Path(tempfile.mkdtemp(prefix="mrrt-nginx-"))
    directory.chmod(0o755)  # the workers must traverse it
    command = [nginx_binary(), "-p", str(directory), "-c", str(directory / "nginx.conf")]
    command += ["-e", str(directory / "error.log")]
    process: subprocess.Popen[bytes] | None = None
    try:
        for attempt in range(BIND_ATTEMPTS):  # nginx binds itself: another process may race us
            port = free_port()
            _write_config(
                directory,
                gw,
                port=port,
                secret=secret,
                auth_cache=auth_cache,
                path_matching=path_matching,
                servers=servers,
            )
            process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                _wait_listening(port, process, directory)
                break
            except RuntimeError as exc:
                _stop(process)
                if "Address already in use" not in str(exc) or attempt == BIND_ATTEMPTS - 1:
                    raise
        yield NginxUnderTest(base_url=f"http://127.0.0.1:{port}", directory=directory)
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Stack:
    gw: GatewayUnderTest
    nginx: NginxUnderTest

    def client(self) -> httpx.AsyncClient:
        """A browser: logs in at the gateway, then talks to nginx (same host, same cookie)."""
        return self.gw.client()

    def url(self, path: str) -> str:
        return self.nginx.base_url + path


@contextlib.contextmanager
def run_stack(
    idp: IdpProcess, *, auth_cache: str = "off", secret: str = SECRET, path_matching: bool = False
) -> Iterator[Stack]:
    forward_auth = {"enabled": True, "secret": SECRET}
    with (
        start_upstreams(idp) as upstreams,
        run_gateway(idp, upstreams, forward_auth=forward_auth) as gw,
        run_nginx(gw, auth_cache=auth_cache, secret=secret, path_matching=path_matching) as nginx,
    ):
        yield Stack(gw=gw, nginx=nginx)


@pytest.fixture
def stack(idp: IdpProcess) -> Iterator[Stack]:
    with run_stack(idp) as running:
        yield running


async def test_nginx_each_route_reaches_its_upstream_with_exactly_its_audience(
    stack: Stack,
) -> None:
    async with stack.client() as client:
        await stack.gw.login(client)
        assert client.cookies.get("gw_session")
        client.headers["Authorization"] = "Bearer client-supplied-must-not-pass"
        client.headers["X-Auth-Request-User"] = "mallory"
        orders = await client.get(stack.url("/api/orders?x=1"), headers=CSRF)
        invoices = await client.post(stack.url("/billing/invoices"), headers=CSRF, json={"n": 1})
    assert orders.status_code == 200, orders.text
    assert orders.json()["aud"] == API and orders.json()["path"] == "/orders"
    assert orders.json()["query"] == "x=1" and "read:orders" in orders.json()["scope"]
    assert invoices.status_code == 200, invoices.text
    assert invoices.json()["aud"] == BILLING and invoices.json()["method"] == "POST"
    assert invoices.json()["body_len"] > 0
    for name in ("api", "billing"):
        seen = stack.gw.upstreams[name].requests
        assert len(seen) == 1
        headers = seen[0]["headers"]
        assert "cookie" not in headers, headers
        assert headers["authorization"].startswith("Bearer ey")
        assert "client-supplied" not in headers["authorization"]
        assert "x-auth-request-user" not in headers
        assert "x-forward-auth-secret" not in headers


async def test_nginx_without_session_is_401_json_and_navigation_goes_to_login(
    stack: Stack,
) -> None:
    async with stack.client() as client:
        api = await client.get(stack.url("/api/orders?x=1"), headers=CSRF)
        page = await client.get(stack.url("/billing/page"), headers={"Accept": "text/html"})
        garbage = await client.get(
            stack.url("/api/orders"), headers={**CSRF, "Cookie": "gw_session=forged.cookie"}
        )
    assert api.status_code == 401
    assert api.json()["error"] == "login_required"
    assert api.json()["login_url"].endswith("/auth/login?return_to=%2Fapi%2Forders%3Fx%3D1")
    assert page.status_code == 302
    assert page.headers["location"].endswith("/auth/login?return_to=%2Fbilling%2Fpage")
    assert garbage.status_code == 401
    assert stack.gw.upstreams["api"].requests == []
    assert stack.gw.upstreams["billing"].requests == []


async def test_nginx_audience_outside_policy_is_403_and_csrf_is_enforced(stack: Stack) -> None:
    async with stack.client() as client:
        await stack.gw.login(client)
        outside = await client.get(stack.url("/outside/secrets"), headers=CSRF)
        no_csrf = await client.post(stack.url("/api/orders"), json={})
        cross_site = await client.post(
            stack.url("/api/orders"), headers={**CSRF, "Origin": "https://evil.example"}, json={}
        )
    assert outside.status_code == 403
    assert outside.json() == {"error": "audience_not_permitted"}
    assert no_csrf.status_code == 403 and no_csrf.json() == {"error": "csrf_failed"}
    assert cross_site.status_code == 403 and cross_site.json() == {"error": "csrf_failed"}
    assert stack.gw.upstreams["outside"].requests == []
    assert stack.gw.upstreams["api"].requests == []


async def test_forward_auth_endpoint_refuses_callers_without_the_secret(idp: IdpProcess) -> None:
    wrong = "not-the-secret-not-the-secret-not-the-secret"
    with run_stack(idp, secret=wrong) as stack:
        async with stack.client() as client:
            await stack.gw.login(client)
            original = {**CSRF, "X-Original-URI": "/api/orders"}
            direct = {
                label: await client.get(f"{stack.gw.base_url}/auth/forward", headers=headers)
                for label, headers in {
                    "none": original,
                    "wrong": {**original, "X-Forward-Auth-Secret": wrong},
                    "right": {**original, "X-Forward-Auth-Secret": SECRET},
                }.items()
            }
            via_nginx = await client.get(stack.url("/api/orders"), headers=CSRF)
            exposed = await client.get(stack.url("/auth/forward"), headers=original)
    assert direct["none"].status_code == direct["wrong"].status_code == 403
    assert "authorization" not in direct["none"].headers
    assert "authorization" not in direct["wrong"].headers
    assert direct["right"].status_code == 200  # the same request, from the data plane
    assert direct["right"].headers["authorization"].startswith("Bearer ")
    # nginx configured with the wrong secret gets nothing through; browsers cannot reach it.
    assert via_nginx.status_code == 403 and via_nginx.json() == {"error": "forbidden"}
    assert exposed.status_code == 404
    assert stack.gw.upstreams["api"].requests == []


async def test_nginx_thirty_concurrent_requests_one_exchange_per_audience(stack: Stack) -> None:
    async with stack.client() as client:
        await stack.gw.login(client)
        stack.gw.idp.reset_stats()
        paths = ["/api/orders" if i % 2 else "/billing/invoices" for i in range(30)]
        responses = await asyncio.gather(*(client.get(stack.url(p), headers=CSRF) for p in paths))
    assert [r.status_code for r in responses] == [200] * 30
    assert {r.json()["aud"] for r in responses} == {API, BILLING}
    assert stack.gw.idp.stats()["refresh_by_resource"] == {API: 1, BILLING: 1}
    assert len(stack.nginx.auth_cache_statuses()) == 30  # no cache: one subrequest each


async def test_nginx_auth_cache_serves_repeats_but_not_other_sessions_or_methods(
    idp: IdpProcess,
) -> None:
    with run_stack(idp, auth_cache="mrrt_auth") as stack:
        async with stack.client() as client:
            await stack.gw.login(client)
            repeats = [await client.get(stack.url(f"/api/o/{i}"), headers=CSRF) for i in range(10)]
            no_csrf_post = await client.post(stack.url("/api/orders"), json={})
            client.cookies.clear()
            anonymous = await client.get(stack.url("/api/o/1"), headers=CSRF)
        statuses = stack.nginx.auth_cache_statuses()
    assert [r.status_code for r in repeats] == [200] * 10
    assert {r.json()["aud"] for r in repeats} == {API}
    assert statuses[:10].count("HIT") == 9  # one subrequest reached the gateway
    assert no_csrf_post.status_code == 403  # a cached GET answer never serves a POST
    assert anonymous.status_code == 401  # nor another (here: no) session


async def test_nginx_auth_cache_never_replays_a_dpop_proof(idp: IdpProcess) -> None:
    """With tokens.dpop the answers carry a single-use proof: the documented cache keeps none
    of them, so every request gets its own proof and the upstream refuses nothing."""
    apis = {
        name: DPoPUpstream(issuer=idp.issuer, audience=audience, name=name, require_nonce=False)
        for name, audience in (("api", API), ("billing", BILLING))
    }
    forward_auth = {"enabled": True, "secret": SECRET}
    try:
        with (
            start_upstreams(idp) as upstreams,
            run_gateway(
                idp,
                upstreams,
                forward_auth=forward_auth,
                tokens={"dpop": "required"},
                routes=[
                    {"name": name, "prefix": f"/{name}/", "upstream": api.url, "audience": audience}
                    for (name, api), audience in zip(apis.items(), (API, BILLING), strict=True)
                ],
            ) as gw,
            run_nginx(
                gw,
                auth_cache="mrrt_auth",
                servers={name: api.base_url for name, api in apis.items()},
            ) as nginx,
        ):
            async with gw.client() as client:
                await gw.login(client)
                answers = [
                    await client.get(nginx.base_url + f"/api/o/{i % 2}", headers=CSRF)
                    for i in range(6)
                ]
            statuses = nginx.auth_cache_statuses()
    finally:
        for api in apis.values():
            api.stop()
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    assert apis["api"].refusals == []
    assert len({seen["jti"] for seen in apis["api"].accepted}) == 6
    assert "HIT" not in statuses


async def _raw_get(base_url: str, target: str, headers: dict[str, str]) -> int:
    """GET ``target`` byte for byte (an HTTP client would resolve its dot segments first, as
    ``curl --path-as-is`` does not); the status of the answer."""
    host, _, port = base_url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=10)
        await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(status_line.split()[1])


def _bearer_audience(headers: dict[str, str]) -> object:
    """The ``aud`` of the bearer token an upstream received (read, not verified)."""
    token = headers["authorization"].removeprefix("Bearer ")
    return jwt.decode(token, options={"verify_signature": False})["aud"]


async def test_nginx_path_matching_merges_slashes_before_dot_segments_like_nginx(
    idp: IdpProcess,
) -> None:
    """Review finding 1: nginx merges `//` first, so /api//../billing/leak is /billing/leak
    and goes to the billing upstream; the gateway must mint billing's token for it, not the
    orders API's (it kept the empty segment, and `..` popped that instead of `api`)."""
    with run_stack(idp, path_matching=True) as stack:
        async with stack.client() as client:
            await stack.gw.login(client)
            cookie = client.cookies.get("gw_session")
        assert cookie
        browser = {"Cookie": f"gw_session={cookie}", **CSRF}
        statuses = [
            await _raw_get(stack.nginx.base_url, target, browser)
            for target in ("/api//../billing/leak", "/billing//..//api/x//y")
        ]
        billing = stack.gw.upstreams["billing"].requests
        api = stack.gw.upstreams["api"].requests
    assert [(r["path"], _bearer_audience(r["headers"])) for r in billing] == [("/leak", BILLING)]
    assert [(r["path"], _bearer_audience(r["headers"])) for r in api] == [("/x/y", API)]
    assert statuses == [200, 200]
