"""The gateway's exception tree and the one handler that renders it.

Every failure a client can see is one of these classes; each carries its HTTP status and a
machine-readable ``error`` code as class attributes (the werkzeug pattern), and the message
never contains a token, cookie or code.

    GatewayError                     500 internal_error
    ├── ConfigError                  startup only -> exit 2
    ├── BadRequest                   400 bad_request
    │   ├── InvalidPath              400 invalid_path
    │   └── LoginFailed              400 login_failed (bad state, IdP error at callback)
    ├── LoginRequired                401 login_required (+ login_url)
    │   └── RefreshTokenRejected     invalid_grant: the session is ended first
    ├── Forbidden                    403 forbidden
    │   ├── CSRFCheckFailed          403 csrf_failed
    │   ├── AudienceNotPermitted     403 audience_not_permitted
    │   └── InsufficientScope        403 insufficient_scope
    ├── NotFound                     404 not_found
    ├── RequestBodyTimeout           408 request_timeout (+ Connection: close)
    ├── PayloadTooLarge              413 payload_too_large
    ├── HeadersTooLarge              431 headers_too_large
    ├── IdentityProviderError        502 idp_error (IdP refused us: misconfiguration)
    ├── IdentityProviderUnavailable  503 idp_unavailable + Retry-After
    ├── SessionStoreUnavailable      503 session_store_unavailable + Retry-After
    └── UpstreamError                502 upstream_unavailable
        ├── UpstreamTimeout          504 upstream_timeout
        └── UpstreamBusy             503 upstream_busy + Retry-After
"""

from __future__ import annotations

import logging
from typing import ClassVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

logger = logging.getLogger("gateway.error")


class GatewayError(Exception):
    """Base of every error the gateway renders."""

    status_code: ClassVar[int] = 500
    error: ClassVar[str] = "internal_error"

    def __init__(self, message: str = "", **extra: str) -> None:
        super().__init__(message or self.error)
        self.message = message or self.error
        self.extra = extra

    def headers(self) -> dict[str, str]:
        """Response headers this error adds (e.g. Retry-After)."""
        return {}


class ConfigError(GatewayError):
    """Invalid configuration; raised at startup only."""

    error = "config_error"


class BadRequest(GatewayError):
    status_code = 400
    error = "bad_request"


class InvalidPath(BadRequest):
    error = "invalid_path"


class LoginFailed(BadRequest):
    error = "login_failed"


class LoginRequired(GatewayError):
    """No usable session: the SPA should send the user to ``login_url``."""

    status_code = 401
    error = "login_required"


class RefreshTokenRejected(LoginRequired):
    """The IdP answered ``invalid_grant``: the refresh token is dead, so is the session."""


class Forbidden(GatewayError):
    status_code = 403
    error = "forbidden"


class CSRFCheckFailed(Forbidden):
    error = "csrf_failed"


class AudienceNotPermitted(Forbidden):
    error = "audience_not_permitted"


class InsufficientScope(Forbidden):
    error = "insufficient_scope"


class NotFound(GatewayError):
    status_code = 404
    error = "not_found"


class RequestBodyTimeout(GatewayError):
    """The client's request body sent nothing for longer than ``limits.body_idle_timeout``.

    The rest of the body will not be read, so the connection cannot carry another request:
    the answer closes it (RFC 9110 §15.5.9)."""

    status_code = 408
    error = "request_timeout"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class PayloadTooLarge(GatewayError):
    status_code = 413
    error = "payload_too_large"


class HeadersTooLarge(GatewayError):
    status_code = 431
    error = "headers_too_large"


class IdentityProviderError(GatewayError):
    """The IdP answered with an error the gateway cannot act on (misconfiguration)."""

    status_code = 502
    error = "idp_error"


class _Unavailable(GatewayError):
    status_code = 503

    def __init__(self, message: str = "", *, retry_after: int = 5, **extra: str) -> None:
        super().__init__(message, **extra)
        self.retry_after = max(1, int(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class IdentityProviderUnavailable(_Unavailable):
    error = "idp_unavailable"


class SessionStoreUnavailable(_Unavailable):
    error = "session_store_unavailable"


class UpstreamError(GatewayError):
    status_code = 502
    error = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    error = "upstream_timeout"


class UpstreamBusy(UpstreamError, _Unavailable):
    """No upstream connection became free within ``upstream_pool.acquire_timeout``."""

    status_code = 503
    error = "upstream_busy"


def render_error(exc: GatewayError) -> Response:
    """Render ``exc`` as the JSON body every client of the gateway can rely on."""
    body: dict[str, str] = {"error": exc.error, "message": exc.message, **exc.extra}
    headers = {"Cache-Control": "no-store", **exc.headers()}
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


async def handle_gateway_error(request: Request, exc: Exception) -> Response:
    """Starlette exception handler for :class:`GatewayError`."""
    if not isinstance(exc, GatewayError):  # pragma: no cover - registered for GatewayError only
        raise exc
    if exc.status_code >= 500:
        logger.warning("%s: %s", exc.error, exc.message)
    return render_error(exc)


async def handle_unexpected_error(request: Request, exc: Exception) -> Response:
    """Last resort: log the type (never the args, which may hold secrets) and answer 500."""
    logger.error("unhandled %s on %s", type(exc).__name__, request.url.path)
    return render_error(GatewayError("unexpected error"))
