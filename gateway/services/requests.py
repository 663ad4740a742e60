"""Service requests: filing, lifecycle transitions and their audit trail, need signals, alarms.

Plain functions over the services' connection (gateway/services/schema.py), run on the services'
`SqliteThread` (`await db.call(requests.get, ticket)`); each write is one transaction, and keeps
the service record it makes for the sinks in that same transaction (gateway/services/relay.py).
A need signal is one piece of evidence of a need: one per request a resident filed, one per
sensor event the catalogue maps to a service (gateway/services/needs.py ranks them).
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import privacy
from gateway.services import lifecycle, needs, relay
from gateway.services.catalogue import Catalogue
from gateway.services.intake import NewRequest
from gateway.services.lifecycle import State
from gateway.services.refusals import DeskError
from gateway.sqlite import Where, transaction

# Tickets shown to residents: the community and 10 characters of an alphabet without look-alikes
# (50 random bits), so no one can guess another resident's ticket. Older sequential tickets stay.
TICKET_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
TICKET_CHARS = 10

MAX_CLOCK_AHEAD_MS = 60_000


@dataclass(frozen=True, slots=True)
class Move:
    """A step asked for: `ticket` to `to`, by `actor` (an operator, the district, a resident's
    rating), with what the target needs (`provider_id` to assign, `merged_into` to merge) and
    when it happened (`ts_ms`; default now)."""

    ticket: str
    to: State
    actor: str
    note: str = ""
    provider_id: str | None = None
    merged_into: str | None = None
    ts_ms: int | None = None


@dataclass(slots=True)
class Step:
    """One lifecycle step of one request, as recorded in the audit trail."""

    request: dict[str, Any]
    from_state: State | None
    to_state: State
    ts_ms: int
    actor: str
    note: str


def create(
    conn: sqlite3.Connection, new: NewRequest, actor: str, community: str
) -> tuple[dict[str, Any], Step | None]:
    """File a request; a known `request_key` gives the first request back and no step."""
    with transaction(conn, immediate=True):
        if new.request_key is not None:
            row = conn.execute("SELECT * FROM requests WHERE request_key = ?", (new.request_key,)).fetchone()
            if row is not None:
                return request_view(row), None
        seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM requests").fetchone()[0]
        ticket = _new_ticket(conn, community)
        service = new.service
        household = f"{new.building}/{new.unit}" if new.building and new.unit else None
        ts = new.requested_ms
        conn.execute(
            """INSERT INTO requests (seq, id, service_code, service_group, state, source, device_id,
                request_key, description, building, floor, unit, household, address, lat, long,
                media_url, contact, attributes, requested_ms, updated_ms, expected_ms,
                state_since_ms, status_notes, address_id, filed_by)
               VALUES (?, ?, ?, ?, 'submitted', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,
                       ?, ?, ?, ?)""",
            (
                seq,
                ticket,
                service.service_code,
                service.group,
                new.source,
                new.device_id,
                new.request_key,
                new.description,
                new.building,
                new.floor,
                new.unit,
                household,
                new.address,
                new.lat,
                new.long,
                new.media_url,
                orjson.dumps(new.contact).decode(),
                orjson.dumps(new.attributes).decode(),
                ts,
                ts,
                ts + service.deadline_ms,
                ts,
                "received",
                new.address_id,
                actor,
            ),
        )
        conn.execute(
            "INSERT INTO transitions (request_id, ts_ms, from_state, to_state, actor, note)"
            " VALUES (?, ?, NULL, 'submitted', ?, ?)",
            (ticket, ts, actor, f"filed via {new.source}"),
        )
        if new.source != "sensor":  # a sensor's request is counted by the event's own signal
            conn.execute(
                "INSERT INTO need_signals (ts_ms, service_code, service_group, building, source,"
                " request_id, device_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (ts, service.service_code, service.group, new.building, new.source, ticket, new.device_id),
            )
        view = request_view(row_of(conn, ticket))
        step = Step(view, None, "submitted", ts, actor, f"filed via {new.source}")
        relay.keep(conn, [step_record(step)])
    return view, step


def _new_ticket(conn: sqlite3.Connection, community: str) -> str:
    while True:
        ticket = f"{community}-{''.join(secrets.choice(TICKET_ALPHABET) for _ in range(TICKET_CHARS))}"
        if conn.execute("SELECT 1 FROM requests WHERE id = ?", (ticket,)).fetchone() is None:
            return ticket


def transition(conn: sqlite3.Connection, catalogue: Catalogue, move: Move, now_ms: int) -> Step:
    """Move a request (when its lifecycle allows), recording the step."""
    ticket, target, actor = move.ticket, move.to, move.actor
    provider_id, merged_into, ts_ms = move.provider_id, move.merged_into, move.ts_ms
    with transaction(conn, immediate=True):
        row = row_of(conn, ticket)
        current: State = row["state"]
        lifecycle.check(current, target)
        last = conn.execute("SELECT MAX(ts_ms) FROM transitions WHERE request_id = ?", (ticket,)).fetchone()[
            0
        ]
        ts = now_ms if ts_ms is None else ts_ms
        if ts > now_ms + MAX_CLOCK_AHEAD_MS:
            raise DeskError("ts is in the future")
        if ts < last:
            raise DeskError("ts is before the request's last recorded step")
        updates: dict[str, Any] = {"state": target, "state_since_ms": ts, "updated_ms": ts}
        updates["stalled_alarm_ms"] = None
        service = catalogue.get(row["service_code"])
        if target == "assigned":
            if provider_id is None:
                raise DeskError("assigning needs provider_id")
            if provider_id not in catalogue.providers:
                raise DeskError(f"provider {provider_id!r} is not in the catalogue", 422)
            if service is not None and provider_id not in service.providers:
                raise DeskError(
                    f"provider {provider_id!r} does not deliver {service.service_code} "
                    f"(providers: {', '.join(service.providers)})",
                    422,
                )
            updates["provider_id"] = provider_id
        elif provider_id is not None:
            raise DeskError("provider_id is only given when assigning")
        if target == "merged":
            if not merged_into or merged_into == ticket:
                raise DeskError("merging needs merged_into: the ticket this request duplicates")
            other = conn.execute("SELECT state FROM requests WHERE id = ?", (merged_into,)).fetchone()
            if other is None:
                raise DeskError(f"merged_into {merged_into!r} is not a request", 422)
            if other["state"] == "merged":
                raise DeskError(f"{merged_into} is itself merged: merge into the request it points to")
            updates["merged_into"] = merged_into
        elif merged_into is not None:
            raise DeskError("merged_into is only given when merging")
        if target == "completed":
            updates["completed_ms"] = ts
        if target == "reopened":
            updates["completed_ms"] = None
            updates["overdue_alarm_ms"] = None
        text = move.note or _default_note(target, provider_id, merged_into)
        updates["status_notes"] = text
        assignments = ", ".join(f"{k} = ?" for k in updates)
        conn.execute(f"UPDATE requests SET {assignments} WHERE id = ?", (*updates.values(), ticket))
        conn.execute(
            "INSERT INTO transitions (request_id, ts_ms, from_state, to_state, actor, note, provider_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (ticket, ts, current, target, actor, text, updates.get("provider_id")),
        )
        step = Step(request_view(row_of(conn, ticket)), current, target, ts, actor, text)
        relay.keep(conn, [step_record(step)])
    return step


def get(conn: sqlite3.Connection, ticket: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM requests WHERE id = ?", (ticket,)).fetchone()
    return None if row is None else request_view(row)


def row_of(conn: sqlite3.Connection, ticket: str) -> sqlite3.Row:
    """The request's row; a ticket that names none is refused (404)."""
    row: sqlite3.Row | None = conn.execute("SELECT * FROM requests WHERE id = ?", (ticket,)).fetchone()
    if row is None:
        raise DeskError(f"no service request {ticket[:128]!r}", 404)
    return row


