"""Configuration reload without a restart (SIGHUP under ``gateway run``).

The configuration file is read and validated again; a file that fails validation is refused
with one log line naming the field, and the running configuration stays. What a reload can
change is what the endpoints build from the settings per configuration: routes, upstreams,
audiences, scopes, limits, CSRF origins, forward-auth, the static site, log level and access
log, and the metric label sets of new routes and audiences. It cannot change what the
long-lived services were built with (listeners, the session store, the IdP client, secrets):
those differences are logged as needing a restart and the running values are kept.

The swap itself is one synchronous step in the event loop (``apply``, from ``app.py``): every
request reads its configuration before its first await, so a request in flight finishes on the
configuration it started with and the next one gets the new. Sessions and cached tokens live
in the services, which stay: a token cached for an (audience, scopes) that the reload kept is
used as before. Each instance reloads on its own signal.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from .errors import ConfigError
from .metrics import GatewayMetrics
from .settings import Settings

logger = logging.getLogger("gateway.reload")

# Settings a reload cannot change: (section, key) or (key,) for a whole section.
RESTART_ONLY: tuple[tuple[str, ...], ...] = (
    ("server",),
    ("public_url",),
    ("oidc",),
    ("session",),
    ("tokens",),
    ("upstream_pool",),
    ("metrics",),
    ("admin",),
    ("tracing",),
    ("log", "format"),
    ("forward_auth", "secret"),
)

SettingsSource = Callable[[], Settings]
Apply = Callable[[Settings], None]


def _value(settings: Settings, path: tuple[str, ...]) -> Any:
    value: Any = settings
    for name in path:
        value = getattr(value, name)
    return value


def needing_restart(running: Settings, new: Settings) -> list[str]:
    """The restart-only settings (dotted names) that differ between ``running`` and ``new``."""
    return [".".join(p) for p in RESTART_ONLY if _value(running, p) != _value(new, p)]


def keep_restart_only(running: Settings, new: Settings) -> Settings:
    """``new`` with every restart-only setting as it is in ``running``."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path in RESTART_ONLY:
        if len(path) == 1:
            top[path[0]] = getattr(running, path[0])
        else:
            nested.setdefault(path[0], {})[path[1]] = _value(running, path)
    for section, values in nested.items():
        current: BaseModel = getattr(new, section)
        top[section] = current.model_copy(update=values)
    return new.model_copy(update=top)


class Reloader:
    """Reads the configuration again and hands the live part of it to ``apply``."""

    def __init__(
        self,
        settings: Settings,
        *,
        source: SettingsSource,
        apply: Apply,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings  # the running configuration
        self._source = source
        self._apply = apply
        self._metrics = metrics
        self.generation = 0  # reloads applied (tests, logs)

    def reload(self) -> bool:
        """Reload now; True when the new configuration is live. Never raises: a refused file
        leaves the running configuration as it is."""
        try:
            new = self._source()
        except ConfigError as exc:
            self._metrics.config_reload("refused")
            # One line, naming the field(s): "routes.1.audience: ...; limits.x: ...".
            problem = "; ".join(exc.message.splitlines())
            logger.error("configuration reload refused, the running one stays: %s", problem)
            return False
        restart = needing_restart(self.settings, new)
        if restart:
            logger.warning(
                "configuration reload: %s can only change with a restart; kept as running",
                ", ".join(restart),
            )
            new = keep_restart_only(self.settings, new)
        try:
            self._apply(new)
        except Exception as exc:  # building the new table failed: keep the running one
            self._metrics.config_reload("refused")
            logger.error(
                "configuration reload failed, the running one stays: %s", type(exc).__name__
            )
            return False
        logging.getLogger().setLevel(new.log.level.upper())
        self.settings = new
        self.generation += 1
        self._metrics.config_reload("applied")
        logger.warning(
            "configuration reloaded: %d route(s), generation %d", len(new.routes), self.generation
        )
        return True

    def install_signal_handler(self) -> bool:
        """Reload on SIGHUP (the running loop's handler); False where signals cannot be
        handled (not the main thread, or a platform without SIGHUP)."""
        import asyncio
        import threading

        sighup = getattr(signal, "SIGHUP", None)
        if sighup is None or threading.current_thread() is not threading.main_thread():
            return False
        asyncio.get_running_loop().add_signal_handler(sighup, self.reload)
        return True

    def remove_signal_handler(self) -> None:
        import asyncio

        sighup = getattr(signal, "SIGHUP", None)
        if sighup is not None:
            asyncio.get_running_loop().remove_signal_handler(sighup)
