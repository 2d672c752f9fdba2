"""Logging setup: JSON or text lines on the ``gateway.*`` loggers; secrets never formatted."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from .settings import LogSettings

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


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
