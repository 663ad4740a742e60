"""Needs and plans: hotspots, the building × group heat map, the ranked needs list, proposals,
votes (one per household), and the plan exported for the street office (JSON or CSV).
"""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import JSONResponse, Response

from gateway.api.auth import Operator, Reader, Terminal
from gateway.api.context import Ctx
from gateway.api.datetimes import epoch_ms
from gateway.api.routes.requests import REFUSED, refused
from gateway.api.schemas import (
    AUTH,
    TOO_MANY,
    CloseIn,
    ErrorBody,
    Heatmap,
    Hotspot,
    Hotspots,
    Need,
    NeedsList,
    Proposal,
    ProposalIn,
    ProposalList,
    VoteIn,
    VoteResult,
)
from gateway.durations import parse_duration
from gateway.services import needs, requests
from gateway.services import proposals as proposal_rows
from gateway.services.intake import IntakeError, NewVote, household_key, household_secret
from gateway.services.refusals import DeskError
from gateway.text import csv_cell

router = APIRouter(prefix="/api/v1", tags=["needs and plans"])
BAD: dict[int | str, dict[str, Any]] = {**AUTH, 422: {"model": ErrorBody}}
DurationText = Annotated[str, Query(max_length=32, description='e.g. "24h", "7d", "90m"')]
ProposalId = Annotated[str, Path(max_length=64)]


def duration_ms(text: str, name: str) -> int:
    value = parse_duration(text)
    if not isinstance(value, timedelta) or value.total_seconds() < 60 or value.days > 3660:
        raise HTTPException(422, f"{name} must be a duration between 1m and 3660d, like 24h or 14d")
    return int(value.total_seconds() * 1000)


@router.get(
    "/needs/hotspots",
    response_model=Hotspots,
    summary="Hotspots: cells (service group × building) with improbably many needs in a window",
    responses=BAD,
)
async def hotspots(
    ctx: Ctx,
    _: Reader,
    end: datetime | None = None,
    window: DurationText = "24h",
    baseline: DurationText = "14d",
    alpha: Annotated[float, Query(gt=0, le=0.5)] = 0.001,
    min_count: Annotated[int, Query(ge=1, le=10_000)] = 3,
) -> Hotspots:
    window_end = epoch_ms(end, default=ctx.clock.now_ms())
    window_start = window_end - duration_ms(window, "window")
    baseline_start = window_start - duration_ms(baseline, "baseline")
    items = await ctx.services.call(
        requests.hotspots, ctx.catalogue, window_start, window_end, baseline_start, alpha, min_count
    )
    return Hotspots(
        window_start_ms=window_start,
        window_end_ms=window_end,
        baseline_start_ms=baseline_start,
        method=(
            "Poisson upper tail of each cell's count against its own baseline rate "
            "(baseline count + 0.5, scaled to the window), Bonferroni-corrected over cells"
        ),
        items=[Hotspot.model_validate(h) for h in items],
    )


@router.get(
    "/needs/heatmap",
    response_model=Heatmap,
    summary="Need signals per building and service group in a period",
    responses=BAD,
)
async def heatmap(ctx: Ctx, _: Reader, start: datetime | None = None, end: datetime | None = None) -> Heatmap:
    end_ms = epoch_ms(end, default=ctx.clock.now_ms())
    start_ms = epoch_ms(start, default=end_ms - needs.RECENT_MS)
    if start_ms >= end_ms:
        raise HTTPException(422, "start must be before end")
    signals = await ctx.services.call(requests.signals, start_ms, end_ms)
    return Heatmap(start_ms=start_ms, end_ms=end_ms, buildings=needs.heatmap(signals, start_ms, end_ms))


@router.get(
    "/needs",
    response_model=NeedsList,
    summary="The ranked needs list: open requests merged by service and building",
    responses=BAD,
)
async def list_needs(ctx: Ctx, _: Reader, recent: DurationText = "7d") -> NeedsList:
    items = await ctx.services.call(
        requests.needs_list, ctx.catalogue, ctx.clock.now_ms(), duration_ms(recent, "recent")
    )
    return NeedsList(items=[Need.model_validate(n) for n in items])


@router.get("/proposals", response_model=ProposalList, summary="Proposals and their votes", responses=AUTH)
async def proposals(ctx: Ctx, _: Reader) -> ProposalList:
    return ProposalList(
        items=[Proposal.model_validate(p) for p in await ctx.services.call(proposal_rows.listing)]
    )


