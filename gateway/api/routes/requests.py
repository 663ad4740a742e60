"""Service requests for operators: list, one with its audit trail, lifecycle transitions, ratings;
the catalogue, providers with their workloads, and third-party assessments.

What each role reads of a request is gateway/privacy.py's: operators and installers all of it,
viewers the redacted view, a terminal the status of the tickets it filed (others are 404 to it).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request

from gateway import privacy
from gateway.api.access import record_reads
from gateway.api.auth import Operator, Principal, Reader, Terminal
from gateway.api.context import Ctx
from gateway.api.datetimes import epoch_ms
from gateway.api.schemas import (
    AUTH,
    TOO_MANY,
    AssessmentIn,
    AssessmentOut,
    ErrorBody,
    ProviderOut,
    RatingIn,
    RatingResult,
    RequestDetail,
    RequestList,
    RequestOut,
    TransitionIn,
)
from gateway.services import ratings, requests
from gateway.services.intake import NewRating
from gateway.services.lifecycle import State, TransitionError
from gateway.services.refusals import DeskError
from gateway.services.requests import Move

router = APIRouter(prefix="/api/v1", tags=["service requests"])
REFUSED: dict[int | str, dict[str, Any]] = {  # the writes' refusals
    **AUTH,
    **TOO_MANY,
    404: {"model": ErrorBody},
    409: {"model": ErrorBody},
    422: {"model": ErrorBody},
}
Ticket = Annotated[str, Path(max_length=128, description="The service request id (ticket)")]


def refused(exc: Exception) -> HTTPException:
    if isinstance(exc, DeskError):
        return HTTPException(exc.status, str(exc))
    return HTTPException(409, str(exc))


@router.get("/requests", response_model=RequestList, summary="Service requests, newest first", responses=AUTH)
async def list_requests(
    ctx: Ctx,
    who: Reader,
    request: Request,
    state: Annotated[list[State] | None, Query()] = None,
    service_code: Annotated[str | None, Query(max_length=128)] = None,
    provider_id: Annotated[str | None, Query(max_length=64)] = None,
    building: Annotated[str | None, Query(max_length=32)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> RequestList:
    items = await ctx.services.call(
        requests.listing,
        states=list(state) if state else None,
        codes=[service_code] if service_code else None,
        provider_id=provider_id,
        building=building,
        filed_by=who.actor if who.role == "terminal" else None,
        start_ms=epoch_ms(since),
        end_ms=epoch_ms(until),
        limit=limit,
        offset=offset,
    )
    await record_reads(ctx, who, request, (r["id"] for r in items))
    return RequestList(items=[request_out(who, r) for r in items])


def request_out(who: Principal, view: dict[str, Any]) -> RequestOut:
    return RequestOut.model_validate(privacy.request_for(who.role, view))


def visible(who: Principal, view: dict[str, Any] | None) -> bool:
    """Whether `who` may know the request exists: a terminal only knows the tickets it filed."""
    return view is not None and (who.role != "terminal" or view.get("filed_by") == who.actor)


@router.get(
    "/requests/{ticket}",
    response_model=RequestDetail,
    summary="One request with its audit trail (who, when, why) and rating",
    responses={**AUTH, 404: {"model": ErrorBody}},
)
async def get_request(ctx: Ctx, who: Reader, request: Request, ticket: Ticket) -> RequestDetail:
    found = await ctx.services.call(requests.get, ticket)
    if found is None or not visible(who, found):
        raise HTTPException(404, f"no service request {ticket!r}")
    history = await ctx.services.call(requests.history, ticket)
    rating = await ctx.services.call(ratings.rating_of, ticket)
    if not privacy.reads_personal(who.role):
        history = privacy.redact_steps(history)
        rating = privacy.redact_rating(rating) if rating is not None else None
    view = privacy.request_for(who.role, found)
    await record_reads(ctx, who, request, [ticket])
    return RequestDetail.model_validate({**view, "history": history, "rating": rating})


@router.post(
    "/requests/{ticket}/transitions",
    response_model=RequestOut,
    summary="Move a request along its lifecycle (refused with the allowed steps if illegal)",
    responses=REFUSED,
)
async def transition(
    ctx: Ctx, who: Operator, request: Request, ticket: Ticket, body: TransitionIn
) -> RequestOut:
    try:
        view = await ctx.actions.transition(
            Move(ticket, body.to, who.actor, body.note, body.provider_id, body.merged_into, epoch_ms(body.ts))
        )
    except (DeskError, TransitionError) as exc:
        raise refused(exc) from None
    await record_reads(ctx, who, request, [ticket])
    return request_out(who, view)


@router.post(
    "/requests/{ticket}/rating",
    response_model=RatingResult,
    summary="A resident's rating of a completed service (one per request): by the token that filed it, "
    "or with its rating code",
    responses=REFUSED,
)
async def rate(ctx: Ctx, who: Terminal, request: Request, ticket: Ticket, body: RatingIn) -> RatingResult:
    when = epoch_ms(body.ts, default=ctx.clock.now_ms())
    try:
        view, first = await ctx.actions.rate(
            NewRating(ticket, body.score, body.comment, when, who.actor, who.actor, body.rating_code)
        )
    except (DeskError, TransitionError) as exc:
        raise refused(exc) from None
    await record_reads(ctx, who, request, [ticket])
    return RatingResult(status="accepted" if first else "duplicate", request=request_out(who, view))


@router.post(
    "/assessments",
    response_model=AssessmentOut,
    status_code=201,
    summary="A third-party assessment of a provider (and optionally one service or request)",
    responses=REFUSED,
)
async def assess(ctx: Ctx, _: Operator, body: AssessmentIn) -> AssessmentOut:
    try:
        saved = await ctx.services.call(
            ratings.assess,
            ctx.catalogue,
            ts_ms=epoch_ms(body.ts, default=ctx.clock.now_ms()),
            assessor=body.assessor,
            provider_id=body.provider_id,
            score=body.score,
            comment=body.comment,
            service_code=body.service_code,
            ticket=body.service_request_id,
        )
    except DeskError as exc:
        raise refused(exc) from None
    return AssessmentOut.model_validate(saved)


@router.get("/catalogue", summary="The service catalogue (services, groups, providers)", responses=AUTH)
async def catalogue(ctx: Ctx, _: Reader) -> dict[str, Any]:
    cat = ctx.catalogue
    return {
        "groups": {code: group.model_dump() for code, group in cat.groups.items()},
        "providers": [p.model_dump() for p in cat.providers.values()],
        "services": [cat.describe_service(s) for s in cat.services.values()],
    }


@router.get(
    "/providers",
    response_model=list[ProviderOut],
    summary="Providers with their current workloads",
    responses=AUTH,
)
async def providers(ctx: Ctx, _: Reader) -> list[ProviderOut]:
    cat = ctx.catalogue
    loads = await ctx.services.call(requests.workloads, ctx.clock.now_ms())
    return [
        ProviderOut(
            **p.model_dump(),
            services=[s.service_code for s in cat.services.values() if p.id in s.providers],
            workload=loads.get(p.id, {"active": 0, "overdue": 0}),
        )
        for p in cat.providers.values()
    ]
