"""The service desk: the pipeline's consumer of terminal messages and device events.

Each batch's terminal messages (requests, ratings, votes) and device events (those the catalogue
maps to a service open a request or count as a need signal) are handled in one call on the
services' `SqliteThread`, so they never race an operator's action; what that produces for the
outside (acks to terminals, live-stream items, dead letters) comes back as a `DeskOutput` for
the router to deliver once the batch is durable. Operators' and the district's actions go
through `gateway/services/actions.py`, the deadline and retention loop is
`gateway/services/deadlines.py`, and the API reads the aggregates (`requests`, `ratings`,
`proposals`, `access_log`) on the same thread.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from gateway.models import DeadLetter, DeviceEvent, TerminalMessage, event_id
from gateway.services import proposals, ratings, requests
from gateway.services.context import ServiceContext
from gateway.services.intake import (
    IntakeError,
    NewRating,
    NewRequest,
    terminal_actor,
    terminal_rating,
    terminal_request,
    terminal_vote,
)
from gateway.services.lifecycle import TransitionError
from gateway.services.refusals import DeskError, reason
from gateway.services.requests import Step
from gateway.topics import device_topic

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DeskOutput:
    """What the services ask the rest of the gateway to deliver, in order. Service records are
    not in it: they are kept in the services' file and handed on by the relay
    (gateway/services/relay.py)."""

    acks: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (topic, payload)
    stream: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    events: list[DeviceEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.acks or self.stream or self.events or self.dead_letters)

    def step(self, step: Step) -> None:
        """A lifecycle step for the live stream."""
        view = {"from": step.from_state, "to": step.to_state, "ts_ms": step.ts_ms, "actor": step.actor}
        self.stream.append(("request", {**step.request, "step": view}))

    def rating(self, request: dict[str, Any], rating: NewRating, step: Step | None) -> None:
        """A first rating for the live stream (and the step to evaluated it made, if any)."""
        self.stream.append(
            (
                "rating",
                {
                    "service_request_id": request["id"],
                    "score": rating.score,
                    "ts_ms": rating.ts_ms,
                    "filed_by": request["filed_by"],  # scopes a terminal's stream (gateway/privacy.py)
                },
            )
        )
        if step is not None:
            self.step(step)

    def vote(self, proposal: dict[str, Any]) -> None:
        """An accepted vote for the live stream: the proposal's new counts."""
        self.stream.append(("vote", {"proposal_id": proposal["id"], "votes": proposal["votes"]}))


