"""Liveness, readiness and Prometheus metrics.

docs/contract.md section 4: "`/healthz` (alive), `/readyz` (broker connected, stores writable),
`/metrics` (Prometheus text)." Probes need no token; /readyz says which check failed to anyone
but its details (URLs, last errors) only with an operator, installer or metrics token. /metrics
needs any valid token, and is the only route a `metrics` token reads.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.auth import Principal, Scraper, optional
from gateway.api.context import Ctx
from gateway.api.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Broker connected and stores writable",
    responses={503: {"model": Ready, "description": "Not ready: see which check failed"}},
)
async def readyz(
    ctx: Ctx,
    who: Annotated[Principal | None, Depends(optional("operator", "installer", "metrics"))],
) -> JSONResponse:
    checks = ctx.readiness()
    ready = all(check["ok"] for check in checks.values())
    if who is None:
        # Addresses and errors tell a stranger what the box talks to: only ok, not why.
        checks = {name: {"ok": check["ok"]} for name, check in checks.items()}
    body = Ready(ready=ready, checks=checks)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(ctx: Ctx, _: Scraper) -> Response:
    return Response(generate_latest(ctx.instruments.registry), media_type=CONTENT_TYPE_LATEST)
