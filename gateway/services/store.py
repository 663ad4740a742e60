"""The service desk's own SQLite file: requests, their audit trail, ratings, needs, proposals, votes.

Separate from the telemetry store (`services.db` beside `gateway.db`) so a burst of sensor data
never delays a resident's request. Used from one thread only (the desk's); every public method
is one transaction, committed with synchronous=FULL before the caller acknowledges anything.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway import privacy
from gateway.files import private_store
from gateway.services import access_log, lifecycle, residents
from gateway.services.catalogue import Catalogue
from gateway.services.intake import NewRating, NewRequest, NewVote
from gateway.services.lifecycle import State, TransitionError
from gateway.sqlite import connect, migrate, transaction

MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE requests (
            seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,
            service_code TEXT NOT NULL, service_group TEXT NOT NULL, state TEXT NOT NULL,
            source TEXT NOT NULL, device_id TEXT, request_key TEXT UNIQUE,
            description TEXT NOT NULL, building TEXT, floor INTEGER, unit TEXT, household TEXT,
            address TEXT, lat REAL, long REAL, media_url TEXT,
            contact TEXT NOT NULL, attributes TEXT NOT NULL,
            requested_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL, expected_ms INTEGER NOT NULL,
            state_since_ms INTEGER NOT NULL, provider_id TEXT, status_notes TEXT, merged_into TEXT,
            completed_ms INTEGER, overdue_alarm_ms INTEGER, stalled_alarm_ms INTEGER)""",
        "CREATE INDEX requests_requested ON requests (requested_ms)",
        "CREATE INDEX requests_state ON requests (state)",
        "CREATE INDEX requests_device_service ON requests (device_id, service_code, state)",
        """CREATE TABLE transitions (
            id INTEGER PRIMARY KEY, request_id TEXT NOT NULL REFERENCES requests (id),
            ts_ms INTEGER NOT NULL, from_state TEXT, to_state TEXT NOT NULL,
            actor TEXT NOT NULL, note TEXT NOT NULL, provider_id TEXT)""",
        "CREATE INDEX transitions_request ON transitions (request_id, id)",
        """CREATE TABLE ratings (
            id INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE REFERENCES requests (id),
            ts_ms INTEGER NOT NULL, score INTEGER NOT NULL, comment TEXT NOT NULL, rater TEXT NOT NULL)""",
        """CREATE TABLE assessments (
            id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, assessor TEXT NOT NULL,
            provider_id TEXT NOT NULL, service_code TEXT, request_id TEXT,
            score INTEGER NOT NULL, comment TEXT NOT NULL)""",
        """CREATE TABLE need_signals (
            id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, service_code TEXT NOT NULL,
            service_group TEXT NOT NULL, building TEXT, source TEXT NOT NULL,
            request_id TEXT, device_id TEXT, event_key TEXT UNIQUE)""",
        "CREATE INDEX need_signals_ts ON need_signals (ts_ms)",
        """CREATE TABLE proposals (
            seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, title TEXT NOT NULL,
            description TEXT NOT NULL, needs TEXT NOT NULL, created_ms INTEGER NOT NULL,
            created_by TEXT NOT NULL, closes_ms INTEGER, closed_ms INTEGER, filed_ms INTEGER)""",
        """CREATE TABLE votes (
            proposal_id TEXT NOT NULL REFERENCES proposals (id), household TEXT NOT NULL,
            choice TEXT NOT NULL, ts_ms INTEGER NOT NULL, device_id TEXT, vote_key TEXT UNIQUE,
            PRIMARY KEY (proposal_id, household))""",
    ],
    # 2: time-series lines written in the same transaction as the request they describe, until
    # the local store's outbox has them (at-least-once; the lines are idempotent). AUTOINCREMENT:
    # ids must never be reused once a prefix of the table has been forwarded and deleted.
    ["CREATE TABLE outbox_lines (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL)"],
    # 3: the desk keeps service *records* (JSON: a lifecycle step or a rating) instead of
    # InfluxDB lines, so each sink encodes them its own way (line protocol, the district uplink).
    # Lines an older version kept and did not forward yet are carried over, in order.
    [
        "CREATE TABLE outbox_records (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL)",
        "INSERT INTO outbox_records (body)"
        " SELECT json_object('kind', 'line', 'line', body) FROM outbox_lines ORDER BY id",
        "DROP TABLE outbox_lines",
    ],
    # 4: Open311's address_id kept as filed (it was folded into the address), so a GET returns it.
    ["ALTER TABLE requests ADD COLUMN address_id TEXT"],
    # 5: who filed each request (the actor of its first step), so a terminal reads only its own
    # tickets (gateway/privacy.py); older rows take it from their audit trail.
    [
        "ALTER TABLE requests ADD COLUMN filed_by TEXT",
        "UPDATE requests SET filed_by = (SELECT actor FROM transitions t WHERE t.request_id = requests.id"
        " AND t.from_state IS NULL ORDER BY t.id LIMIT 1)",
    ],
    # 6: the box's own secrets, kept with the data they protect (and in its backups): "rating"
    # derives each request's rating code (gateway/privacy.py, docs/privacy.md).
    ["CREATE TABLE box_secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL)"],
    # 7: the access log of personal-data reads (gateway/services/access_log.py)
    access_log.SCHEMA,
    # 8: when a request's personal data was emptied (gateway/services/residents.py)
    residents.SCHEMA,
]

