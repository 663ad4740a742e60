"""What is done to requests from outside the pipeline: operators' and residents' calls over the
API, the district's commands, welfare checks (gateway/care/).

Each action is one call on the services' `SqliteThread` (the same one the desk writes with, so
an action never races a terminal's message), then its output (the live stream's item, the
service records the relay hands on) is delivered and durable before the caller answers. A rating
or vote refused over the API is counted and told like a terminal's, and dead-lettered with the
next batch handed on (gateway/services/relay.py).

`file(new, actor)` is the seam for filing a request from elsewhere in the gateway.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from gateway.services import proposals, ratings, requests
from gateway.services.context import ServiceContext
from gateway.services.desk import DeskOutput
from gateway.services.intake import NewRating, NewRequest, NewVote
from gateway.services.lifecycle import TransitionError
from gateway.services.refusals import DeskError
from gateway.services.relay import RecordRelay
from gateway.services.requests import Move

Deliver = Callable[[DeskOutput], Awaitable[None]]


class Actions:
    def __init__(self, services: ServiceContext, relay: RecordRelay, deliver: Deliver) -> None:
        self._services = services
        self._db = services.db
        self._relay = relay
        self._deliver = deliver

    async def file(self, new: NewRequest, actor: str) -> tuple[dict[str, Any], bool]:
        """File a request; (request, created): False when it was a re-send (a known request_key)."""
        view, step = await self._db.call(requests.create, new, actor, self._services.community)
        self._services.instruments.service_requests.labels(
            source=new.source, outcome="accepted" if step else "duplicate"
        ).inc()
        if step is not None:
            out = DeskOutput()
            out.step(step)
            await self._deliver(out)
        return view, step is not None

    async def transition(self, move: Move) -> dict[str, Any]:
        """Move a request along its lifecycle; the request as it now is."""
        step = await self._db.call(
            requests.transition, self._services.catalogue, move, self._services.clock.now_ms()
        )
        out = DeskOutput()
        out.step(step)
        await self._deliver(out)
        return step.request

    async def rate(self, rating: NewRating) -> tuple[dict[str, Any], bool]:
        """A resident's rating; (request, first): False when the request was rated already."""
        try:
            view, first, step = await self._db.call(
                ratings.rate, self._services.catalogue, rating, self._services.clock.now_ms()
            )
        except (DeskError, TransitionError) as exc:
            body = {"service_request_id": rating.service_request_id, "score": rating.score}
            self._refused("rating", rating.filer, body, exc)
            raise
        if first:
            self._services.instruments.ratings.labels(score=str(rating.score)).inc()
            out = DeskOutput()
            out.rating(view, rating, step)
            await self._deliver(out)
        return view, first

    async def vote(self, vote: NewVote) -> tuple[str, dict[str, Any]]:
        """A household's vote: "accepted", or "duplicate" for a re-sent one; (status, proposal)."""
        try:
            status, proposal = await self._db.call(
                proposals.vote, self._services.households, vote, self._services.clock.now_ms()
            )
        except DeskError as exc:
            # The household is left out of the dead letter, as from a terminal.
            self._refused("vote", vote.by, {"proposal_id": vote.proposal_id}, exc)
            raise
        if status == "accepted":
            out = DeskOutput()
            out.vote(proposal)
            await self._deliver(out)
        return status, proposal

    def _refused(self, channel: str, who: str, body: dict[str, Any], exc: Exception) -> None:
        """Counted and told at once, dead-lettered with the next batch handed on (the caller
        answers with the HTTP error meanwhile: a refusal costs the client no wait for a commit)."""
        letter = self._services.refusals.letter(
            self._services.clock.now_ms(),
            f"api/{channel}",
            who[:128],
            exc,
            orjson.dumps(body),
            channel,
            " over the API",
        )
        self._relay.hold(letter)
