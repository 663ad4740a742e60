"""The live stream: Server-Sent Events of alarms, events, presence changes and acknowledgements.

Event names: `alarm` (warning/critical events), `event` (info events), `presence`, `ack`, and
from the service loop `request` (each lifecycle step), `rating` and `vote`.
Clients may pass `types=alarm,presence` to receive only some; a comment ping every 15 s keeps
proxies from closing an idle stream. Each subscriber receives what its role may read
(gateway/privacy.py): `request` items redacted for viewers, and a terminal only the requests and
ratings of the tickets it filed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query
from sse_starlette import EventSourceResponse, ServerSentEvent

from gateway import privacy
from gateway.api.auth import Reader
from gateway.api.context import ApiContext, context

router = APIRouter(prefix="/api/v1", tags=["stream"])
STREAM_TYPES = ("alarm", "event", "presence", "ack", "request", "rating", "vote")


@router.get(
    "/stream",
    summary="Live stream (Server-Sent Events)",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def stream(
    ctx: Annotated[ApiContext, Depends(context)],
    who: Reader,
    types: Annotated[str | None, Query(description="Comma-separated: " + ",".join(STREAM_TYPES))] = None,
) -> EventSourceResponse:
    wanted = set(STREAM_TYPES)
    if types:
        wanted = {t.strip() for t in types.split(",") if t.strip()}
        unknown = wanted - set(STREAM_TYPES)
        if unknown:
            raise HTTPException(422, f"unknown stream types: {', '.join(sorted(unknown))}")

    async def events() -> AsyncIterator[ServerSentEvent]:
        async with ctx.hub.subscribe() as queue:
            yield ServerSentEvent(comment="connected")
            while True:
                name, data = await queue.get()
                if name not in wanted:
                    continue
                shown = privacy.stream_item(name, data, who.role, who.actor)
                if shown is not None:
                    yield ServerSentEvent(data=orjson.dumps(shown).decode(), event=name)

    return EventSourceResponse(events(), ping=15)
