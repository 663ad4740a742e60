"""The live stream: Server-Sent Events of alarms, events, presence changes and acknowledgements.

Event names: `alarm` (warning/critical events), `event` (info events), `presence`, `ack`, and
from the service loop `request` (each lifecycle step), `rating` and `vote`.
Clients may pass `types=alarm,presence` to receive only some; a comment ping every 15 s keeps
proxies from closing an idle stream. Each subscriber receives what its role may read
(gateway/privacy.py): `request` items redacted for viewers, and a terminal only the requests and
ratings of the tickets it filed.

Streams are bounded: at most `api.stream_max_subscribers` at once and `api.stream_max_per_token`
for one token (more are refused with 429 before they start). A stream ends when its token
expires, with a last `expired` event, as a new request with that token would be refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

import orjson
from fastapi import APIRouter, HTTPException, Query
from sse_starlette import EventSourceResponse, ServerSentEvent

from gateway import privacy
from gateway.api.access import record_reads
from gateway.api.auth import Reader
from gateway.api.context import Ctx
from gateway.stream import StreamFull, StreamItem

router = APIRouter(prefix="/api/v1", tags=["stream"])
STREAM_ENDPOINT = "GET /api/v1/stream"
STREAM_TYPES = ("alarm", "event", "presence", "ack", "request", "rating", "vote")


@router.get(
    "/stream",
    summary="Live stream (Server-Sent Events)",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def stream(
    ctx: Ctx,
    who: Reader,
    types: Annotated[str | None, Query(description="Comma-separated: " + ",".join(STREAM_TYPES))] = None,
) -> EventSourceResponse:
    wanted = set(STREAM_TYPES)
    if types:
        wanted = {t.strip() for t in types.split(",") if t.strip()}
        unknown = wanted - set(STREAM_TYPES)
        if unknown:
            raise HTTPException(422, f"unknown stream types: {', '.join(sorted(unknown))}")

    try:
        ctx.hub.room_for(who.token_id)
    except StreamFull as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": "5"}) from None

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            async with ctx.hub.subscribe(who.token_id) as queue:
                yield ServerSentEvent(comment="connected")
                while (item := await _next(queue, who.expires_ms)) is not None:
                    name, data = item
                    if name not in wanted:
                        continue
                    shown = privacy.stream_item(name, data, who.role, who.actor)
                    if shown is None:
                        continue
                    if name == "request":
                        await record_reads(ctx, who, STREAM_ENDPOINT, [str(data.get("id"))])
                    yield ServerSentEvent(data=orjson.dumps(shown).decode(), event=name)
                yield ServerSentEvent(data=orjson.dumps({"detail": EXPIRED}).decode(), event="expired")
        except StreamFull:
            return  # another stream took the last place after the check above

    return EventSourceResponse(events(), ping=15)


EXPIRED = "the token expired: ask the installer for a new one"


async def _next(queue: asyncio.Queue[StreamItem], expires_ms: int | None) -> StreamItem | None:
    """The next item, or None once the token has expired (waiting no longer than that)."""
    if expires_ms is None:
        return await queue.get()
    left_s = expires_ms / 1000 - time.time()
    if left_s <= 0:
        return None
    try:
        return await asyncio.wait_for(queue.get(), left_s)
    except TimeoutError:
        return None
