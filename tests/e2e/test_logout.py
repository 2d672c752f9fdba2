"""The end of a session, proven with the real OpenID Provider: RP-initiated logout revokes the
refresh token at the IdP, and the IdP's back-channel logout ends the gateway's session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest

from tests.unit.test_redis_store import REDIS_URL, _delete_prefix

from .conftest import IdpFactory
from .gateway_harness import CSRF, GatewayUnderTest, run_gateway, start_upstreams
from .login import browser_logout
from .servers import API, CLIENT_ID, CLIENT_SECRET, IdpProcess, reserve_socket

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture
def gw(idp: IdpProcess) -> Iterator[GatewayUnderTest]:
    with start_upstreams(idp) as upstreams, run_gateway(idp, upstreams) as running:
        yield running


async def refresh_at_idp(idp: IdpProcess, refresh_token: str) -> httpx.Response:
    """A refresh-token grant sent straight to the IdP's token endpoint, as the gateway would."""
    async with httpx.AsyncClient(timeout=10) as http:
        discovery = (await http.get(idp.discovery_url)).json()
        return await http.post(
            discovery["token_endpoint"],
            data={
                "grant_type": "refresh_token",
                "refresh_token": refresh_token,
                "resource": API,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
            },
        )


async def session_of(gw: GatewayUnderTest, client: httpx.AsyncClient) -> Any:
    session_id = gw.gateway.sessions.session_id_from_cookie(
        f"gw_session={client.cookies['gw_session']}"
    )
    return session_id, await gw.gateway.store.load(session_id)


async def test_logout_revokes_the_refresh_token_at_the_idp(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        await gw.login(client)
        assert (await client.get("/api/x", headers=CSRF)).status_code == 200
        session_id, session = await session_of(gw, client)
        refresh_token = session.refresh_token
        before = await refresh_at_idp(gw.idp, refresh_token)  # it works before logout
        gw.idp.reset_stats()
        logout = await client.post("/auth/logout", headers=CSRF)
        me = await client.get("/auth/me")
        api = await client.get("/api/x", headers=CSRF)
    after = await refresh_at_idp(gw.idp, refresh_token)
    assert before.status_code == 200 and before.json()["access_token"]
    assert logout.status_code == 200 and logout.json()["logged_out"] is True
    assert (
        "gw_session=;" in logout.headers["set-cookie"]
        and "Max-Age=0" in logout.headers["set-cookie"]
    )
    assert after.status_code == 400 and after.json()["error"] == "invalid_grant"
    assert gw.idp.stats()["revocations"] == 1
    assert me.status_code == api.status_code == 401
    assert await gw.gateway.store.load(session_id) is None
    assert await gw.gateway.store.get_token(session_id, API) is None


async def test_logout_form_redirects_to_the_idp_with_the_configured_return(
    gw: GatewayUnderTest,
) -> None:
    async with gw.client() as client:
        await gw.login(client)
        _, session = await session_of(gw, client)
        gw.idp.reset_stats()
        # A same-origin form post; the query parameter and Host header must not steer it.
        client.headers["Origin"] = gw.base_url
        redirect = await client.post(
            "/auth/logout?post_logout_redirect_uri=https://evil.example/",
            headers={"Host": "evil.example"},
        )
        location = redirect.headers["location"]
        final = await browser_logout(client, location, idp_issuer=gw.idp.issuer)
        me = await client.get("/auth/me")
    query = parse_qs(urlsplit(location).query)
    assert redirect.status_code == 303
    assert location.startswith(gw.idp.issuer + "/session/end?")
    assert query["post_logout_redirect_uri"] == [gw.base_url + "/"]
    assert query["client_id"] == [CLIENT_ID]
    assert query["id_token_hint"] == [session.id_token]
    # The IdP ended its session and sent the browser back to the gateway's configured page.
    assert str(final.url) == gw.base_url + "/"
    assert gw.idp.stats()["end_sessions"] == 1
    assert me.status_code == 401


async def test_logout_without_a_session_still_clears_the_cookie(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        response = await client.post("/auth/logout", headers=CSRF)
    assert response.status_code == 200 and response.json()["logged_out"] is False
    assert response.json()["logout_url"] == gw.base_url + "/"
    assert "Max-Age=0" in response.headers["set-cookie"]


def _idp_logout_url(idp: IdpProcess, gateway_url: str) -> str:
    """The IdP's own logout page (the user signs out at the IdP, not at the gateway)."""
    back = quote(gateway_url + "/healthz", safe="")
    return f"{idp.issuer}/session/end?client_id={CLIENT_ID}&post_logout_redirect_uri={back}"


async def test_backchannel_logout_from_the_idp_ends_the_gateway_session(
    idp_factory: IdpFactory,
) -> None:
    sock = reserve_socket()
    gateway_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    idp = idp_factory(backchannel_uri=gateway_url + "/auth/backchannel-logout")
    with start_upstreams(idp) as upstreams, run_gateway(idp, upstreams, sock=sock) as gw:
        async with gw.client() as alice, gw.client() as other_browser:
            await gw.login(alice)
            await gw.login(other_browser)  # same user, another IdP session (another sid)
            assert (await alice.get("/api/x", headers=CSRF)).status_code == 200
            _, session = await session_of(gw, alice)
            final = await browser_logout(
                alice, _idp_logout_url(idp, gw.base_url), idp_issuer=idp.issuer
            )
            me = await alice.get("/auth/me")
            api = await alice.get("/api/x", headers=CSRF)
            other = await other_browser.get("/api/x", headers=CSRF)
        stats = idp.stats()
    assert final.status_code == 200 and str(final.url) == gw.base_url + "/healthz"
    assert stats["end_sessions"] == 1
    assert stats["backchannel"] == {"success": 1, "error": 0}
    assert me.status_code == api.status_code == 401
    assert api.json()["error"] == "login_required"
    assert other.status_code == 200  # only the session the IdP named (by sid) ended
    assert session.sid is not None


async def test_backchannel_logout_on_one_instance_ends_the_session_on_all(
    idp_factory: IdpFactory,
) -> None:
    """Two gateways sharing Redis: the IdP notifies one, the user was on the other."""
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    redis = {"store": "redis", "redis_url": REDIS_URL, "redis_key_prefix": prefix}
    notified_sock = reserve_socket()
    notified_url = f"http://127.0.0.1:{notified_sock.getsockname()[1]}"
    idp = idp_factory(backchannel_uri=notified_url + "/auth/backchannel-logout")
    try:
        with (
            start_upstreams(idp) as upstreams,
            run_gateway(idp, upstreams, sock=notified_sock, session=redis) as notified,
            run_gateway(idp, upstreams, session=redis) as serving,
        ):
            async with serving.client() as client:
                await serving.login(client)
                assert (await client.get("/api/x", headers=CSRF)).status_code == 200
                # Cookies are per host, not port: the same cookie is valid on both instances.
                async with notified.client(cookies=client.cookies) as same_browser:
                    assert (await same_browser.get("/auth/me")).status_code == 200
                await browser_logout(
                    client, _idp_logout_url(idp, serving.base_url), idp_issuer=idp.issuer
                )
                after = await client.get("/api/x", headers=CSRF)
            stats = idp.stats()
    finally:
        await _delete_prefix(REDIS_URL, prefix)
    assert stats["backchannel"] == {"success": 1, "error": 0}
    assert after.status_code == 401