# Tickets shown to residents: the community and 10 characters of an alphabet without look-alikes
# (50 random bits), so no one can guess another resident's ticket. Older sequential tickets stay.
TICKET_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
TICKET_CHARS = 10
RATING_CODE_CHARS = 8

MAX_CLOCK_AHEAD_MS = 60_000


class DeskError(ValueError):
    """A refused operation on the service desk; `status` is the HTTP status that fits it."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Step:
    """One lifecycle step of one request, as recorded in the audit trail."""

    request: dict[str, Any]
    from_state: State | None
    to_state: State
    ts_ms: int
    actor: str
    note: str


class ServiceStore:
    def __init__(self, path: Path, catalogue: Catalogue, community: str) -> None:
        self._path = path
        self._catalogue = catalogue
        self._community = community
        self._conn: sqlite3.Connection | None = None
        self._sent_upto = 0  # outbox_records handed on in this run

    def open(self) -> None:
        private_store(self._path)
        conn = connect(self._path)
        conn.row_factory = sqlite3.Row
        # What is emptied or deleted is overwritten on disk, not left in free pages, so no copy of
        # the file made afterwards (a backup) holds it (docs/privacy.md).
        conn.execute("PRAGMA secure_delete=ON")
        migrate(conn, MIGRATIONS, str(self._path))
        with transaction(conn, immediate=True):
            conn.execute(
                "INSERT OR IGNORE INTO box_secrets (name, value) VALUES ('rating', ?)",
                (secrets.token_bytes(32),),
            )
        self._rating_secret: bytes = conn.execute(
            "SELECT value FROM box_secrets WHERE name = 'rating'"
        ).fetchone()[0]
        self._conn = conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the service store is not open")
        return self._conn

    # -- requests ------------------------------------------------------------------------------

    def create(self, new: NewRequest, actor: str) -> tuple[dict[str, Any], Step | None]:
        """File a request; a known `request_key` gives the first request back and no step."""
        conn = self.conn
        with transaction(conn, immediate=True):
            if new.request_key is not None:
                row = conn.execute(
                    "SELECT * FROM requests WHERE request_key = ?", (new.request_key,)
                ).fetchone()
                if row is not None:
                    return request_view(row), None
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM requests").fetchone()[0]
            ticket = self._new_ticket()
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
                    (
                        ts,
                        service.service_code,
                        service.group,
                        new.building,
                        new.source,
                        ticket,
                        new.device_id,
                    ),
                )
            view = self._get(ticket)
            step = Step(view, None, "submitted", ts, actor, f"filed via {new.source}")
            self._keep([step_record(step)])
        return view, step

    def _new_ticket(self) -> str:
        while True:
            ticket = (
                f"{self._community}-{''.join(secrets.choice(TICKET_ALPHABET) for _ in range(TICKET_CHARS))}"
            )
            if self.conn.execute("SELECT 1 FROM requests WHERE id = ?", (ticket,)).fetchone() is None:
                return ticket

    def rating_code(self, ticket: str) -> str:
        """The request's rating code: what the resident is given (on the kiosk's receipt) to rate
        it from anywhere. Derived from the box's secret, so a re-sent request gets it again."""
        digest = hmac.new(self._rating_secret, ticket.encode(), hashlib.sha256).digest()
        return "".join(TICKET_ALPHABET[b % len(TICKET_ALPHABET)] for b in digest[:RATING_CODE_CHARS])

    def transition(
        self,
        ticket: str,
        target: State,
        actor: str,
        note: str = "",
        provider_id: str | None = None,
        merged_into: str | None = None,
        ts_ms: int | None = None,
        now_ms: int = 0,
    ) -> Step:
        conn = self.conn
        with transaction(conn, immediate=True):
            row = self._row(ticket)
            current: State = row["state"]
            lifecycle.check(current, target)
            last = conn.execute(
                "SELECT MAX(ts_ms) FROM transitions WHERE request_id = ?", (ticket,)
            ).fetchone()[0]
            ts = now_ms if ts_ms is None else ts_ms
            if ts > now_ms + MAX_CLOCK_AHEAD_MS:
                raise DeskError("ts is in the future")
            if ts < last:
                raise DeskError("ts is before the request's last recorded step")
            updates: dict[str, Any] = {"state": target, "state_since_ms": ts, "updated_ms": ts}
            updates["stalled_alarm_ms"] = None
            service = self._catalogue.get(row["service_code"])
            if target == "assigned":
                if provider_id is None:
                    raise DeskError("assigning needs provider_id")
                if provider_id not in self._catalogue.providers:
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
            text = note or _default_note(target, provider_id, merged_into)
            updates["status_notes"] = text
            assignments = ", ".join(f"{k} = ?" for k in updates)
            conn.execute(f"UPDATE requests SET {assignments} WHERE id = ?", (*updates.values(), ticket))
            conn.execute(
                "INSERT INTO transitions (request_id, ts_ms, from_state, to_state, actor, note, provider_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (ticket, ts, current, target, actor, text, updates.get("provider_id")),
            )
            view = self._get(ticket)
            step = Step(view, current, target, ts, actor, text)
            self._keep([step_record(step)])
        return step

    # -- service records on their way to the outbox -------------------------------------------------

    def _keep(self, records: list[dict[str, Any]]) -> None:
        self.conn.executemany(
            "INSERT INTO outbox_records (body) VALUES (?)", [(orjson.dumps(r).decode(),) for r in records]
        )

    def unsent_records(self) -> tuple[int, list[dict[str, Any]]]:
        """Records not yet handed on in this run (after a restart: all not yet forwarded)."""
        rows = self.conn.execute(
            "SELECT id, body FROM outbox_records WHERE id > ? ORDER BY id", (self._sent_upto,)
        ).fetchall()
        if rows:
            self._sent_upto = rows[-1][0]
        return self._sent_upto, [orjson.loads(r[1]) for r in rows]

    def forwarded(self, upto: int) -> None:
        """The local store's outbox has every record up to `upto`: they need not be kept here."""
        self.conn.execute("DELETE FROM outbox_records WHERE id <= ?", (upto,))

    def get(self, ticket: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM requests WHERE id = ?", (ticket,)).fetchone()
        return None if row is None else request_view(row)

    def history(self, ticket: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT ts_ms, from_state, to_state, actor, note, provider_id FROM transitions"
            " WHERE request_id = ? ORDER BY id",
            (ticket,),
        )
        return [dict(r) for r in rows]

    def requests(
        self,
        *,
        ids: list[str] | None = None,
        codes: list[str] | None = None,
        states: list[str] | None = None,
        provider_id: str | None = None,
        building: str | None = None,
        filed_by: str | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        where: list[str] = []
        args: list[object] = []
        for column, values in (("id", ids), ("service_code", codes), ("state", states)):
            if values:
                where.append(f"{column} IN ({', '.join('?' * len(values))})")
                args.extend(values)
        for column, value in (("provider_id", provider_id), ("building", building), ("filed_by", filed_by)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if start_ms is not None:
            where.append("requested_ms >= ?")
            args.append(start_ms)
        if end_ms is not None:
            where.append("requested_ms < ?")
            args.append(end_ms)
        sql = "SELECT * FROM requests" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY requested_ms DESC, seq DESC LIMIT ? OFFSET ?"
        return [request_view(r) for r in self.conn.execute(sql, (*args, limit, offset))]

    def _row(self, ticket: str) -> sqlite3.Row:
        row: sqlite3.Row | None = self.conn.execute(
            "SELECT * FROM requests WHERE id = ?", (ticket,)
        ).fetchone()
        if row is None:
            raise DeskError(f"no service request {ticket[:128]!r}", 404)
        return row

    def _get(self, ticket: str) -> dict[str, Any]:
        return request_view(self._row(ticket))

    # -- sensor-opened requests and need signals -------------------------------------------------

    def sensor_signal(
        self, event_key: str, ts_ms: int, device_id: str, building: str | None, service_code: str
    ) -> bool:
        """Count a device event as evidence of a need; False when it was already counted."""
        service = self._catalogue.services[service_code]
        with transaction(self.conn, immediate=True):
            cursor = self.conn.execute(
                "INSERT OR IGNORE INTO need_signals (ts_ms, service_code, service_group, building, source,"
                " device_id, event_key) VALUES (?, ?, ?, ?, 'sensor', ?, ?)",
                (ts_ms, service_code, service.group, building, device_id, event_key),
            )
        return cursor.rowcount == 1

    def open_sensor_request(self, device_id: str, service_code: str) -> dict[str, Any] | None:
        """The request a device's earlier event opened and that is still being worked on."""
        placeholders = ", ".join("?" * len(lifecycle.ACTIVE))
        row = self.conn.execute(
            f"SELECT * FROM requests WHERE device_id = ? AND service_code = ? AND source = 'sensor'"
            f" AND state IN ({placeholders}) LIMIT 1",
            (device_id, service_code, *sorted(lifecycle.ACTIVE)),
        ).fetchone()
        return None if row is None else request_view(row)

    def link_signal(self, event_key: str, ticket: str) -> None:
        with transaction(self.conn, immediate=True):
            self.conn.execute(
                "UPDATE need_signals SET request_id = ? WHERE event_key = ?", (ticket, event_key)
            )

    def signals(self, start_ms: int, end_ms: int) -> list[sqlite3.Row]:
        """Need signals in [start, end): one per request filed by a resident, one per sensor event."""
        return self.conn.execute(
            "SELECT ts_ms, service_code, service_group, building, source FROM need_signals"
            " WHERE ts_ms >= ? AND ts_ms < ?",
            (start_ms, end_ms),
        ).fetchall()

    # -- process control ---------------------------------------------------------------------------

    def due_alarms(self, now_ms: int) -> list[tuple[str, dict[str, Any], int]]:
        """Requests past their deadline or stalled, each reported once: (type, request, due_ms)."""
        conn = self.conn
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
                    conn.execute(
                        "UPDATE requests SET overdue_alarm_ms = ? WHERE seq = ?", (now_ms, row["seq"])
                    )
                    out.append(("request_overdue", request_view(row), row["expected_ms"]))
                service = self._catalogue.get(row["service_code"])
                if service is None or row["stalled_alarm_ms"] is not None:
                    continue
                stall_due = row["state_since_ms"] + self._catalogue.stall_ms(service)
                if stall_due < now_ms:
                    conn.execute(
                        "UPDATE requests SET stalled_alarm_ms = ? WHERE seq = ?", (now_ms, row["seq"])
                    )
                    out.append(("request_stalled", request_view(row), stall_due))
        return out

    def workloads(self, now_ms: int) -> dict[str, dict[str, int]]:
        placeholders = ", ".join("?" * len(lifecycle.ACTIVE))
        rows = self.conn.execute(
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

    # -- ratings and assessments -------------------------------------------------------------------

    def rate(self, rating: NewRating, now_ms: int) -> tuple[dict[str, Any], bool, Step | None]:
        """A resident's rating: (request, first rating?, the step to evaluated if it made one)."""
        conn = self.conn
        row = self._row(rating.service_request_id)
        own = row["filed_by"] is not None and row["filed_by"] == rating.filer
        code = rating.code is not None and hmac.compare_digest(
            rating.code.strip().upper(), self.rating_code(rating.service_request_id)
        )
        if not (own or code):
            raise DeskError(
                f"not_the_filer: {rating.service_request_id} is rated through the terminal or token that "
                "filed it, or with its rating code",
                403,
            )
        if row["state"] not in ("completed", "evaluated", "closed"):
            raise DeskError(
                f"{rating.service_request_id} is {row['state']}: a service is rated once it is completed", 409
            )
        with transaction(conn, immediate=True):
            cursor = conn.execute(
                "INSERT OR IGNORE INTO ratings (request_id, ts_ms, score, comment, rater)"
                " VALUES (?, ?, ?, ?, ?)",
                (rating.service_request_id, rating.ts_ms, rating.score, rating.comment, rating.rater),
            )
            if cursor.rowcount == 1:
                self._keep([rating_record(request_view(row), rating)])
        if cursor.rowcount == 0:
            return request_view(row), False, None
        step = None
        if row["state"] == "completed":
            ts = max(rating.ts_ms, row["state_since_ms"])
            step = self.transition(
                rating.service_request_id,
                "evaluated",
                f"resident via {rating.rater}",
                f"rated {rating.score}/5",
                ts_ms=ts,
                now_ms=max(now_ms, ts),
            )
        return self._get(rating.service_request_id), True, step

    def rating_of(self, ticket: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT ts_ms, score, comment, rater FROM ratings WHERE request_id = ?", (ticket,)
        ).fetchone()
        return None if row is None else dict(row)

    def assess(
        self,
        ts_ms: int,
        assessor: str,
        provider_id: str,
        score: int,
        comment: str,
        service_code: str | None,
        ticket: str | None,
    ) -> dict[str, Any]:
        if provider_id not in self._catalogue.providers:
            raise DeskError(f"provider {provider_id!r} is not in the catalogue", 422)
        if service_code is not None and self._catalogue.get(service_code) is None:
            raise DeskError(f"service {service_code!r} is not in the catalogue", 422)
        if ticket is not None:
            self._row(ticket)
        with transaction(self.conn, immediate=True):
            cursor = self.conn.execute(
                "INSERT INTO assessments"
                " (ts_ms, assessor, provider_id, service_code, request_id, score, comment)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (ts_ms, assessor, provider_id, service_code, ticket, score, comment),
            )
        return {
            "id": cursor.lastrowid,
            "ts_ms": ts_ms,
            "assessor": assessor,
            "provider_id": provider_id,
            "service_code": service_code,
            "service_request_id": ticket,
            "score": score,
            "comment": comment,
        }

    def evaluation_rows(self, start_ms: int, end_ms: int) -> list[sqlite3.Row]:
        """Every request filed in [start, end) with its resident rating, for the evaluation."""
        return self.conn.execute(
            """SELECT r.id, r.service_code, r.service_group, r.provider_id, r.state, r.requested_ms,
                      r.expected_ms, r.completed_ms, g.score
               FROM requests r LEFT JOIN ratings g ON g.request_id = r.id
               WHERE r.requested_ms >= ? AND r.requested_ms < ?""",
            (start_ms, end_ms),
        ).fetchall()

    def assessment_rows(self, start_ms: int, end_ms: int) -> list[sqlite3.Row]:
        return self.conn.execute(
            "SELECT ts_ms, provider_id, service_code, score FROM assessments WHERE ts_ms >= ? AND ts_ms < ?",
            (start_ms, end_ms),
        ).fetchall()

    def active_requests(self) -> list[dict[str, Any]]:
        """Requests still owed, plus those merged into them (they count their households)."""
        placeholders = ", ".join("?" * len(lifecycle.ACTIVE))
        rows = self.conn.execute(
            f"""SELECT * FROM requests WHERE state IN ({placeholders})
                OR (state = 'merged' AND merged_into IN (
                    SELECT id FROM requests WHERE state IN ({placeholders})))""",
            (*sorted(lifecycle.ACTIVE), *sorted(lifecycle.ACTIVE)),
        )
        return [request_view(r) for r in rows]

    # -- proposals and votes -----------------------------------------------------------------------

    def create_proposal(
        self, title: str, description: str, needs: list[str], closes_ms: int | None, actor: str, now_ms: int
    ) -> dict[str, Any]:
        with transaction(self.conn, immediate=True):
            seq = self.conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM proposals").fetchone()[0]
            pid = f"P-{seq:04d}"
            self.conn.execute(
                "INSERT INTO proposals"
                " (seq, id, title, description, needs, created_ms, created_by, closes_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, pid, title, description, orjson.dumps(needs).decode(), now_ms, actor, closes_ms),
            )
        proposal = self.proposal(pid)
        assert proposal is not None
        return proposal

    def proposal(self, pid: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM proposals WHERE id = ?", (pid,)).fetchone()
        return None if row is None else self._proposal_view(row)

    def proposals(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM proposals ORDER BY seq").fetchall()
        return [self._proposal_view(r) for r in rows]

    def close_proposal(self, pid: str, now_ms: int, filed: bool) -> dict[str, Any]:
        proposal = self.proposal(pid)
        if proposal is None:
            raise DeskError(f"no proposal {pid[:64]!r}", 404)
        with transaction(self.conn, immediate=True):
            self.conn.execute(
                "UPDATE proposals SET closed_ms = COALESCE(closed_ms, ?) WHERE id = ?", (now_ms, pid)
            )
            if filed:
                self.conn.execute(
                    "UPDATE proposals SET filed_ms = COALESCE(filed_ms, ?) WHERE id = ?", (now_ms, pid)
                )
        result = self.proposal(pid)
        assert result is not None
        return result

    def vote(self, vote: NewVote, now_ms: int) -> tuple[str, dict[str, Any]]:
        """Record a vote: "accepted", or "duplicate" for a re-sent one; a second vote is refused."""
        proposal = self.proposal(vote.proposal_id)
        if proposal is None:
            raise DeskError(f"no proposal {vote.proposal_id[:64]!r}", 404)
        conn = self.conn
        if vote.vote_key is not None:
            known = conn.execute("SELECT 1 FROM votes WHERE vote_key = ?", (vote.vote_key,)).fetchone()
            if known is not None:
                return "duplicate", proposal
        if not proposal["open"] or (
            proposal["closes_ms"] is not None and vote.ts_ms >= proposal["closes_ms"]
        ):
            raise DeskError(f"proposal {vote.proposal_id} is closed for voting", 409)
        with transaction(conn, immediate=True):
            cursor = conn.execute(
                "INSERT OR IGNORE INTO votes (proposal_id, household, choice, ts_ms, device_id, vote_key)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (vote.proposal_id, vote.household, vote.choice, vote.ts_ms, vote.device_id, vote.vote_key),
            )
        if cursor.rowcount == 0:
            # The household is not named: refusals are logged and dead-lettered.
            raise DeskError(f"already_voted: this household has already voted on {vote.proposal_id}", 409)
        result = self.proposal(vote.proposal_id)
        assert result is not None
        return "accepted", result

    def _proposal_view(self, row: sqlite3.Row) -> dict[str, Any]:
        counts = {choice: 0 for choice in ("yes", "no", "abstain")}
        for choice, n in self.conn.execute(
            "SELECT choice, COUNT(*) FROM votes WHERE proposal_id = ? GROUP BY choice", (row["id"],)
        ):
            counts[choice] = n
        decided = counts["yes"] + counts["no"]
        closed = row["closed_ms"] is not None
        return {
            "id": row["id"],
            "title": row["title"],
            "description": row["description"],
            "needs": orjson.loads(row["needs"]),
            "created_ms": row["created_ms"],
            "created_by": row["created_by"],
            "closes_ms": row["closes_ms"],
            "closed_ms": row["closed_ms"],
            "filed_ms": row["filed_ms"],
            "open": not closed,
            "votes": counts,
            "households_voted": sum(counts.values()),
            # Passed: more yes than no among households that took a side (abstentions count for
            # turnout only). Decided only once the proposal is closed.
            "result": ("passed" if counts["yes"] > counts["no"] else "rejected") if closed else "open",
            "approval": counts["yes"] / decided if decided else None,
        }


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
    """A lifecycle step as the desk keeps it for the sinks (gateway/sinks/lineprotocol.py and
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


def rating_record(request: dict[str, Any], rating: NewRating) -> dict[str, Any]:
    return {
        "kind": "rating",
        "request": privacy.uplink_request(request),
        "score": rating.score,
        "ts_ms": rating.ts_ms,
    }


def _default_note(target: State, provider_id: str | None, merged_into: str | None) -> str:
    if target == "assigned":
        return f"assigned to {provider_id}"
    if target == "merged":
        return f"duplicate of {merged_into}"
    return target.replace("_", " ")


__all__ = ["DeskError", "ServiceStore", "Step", "TransitionError", "request_view"]
