"""Static files served by the gateway itself (a small front end such as the demo page).

The files are public (no session, no CSRF) and only answer GET and HEAD. Configured routes keep
priority under the static path by the same longest-prefix rule as between routes: with the page
at ``/`` and a route at ``/api/``, ``/api/x`` is proxied and ``/app.js`` is a file. Everything the
static site does not serve goes to the proxy (``dispatch.py``), which answers 404 for paths no
route claims.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from .errors import Forbidden, InvalidPath, NotFound
from .routing import RouteTable, normalize_path
from .settings import StaticSettings

_METHODS = frozenset({"GET", "HEAD"})
# Files are revalidated (ETag / Last-Modified) rather than cached blindly, and never sniffed.
_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-cache"))
_CSP = b"content-security-policy"


class StaticSite:
    """Serves ``settings.directory`` under ``settings.path``."""

    def __init__(self, settings: StaticSettings, routes: RouteTable) -> None:
        self._prefix = settings.path  # always ends with "/"
        self._routes = routes
        self._files = StaticFiles(directory=settings.directory, html=True)
        csp = settings.content_security_policy.encode("latin-1")
        # On every answer, 304s included: a browser merges a 304's headers into its cached copy.
        self._headers = _HEADERS + (((_CSP, csp),) if csp else ())

    def serves(self, method: str, raw_path: str) -> bool:
        """Whether this request is for a file (rather than a route or the proxy's 404);
        ``raw_path``: the path as sent, below the mount point."""
        if method not in _METHODS:
            return False
        try:
            path = normalize_path(raw_path)
        except InvalidPath:
            return False  # the proxy renders the 400
        if not (path.startswith(self._prefix) or path == self._prefix[:-1]):
            return False
        route = self._routes.match(path)
        return route is None or len(route.prefix) < len(self._prefix)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the file the dispatcher found this site :meth:`serves`; raise NotFound (or
        Forbidden, for a file it may not read) for the dispatcher's error renderer."""
        # StaticFiles resolves the file from the path below root_path.
        child = dict(scope, root_path=scope.get("root_path", "") + self._prefix[:-1])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self._headers if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self._files(child, receive, send_with_headers)
        except HTTPException as exc:
            if exc.status_code == 404:
                raise NotFound("no such file") from None
            raise Forbidden("the file cannot be served") from None


__all__ = ["StaticSite"]
