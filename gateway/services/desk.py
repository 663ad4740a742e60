"""The service desk: requests, ratings and votes in; lifecycle, process control and reports out.

One component with an explicit lifecycle (`open`, `run`, `close`). Every operation runs on the
desk's own thread against the aggregates (`requests`, `ratings`, `proposals`), one at a time,
so a terminal's request and an operator's action never race. What an operation produces for the
outside (acks to terminals, live-stream items, service records for the sinks, alarms) is
returned as a `DeskOutput`, and handed to the `deliver` callback the application wires to the
stream, the local store and the sinks.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson

from gateway.clock import ClockJump, ClockWatch
from gateway.instruments import Instruments
from gateway.logsummary import LogSummary
from gateway.models import DeadLetter, DeviceEvent, TerminalMessage, event_id
from gateway.services import (
    access_log,
    evaluation,
    needs,
    proposals,
    ratings,
    relay,
    requests,
    residents,
    schema,
)
from gateway.services.catalogue import Catalogue
from gateway.services.households import HouseholdRegister
from gateway.services.intake import (
    IntakeError,
    NewRating,
    NewRequest,
    NewVote,
    terminal_actor,
    terminal_rating,
    terminal_request,
    terminal_vote,
)
from gateway.services.lifecycle import State, TransitionError
from gateway.services.refusals import DeskError
from gateway.services.requests import Step
from gateway.settings import PrivacySettings
from gateway.topics import device_topic

log = logging.getLogger(__name__)
T = TypeVar("T")

DESK_DEVICE = "service-desk"
API_REFUSALS_KEPT = 1000


@dataclass(slots=True)
class DeskOutput:
    """What the desk asks the rest of the gateway to deliver, in order."""

    acks: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (topic, payload)
    stream: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)  # service records for the sinks
    events: list[DeviceEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    records_upto: int = 0  # the desk's kept records up to this id are in `records`

    def __bool__(self) -> bool:
        return bool(self.acks or self.stream or self.records or self.events or self.dead_letters)

    def step(self, step: Step) -> None:
        """A lifecycle step for the live stream (its record for the sinks was kept by the store)."""
        self.stream.append(("request", {**step.request, "step": _step_view(step)}))


def _step_view(step: Step) -> dict[str, Any]:
    return {"from": step.from_state, "to": step.to_state, "ts_ms": step.ts_ms, "actor": step.actor}


class ServiceDesk:
    def __init__(
        self,
        path: Path,
        catalogue: Catalogue,
        community: str,
        instruments: Instruments,
        check_interval_s: float = 60.0,
        households: HouseholdRegister | None = None,
        privacy: PrivacySettings | None = None,
        clock: ClockWatch | None = None,
    ) -> None:
        self.catalogue = catalogue
        self._households = households or HouseholdRegister([])
        self._privacy = privacy or PrivacySettings()
        # Refusals over the API waiting for the next output; a flood keeps the newest (all counted).
        self._api_refusals: deque[DeadLetter] = deque(maxlen=API_REFUSALS_KEPT)
        self._community = community
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._sent_upto = 0  # outbox_records handed on in this run
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cgw-desk")
        self._instruments = instruments
        self._check_interval_s = check_interval_s
        # A repeated vote or rating is routine: told a few lines an hour (gateway/logsummary.py).
        self._refusals = LogSummary(log)
        self._deliver: Callable[[DeskOutput], Awaitable[None]] | None = None
        self._forwarded_upto = 0  # set when the local store's outbox has the desk's records
        self._clock = clock or ClockWatch()
        self._jumps: deque[ClockJump] = deque()  # the clock's jumps whose deadlines are not moved yet
        self._clock.on_jump(self._jumps.append)

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self, deliver: Callable[[DeskOutput], Awaitable[None]]) -> None:
        self._deliver = deliver
        self._conn = await self._call(schema.connect, self._path)

    async def run(self) -> None:
        """Process control: raise overdue and stalled alarms, every `check_interval_s`.

        First it hands on the service records an earlier run kept but did not forward.
        """
        await self._emit(DeskOutput())
        while True:
            await asyncio.sleep(self._check_interval_s)
            self._clock.check()  # a jump since the last look moves the deadlines first
            await self.check_deadlines(self._clock.now_ms())
            await self.keep_to_retention(self._clock.retention_ms())
            self._refusals.flush()

    async def keep_to_retention(self, now: int) -> None:
        """Pseudonymise what is past `privacy.personal_data_retention`, and delete the access
        log's entries past `privacy.access_log_retention`."""
        personal_ms = int(self._privacy.personal_data_retention.total_seconds() * 1000)
        done = await self._call(residents.pseudonymise_closed, self.conn, now - personal_ms, now)
        if done:
            log.info("pseudonymised %d closed requests past privacy.personal_data_retention", done)
        keep_ms = int(self._privacy.access_log_retention.total_seconds() * 1000)
        await self._call(access_log.prune, self.conn, now - keep_ms)

    async def close(self) -> None:
        self._refusals.flush_all()
        if self._conn is not None:
            await self._call(self._conn.close)
            self._conn = None
        self._thread.shutdown(wait=True)

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the service desk is not open")
        return self._conn

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, lambda: fn(*args, **kwargs))

    async def _emit(self, out: DeskOutput) -> None:
        await self._call(self._collect_records, out)
        if out and self._deliver is not None:
            await self._deliver(out)

    def _collect_records(self, out: DeskOutput) -> None:
        """Attach the kept records not yet handed on, and the API's refusals to dead-letter;
        forget the records the outbox already has."""
        while self._api_refusals:
            out.dead_letters.append(self._api_refusals.popleft())
        if self._forwarded_upto:
            relay.forget(self.conn, self._forwarded_upto)
        self._sent_upto, records = relay.unsent(self.conn, self._sent_upto)
        out.records_upto = self._sent_upto
        out.records.extend(records)

    def forwarded(self, upto: int) -> None:
        """Called once the local store committed records up to `upto` into its outbox."""
        self._forwarded_upto = max(self._forwarded_upto, upto)

    # -- from the pipeline ----------------------------------------------------------------------

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
                await self._call(self._handle, messages, events, out)
                await self._call(self._collect_records, out)
            except sqlite3.OperationalError as exc:
                log.error("the service desk cannot write its store (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            return out

    def _handle(self, messages: list[TerminalMessage], events: list[DeviceEvent], out: DeskOutput) -> None:
        for message in messages:
            handler = {"request": self._request, "rating": self._rating, "vote": self._vote}[message.channel]
            try:
                if message.refused is not None:
                    raise IntakeError(message.refused)
                handler(message, out)
            except (IntakeError, DeskError, TransitionError) as exc:
                reason = str(exc)
                if not reason.split(":", 1)[0].isidentifier() or ":" not in reason:
                    reason = f"refused: {reason}"
                letter = DeadLetter(
                    message.received_ms,
                    message.topic,
                    message.device_id,
                    reason,
                    message.payload,
                    message.channel,
                )
                out.dead_letters.append(letter)
                self._instruments.messages_rejected.labels(reason=letter.reason_code).inc()
                # Answered to the terminal, dead-lettered and counted: a resident's outcome (a second
                # vote, a missing field), not the operator's problem, so not a WARNING.
                self._refusals.note(f"refused {message.channel}s", f"{message.device_id}: {reason}")
                out.acks.append((device_topic(message.device_id, "ack"), _refusal(message, reason)))
        for event in events:
            self._sensor_event(event, out)

    def _request(self, message: TerminalMessage, out: DeskOutput) -> None:
        new = terminal_request(
            self.catalogue, message.device_id, message.obj, message.ts_ms, message.building
        )
        view, step = requests.create(self.conn, new, terminal_actor(message.device_id), self._community)
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
                    "rating_code": ratings.rating_code(self.conn, view["id"]),
                },
            )
        )
        if step is not None:
            out.step(step)

    def _rating(self, message: TerminalMessage, out: DeskOutput) -> None:
        rating = terminal_rating(message.device_id, message.obj, message.ts_ms)
        first = self._rate(rating, out)
        ack: dict[str, Any] = {
            "service_request_id": rating.service_request_id,
            "status": "accepted" if first else "duplicate",
        }
        if "rating_id" in message.obj:
            ack["rating_id"] = message.obj["rating_id"]
        out.acks.append((device_topic(message.device_id, "ack"), ack))

    def _rate(self, rating: NewRating, out: DeskOutput) -> bool:
        view, first, step = ratings.rate(self.conn, self.catalogue, rating, self._clock.now_ms())
        if not first:
            return False
        self._instruments.ratings.labels(score=str(rating.score)).inc()
        out.stream.append(
            (
                "rating",
                {
                    "service_request_id": view["id"],
                    "score": rating.score,
                    "ts_ms": rating.ts_ms,
                    "filed_by": view["filed_by"],  # scopes a terminal's stream (gateway/privacy.py)
                },
            )
        )
        if step is not None:
            out.step(step)
        return True

    def _vote(self, message: TerminalMessage, out: DeskOutput) -> None:
        vote = terminal_vote(message.device_id, message.obj, message.ts_ms)
        status, proposal = self._counted_vote(vote)
        ack: dict[str, Any] = {"proposal_id": vote.proposal_id, "status": status}
        if "vote_id" in message.obj:
            ack["vote_id"] = message.obj["vote_id"]
        out.acks.append((device_topic(message.device_id, "ack"), ack))
        if status == "accepted":
            out.stream.append(("vote", {"proposal_id": vote.proposal_id, "votes": proposal["votes"]}))

    def _counted_vote(self, vote: NewVote) -> tuple[str, dict[str, Any]]:
        """A vote checked against the household register, then recorded (one per household)."""
        return proposals.vote(self.conn, self._households, vote, self._clock.now_ms())

    def _sensor_event(self, event: DeviceEvent, out: DeskOutput) -> None:
        match = self.catalogue.trigger(event.kind, event.type)
        if match is None:
            return
        service, opens = match
        key = str(event_id(event))
        if not requests.sensor_signal(
            self.conn, self.catalogue, key, event.ts_ms, event.device_id, event.building, service.service_code
        ):
            return  # a redelivered event: already counted
        if not opens:
            return
        if requests.open_sensor_request(self.conn, event.device_id, service.service_code) is not None:
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
        view, step = requests.create(self.conn, new, f"sensor {event.device_id}", self._community)
        requests.link_signal(self.conn, key, view["id"])
        self._instruments.service_requests.labels(source="sensor", outcome="accepted").inc()
        if step is not None:
            out.step(step)

    # -- process control ------------------------------------------------------------------------

    async def check_deadlines(self, now: int) -> DeskOutput:
        while self._jumps:
            jump = self._jumps.popleft()
            moved = await self._call(
                requests.shift_deadlines, self.conn, jump.by_ms, jump.from_ms, jump.before_ms
            )
            if moved:
                log.info("moved %d deadlines of open requests with the clock's jump", moved)
        out = DeskOutput()
        for alarm_type, request, due_ms in await self._call(
            requests.due_alarms, self.conn, self.catalogue, now
        ):
            what = "is past its deadline" if alarm_type == "request_overdue" else "has not moved on"
            event = DeviceEvent(
                device_id=request["device_id"] or DESK_DEVICE,
                kind="service_request",
                ts_ms=due_ms,
                type=alarm_type,
                severity="warning",
                message=f"{request['id']} ({request['service_code']}) {what} ({request['state']})",
                data={
                    "service_request_id": request["id"],
                    "service_code": request["service_code"],
                    "state": request["state"],
                    "provider_id": request["provider_id"],
                    "expected_ms": request["expected_ms"],
                },
                source="service_desk",
                building=request["building"],
            )
            out.events.append(event)
            self._instruments.service_alarms.labels(type=alarm_type).inc()
        await self._emit(out)
        return out

    # -- operators and Open311 (API) ------------------------------------------------------------

    async def file(self, new: NewRequest, actor: str) -> tuple[dict[str, Any], bool]:
        """File a request from the API; (request, created) — False when it was a re-send."""
        view, step = await self._call(requests.create, self.conn, new, actor, self._community)
        self._instruments.service_requests.labels(
            source=new.source, outcome="accepted" if step else "duplicate"
        ).inc()
        if step is not None:
            out = DeskOutput()
            out.step(step)
            await self._emit(out)
        return view, step is not None

    async def transition(
        self,
        ticket: str,
        target: State,
        actor: str,
        note: str = "",
        provider_id: str | None = None,
        merged_into: str | None = None,
        ts_ms: int | None = None,
    ) -> dict[str, Any]:
        step = await self._call(
            requests.transition,
            self.conn,
            self.catalogue,
            ticket,
            target,
            actor,
            note,
            provider_id,
            merged_into,
            ts_ms,
            self._clock.now_ms(),
        )
        out = DeskOutput()
        out.step(step)
        await self._emit(out)
        return step.request

    async def rate(self, rating: NewRating) -> tuple[dict[str, Any], bool]:
        out = DeskOutput()
        body = {"service_request_id": rating.service_request_id, "score": rating.score}
        try:
            first = await self._call(self._rate, rating, out)
        except (DeskError, TransitionError) as exc:
            self._refused_over_api("rating", rating.filer, body, exc)
            raise
        await self._emit(out)
        request = await self.get(rating.service_request_id)
        assert request is not None
        return request, first

    async def vote(self, vote: NewVote) -> tuple[str, dict[str, Any]]:
        try:
            status, proposal = await self._call(self._counted_vote, vote)
        except DeskError as exc:
            # The household is left out of the dead letter, as from a terminal.
            self._refused_over_api("vote", vote.by, {"proposal_id": vote.proposal_id}, exc)
            raise
        if status == "accepted":
            out = DeskOutput(stream=[("vote", {"proposal_id": vote.proposal_id, "votes": proposal["votes"]})])
            await self._emit(out)
        return status, proposal

    def _refused_over_api(self, channel: str, who: str, body: dict[str, Any], exc: Exception) -> None:
        """A rating or vote refused over the API: counted and logged at once, and dead-lettered
        with the desk's next output (the caller answers with the HTTP error meanwhile, so a
        refusal costs the client no wait for a commit)."""
        reason = str(exc)
        if ":" not in reason or not reason.split(":", 1)[0].isidentifier():
            reason = f"refused: {reason}"
        letter = DeadLetter(
            self._clock.now_ms(), f"api/{channel}", who[:128], reason, orjson.dumps(body), channel
        )
        self._instruments.messages_rejected.labels(reason=letter.reason_code).inc()
        self._refusals.note(f"refused {channel}s over the API", f"{who[:128]}: {reason}")
        self._api_refusals.append(letter)

    # -- the access log of personal-data reads --------------------------------------------------

    async def record_access(self, access: access_log.Access) -> None:
        await self._call(access_log.record, self.conn, access)

    async def access_log(self, **filters: Any) -> list[dict[str, Any]]:
        return await self._call(lambda: access_log.listing(self.conn, **filters))

    async def assess(self, **kwargs: Any) -> dict[str, Any]:
        return await self._call(ratings.assess, self.conn, self.catalogue, **kwargs)

    async def get(self, ticket: str) -> dict[str, Any] | None:
        return await self._call(requests.get, self.conn, ticket)

    async def history(self, ticket: str) -> list[dict[str, Any]]:
        return await self._call(requests.history, self.conn, ticket)

    async def rating_of(self, ticket: str) -> dict[str, Any] | None:
        return await self._call(ratings.rating_of, self.conn, ticket)

    async def requests(self, **filters: Any) -> list[dict[str, Any]]:
        return await self._call(lambda: requests.listing(self.conn, **filters))

    async def workloads(self) -> dict[str, dict[str, int]]:
        return await self._call(requests.workloads, self.conn, self._clock.now_ms())

    # -- needs, plans, evaluation --------------------------------------------------------------

    async def signals(self, start_ms: int, end_ms: int) -> list[needs.Signal]:
        return await self._call(requests.signals, self.conn, start_ms, end_ms)

    async def hotspots(
        self, window_start: int, window_end: int, baseline_start: int, alpha: float, min_count: int
    ) -> list[dict[str, Any]]:
        return await self._call(
            requests.hotspots,
            self.conn,
            self.catalogue,
            window_start,
            window_end,
            baseline_start,
            alpha,
            min_count,
        )

    async def needs_list(self, recent_ms: int) -> list[dict[str, Any]]:
        return await self._call(
            requests.needs_list, self.conn, self.catalogue, self._clock.now_ms(), recent_ms
        )

    async def create_proposal(
        self, title: str, description: str, need_ids: list[str], closes_ms: int | None, actor: str
    ) -> dict[str, Any]:
        return await self._call(
            proposals.create, self.conn, title, description, need_ids, closes_ms, actor, self._clock.now_ms()
        )

    async def proposal(self, pid: str) -> dict[str, Any] | None:
        return await self._call(proposals.get, self.conn, pid)

    async def proposals(self) -> list[dict[str, Any]]:
        return await self._call(proposals.listing, self.conn)

    async def close_proposal(self, pid: str, filed: bool) -> dict[str, Any]:
        return await self._call(proposals.close, self.conn, pid, self._clock.now_ms(), filed)

    async def evaluations(
        self, start_ms: int, end_ms: int, bys: tuple[evaluation.By, ...], period: evaluation.Period
    ) -> dict[str, list[dict[str, Any]]]:
        """The same figures grouped several ways, from one read of the requests and assessments."""
        return await self._call(ratings.evaluations, self.conn, start_ms, end_ms, bys, period)

    async def evaluation(
        self, start_ms: int, end_ms: int, by: evaluation.By, period: evaluation.Period
    ) -> list[dict[str, Any]]:
        return (await self.evaluations(start_ms, end_ms, (by,), period))[by]


def _refusal(message: TerminalMessage, reason: str) -> dict[str, Any]:
    ack: dict[str, Any] = {"status": "rejected", "error": reason}
    for key in ("request_id", "service_request_id", "vote_id", "proposal_id", "rating_id"):
        value = message.obj.get(key)
        if isinstance(value, str):
            ack[key] = value[:128]
    return ack
