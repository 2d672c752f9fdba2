"""Logging setup, request ids and the per-request context shared by middleware and proxy.

JSON or text lines on the ``gateway.*`` loggers; secrets, query strings and headers are never
formatted. A request id (from a valid incoming ``X-Request-ID`` or generated) rides along in a
context variable, so every line logged while serving a request carries it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import time
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, Literal

from starlette.types import Scope

from .headers import first_header
from .metrics import GATEWAY_ROUTE
from .settings import LogSettings

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_STANDARD.add("color_message")  # uvicorn's ANSI-coloured copy of the message

REQUEST_ID_HEADER = b"x-request-id"
CONTEXT_KEY = "gateway.context"  # the RequestContext's key in the ASGI scope
# What we accept from clients: short, and safe to echo into logs and headers.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

current_request_id: ContextVar[str | None] = ContextVar("gateway_request_id", default=None)


@dataclass(slots=True)
class RequestContext:
    """Per-request facts the access log and metrics need, filled in along the way."""

    request_id: str
    route: str = GATEWAY_ROUTE  # a configured route name, ``gateway`` or ``unmatched``
    upstream_seconds: float | None = None
    sub: str | None = None
    status: int | None = None  # set by the proxy as it starts its answer
    # Set by bind_request_id (the proxy's fast path): what resets ``current_request_id``.
    bound: Token[str | None] | None = None


def request_context(scope: Scope) -> RequestContext:
    """The request's context: the dispatcher's, or a new one for an endpoint called on its own."""
    context: RequestContext | None = scope.get(CONTEXT_KEY)
    if context is None:
        context = scope[CONTEXT_KEY] = RequestContext(request_id=new_request_id())
    return context


# Request ids are drawn from the OS's CSPRNG in batches: one system call per 256 ids instead of
# one per request, cut into ids in C (``bytes.hex`` with a separator every 16 bytes, then
# ``split``: a third of the per-id cost of slicing them out in Python). ``list.pop`` is atomic,
# so two threads never share an id; a child process (fork) starts with an empty batch, not with
# a copy of its parent's.
_ID_BYTES = 16
_IDS_PER_DRAW = 256
_spare_ids: list[str] = []
os.register_at_fork(after_in_child=_spare_ids.clear)


def new_request_id() -> str:
    """A fresh request id: 32 hex characters (128 random bits)."""
    try:
        return _spare_ids.pop()
    except IndexError:
        drawn = os.urandom(_ID_BYTES * _IDS_PER_DRAW).hex(" ", _ID_BYTES).split(" ")
        own = drawn.pop()  # not from _spare_ids: another thread may empty it meanwhile
        _spare_ids.extend(drawn)
        return own


def incoming_request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The client's (first) ``X-Request-ID`` if it is valid (see :func:`valid_request_id`)."""
    return valid_request_id(first_header(headers, REQUEST_ID_HEADER))


def bind_request_id(context: RequestContext, client_value: str | None) -> None:
    """Give ``context`` the client's request id (``client_value``, if valid) or a new one, and
    make it the id of every line logged until the request ends (which resets ``bound``)."""
    context.request_id = valid_request_id(client_value) or new_request_id()
    context.bound = current_request_id.set(context.request_id)


def valid_request_id(value: str | None) -> str | None:
    """A client's ``X-Request-ID`` (a header value, decoded as latin-1) if it is 1-128
    characters of ``[A-Za-z0-9._-]``: safe to log and to echo."""
    return value if value is not None and _VALID_REQUEST_ID.fullmatch(value) else None


def user_for_log(
    sub: str | None, mode: Literal["hashed", "omit", "plain"], key: bytes = b""
) -> str | None:
    """The user as the access log shows it: a keyed hash of ``sub`` by default.

    Keyed (HMAC-SHA256 with a key derived from the session secret) so that a guessable ``sub``
    such as an e-mail address cannot be recovered from the logs by hashing candidates; the same
    user still gets the same value on every instance that shares the secret.
    """
    if sub is None or mode == "omit":
        return None
    if mode == "plain":
        return sub
    return hmac.new(key, sub.encode(), hashlib.sha256).hexdigest()[:16]


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if "request_id" not in entry:
            request_id = current_request_id.get()
            if request_id is not None:
                entry["request_id"] = request_id
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


def configure_logging(settings: LogSettings) -> None:
    """Route gateway and uvicorn logs to stderr in the configured format."""
    handler = logging.StreamHandler()
    if settings.format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    # uvicorn's access log would print full URLs with query strings (codes, states): ours is used.
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every request URL at INFO; the IdP URLs carry no secrets but are noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
