"""Builds the FastAPI application from an `ApiContext`.

Errors are JSON `{"detail": "<one clear sentence>"}`, validation errors included (FastAPI's
default lists them as objects; an installer's script wants one line).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import __version__
from gateway.api.context import ApiContext
from gateway.api.routes import devices, events, health, stream

DESCRIPTION = """
The community edge gateway's API (contract: CONTRACT.md section 4).

Reads need a bearer token of any role (`viewer`, `terminal`, `operator`, `installer`); writes
need a role that allows them. `/healthz` and `/readyz` need no token.
"""


def create_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(
        title="cgw: community edge gateway",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=[
            {"name": "health", "description": "Liveness, readiness, Prometheus metrics"},
            {"name": "devices", "description": "Devices, presence, telemetry, profiles"},
            {"name": "events", "description": "Events, alarms and acknowledgements, dead letters"},
            {"name": "stream", "description": "Live Server-Sent Events"},
        ],
    )
    app.state.ctx = ctx
    app.include_router(health.router)
    app.include_router(devices.router)
    app.include_router(events.router)
    app.include_router(stream.router)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}{more}"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    return app
