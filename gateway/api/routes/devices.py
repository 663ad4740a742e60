"""Devices: the list with presence and last values, one device, its telemetry over a range.

Presence and last values come from the live registry; history comes from the local store,
so all of it works with the uplink down.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request

from gateway import privacy
from gateway.api.access import record_device_reads
from gateway.api.auth import Principal, Reader
from gateway.api.context import ApiContext, Ctx
from gateway.api.datetimes import epoch_ms
from gateway.api.schemas import (
    AUTH,
    DeviceList,
    DeviceOut,
    ErrorBody,
    ProfileOut,
    Summary,
    Telemetry,
)
from gateway.durations import Duration
from gateway.store.queries import EventFilter

router = APIRouter(prefix="/api/v1", tags=["devices"])
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody}}

# Without a step, ranges up to this long return raw points; longer ones are bucketed.
RAW_RANGE = timedelta(hours=2)
TARGET_POINTS = 500


def _shown(who: Principal, device: Any) -> dict[str, Any]:
    # A device's unit names the home it sits in: personal data (gateway/privacy.py).
    return privacy.device_for(who.role, device.to_dict())


def _device_out(ctx: ApiContext, shown: dict[str, Any]) -> DeviceOut:
    return DeviceOut(**shown, active_alarms=ctx.alarms_active(str(shown["device_id"])))


@router.get(
    "/devices", response_model=DeviceList, summary="Devices with presence and last values", responses=AUTH
)
async def list_devices(
    request: Request,
    ctx: Ctx,
    who: Reader,
    kind: str | None = None,
    building: str | None = None,
    online: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> DeviceList:
    devices = sorted(ctx.registry.all(), key=lambda d: d.device_id)
    selected = [
        d
        for d in devices
        if (kind is None or d.kind == kind)
        and (building is None or d.building == building)
        and (online is None or d.online == online)
    ]
    shown = [_shown(who, d) for d in selected[offset : offset + limit]]
    await record_device_reads(ctx, who, request, shown)
    return DeviceList(
        total=len(selected),
        online=sum(1 for d in selected if d.online),
        items=[_device_out(ctx, s) for s in shown],
    )


@router.get(
    "/devices/{device_id}", response_model=DeviceOut, summary="One device", responses={**NOT_FOUND, **AUTH}
)
async def get_device(request: Request, ctx: Ctx, who: Reader, device_id: str) -> DeviceOut:
    device = ctx.registry.get(device_id)
    if device is None:
        raise HTTPException(404, f"no device {device_id!r}")
    shown = _shown(who, device)
    await record_device_reads(ctx, who, request, [shown])
    return _device_out(ctx, shown)


@router.get(
    "/devices/{device_id}/telemetry",
    response_model=Telemetry,
    summary="A device's telemetry over a time range, raw or downsampled",
    description=(
        "`start`/`end` are ISO 8601 date-times (default: the last hour). With `step` (e.g. `60`, `5m`, "
        "`1h` or ISO 8601 `PT5M`) points are averaged per bucket with min, max and count; "
        f"without it, ranges up to {RAW_RANGE} return raw points and longer ones get a step that "
        f"gives about {TARGET_POINTS} points. Ranges older than raw retention read minute roll-ups."
    ),
    responses={**NOT_FOUND, **AUTH, 422: {"model": ErrorBody}},
)
async def get_telemetry(
    ctx: Ctx,
    _: Reader,
    device_id: str,
    metric: Annotated[list[str] | None, Query(description="Metric names; default all")] = None,
    start: datetime | None = None,
    end: datetime | None = None,
    step: Annotated[Duration | None, Query(description="Bucket width: 60, 60s, 5m, 1h or PT5M")] = None,
) -> Telemetry:
    if ctx.registry.get(device_id) is None:
        raise HTTPException(404, f"no device {device_id!r}")
    now_ms = ctx.clock.now_ms()
    end_ms = epoch_ms(end, default=now_ms + 1)
    start_ms = epoch_ms(start, default=end_ms - 3_600_000)
    if start_ms >= end_ms:
        raise HTTPException(422, "start must be before end")
    step_ms: int | None = None
    if step is not None:
        step_ms = int(step.total_seconds() * 1000)
        if step_ms < 1000:
            raise HTTPException(422, "step must be at least 1 second")
        if (end_ms - start_ms) // step_ms > 10_000:
            raise HTTPException(422, "step too small for this range: at most 10000 buckets")
    elif end_ms - start_ms > RAW_RANGE.total_seconds() * 1000:
        step_ms = max(1000, (end_ms - start_ms) // TARGET_POINTS)
    data = await ctx.reader.telemetry(device_id, metric, start_ms, end_ms, step_ms, now_ms)
    return Telemetry.model_validate(data)


@router.get(
    "/summary", response_model=Summary, summary="Presence by kind and building, open alarms", responses=AUTH
)
async def summary(ctx: Ctx, _: Reader) -> Summary:
    by_kind: dict[str, Counter[str]] = {}
    by_building: dict[str, Counter[str]] = {}
    devices = ctx.registry.all()
    for d in devices:
        state = "online" if d.online else "offline"
        by_kind.setdefault(d.kind, Counter())[state] += 1
        by_building.setdefault(d.building or "-", Counter())[state] += 1
    open_alarms = await ctx.reader.events(EventFilter(alarm=True, acked=False, limit=10_000))
    return Summary(
        community=ctx.community,
        devices=len(devices),
        online=sum(1 for d in devices if d.online),
        by_kind={k: {"online": c["online"], "offline": c["offline"]} for k, c in by_kind.items()},
        by_building={b: {"online": c["online"], "offline": c["offline"]} for b, c in by_building.items()},
        open_alarms=len(open_alarms),
        stream_subscribers=ctx.hub.subscribers,
    )


@router.get("/profiles", response_model=list[ProfileOut], summary="Device profiles", responses=AUTH)
async def profiles(ctx: Ctx, _: Reader) -> list[ProfileOut]:
    return [ProfileOut.model_validate(profile.describe()) for profile in ctx.profiles]
