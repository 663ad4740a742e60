"""Builds the FastAPI application from an `ApiContext`.

Errors are JSON `{"detail": "<one clear sentence>"}`, validation errors included (FastAPI's
default lists them as objects; an installer's script wants one line).
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import __version__, dashboard
from gateway.api import docs
from gateway.api.bodies import BodyGuard
from gateway.api.context import ApiContext
from gateway.api.headers import HostGuard, SecurityHeaders
from gateway.api.routes import (
    access,
    care,
    devices,
    evaluation,
    events,
    health,
    needs,
    open311,
    requests,
    stream,
)

DESCRIPTION = """
The community edge gateway's API (contract: docs/contract.md section 4).

Reads need a bearer token of any role (`viewer`, `terminal`, `operator`, `installer`); writes
need a role that allows them. `/healthz` and `/readyz` need no token.
"""


def create_app(
    ctx: ApiContext,
    *,
    max_body_bytes: int = 64 * 1024,
    allowed_hosts: frozenset[str] = frozenset({"*"}),
) -> FastAPI:
    app = FastAPI(
        title="cgw: community edge gateway",
        version=__version__,
        description=DESCRIPTION,
        # Served by gateway/api/docs.py from the package, never from another host; no ReDoc.
        docs_url=None,
        redoc_url=None,
        openapi_tags=[
            {"name": "health", "description": "Liveness, readiness, Prometheus metrics"},
            {"name": "devices", "description": "Devices, presence, telemetry, profiles"},
            {"name": "events", "description": "Events, alarms and acknowledgements, dead letters"},
            {"name": "stream", "description": "Live Server-Sent Events"},
            {"name": "open311", "description": "Open311 GeoReport v2 (services and service requests)"},
            {"name": "service requests", "description": "Lifecycle, audit trail, ratings, providers"},
            {"name": "needs and plans", "description": "Hotspots, needs list, proposals, votes, the plan"},
            {"name": "evaluation", "description": "Satisfaction and process figures"},
            {"name": "privacy", "description": "Reads of residents' personal data (installer)"},
        ],
    )
    app.state.ctx = ctx
    app.include_router(health.router)
    app.include_router(devices.router)
    app.include_router(events.router)
    app.include_router(stream.router)
    app.include_router(open311.router)
    app.include_router(requests.router)
    app.include_router(needs.router)
    app.include_router(evaluation.router)
    app.include_router(access.router)
    app.include_router(care.router)
    docs.mount(app)
    dashboard.mount(app)
    # The last added runs first: the host is checked, then the body read, then the routes;
    # every answer, refusals included, leaves with the security headers.
    app.add_middleware(BodyGuard, max_bytes=max_body_bytes, refuse=_error)
    app.add_middleware(HostGuard, allowed=allowed_hosts, refuse=_error)
    app.add_middleware(SecurityHeaders)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        message = f"{where}: {first.get('msg', 'invalid')}{more}"
        if request.url.path.startswith(OPEN311):
            return _open311_error(request.url.path, 400, message, None)
        return JSONResponse({"detail": message}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(request.url.path, exc.status_code, str(exc.detail), exc.headers)

    return app


OPEN311 = "/open311/"


def _error(path: str, status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """An error in the format of the part of the API that was asked."""
    if path.startswith(OPEN311):
        return _open311_error(path, status, message, headers)
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def _open311_error(path: str, status: int, message: str, headers: Mapping[str, str] | None) -> Response:
    """The GeoReport v2 error format: a list of {code, description}, in the format asked for."""
    errors = [{"code": status, "description": message}]
    fmt = "xml" if path.endswith(".xml") else "json"
    return open311.respond(fmt, "errors", errors, status, headers)
