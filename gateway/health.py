"""``GET /healthz`` (the process answers) and ``GET /readyz`` (the IdP and the store answer)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import GatewayError
from .services import Services


class HealthEndpoints:
    """Liveness and readiness probes."""

    def __init__(self, services: Services) -> None:
        self._services = services

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Ready when the IdP's metadata and keys are fetched (tried afresh each time while
        they are not) and the session store answers."""
        checks: dict[str, str] = {}
        try:
            await self._services.ensure_started(fresh=True)
            checks["idp"] = "ok"
        except GatewayError as exc:
            checks["idp"] = exc.error
        try:
            await self._services.store.ping()
            checks["store"] = "ok"
        except GatewayError as exc:
            checks["store"] = exc.error
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
