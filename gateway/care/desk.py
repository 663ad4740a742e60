"""The care desk: precision care's one component with a lifecycle (`open`, `run`, `close`).

It owns the care file (`care.sqlite3`, one `SqliteThread`), the welfare rules
(gateway/care/welfare.py) and the activity reader (gateway/care/signals.py). The pipeline hands
it each batch (`observe`, on the event loop, never blocking): the readings of devices whose
registry entry names a building and unit are the activity of that household, analysed only
while the household consents to `welfare`. `run` asks the rules every `care.evaluate_every`,
raises welfare checks for the grid's workers, files each as a service request through the
service desk's `file` (so the service loop follows it like any other), escalates the ones not
acknowledged within `care.ack_within` to `care.escalate_to`, and keeps the days the rules learnt.
The API's care routes call the rest.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from gateway.care import checks, households, visits
from gateway.care.checks import CheckError, Outcome, WelfareCheck
from gateway.care.equity import figures
from gateway.care.households import CareNeeds, Purpose
from gateway.care.matching import UNUSED_DAYS, eligible_unused, of_unit
from gateway.care.schema import MIGRATIONS
from gateway.care.signals import ActivityReader
from gateway.care.welfare import Alert, DayRecord, Source, WelfareEngine
from gateway.clock import ClockWatch
from gateway.files import private_store
from gateway.models import Batch
from gateway.registry import DeviceRegistry
from gateway.services import requests as service_requests
from gateway.services.actions import Actions
from gateway.services.catalogue import Catalogue
from gateway.services.intake import NewRequest
from gateway.services.lifecycle import State, TransitionError
from gateway.services.requests import Move
from gateway.settings import CareGrid, CareSettings
from gateway.sqlite import SqliteThread, connect, migrate, transaction

log = logging.getLogger(__name__)
ACTOR = "care"
DAY_MS = 86_400_000


def _open(path: Path) -> sqlite3.Connection:
    conn = connect(private_store(path))  # the most sensitive file of all: 0600 in a 0700 folder
    conn.row_factory = sqlite3.Row
    migrate(conn, MIGRATIONS, "the care file")
    return conn


class CareDesk:
    def __init__(
        self,
        path: Path,
        settings: CareSettings,
        catalogue: Catalogue,
        services: Actions,
        services_db: SqliteThread,
        registry: DeviceRegistry,
        clock: ClockWatch | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock or ClockWatch()  # the gateway's time, as the other stages take it
        self._catalogue = catalogue
        self._services = services  # files and moves the welfare checks' requests
        self._services_db = services_db  # services.sqlite3, to read a household's requests
        self._registry = registry
        self._db = SqliteThread("care", lambda: _open(path))
        self.engine = WelfareEngine(settings)
        self._reader = ActivityReader(settings.energy_step_w)
        self._ack_within_ms = int(settings.ack_within.total_seconds() * 1000)
        self._grid_of = {b: g for g in settings.grids for b in g.buildings}

    # -- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (and migrate) the care file; watch every household that consents to `welfare`."""
        for household, days in await self._db.call(_consenting_days):
            self.engine.watch(household, days)

    async def run(self) -> None:
        step_s = self.settings.evaluate_every.total_seconds()
        while True:
            await asyncio.sleep(step_s)
            await self.tick(self._clock.now_ms())

    async def close(self) -> None:
        await self._db.close()

    async def tick(self, now: int) -> list[WelfareCheck]:
        """One look: the checks the rules raise now, the escalations due, the days to keep."""
        raised = [await self.raise_check(alert) for alert in self.engine.evaluate(now)]
        for check in await self._db.call(lambda c: checks.listing(c, open_only=True)):
            if check.due_escalation(now, self._ack_within_ms):
                check.escalate(now, self.settings.escalate_to)
                await self._db.call(checks.save, check)
                log.warning(
                    "welfare check %s not acknowledged in time: escalated to %s", check.id, check.escalated_to
                )
                await self._walk(check.ticket, ("triaged", "assigned"), f"escalated: {check.why}")
        closed = self.engine.take_closed_days()
        if closed:
            await self._db.call(_keep_days, closed, self.settings.baseline_days)
        return raised

    # -- activity in ------------------------------------------------------------------------------

    def observe(self, batch: Batch) -> None:
        """The activity in a pipeline batch (readings and emergency presses of home devices)."""
        for reading in batch.readings:
            household = self._household_of(reading.device_id)
            if household is None:
                continue
            seen = self._reader.activity(reading.device_id, reading.kind, reading.ts_ms, reading.metrics)
            if seen is not None:
                self.engine.observe(household, reading.ts_ms, seen.source, seen.since_ms)
        for event in batch.events:
            if event.kind == "emergency_button":
                household = self._household_of(event.device_id)
                if household is not None:
                    self.engine.observe(household, event.ts_ms, "button")

    def _household_of(self, device_id: str) -> str | None:
        device = self._registry.get(device_id)
        if device is None or not device.building or not device.unit:
            return None
        key = f"{device.building}/{device.unit}"
        return key if self.engine.watching(key) else None

    def checkin(self, household: str, ts_ms: int, source: Source = "checkin") -> bool:
        """A check-in (the household says it is well); False when it does not consent to `welfare`."""
        if not self.engine.watching(household):
            return False
        self.engine.observe(household, ts_ms, source)
        return True

    # -- welfare checks ---------------------------------------------------------------------------

    async def raise_check(self, alert: Alert) -> WelfareCheck:
        """A welfare check for an alert: kept, filed as a service request, listed for the grid."""
        building, _, unit = alert.household.partition("/")
        grid = self._grid_of.get(building)
        check = WelfareCheck(
            id=f"wc-{alert.raised_ms}-{secrets.token_hex(3)}",
            household=alert.household,
            building=building,
            grid=None if grid is None else grid.id,
            rule=alert.rule,
            raised_ms=alert.raised_ms,
            quiet_since_ms=alert.quiet_since_ms,
            why=alert.why,
        )
        service = self._catalogue.services.get(self.settings.check_service)
        if service is not None:
            view, _ = await self._services.file(
                NewRequest(
                    service=service,
                    description=f"Welfare check: {alert.why}",
                    requested_ms=alert.raised_ms,
                    source="care",
                    request_key=f"care|{check.id}",
                    building=building,
                    unit=unit,
                    address=f"Building {building}, {unit}",
                ),
                ACTOR,
            )
            check.ticket = view["id"]
        await self._db.call(checks.save, check)
        log.info(
            "welfare check %s raised for a household of building %s (%s)", check.id, building, alert.rule
        )
        return check

    async def _walk(self, ticket: str | None, states: tuple[State, ...], note: str) -> None:
        """Move the check's request along as far as the lifecycle allows (a step it is past is skipped)."""
        if ticket is None:
            return
        for state in states:
            provider = self.settings.escalate_to if state == "assigned" else None
            try:
                await self._services.transition(Move(ticket, state, ACTOR, note, provider_id=provider))
            except (TransitionError, ValueError) as exc:
                log.debug("request %s not moved to %s: %s", ticket, state, exc)

    async def check(self, check_id: str) -> WelfareCheck | None:
        return await self._db.call(checks.load, check_id)

    async def checks(self, *, open_only: bool = False, household: str | None = None) -> list[WelfareCheck]:
        return await self._db.call(lambda c: checks.listing(c, open_only=open_only, household=household))

    async def acknowledge(self, check_id: str, by: str, ts_ms: int) -> tuple[WelfareCheck, bool]:
        check = await self._found(check_id)
        first = check.acknowledge(by, ts_ms)
        if first:
            await self._db.call(checks.save, check)
        return check, first

    async def close_check(
        self, check_id: str, outcome: Outcome, by: str, ts_ms: int, note: str = ""
    ) -> tuple[WelfareCheck, bool]:
        check = await self._found(check_id)
        first = check.close(outcome, by, ts_ms, note)
        if first:
            await self._db.call(checks.save, check)
            await self._walk(
                check.ticket, ("triaged", "assigned", "in_service", "completed"), f"visited: {outcome}"
            )
            if outcome != "not_home" and self.engine.watching(check.household):
                # Someone was there: the quiet is over.
                self.engine.observe(check.household, ts_ms, "checkin")
        return check, first

    async def _found(self, check_id: str) -> WelfareCheck:
        check = await self.check(check_id)
        if check is None:
            raise CheckError(f"unknown_check: no welfare check {check_id!r}")
        return check

    # -- the register and consent ----------------------------------------------------------------

    def grids(self) -> list[CareGrid]:
        return list(self.settings.grids)

    def grid_of(self, building: str) -> CareGrid | None:
        return self._grid_of.get(building)

    def buildings_of(self, worker: str) -> frozenset[str]:
        return frozenset(b for g in self.settings.grids if worker in g.workers for b in g.buildings)

    async def households(self, buildings: frozenset[str] | None) -> list[dict[str, Any]]:
        return await self._db.call(households.listing, buildings)

    async def set_consent(self, household: str, purpose: Purpose, granted: bool, ts_ms: int, by: str) -> bool:
        changed = await self._db.call(households.set_consent, household, purpose, granted, ts_ms, by)
        if changed and purpose == "welfare":
            if granted:
                self.engine.watch(household)
            else:
                self.engine.forget(household)  # at once: nothing more of it is analysed
        return changed

    async def consents(self, household: str) -> dict[str, bool]:
        return await self._db.call(households.consents, household)

    async def put_needs(self, household: str, needs: CareNeeds, ts_ms: int, by: str) -> None:
        building, _, unit = household.partition("/")
        await self._db.call(households.put_needs, household, building, unit, needs, ts_ms, by)

    # -- visits, needs, the household's view, equity -----------------------------------------------

    async def record_visit(self, visit: visits.Visit) -> bool:
        return await self._db.call(visits.record, visit, self._clock.now_ms())

    async def needs_list(self, buildings: frozenset[str] | None) -> list[dict[str, Any]]:
        items, weights = await self._db.call(_needs_and_weights, buildings)
        return visits.ranked(items, weights, self._clock.now_ms())

    async def household_view(self, household: str) -> dict[str, Any]:
        building, _, unit = household.partition("/")
        needs, consents, open_needs, past_visits = await self._db.call(_household, household)
        requests = of_unit(await self._services_db.call(service_requests.listing, building=building), unit)
        since = self._clock.now_ms() - UNUSED_DAYS * DAY_MS
        used = [r["service_code"] for r in requests if r["requested_ms"] >= since]
        group = households.group_of(needs)
        return {
            "household": household,
            "building": building,
            "unit": unit,
            "grid": None if (g := self.grid_of(building)) is None else g.id,
            "group": group,
            "weight": visits.weight(group, needs),
            "needs": None if needs is None else asdict(needs),
            "consents": consents,
            "welfare": "learning"
            if self.engine.learning(household) and self.engine.watching(household)
            else ("watched" if self.engine.watching(household) else "not analysed"),
            "open_requests": [r for r in requests if r.get("completed_ms") is None],
            "past_requests": [r for r in requests if r.get("completed_ms") is not None],
            "open_needs": visits.ranked(
                open_needs, {household: visits.weight(group, needs)}, self._clock.now_ms()
            ),
            "visits": past_visits,
            "welfare_checks": [checks.view(c) for c in await self.checks(household=household)],
            "eligible_unused": eligible_unused(needs, used, self._catalogue),
        }

    async def equity(self, start_ms: int, end_ms: int) -> list[dict[str, Any]]:
        groups, window = await self._db.call(_groups_and_checks, start_ms, end_ms)
        requests = await self._services_db.call(
            service_requests.listing, start_ms=start_ms, end_ms=end_ms, limit=100_000
        )
        return figures(groups, requests, window)