@router.post(
    "/proposals",
    response_model=Proposal,
    status_code=201,
    summary="Propose a plan item drawn from the needs list, for residents to vote on",
    responses={**BAD, **TOO_MANY},
)
async def create_proposal(ctx: Ctx, who: Operator, body: ProposalIn) -> Proposal:
    created = await ctx.services.call(
        proposal_rows.create,
        body.title,
        body.description,
        body.need_ids,
        epoch_ms(body.closes),
        who.actor,
        ctx.clock.now_ms(),
    )
    return Proposal.model_validate(created)


@router.get(
    "/proposals/{proposal_id}",
    response_model=Proposal,
    summary="One proposal with its results",
    responses={**AUTH, 404: {"model": ErrorBody}},
)
async def get_proposal(ctx: Ctx, _: Reader, proposal_id: ProposalId) -> Proposal:
    found = await ctx.services.call(proposal_rows.get, proposal_id)
    if found is None:
        raise HTTPException(404, f"no proposal {proposal_id!r}")
    return Proposal.model_validate(found)


@router.post(
    "/proposals/{proposal_id}/votes",
    response_model=VoteResult,
    summary="A household's vote, proved by its PIN or card against the household register "
    "(one per household per proposal; a re-sent vote is a duplicate)",
    responses=REFUSED,
)
async def vote(ctx: Ctx, who: Terminal, proposal_id: ProposalId, body: VoteIn) -> VoteResult:
    try:
        household = household_key(body.building, body.unit)
        key = f"api:{who.token_id}|{body.vote_id}" if body.vote_id else None
        secret = household_secret(body.pin, body.card)
        status, proposal = await ctx.actions.vote(
            NewVote(proposal_id, household, body.choice, ctx.clock.now_ms(), None, key, secret, who.actor)
        )
    except IntakeError as exc:
        raise HTTPException(422, str(exc)) from None
    except DeskError as exc:
        raise refused(exc) from None
    return VoteResult.model_validate({"status": status, "proposal": proposal})


@router.post(
    "/proposals/{proposal_id}/close",
    response_model=Proposal,
    summary="Close voting (and optionally file the proposal in the plan)",
    responses=REFUSED,
)
async def close_proposal(ctx: Ctx, _: Operator, proposal_id: ProposalId, body: CloseIn) -> Proposal:
    try:
        return Proposal.model_validate(
            await ctx.services.call(proposal_rows.close, proposal_id, ctx.clock.now_ms(), body.file)
        )
    except DeskError as exc:
        raise refused(exc) from None


PLAN_COLUMNS = (
    "proposal_id",
    "title",
    "result",
    "yes",
    "no",
    "abstain",
    "households_voted",
    "approval",
    "needs",
    "households_affected",
    "filed_at",
)


@router.get(
    "/plan.{fmt}",
    summary="The plan for the street office: proposals, their votes and the needs they answer",
    responses={
        **AUTH,
        200: {"content": {"application/json": {}, "text/csv": {}}, "description": "The plan"},
    },
)
async def plan(
    ctx: Ctx, _: Reader, fmt: Annotated[Literal["json", "csv"], Path()], filed_only: bool = False
) -> Response:
    needs_now = await ctx.services.call(
        requests.needs_list, ctx.catalogue, ctx.clock.now_ms(), needs.RECENT_MS
    )
    listed = {n["need_id"]: n for n in needs_now}
    rows = []
    for p in await ctx.services.call(proposal_rows.listing):
        if filed_only and p["filed_ms"] is None:
            continue
        rows.append(
            {
                "proposal_id": p["id"],
                "title": p["title"],
                "result": p["result"],
                "yes": p["votes"]["yes"],
                "no": p["votes"]["no"],
                "abstain": p["votes"]["abstain"],
                "households_voted": p["households_voted"],
                "approval": p["approval"],
                "needs": p["needs"],
                "households_affected": sum(listed[n]["households"] for n in p["needs"] if n in listed),
                "filed_at": datetime.fromtimestamp(p["filed_ms"] / 1000).astimezone().isoformat()
                if p["filed_ms"]
                else None,
            }
        )
    if fmt == "json":
        return JSONResponse({"community": ctx.community, "proposals": rows, "needs": list(listed.values())})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PLAN_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: csv_cell(v) for k, v in {**row, "needs": ";".join(row["needs"])}.items()})
    headers = {"Content-Disposition": f'attachment; filename="plan-{ctx.community}.csv"'}
    # A byte-order mark so spreadsheet programs open the Chinese text as UTF-8.
    return Response("\ufeff" + buffer.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)