class ServiceDesk:
    def __init__(self, services: ServiceContext) -> None:
        self._db = services.db
        self._catalogue = services.catalogue
        self._community = services.community
        self._instruments = services.instruments
        self._refusals = services.refusals
        self._households = services.households
        self._clock = services.clock

    async def handle(self, messages: list[TerminalMessage], events: list[DeviceEvent]) -> DeskOutput:
        """Terminal messages and device events of one pipeline batch; durable before it returns.

        A store that cannot write (a full disk) is retried until it can: the pipeline waits,
        nothing of the batch is acknowledged, and the broker holds what follows. A retry sees
        what an earlier attempt committed as a repeat (requests are keyed by the terminal's id).
        """
        delay = 0.5
        while True:
            out = DeskOutput()
            if not (messages or events):
                return out
            try:
                await self._db.call(self._handle, messages, events, out)
            except sqlite3.OperationalError as exc:
                log.error("the service desk cannot write its store (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            return out

    def _handle(
        self,
        conn: sqlite3.Connection,
        messages: list[TerminalMessage],
        events: list[DeviceEvent],
        out: DeskOutput,
    ) -> None:
        for message in messages:
            handler = {"request": self._request, "rating": self._rating, "vote": self._vote}[message.channel]
            try:
                if message.refused is not None:
                    raise IntakeError(message.refused)
                handler(conn, message, out)
            except (IntakeError, DeskError, TransitionError) as exc:
                # Answered to the terminal, dead-lettered and counted: a resident's outcome (a second
                # vote, a missing field), not the operator's problem, so not a WARNING.
                out.dead_letters.append(
                    self._refusals.letter(
                        message.received_ms,
                        message.topic,
                        message.device_id,
                        exc,
                        message.payload,
                        message.channel,
                    )
                )
                out.acks.append((device_topic(message.device_id, "ack"), _refusal(message, reason(exc))))
        for event in events:
            self._sensor_event(conn, event, out)

    def _request(self, conn: sqlite3.Connection, message: TerminalMessage, out: DeskOutput) -> None:
        new = terminal_request(
            self._catalogue, message.device_id, message.obj, message.ts_ms, message.building
        )
        view, step = requests.create(conn, new, terminal_actor(message.device_id), self._community)
        status = "accepted" if step is not None else "duplicate"
        self._instruments.service_requests.labels(source="terminal", outcome=status).inc()
        out.acks.append(
            (
                device_topic(message.device_id, "ack"),
                {
                    "request_id": message.obj["request_id"],
                    "status": status,
                    "service_request_id": view["id"],
                    # For the resident's receipt: rates the request from any terminal.
                    "rating_code": ratings.rating_code(conn, view["id"]),
                },
            )
        )
        if step is not None:
            out.step(step)

    def _rating(self, conn: sqlite3.Connection, message: TerminalMessage, out: DeskOutput) -> None:
        rating = terminal_rating(message.device_id, message.obj, message.ts_ms)
        view, first, step = ratings.rate(conn, self._catalogue, rating, self._clock.now_ms())
        if first:
            self._instruments.ratings.labels(score=str(rating.score)).inc()
            out.rating(view, rating, step)
        ack: dict[str, Any] = {
            "service_request_id": rating.service_request_id,
            "status": "accepted" if first else "duplicate",
        }
        if "rating_id" in message.obj:
            ack["rating_id"] = message.obj["rating_id"]
        out.acks.append((device_topic(message.device_id, "ack"), ack))

    def _vote(self, conn: sqlite3.Connection, message: TerminalMessage, out: DeskOutput) -> None:
        vote = terminal_vote(message.device_id, message.obj, message.ts_ms)
        status, proposal = proposals.vote(conn, self._households, vote, self._clock.now_ms())
        ack: dict[str, Any] = {"proposal_id": vote.proposal_id, "status": status}
        if "vote_id" in message.obj:
            ack["vote_id"] = message.obj["vote_id"]
        out.acks.append((device_topic(message.device_id, "ack"), ack))
        if status == "accepted":
            out.vote(proposal)

    def _sensor_event(self, conn: sqlite3.Connection, event: DeviceEvent, out: DeskOutput) -> None:
        match = self._catalogue.trigger(event.kind, event.type)
        if match is None:
            return
        service, opens = match
        key = str(event_id(event))
        if not requests.sensor_signal(
            conn, self._catalogue, key, event.ts_ms, event.device_id, event.building, service.service_code
        ):
            return  # a redelivered event: already counted
        if not opens:
            return
        if requests.open_sensor_request(conn, event.device_id, service.service_code) is not None:
            return  # the device's need is already being worked on
        new = NewRequest(
            service=service,
            description=event.message or f"{event.type} reported by {event.device_id}",
            requested_ms=event.ts_ms,
            source="sensor",
            device_id=event.device_id,
            request_key=f"sensor|{key}",
            building=event.building,
            address=f"Building {event.building}" if event.building else None,
            attributes={},
        )
        view, step = requests.create(conn, new, f"sensor {event.device_id}", self._community)
        requests.link_signal(conn, key, view["id"])
        self._instruments.service_requests.labels(source="sensor", outcome="accepted").inc()
        if step is not None:
            out.step(step)


def _refusal(message: TerminalMessage, reason: str) -> dict[str, Any]:
    ack: dict[str, Any] = {"status": "rejected", "error": reason}
    for key in ("request_id", "service_request_id", "vote_id", "proposal_id", "rating_id"):
        value = message.obj.get(key)
        if isinstance(value, str):
            ack[key] = value[:128]
    return ack
