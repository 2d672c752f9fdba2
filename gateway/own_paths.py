"""The paths the gateway answers itself, defined once. Pure.

The dispatcher sends these to the gateway's own endpoints (never to a route), settings
validation refuses a route or static site that would shadow them, and the security-headers rule
treats every answer under them as the gateway's own.
"""

from __future__ import annotations

AUTH_PREFIX = "/auth/"
LOGIN = "/auth/login"
CALLBACK = "/auth/callback"
LOGOUT = "/auth/logout"
ME = "/auth/me"
BACKCHANNEL_LOGOUT = "/auth/backchannel-logout"
FORWARD_AUTH = "/auth/forward"  # the default of forward_auth.path (any path under /auth/)
HEALTH = "/healthz"
READY = "/readyz"
METRICS = "/metrics"

AUTH_ENDPOINTS = (LOGIN, CALLBACK, LOGOUT, ME, BACKCHANNEL_LOGOUT)
SERVICE_ENDPOINTS = (HEALTH, READY, METRICS)
_SERVICE = frozenset(SERVICE_ENDPOINTS)


def is_owned_path(path: str) -> bool:
    """Whether the gateway answers ``path`` itself (all of ``/auth/``, health and metrics)."""
    return path.startswith(AUTH_PREFIX) or path in _SERVICE or path == AUTH_PREFIX[:-1]


def is_reserved_prefix(prefix: str) -> bool:
    """Routes and the static site may not shadow the gateway's own paths (``/`` may)."""
    return is_owned_path(prefix) or is_owned_path(prefix.rstrip("/"))
