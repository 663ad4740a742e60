"""Residents' rights and retention over the services' file: export, erasure, pseudonymisation.

PIPL gives residents the right to see and to erase their personal data, and asks that it be kept
no longer than needed (docs/privacy.md). Here:
- `pseudonymise_closed`: the personal fields (gateway/privacy.py REQUEST_PERSONAL, the steps'
  notes, the ratings' comments) of requests closed longer than `privacy.personal_data_retention`
  are emptied, and votes on proposals closed that long ago no longer name their household. Run by
  the services' periodic task (gateway/services/deadlines.py).
- `export`: everything kept about one contact or one household, as JSON.
- `erase`: the same pseudonymisation at once, for one contact or one household, with a report.
The rows stay, with their services, providers, times, states, scores and vote choices: every
evaluation figure, needs count and vote tally is the same after as before.

Functions over the services' connection (gateway/services/schema.py opens it with secure_delete,
so what is emptied is overwritten on disk, not left in free pages), run on the services' thread
or by `cgw residents`.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.services.lifecycle import OPEN311_CLOSED
from gateway.sqlite import transaction

SCHEMA = ["ALTER TABLE requests ADD COLUMN pseudonymised_ms INTEGER"]


@dataclass(frozen=True, slots=True)
class Resident:
    """Whom an export or an erasure is about: a contact (phone, e-mail, name) or a household."""

    contact: str | None = None
    household: str | None = None  # "building/unit"

    def __post_init__(self) -> None:
        if (self.contact is None) == (self.household is None):
            raise ValueError("name exactly one of a contact or a household (building/unit)")
        if self.household is not None and "/" not in self.household:
            raise ValueError("a household is building/unit, e.g. 3/2-301")

    def words(self) -> list[str]:
        """What names this resident in free text: the contact, or the household and its unit."""
        if self.contact is not None:
            return [self.contact]
        assert self.household is not None
        return [self.household, self.household.partition("/")[2]]


@dataclass(slots=True)
class ErasureReport:
    resident: Resident
    at_ms: int
    requests: list[str] = field(default_factory=list)
    still_open: list[str] = field(default_factory=list)
    votes: int = 0
    ratings: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "erased_at_ms": self.at_ms,
            "contact": self.resident.contact is not None,  # the erased contact is not repeated
            "household": self.resident.household is not None,
            "requests": self.requests,
            "requests_still_open": self.still_open,
            "ratings_emptied": self.ratings,
            "votes_unlinked": self.votes,
            "kept": "services, providers, times, states, scores and vote choices: every figure stays",
        }


def tickets_of(conn: sqlite3.Connection, resident: Resident) -> list[str]:
    if resident.contact is not None:
        rows = conn.execute(
            "SELECT id FROM requests WHERE EXISTS (SELECT 1 FROM json_each(requests.contact) WHERE value = ?)"
            " ORDER BY seq",
            (resident.contact,),
        )
    else:
        assert resident.household is not None
        building, _, unit = resident.household.partition("/")
        rows = conn.execute(
            "SELECT id FROM requests WHERE household = ? OR (building = ? AND unit = ?) ORDER BY seq",
            (resident.household, building, unit),
        )
    return [r[0] for r in rows]


def export(conn: sqlite3.Connection, resident: Resident) -> dict[str, Any]:
    """Everything kept about `resident`: requests with their steps and ratings, and votes."""
    tickets = tickets_of(conn, resident)
    requests = []
    for ticket in tickets:
        row = conn.execute("SELECT * FROM requests WHERE id = ?", (ticket,)).fetchone()
        item = dict(row)
        for internal in ("seq", "overdue_alarm_ms", "stalled_alarm_ms"):
            del item[internal]
        item["contact"] = orjson.loads(row["contact"])
        item["attributes"] = orjson.loads(row["attributes"])
        item["history"] = [
            dict(r)
            for r in conn.execute(
                "SELECT ts_ms, from_state, to_state, actor, note FROM transitions"
                " WHERE request_id = ? ORDER BY id",
                (ticket,),
            )
        ]
        rating = conn.execute(
            "SELECT ts_ms, score, comment FROM ratings WHERE request_id = ?", (ticket,)
        ).fetchone()
        item["rating"] = dict(rating) if rating is not None else None
        requests.append(item)
    votes = []
    if resident.household is not None:
        votes = [
            dict(r)
            for r in conn.execute(
                "SELECT proposal_id, choice, ts_ms FROM votes WHERE household = ? ORDER BY ts_ms",
                (resident.household,),
            )
        ]
    return {"format": "cgw-residents-export/1", "requests": requests, "votes": votes}


def erase(conn: sqlite3.Connection, resident: Resident, now_ms: int) -> ErasureReport:
    """Pseudonymise everything kept about `resident` now, whatever the requests' states."""
    report = ErasureReport(resident, now_ms)
    with transaction(conn, immediate=True):
        report.requests = tickets_of(conn, resident)
        if report.requests:
            marks = ", ".join("?" * len(report.requests))
            report.still_open = [
                r[0]
                for r in conn.execute(
                    f"SELECT id FROM requests WHERE id IN ({marks}) AND state NOT IN"
                    f" ({', '.join('?' * len(OPEN311_CLOSED))})",
                    (*report.requests, *sorted(OPEN311_CLOSED)),
                )
            ]
            report.ratings = _pseudonymise(conn, report.requests, now_ms)
        if resident.household is not None:
            report.votes = _unlink_votes(conn, "household = ?", (resident.household,))
            # The access log keeps who read what, but no longer which household it was.
            conn.execute(
                "UPDATE access_log SET records = replace(records, ?, ?)",
                (orjson.dumps(f"household:{resident.household}").decode(), '"household:(erased)"'),
            )
    return report


