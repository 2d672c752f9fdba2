"""The route table: longest-prefix match of a normalised path, and the upstream URL. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from .errors import InvalidPath
from .session_rules import SessionRules
from .settings import USER_MODES, RouteSettings

# Percent-encoded unreserved characters (RFC 3986 §2.3) mean the same as the characters
# themselves (§6.2.2.2), and upstreams decode them: `/ap%69/` must be matched as `/api/`.
_ENCODED_UNRESERVED = re.compile(r"%(2[dD]|2[eE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")


def _decode_unreserved(segment: str) -> str:
    return _ENCODED_UNRESERVED.sub(lambda m: chr(int(m.group(1), 16)), segment)


def normalize_path(raw_path: str) -> str:
    """Merge repeated slashes, then resolve ``.``/``..`` segments of a raw (still
    percent-encoded) path, RFC 3986 §5.2.4.

    Slashes are merged first because every data plane in front of the gateway does so (nginx
    ``merge_slashes``, Traefik, Go's ``path.Clean``, Envoy ``merge_slashes``): were the empty
    segment of ``/api//../billing`` kept, ``..`` would pop it and the gateway would judge
    ``/api/billing`` (the orders route) while the data plane routes ``/billing`` (issue
    "Findings of an adversarial review", item 1). The proxy forwards the merged path too, so
    that forward-auth and the proxy route every path alike.

    Segments are judged after percent-decoding, so ``%2e%2e`` counts as ``..``; a segment that
    decodes to a slash or backslash, a NUL or control character, or a ``..`` climbing above the
    root is refused: each is a known way to make an upstream resolve a path outside the route.
    Encoded unreserved characters are decoded, so routes match what the upstream will see;
    the result keeps its original encoding otherwise.

    Nearly every request's path is already normal: printable ASCII with no percent-encoding to
    judge, no backslash, no segment starting with a dot and no empty one. Such a path is
    returned as it is, after a few string methods (this runs on every proxied request; a
    regular expression's search costs several times as much).
    """
    if (
        raw_path[:1] == "/"
        and raw_path.isascii()
        and raw_path.isprintable()
        and "%" not in raw_path
        and "\\" not in raw_path
        and "/." not in raw_path
        and "//" not in raw_path
    ):
        return raw_path
    return _resolve(raw_path)


def _resolve(raw_path: str) -> str:
    """:func:`normalize_path`, segment by segment."""
    if not raw_path.startswith("/"):
        raise InvalidPath("the path must start with /")
    out: list[str] = []
    segments = raw_path[1:].split("/")
    for index, segment in enumerate(segments):
        try:
            decoded = unquote(segment, errors="strict") if "%" in segment else segment
        except UnicodeDecodeError:  # %ff, overlong %c0%af ("/"): not UTF-8, refused
            raise InvalidPath("the path is not percent-encoded UTF-8") from None
        if any(ch in decoded for ch in "/\\") or any(
            ord(ch) < 0x20 or ord(ch) == 0x7F for ch in decoded
        ):
            raise InvalidPath("the path contains an encoded slash, backslash or control character")
        if ";" in decoded and decoded.split(";", 1)[0] in (".", ".."):
            # `..;x` is `..` to servers that drop path parameters (Tomcat, Jetty, Spring).
            raise InvalidPath("the path contains a dot segment with parameters")
        last = index == len(segments) - 1
        if not segment and not last:
            continue  # `//`: merged (a trailing slash is the last, empty segment: kept)
        if decoded == ".":
            if last:
                out.append("")
            continue
        if decoded == "..":
            if not out:
                raise InvalidPath("the path climbs above the root")
            out.pop()
            if last:
                out.append("")
            continue
        out.append(_decode_unreserved(segment) if "%" in segment else segment)
    return "/" + "/".join(out)


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled route: settings plus the parsed upstream. What the proxy reads on every
    request is a plain field (no property, no recomputation)."""

    settings: RouteSettings
    upstream_origin: str  # scheme://host:port
    upstream_path: str  # always ends with "/"
    name: str = field(init=False)
    prefix: str = field(init=False)
    mode: str = field(init=False)  # settings.auth: user, none, client, user_or_client, ...
    needs_token: bool = field(init=False)  # any mode but none: the IdP is needed
    needs_session: bool = field(init=False)  # a mode that uses the user's session if any
    rules: SessionRules = field(init=False)  # claim rules and step-up (auth: user)
    judged: bool = field(init=False)  # has rules: a plain field, read on every request
    audience: str = field(init=False)  # "" when the route names none
    scope_key: str = field(init=False)  # the scopes, space-separated (a token-cache key part)
    # Copied from the settings: a pydantic model's attributes cost several times a slot's.
    csrf: bool = field(init=False)
    forward_cookies: bool = field(init=False)
    timeout: float = field(init=False)
    strip_prefix: bool = field(init=False)
    max_body_bytes: int | None = field(init=False)  # None: the global limit
    # Client identity/override headers this route forwards anyway (headers.py), lower-case.
    forward_identity_headers: frozenset[bytes] = field(init=False)
    _base: str = field(init=False)  # what a path is appended to (no strip_prefix)
    _stripped_base: str = field(init=False)  # what the rest after the prefix is appended to

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # frozen: derived fields are set once, here
        set_field(self, "name", self.settings.name)
        set_field(self, "prefix", self.settings.prefix)
        set_field(self, "mode", self.settings.auth)
        set_field(self, "needs_token", self.settings.auth != "none")
        set_field(self, "needs_session", self.settings.auth in USER_MODES)
        set_field(self, "rules", SessionRules.of(self.settings))
        set_field(self, "judged", not self.rules.empty)
        set_field(self, "audience", self.settings.audience or "")
        set_field(self, "scope_key", " ".join(self.settings.scopes))
        set_field(self, "csrf", self.settings.csrf)
        set_field(self, "forward_cookies", self.settings.forward_cookies)
        set_field(self, "timeout", self.settings.timeout)
        set_field(self, "strip_prefix", self.settings.strip_prefix)
        set_field(self, "max_body_bytes", self.settings.max_body_bytes)
        set_field(
            self,
            "forward_identity_headers",
            frozenset(name.encode("latin-1") for name in self.settings.forward_identity_headers),
        )
        set_field(self, "_base", self.upstream_origin + self.upstream_path.rstrip("/"))
        set_field(self, "_stripped_base", self.upstream_origin + self.upstream_path)

    def upstream_url(self, path: str, query: str) -> str:
        """Map a normalised request path (already matched to this route) to the upstream URL."""
        if self.strip_prefix:
            # A matched path is the prefix, or the prefix without its trailing slash: either
            # way, what follows the prefix (possibly nothing).
            url = self._stripped_base + path[len(self.prefix) :]
        else:
            url = self._base + path
        return url + "?" + query if query else url


def _compile(settings: RouteSettings) -> Route:
    parts = urlsplit(settings.upstream)
    path = parts.path or "/"
    if not path.endswith("/"):
        path += "/"
    return Route(
        settings=settings, upstream_origin=f"{parts.scheme}://{parts.netloc}", upstream_path=path
    )


class RouteTable:
    """Longest prefix wins; ``/api`` (no trailing slash) matches the route ``/api/``.

    Routes are looked up by the path's first segment, so a request meets only the few routes
    that share it (however many are configured), longest first; a ``/`` route comes last.
    """

    def __init__(self, routes: list[RouteSettings]) -> None:
        self._routes = sorted(
            (_compile(r) for r in routes), key=lambda r: len(r.prefix), reverse=True
        )
        self._by_name = {r.name: r for r in self._routes}
        # first segment ("/api/") -> [(prefix, prefix without its trailing slash, route)],
        # longest first.
        self._by_segment: dict[str, list[tuple[str, str, Route]]] = {}
        self._root: Route | None = None
        for route in self._routes:
            if route.prefix == "/":
                self._root = self._root or route
            else:
                self._by_segment.setdefault(_first_segment(route.prefix), []).append(
                    (route.prefix, route.prefix[:-1], route)
                )

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)

    def by_name(self, name: str) -> Route | None:
        return self._by_name.get(name)

    def match(self, path: str) -> Route | None:
        """The route for a normalised path, or None."""
        for prefix, bare, route in self._by_segment.get(_first_segment(path), ()):
            if path.startswith(prefix) or path == bare:
                return route
        return self._root


def _first_segment(path: str) -> str:
    """``/api/`` for ``/api/v1/x``, ``/api`` and ``/api/`` alike (a route prefix's first
    segment is the same as that of every path it matches)."""
    end = path.find("/", 1)
    return path[: end + 1] if end > 0 else path + "/"
