"""Security headers on the gateway's own answers, never on upstream answers it relays.

Three cases, decided by the dispatcher (``dispatch.py``) from where an answer comes from, not
guessed from its shape:

* every answer on the gateway's own paths (``own_paths``: ``/auth/*``, ``/healthz``,
  ``/readyz``, ``/metrics``) gets all of them, ``no-store`` included (:func:`own_path_headers`);
* a JSON error or a redirect to login that the gateway renders on any other path gets
  :func:`own_answer_headers`;
* what an upstream answered, and the static site's files, keep their own headers.
"""

from __future__ import annotations

from collections.abc import Iterable

# OWASP Secure Headers / HTTP Headers Cheat Sheet: nothing here is meant to be framed, sniffed,
# cached (/auth answers carry state) or to leak its URL in a Referer.
_ALWAYS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)
_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
_NO_STORE = (b"cache-control", b"no-store")
_HSTS = (b"strict-transport-security", b"max-age=31536000")

RawHeaders = list[tuple[bytes, bytes]]


def own_answer_headers(*, https: bool) -> tuple[tuple[bytes, bytes], ...]:
    """The headers for a JSON error or a redirect the gateway renders itself (which carry their
    own ``Cache-Control: no-store``)."""
    return _ALWAYS + (_CSP,) + ((_HSTS,) if https else ())


def own_path_headers(headers: Iterable[tuple[bytes, bytes]], *, https: bool) -> RawHeaders:
    """An own path's answer headers with the security headers added (an endpoint's own choice
    of one of them stays), ``Cache-Control`` replaced by ``no-store``: /auth answers carry login
    state and user data, health answers must be live. No CSP on an HTML page of ours (the
    demo's login error pages set their own)."""
    out = [(n, v) for n, v in headers if n.lower() != b"cache-control"]
    present = {name.lower() for name, _ in out}
    out += [h for h in _ALWAYS if h[0] not in present]
    if _content_type(out) != b"text/html" and _CSP[0] not in present:
        out.append(_CSP)
    out.append(_NO_STORE)
    if https and _HSTS[0] not in present:
        out.append(_HSTS)
    return out


def _content_type(headers: RawHeaders) -> bytes | None:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.split(b";")[0].strip().lower()
    return None
