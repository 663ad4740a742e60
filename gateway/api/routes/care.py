"""Precision care (docs/care.md): grids, the care register and consent, visits, the needs list,
welfare checks, a household's view, and the equity figures.

Who reads what: `operator` and `installer` every household; `grid_worker` (the token named in a
grid's `workers`) the households of its own grids only; every read of a household's data is
recorded in the access log. The equity figures are aggregates any reader may see. Writes from
a phone in the field (visits, acknowledgements) carry their own ids and times, so a batch sent
again after a dead zone changes nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request

from gateway.api.access import record_reads
from gateway.api.auth import Principal, Reader, require
from gateway.api.context import ApiContext, Ctx
from gateway.api.datetimes import epoch_ms
from gateway.api.schemas import (
    AUTH,
    CareCheckinIn,
    CareConsentIn,
    CareGridList,
    CareGridOut,
    CareNeedsIn,
    CareVisitBatch,
    CareVisitResult,
    CareVisitResults,
    CheckAckIn,
    CheckCloseIn,
    ErrorBody,
)
from gateway.care.checks import OUTCOMES, CheckError, WelfareCheck
from gateway.care.checks import view as check_view
from gateway.care.desk import CareDesk
from gateway.care.households import PURPOSES, CareNeeds
from gateway.care.visits import Visit
from gateway.services.intake import IntakeError, household_key

router = APIRouter(prefix="/api/v1/care", tags=["precision care"])
Carer = Annotated[Principal, Depends(require("operator", "installer", "grid_worker"))]
Operator = Annotated[Principal, Depends(require("operator", "installer"))]
CheckinBy = Annotated[Principal, Depends(require("terminal", "operator", "installer", "grid_worker"))]
Part = Annotated[str, Path(min_length=1, max_length=32)]
# Every care route may answer these (a refusal's body is always ErrorBody, never FastAPI's list).
BAD: dict[int | str, dict[str, Any]] = {**AUTH, **{code: {"model": ErrorBody} for code in (404, 409, 422)}}


def _care(ctx: ApiContext) -> CareDesk:
    if ctx.care is None:
        raise HTTPException(404, "precision care is not running on this gateway")
    return ctx.care


def _scope(care: CareDesk, who: Principal) -> frozenset[str] | None:
    """The buildings `who` may see households of (None: all)."""
    if who.role != "grid_worker":
        return None
    return care.buildings_of(who.name or "")


def _household(care: CareDesk, who: Principal, building: str, unit: str) -> str:
    try:
        key = household_key(building, unit)
    except IntakeError as exc:
        raise HTTPException(422, str(exc)) from None
    scope = _scope(care, who)
    if scope is not None and building not in scope:
        raise HTTPException(403, "not_your_grid: this household is not in a grid you work in")
    return key


@router.get(
    "/grids",
    response_model=CareGridList,
    summary="The grids (网格): buildings and grid workers",
    responses=BAD,
)
async def grids(
    ctx: Ctx, _: Annotated[Principal, Depends(require("viewer", "operator", "installer", "grid_worker"))]
) -> CareGridList:
    return CareGridList(items=[CareGridOut.model_validate(g.model_dump()) for g in _care(ctx).grids()])


@router.get(
    "/households", summary="The care register (scoped to the reader's grids), with consents", responses=BAD
)
async def list_households(ctx: Ctx, who: Carer, request: Request) -> dict[str, Any]:
    care = _care(ctx)
    items = await care.households(_scope(care, who))
    await record_reads(ctx, who, request, (f"household:{h['household']}" for h in items))
    return {"items": items}


@router.get(
    "/households/{building}/{unit}",
    summary="A household's view: needs, requests, visits, "
    "welfare checks, and the services it is eligible for and does not use",
    responses=BAD,
)
async def household_view(
    ctx: Ctx, who: Carer, request: Request, building: Part, unit: Part
) -> dict[str, Any]:
    care = _care(ctx)
    key = _household(care, who, building, unit)
    view = await care.household_view(key)
    await record_reads(ctx, who, request, (f"household:{key}",))
    return view


@router.put(
    "/households/{building}/{unit}/needs",
    summary="Record a household's care needs (needs its `register` consent)",
    responses=BAD,
)
async def put_needs(ctx: Ctx, who: Carer, building: Part, unit: Part, body: CareNeedsIn) -> dict[str, Any]:
    care = _care(ctx)
    key = _household(care, who, building, unit)
    if not (await care.consents(key)).get("register"):
        raise HTTPException(
            409, "no_consent: the household has not consented to have its care needs recorded"
        )
    await care.put_needs(key, CareNeeds(**body.model_dump()), ctx.clock.now_ms(), who.actor)
    return {"household": key, "needs": body.model_dump()}


@router.post(
    "/households/{building}/{unit}/consent",
    summary="Record a consent, or its withdrawal "
    f"(purposes: {', '.join(PURPOSES)}); a withdrawal stops the processing at once",
    responses=BAD,
)
async def consent(ctx: Ctx, who: Carer, building: Part, unit: Part, body: CareConsentIn) -> dict[str, Any]:
    care = _care(ctx)
    key = _household(care, who, building, unit)
    changed = await care.set_consent(key, body.purpose, body.granted, ctx.clock.now_ms(), who.actor)
    return {"household": key, "consents": await care.consents(key), "changed": changed}


@router.post(
    "/visits",
    response_model=CareVisitResults,
    summary="Visits and questionnaires from the field, "
    "in a batch (offline-tolerant: a visit's id makes a re-sent one a duplicate)",
    responses=BAD,
)
async def post_visits(ctx: Ctx, who: Carer, body: CareVisitBatch) -> CareVisitResults:
    care = _care(ctx)
    scope = _scope(care, who)
    out = []
    for v in body.visits:
        if scope is not None and v.building not in scope:
            out.append(CareVisitResult(id=v.id, status="refused", error="not_your_grid"))
            continue
        unknown = [c for c in v.needs if c not in ctx.catalogue.services]
        if unknown:
            out.append(
                CareVisitResult(id=v.id, status="refused", error=f"unknown_service: {', '.join(unknown)}")
            )
            continue
        try:
            key = household_key(v.building, v.unit)
        except IntakeError as exc:
            out.append(CareVisitResult(id=v.id, status="refused", error=str(exc)))
            continue
        if not (await care.consents(key)).get("visits"):
            out.append(CareVisitResult(id=v.id, status="refused", error="no_consent: visits"))
            continue
        visit = Visit(
            v.id,
            key,
            v.building,
            v.kind,
            epoch_ms(v.at, default=ctx.clock.now_ms()),
            who.name or who.actor,
            v.note,
            dict(v.answers),
            tuple(v.needs),
        )
        status = "accepted" if await care.record_visit(visit) else "duplicate"
        out.append(CareVisitResult(id=v.id, status=status))
    return CareVisitResults(items=out)


@router.get(
    "/needs",
    summary="Open needs from visits, weighted by the household's vulnerability (weights in docs/care.md)",
    responses=BAD,
)
async def needs_list(ctx: Ctx, who: Carer, request: Request) -> dict[str, Any]:
    care = _care(ctx)
    items = await care.needs_list(_scope(care, who))
    await record_reads(ctx, who, request, {f"household:{n['household']}" for n in items})
    return {"items": items}


@router.get("/checks", summary="Welfare checks (a grid worker: its grids' only)", responses=BAD)
async def list_checks(ctx: Ctx, who: Carer, request: Request, open_only: bool = False) -> dict[str, Any]:
    care = _care(ctx)
    scope = _scope(care, who)
    items = [c for c in await care.checks(open_only=open_only) if scope is None or c.building in scope]
    await record_reads(ctx, who, request, {f"household:{c.household}" for c in items})
    return {"items": [check_view(c) for c in items]}


async def _scoped_check(care: CareDesk, who: Principal, check_id: str) -> WelfareCheck:
    check = await care.check(check_id)
    scope = _scope(care, who)
    if check is None or (scope is not None and check.building not in scope):
        raise HTTPException(404, f"no welfare check {check_id!r} you may see")
    return check


@router.post("/checks/{check_id}/ack", summary="Acknowledge a welfare check (on the way)", responses=BAD)
async def ack(
    ctx: Ctx, who: Carer, check_id: Annotated[str, Path(max_length=64)], body: CheckAckIn
) -> dict[str, Any]:
    care = _care(ctx)
    await _scoped_check(care, who, check_id)
    at = epoch_ms(body.at, default=ctx.clock.now_ms())
    return await _answer(care.acknowledge(check_id, who.name or who.actor, at))


@router.post(
    "/checks/{check_id}/close",
    summary=f"Close a welfare check with the visit's outcome ({', '.join(OUTCOMES)})",
    responses=BAD,
)
async def close(
    ctx: Ctx, who: Carer, check_id: Annotated[str, Path(max_length=64)], body: CheckCloseIn
) -> dict[str, Any]:
    care = _care(ctx)
    await _scoped_check(care, who, check_id)
    at = epoch_ms(body.at, default=ctx.clock.now_ms())
    return await _answer(care.close_check(check_id, body.outcome, who.name or who.actor, at, body.note))


async def _answer(step: Awaitable[tuple[WelfareCheck, bool]]) -> dict[str, Any]:
    """A step on a check as the phone that sent it hears it: the check, and whether this was the
    first time (a re-sent step is a duplicate); a step the check's state refuses is 409."""
    try:
        check, first = await step
    except CheckError as exc:
        raise HTTPException(409, str(exc)) from None
    return {**check_view(check), "status": "accepted" if first else "duplicate"}


@router.post(
    "/checkins", summary="A household says it is well (a terminal or a carer's phone)", responses=BAD
)
async def checkin(ctx: Ctx, who: CheckinBy, body: CareCheckinIn) -> dict[str, Any]:
    care = _care(ctx)
    key = _household(care, who, body.building, body.unit)
    analysed = care.checkin(key, epoch_ms(body.at, default=ctx.clock.now_ms()))
    return {"household": key, "status": "accepted" if analysed else "not_analysed"}


@router.get(
    "/equity",
    summary="Service and welfare-check figures by household group (aggregates only)",
    responses=BAD,
)
async def equity(
    ctx: Ctx, _: Reader, start: datetime | None = None, end: datetime | None = None
) -> dict[str, Any]:
    end_ms = epoch_ms(end, default=ctx.clock.now_ms())
    start_ms = epoch_ms(start, default=end_ms - 30 * 86_400_000)
    if start_ms >= end_ms:
        raise HTTPException(422, "start must be before end")
    return {"start_ms": start_ms, "end_ms": end_ms, "groups": await _care(ctx).equity(start_ms, end_ms)}
