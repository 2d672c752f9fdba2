"""Browser-like login and logout against the test IdP's dev interactions.

The helpers follow redirects by hand with one shared ``httpx.AsyncClient`` (so
its cookie jar holds both the gateway's and the IdP's cookies, as a browser's
would) and fill in the dev-interaction forms parsed from the HTML.

Cookies are per host, not per port: the gateway, the IdP and the upstreams all
live on 127.0.0.1, so the client sends the IdP's ``_session`` cookie to the
gateway too, exactly like a browser would. httpx never sends ``Secure`` cookies
over plain http, so gateways under test must use an http public URL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx

__all__ = ["Form", "LoginError", "browser_login", "browser_logout", "idp_authorize", "parse_forms"]

MAX_STEPS = 20


class LoginError(AssertionError):
    """The login or logout dance did not reach its end."""


@dataclass
class Form:
    """An HTML form: where it posts and the fields it would submit."""

    action: str
    method: str = "get"
    id: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    buttons: list[tuple[str, str]] = field(default_factory=list)


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[Form] = []
        self._current: Form | None = None
        # Inputs/buttons outside their form (``form="id"``), resolved at the end.
        self._detached: list[tuple[str, str, str, bool]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag == "form":
            self._current = Form(
                action=a.get("action", ""), method=a.get("method", "get").lower(), id=a.get("id")
            )
            self.forms.append(self._current)
        elif tag in ("input", "button", "textarea", "select") and a.get("name"):
            is_button = tag == "button" or a.get("type", "").lower() in ("submit", "image")
            owner = a.get("form")
            if owner:
                self._detached.append((owner, a["name"], a.get("value", ""), is_button))
            elif self._current is not None:
                self._add(self._current, a["name"], a.get("value", ""), is_button)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None

    @staticmethod
    def _add(form: Form, name: str, value: str, is_button: bool) -> None:
        if is_button:
            form.buttons.append((name, value))
        else:
            form.fields[name] = value

    def close(self) -> None:
        super().close()
        by_id = {f.id: f for f in self.forms if f.id}
        for owner, name, value, is_button in self._detached:
            if owner in by_id:
                self._add(by_id[owner], name, value, is_button)


def parse_forms(html: str) -> list[Form]:
    """Every ``<form>`` in ``html`` with its fields and named submit buttons."""
    parser = _FormParser()
    parser.feed(html)
    parser.close()
    return parser.forms


def _origin(url: str | httpx.URL) -> str:
    parts = urlsplit(str(url))
    return f"{parts.scheme}://{parts.netloc}".lower()


def _is_redirect(response: httpx.Response) -> bool:
    return response.status_code in (301, 302, 303, 307, 308) and "location" in response.headers


def _fill(form: Form, *, username: str, password: str) -> dict[str, str]:
    """The data a user would submit on an IdP page (login, consent, logout)."""
    data = dict(form.fields)
    prompt = data.get("prompt")
    if prompt == "login":
        data.update(login=username, password=password)
    elif prompt == "consent":
        pass
    elif "xsrf" in data:  # /session/end confirmation: press "Yes, sign me out"
        data.setdefault("logout", "yes")
    return data


async def _drive(
    client: httpx.AsyncClient,
    start_url: str,
    *,
    idp_origin: str | None,
    username: str,
    password: str,
    max_steps: int,
    stop_on_leaving_idp: bool,
    stop_at_callback: bool = True,
    start_method: str = "GET",
) -> tuple[httpx.Response, str | None]:
    """Walk through redirects and IdP forms.

    Returns ``(response, None)`` when a non-IdP response ends the walk (a
    non-redirect, or with ``stop_at_callback`` any answer from ``/auth/callback``), or
    ``(idp_response, location)`` for the first IdP redirect leaving the IdP
    when ``stop_on_leaving_idp`` is set.
    """
    method, url, data = start_method, start_url, None
    trail: list[str] = []
    for _ in range(max_steps):
        response = await client.request(method, url, data=data, follow_redirects=False)
        trail.append(f"{method} {url} -> {response.status_code}")
        here = _origin(response.url)
        location = (
            urljoin(str(response.url), response.headers["location"])
            if _is_redirect(response)
            else None
        )
        if idp_origin is None and location is not None and _origin(location) != here:
            idp_origin = _origin(location)  # the first hop off the start origin is the IdP
        on_idp = idp_origin is not None and here == idp_origin

        if location is not None:
            if on_idp and _origin(location) != idp_origin and stop_on_leaving_idp:
                return response, location
            if (
                stop_at_callback
                and not on_idp
                and urlsplit(str(response.url)).path.endswith("/auth/callback")
            ):
                return response, None
            method, url, data = "GET", location, None
            continue
        if not on_idp:
            return response, None
        if response.status_code != 200 or "html" not in response.headers.get("content-type", ""):
            raise LoginError(
                f"IdP answered {response.status_code} at {response.url}: {response.text[:500]}\n"
                + "\n".join(trail)
            )
        forms = [f for f in parse_forms(response.text) if f.method == "post"]
        if not forms:
            raise LoginError(f"no form on IdP page {response.url}:\n{response.text[:500]}")
        form = forms[0]
        method, url = "POST", urljoin(str(response.url), form.action)
        data = _fill(form, username=username, password=password)
    raise LoginError(f"no end after {max_steps} steps:\n" + "\n".join(trail))


async def browser_login(
    client: httpx.AsyncClient,
    login_url: str,
    *,
    username: str = "alice",
    password: str = "password",
    idp_issuer: str | None = None,
    max_steps: int = MAX_STEPS,
) -> httpx.Response:
    """Log in through the gateway like a browser; return the gateway's final answer.

    Starts at ``login_url`` (e.g. ``http://127.0.0.1:GW/auth/login?return_to=/``),
    follows every redirect, fills the dev login form (``login`` = ``username``,
    which becomes ``sub``) and the consent form, and returns the gateway's
    response to ``/auth/callback`` (normally the redirect to ``return_to``, not
    followed), or the first non-redirect response not served by the IdP.
    The IdP is ``idp_issuer``'s origin, by default the first redirect target
    on another origin than ``login_url``'s.
    """
    response, _ = await _drive(
        client,
        login_url,
        idp_origin=_origin(idp_issuer) if idp_issuer else None,
        username=username,
        password=password,
        max_steps=max_steps,
        stop_on_leaving_idp=False,
    )
    return response


async def idp_authorize(
    client: httpx.AsyncClient,
    authorize_url: str,
    *,
    username: str = "alice",
    password: str = "password",
    max_steps: int = MAX_STEPS,
) -> str:
    """Run an IdP ``/auth`` request to its end; return the redirect back to the client.

    The returned URL (``redirect_uri?code=..&state=..&iss=..`` or an error) is
    not fetched, so any ``redirect_uri`` works even with nothing listening.
    """
    response, location = await _drive(
        client,
        authorize_url,
        idp_origin=_origin(authorize_url),
        username=username,
        password=password,
        max_steps=max_steps,
        stop_on_leaving_idp=True,
    )
    if location is None:
        raise LoginError(f"IdP did not redirect back: {response.status_code} {response.text[:500]}")
    return location


async def browser_logout(
    client: httpx.AsyncClient,
    logout_url: str,
    *,
    method: str = "GET",
    idp_issuer: str | None = None,
    max_steps: int = MAX_STEPS,
) -> httpx.Response:
    """Log out through the gateway like a browser; return the first non-IdP answer.

    Sends ``method logout_url``, follows redirects to the IdP's ``/session/end``,
    confirms "Yes, sign me out" and follows the redirect to the
    ``post_logout_redirect_uri``, returning the first response that is neither
    a redirect nor served by the IdP (``idp_issuer``'s origin, by default the
    first redirect target on another origin than ``logout_url``'s).
    """
    response, _ = await _drive(
        client,
        logout_url,
        idp_origin=_origin(idp_issuer) if idp_issuer else None,
        username="",
        password="",
        max_steps=max_steps,
        stop_on_leaving_idp=False,
        stop_at_callback=False,
        start_method=method,
    )
    return response
