"""Events and alarms (list, one, acknowledge) and the dead-letter store.

Alarms are events with severity warning or critical; an operator acknowledges them with a note,
and the acknowledgement (who, when, why) is kept with the event.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query

from gateway.api.auth import Operator, Reader
from gateway.api.context import Ctx
from gateway.api.datetimes import epoch_ms
from gateway.api.schemas import (
    AUTH,
    TOO_MANY,
    AckIn,
    DeadLetterList,
    ErrorBody,
    EventList,
    EventOut,
)
from gateway.models import Severity
from gateway.store.queries import EventFilter

router = APIRouter(prefix="/api/v1", tags=["events"])
Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=1_000_000)]
# Event ids are 63-bit (see gateway.models.event_id): anything larger cannot name an event.
EventId = Annotated[int, Path(ge=0, le=2**63 - 1, description="The event's stable id")]


@router.get("/events", response_model=EventList, summary="Events, newest first", responses=AUTH)
async def list_events(
    ctx: Ctx,
    _: Reader,
    device_id: str | None = None,
    kind: str | None = None,
    building: str | None = None,
    type: str | None = None,
    severity: Severity | None = None,
    source: str | None = None,
    alarm: bool | None = None,
    acked: bool | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> EventList:
    flt = EventFilter(
        device_id=device_id,
        kind=kind,
        building=building,
        type=type,
        severity=severity,
        source=source,
        alarm=alarm,
        acked=acked,
        since_ms=epoch_ms(since),
        until_ms=epoch_ms(until),
        limit=limit,
        offset=offset,
    )
    return EventList(items=[EventOut.model_validate(e) for e in await ctx.reader.events(flt)])


@router.get(
    "/alarms",
    response_model=EventList,
    summary="Alarms; by default those not yet acknowledged",
    responses=AUTH,
)
async def list_alarms(
    ctx: Ctx,
    _: Reader,
    acked: bool | None = False,
    severity: Severity | None = None,
    building: str | None = None,
    device_id: str | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> EventList:
    flt = EventFilter(
        alarm=True,
        acked=acked,
        severity=severity,
        building=building,
        device_id=device_id,
        limit=limit,
        offset=offset,
    )
    return EventList(items=[EventOut.model_validate(e) for e in await ctx.reader.events(flt)])


@router.get(
    "/events/{event_id}",
    response_model=EventOut,
    summary="One event",
    responses={404: {"model": ErrorBody}, **AUTH},
)
async def get_event(ctx: Ctx, _: Reader, event_id: EventId) -> EventOut:
    event = await ctx.reader.event(event_id)
    if event is None:
        raise HTTPException(404, f"no event {event_id}")
    return EventOut.model_validate(event)


@router.post(
    "/events/{event_id}/ack",
    response_model=EventOut,
    summary="Acknowledge an alarm (operator, installer)",
    description="Idempotent: acknowledging twice keeps the first acknowledgement.",
    responses={404: {"model": ErrorBody}, **AUTH, **TOO_MANY},
)
async def acknowledge(ctx: Ctx, who: Operator, event_id: EventId, body: AckIn | None = None) -> EventOut:
    note = body.note if body is not None else ""
    event = await ctx.reader.acknowledge(event_id, who.actor, note, ctx.clock.now_ms())
    if event is None:
        raise HTTPException(404, f"no event {event_id}")
    ctx.hub.publish("ack", {"id": event_id, "acked_by": event["acked_by"], "acked_ms": event["acked_ms"]})
    return EventOut.model_validate(event)


@router.get(
    "/dead-letters",
    response_model=DeadLetterList,
    summary="Refused messages with the reason (operator, installer)",
    responses=AUTH,
)
async def dead_letters(
    ctx: Ctx,
    _: Operator,
    device_id: str | None = None,
    reason: Annotated[str | None, Query(description="Reason code, e.g. bad_json, out_of_range")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> DeadLetterList:
    items = await ctx.reader.dead_letters(device_id, reason, limit, offset)
    return DeadLetterList.model_validate({"items": items})