def history(conn: sqlite3.Connection, ticket: str) -> list[dict[str, Any]]:
    """The request's audit trail, oldest step first."""
    rows = conn.execute(
        "SELECT ts_ms, from_state, to_state, actor, note, provider_id FROM transitions"
        " WHERE request_id = ? ORDER BY id",
        (ticket,),
    )
    return [dict(r) for r in rows]


def listing(
    conn: sqlite3.Connection,
    *,
    ids: Sequence[str] | None = None,
    codes: Sequence[str] | None = None,
    states: Sequence[str] | None = None,
    provider_id: str | None = None,
    building: str | None = None,
    filed_by: str | None = None,
    start_ms: int | None = None,
    end_ms: int | None = None,
    limit: int = 1000,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Requests matching every filter given, newest first."""
    where = Where()
    where.among("id", ids)
    where.among("service_code", codes)
    where.among("state", states)
    where.equal(provider_id=provider_id, building=building, filed_by=filed_by)
    where.given("requested_ms >= ?", start_ms)
    where.given("requested_ms < ?", end_ms)
    sql = f"SELECT * FROM requests{where} ORDER BY requested_ms DESC, seq DESC LIMIT ? OFFSET ?"
    return [request_view(r) for r in conn.execute(sql, (*where.args, limit, offset))]


def workloads(conn: sqlite3.Connection, now_ms: int) -> dict[str, dict[str, int]]:
    """Each provider's active requests, by state, and how many of them are overdue."""
    placeholders = ", ".join("?" * len(lifecycle.ACTIVE))
    rows = conn.execute(
        f"""SELECT provider_id, state, COUNT(*) AS n, SUM(expected_ms < ?) AS overdue FROM requests
            WHERE provider_id IS NOT NULL AND state IN ({placeholders}) GROUP BY provider_id, state""",
        (now_ms, *sorted(lifecycle.ACTIVE)),
    )
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        load = out.setdefault(row["provider_id"], {"active": 0, "overdue": 0})
        load[row["state"]] = row["n"]
        load["active"] += row["n"]
        load["overdue"] += row["overdue"] or 0
    return out


# -- process control ---------------------------------------------------------------------------


def shift_deadlines(conn: sqlite3.Connection, by_ms: int, from_ms: int, before_ms: int) -> int:
    """The gateway's clock jumped by `by_ms`: open requests filed, or moved to their state,
    while it showed [from_ms, before_ms] get their deadlines moved by as much, so a jump
    neither makes them all overdue nor holds them back (gateway/clock.py); how many deadlines
    moved (a request's deadline and its stall time count apart)."""
    placeholders = ", ".join("?" * len(lifecycle.ACTIVE))
    active = sorted(lifecycle.ACTIVE)
    with transaction(conn, immediate=True):
        moved: int = conn.execute(
            f"UPDATE requests SET expected_ms = expected_ms + ? WHERE state IN ({placeholders})"
            " AND requested_ms BETWEEN ? AND ?",
            (by_ms, *active, from_ms, before_ms),
        ).rowcount
        moved += conn.execute(
            f"UPDATE requests SET state_since_ms = state_since_ms + ? WHERE state IN ({placeholders})"
            " AND state_since_ms BETWEEN ? AND ?",
            (by_ms, *active, from_ms, before_ms),
        ).rowcount
    return moved


def due_alarms(
    conn: sqlite3.Connection, catalogue: Catalogue, now_ms: int
) -> list[tuple[str, dict[str, Any], int]]:
    """Requests past their deadline or stalled, each reported once: (type, request, due_ms)."""
    out: list[tuple[str, dict[str, Any], int]] = []
    placeholders = ", ".join("?" * len(lifecycle.ACTIVE))
    with transaction(conn, immediate=True):
        rows = conn.execute(
            f"SELECT * FROM requests WHERE state IN ({placeholders})"
            " AND (overdue_alarm_ms IS NULL OR stalled_alarm_ms IS NULL)",
            sorted(lifecycle.ACTIVE),
        ).fetchall()
        for row in rows:
            if row["overdue_alarm_ms"] is None and row["expected_ms"] < now_ms:
                conn.execute("UPDATE requests SET overdue_alarm_ms = ? WHERE seq = ?", (now_ms, row["seq"]))
                out.append(("request_overdue", request_view(row), row["expected_ms"]))
            service = catalogue.get(row["service_code"])
            if service is None or row["stalled_alarm_ms"] is not None:
                continue
            stall_due = row["state_since_ms"] + catalogue.stall_ms(service)
            if stall_due < now_ms:
                conn.execute("UPDATE requests SET stalled_alarm_ms = ? WHERE seq = ?", (now_ms, row["seq"]))
                out.append(("request_stalled", request_view(row), stall_due))
    return out


# -- sensor-opened requests and need signals -----------------------------------------------------


def sensor_signal(
    conn: sqlite3.Connection,
    catalogue: Catalogue,
    event_key: str,
    ts_ms: int,
    device_id: str,
    building: str | None,
    service_code: str,
) -> bool:
    """Count a device event as evidence of a need; False when it was already counted."""
    service = catalogue.services[service_code]
    with transaction(conn, immediate=True):
        cursor = conn.execute(
            "INSERT OR IGNORE INTO need_signals (ts_ms, service_code, service_group, building, source,"
            " device_id, event_key) VALUES (?, ?, ?, ?, 'sensor', ?, ?)",
            (ts_ms, service_code, service.group, building, device_id, event_key),
        )
    return cursor.rowcount == 1


def open_sensor_request(conn: sqlite3.Connection, device_id: str, service_code: str) -> dict[str, Any] | None:
    """The request a device's earlier event opened and that is still being worked on."""
    placeholders = ", ".join("?" * len(lifecycle.ACTIVE))
    row = conn.execute(
        f"SELECT * FROM requests WHERE device_id = ? AND service_code = ? AND source = 'sensor'"
        f" AND state IN ({placeholders}) LIMIT 1",
        (device_id, service_code, *sorted(lifecycle.ACTIVE)),
    ).fetchone()
    return None if row is None else request_view(row)


def link_signal(conn: sqlite3.Connection, event_key: str, ticket: str) -> None:
    """Name the request a sensor event's signal opened."""
    with transaction(conn, immediate=True):
        conn.execute("UPDATE need_signals SET request_id = ? WHERE event_key = ?", (ticket, event_key))


def signals(conn: sqlite3.Connection, start_ms: int, end_ms: int) -> list[needs.Signal]:
    """Need signals in [start, end): one per request filed by a resident, one per sensor event."""
    rows = conn.execute(
        "SELECT ts_ms, service_code, service_group, building, source FROM need_signals"
        " WHERE ts_ms >= ? AND ts_ms < ?",
        (start_ms, end_ms),
    ).fetchall()
    return [needs.Signal(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def active(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Requests still owed, plus those merged into them (they count their households)."""
    placeholders = ", ".join("?" * len(lifecycle.ACTIVE))
    rows = conn.execute(
        f"""SELECT * FROM requests WHERE state IN ({placeholders})
            OR (state = 'merged' AND merged_into IN (
                SELECT id FROM requests WHERE state IN ({placeholders})))""",
        (*sorted(lifecycle.ACTIVE), *sorted(lifecycle.ACTIVE)),
    )
    return [request_view(r) for r in rows]


def needs_list(
    conn: sqlite3.Connection, catalogue: Catalogue, now_ms: int, recent_ms: int
) -> list[dict[str, Any]]:
    """The ranked needs list: requests still owed, with the signals of the last `recent_ms`."""
    priorities = {code: group.priority for code, group in catalogue.groups.items()}
    return needs.needs_list(active(conn), signals(conn, now_ms - recent_ms, now_ms + 1), priorities, now_ms)


def hotspots(
    conn: sqlite3.Connection,
    catalogue: Catalogue,
    window_start: int,
    window_end: int,
    baseline_start: int,
    alpha: float,
    min_count: int,
) -> list[dict[str, Any]]:
    """Cells (building, service group) with more signals in the window than their baseline explains."""
    names = {code: group.name_en for code, group in catalogue.groups.items()}
    return needs.hotspots(
        signals(conn, baseline_start, window_end),
        window_start,
        window_end,
        baseline_start,
        alpha=alpha,
        min_count=min_count,
        group_names=names,
    )


def request_view(row: sqlite3.Row) -> dict[str, Any]:
    state: State = row["state"]
    return {
        "id": row["id"],
        "service_code": row["service_code"],
        "service_group": row["service_group"],
        "state": state,
        "status": lifecycle.open311_status(state),
        "source": row["source"],
        "device_id": row["device_id"],
        "description": row["description"],
        "building": row["building"],
        "floor": row["floor"],
        "unit": row["unit"],
        "household": row["household"],
        "address": row["address"],
        "address_id": row["address_id"],
        "lat": row["lat"],
        "long": row["long"],
        "media_url": row["media_url"],
        "attributes": orjson.loads(row["attributes"]),
        "requested_ms": row["requested_ms"],
        "updated_ms": row["updated_ms"],
        "expected_ms": row["expected_ms"],
        "state_since_ms": row["state_since_ms"],
        "provider_id": row["provider_id"],
        "status_notes": row["status_notes"],
        "merged_into": row["merged_into"],
        "completed_ms": row["completed_ms"],
        "overdue": row["overdue_alarm_ms"] is not None,
        "filed_by": row["filed_by"],  # internal: scopes a terminal's reads (gateway/privacy.py)
    }


def step_record(step: Step) -> dict[str, Any]:
    """A lifecycle step as kept for the sinks (gateway/sinks/lineprotocol.py and
    gateway/uplink/items.py read it): the request's allow-listed fields only, so no outbox on
    disk ever holds a resident's personal data (gateway/privacy.py)."""
    return {
        "kind": "step",
        "request": privacy.uplink_request(step.request),
        "from": step.from_state,
        "to": step.to_state,
        "ts_ms": step.ts_ms,
        "actor": step.actor,
    }


def _default_note(target: State, provider_id: str | None, merged_into: str | None) -> str:
    if target == "assigned":
        return f"assigned to {provider_id}"
    if target == "merged":
        return f"duplicate of {merged_into}"
    return target.replace("_", " ")