# -- on the care file's thread ---------------------------------------------------------------------


def _consenting_days(conn: sqlite3.Connection) -> list[tuple[str, list[DayRecord]]]:
    out = []
    for household in households.consenting(conn, "welfare"):
        rows = conn.execute("SELECT record FROM days WHERE household = ? ORDER BY day", (household,))
        days = []
        for (text,) in rows:
            raw = orjson.loads(text)
            days.append(
                DayRecord(
                    raw["day"], tuple(raw["counts"]), raw["wake_min"], tuple(raw["longest"]), raw["bed_min"]
                )
            )
        out.append((household, days))
    return out


def _keep_days(conn: sqlite3.Connection, closed: list[tuple[str, DayRecord]], keep: int) -> None:
    consenting = set(households.consenting(conn, "welfare"))
    with transaction(conn, immediate=True):
        for household, day in closed:
            if household not in consenting:
                continue  # withdrawn meanwhile: nothing of it is kept
            conn.execute(
                "INSERT OR REPLACE INTO days (household, day, record) VALUES (?, ?, ?)",
                (household, day.day, orjson.dumps(asdict(day)).decode()),
            )
            conn.execute("DELETE FROM days WHERE household = ? AND day <= ?", (household, day.day - keep))


def _needs_and_weights(
    conn: sqlite3.Connection, buildings: frozenset[str] | None
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    items = [n for n in visits.open_needs(conn) if buildings is None or n["building"] in buildings]
    weights = {}
    for household in {n["household"] for n in items}:
        needs = households.needs_of(conn, household)
        weights[household] = visits.weight(households.group_of(needs), needs)
    return items, weights


def _household(conn: sqlite3.Connection, household: str) -> tuple[Any, ...]:
    return (
        households.needs_of(conn, household),
        households.consents(conn, household),
        visits.open_needs(conn, household),
        visits.of_household(conn, household),
    )


def _groups_and_checks(
    conn: sqlite3.Connection, start_ms: int, end_ms: int
) -> tuple[dict[str, households.Group], list[WelfareCheck]]:
    groups = {
        row["household"]: households.group_of(households.needs_of(conn, row["household"]))
        for row in conn.execute("SELECT household FROM households")
    }
    window = [c for c in checks.listing(conn, since_ms=start_ms, limit=100_000) if c.raised_ms < end_ms]
    return groups, window