def pseudonymise_closed(conn: sqlite3.Connection, before_ms: int, now_ms: int) -> int:
    """Pseudonymise requests closed before `before_ms`, and votes on proposals closed before it;
    how many requests."""
    closed = sorted(OPEN311_CLOSED)
    with transaction(conn, immediate=True):
        tickets = [
            r[0]
            for r in conn.execute(
                f"SELECT id FROM requests WHERE pseudonymised_ms IS NULL AND updated_ms < ?"
                f" AND state IN ({', '.join('?' * len(closed))})",
                (before_ms, *closed),
            )
        ]
        if tickets:
            _pseudonymise(conn, tickets, now_ms)
        _unlink_votes(
            conn,
            "household NOT LIKE 'anonymous-%' AND proposal_id IN"
            " (SELECT id FROM proposals WHERE closed_ms IS NOT NULL AND closed_ms < ?)",
            (before_ms,),
        )
    return len(tickets)


def _pseudonymise(conn: sqlite3.Connection, tickets: Iterable[str], now_ms: int) -> int:
    """Empty the personal fields of `tickets` (in the caller's transaction); ratings emptied."""
    ids = list(tickets)
    marks = ", ".join("?" * len(ids))
    conn.execute(
        f"""UPDATE requests SET description = '', unit = NULL, household = NULL, address = NULL,
            address_id = NULL, lat = NULL, long = NULL, media_url = NULL, contact = '{{}}',
            attributes = '{{}}', status_notes = NULL, pseudonymised_ms = ?,
            -- an Open311 client's device id names the resident's phone, in its re-send key too
            device_id = CASE WHEN source = 'open311' THEN NULL ELSE device_id END,
            request_key = CASE WHEN source = 'open311' THEN NULL ELSE request_key END
            WHERE id IN ({marks})""",
        (now_ms, *ids),
    )
    conn.execute(f"UPDATE transitions SET note = '' WHERE request_id IN ({marks})", ids)
    return conn.execute(
        f"UPDATE ratings SET comment = '' WHERE request_id IN ({marks}) AND comment != ''", ids
    ).rowcount


def _unlink_votes(conn: sqlite3.Connection, where: str, args: tuple[object, ...]) -> int:
    """Votes keep their choice and count, but name no household (nor the terminal) any more."""
    rows = conn.execute(f"SELECT rowid FROM votes WHERE {where}", args).fetchall()
    for (rowid,) in rows:
        conn.execute(
            "UPDATE votes SET household = ?, device_id = NULL WHERE rowid = ?",
            (f"anonymous-{secrets.token_hex(8)}", rowid),
        )
    return len(rows)
