"""Ratings and assessments: how residents rate a completed service, and how operators assess
providers; the evaluation's figures are drawn from both (gateway/services/evaluation.py).

Plain functions over the services' connection, run on the services' `SqliteThread`. A rating
is accepted from the terminal or token that filed the request, or with its rating code: an
HMAC of the ticket under the box's own secret (kept in the file, and in its backups), printed on
the kiosk's receipt, so a resident can rate from any terminal and no one can guess another's.
"""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
from typing import Any

from gateway import privacy
from gateway.services import evaluation, relay, requests
from gateway.services.catalogue import Catalogue
from gateway.services.intake import NewRating
from gateway.services.refusals import DeskError
from gateway.services.requests import TICKET_ALPHABET, Move, Step
from gateway.sqlite import transaction

RATING_CODE_CHARS = 8


def rating_code(conn: sqlite3.Connection, ticket: str) -> str:
    """The request's rating code: what the resident is given (on the kiosk's receipt) to rate
    it from anywhere. Derived from the box's secret, so a re-sent request gets it again."""
    secret: bytes = conn.execute("SELECT value FROM box_secrets WHERE name = 'rating'").fetchone()[0]
    digest = hmac.new(secret, ticket.encode(), hashlib.sha256).digest()
    return "".join(TICKET_ALPHABET[b % len(TICKET_ALPHABET)] for b in digest[:RATING_CODE_CHARS])


def rate(
    conn: sqlite3.Connection, catalogue: Catalogue, rating: NewRating, now_ms: int
) -> tuple[dict[str, Any], bool, Step | None]:
    """A resident's rating: (request, first rating?, the step to evaluated if it made one)."""
    row = requests.row_of(conn, rating.service_request_id)
    own = row["filed_by"] is not None and row["filed_by"] == rating.filer
    code = rating.code is not None and hmac.compare_digest(
        rating.code.strip().upper(), rating_code(conn, rating.service_request_id)
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
            "INSERT OR IGNORE INTO ratings (request_id, ts_ms, score, comment, rater) VALUES (?, ?, ?, ?, ?)",
            (rating.service_request_id, rating.ts_ms, rating.score, rating.comment, rating.rater),
        )
        if cursor.rowcount == 1:
            relay.keep(conn, [rating_record(requests.request_view(row), rating)])
    if cursor.rowcount == 0:
        return requests.request_view(row), False, None
    step = None
    if row["state"] == "completed":
        ts = max(rating.ts_ms, row["state_since_ms"])
        move = Move(
            rating.service_request_id,
            "evaluated",
            f"resident via {rating.rater}",
            f"rated {rating.score}/5",
            ts_ms=ts,
        )
        step = requests.transition(conn, catalogue, move, max(now_ms, ts))
    return requests.request_view(requests.row_of(conn, rating.service_request_id)), True, step


def rating_of(conn: sqlite3.Connection, ticket: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT ts_ms, score, comment, rater FROM ratings WHERE request_id = ?", (ticket,)
    ).fetchone()
    return None if row is None else dict(row)


def rating_record(request: dict[str, Any], rating: NewRating) -> dict[str, Any]:
    """A rating as kept for the sinks: the request's allow-listed fields and the score."""
    return {
        "kind": "rating",
        "request": privacy.uplink_request(request),
        "score": rating.score,
        "ts_ms": rating.ts_ms,
    }


def assess(
    conn: sqlite3.Connection,
    catalogue: Catalogue,
    *,
    ts_ms: int,
    assessor: str,
    provider_id: str,
    score: int,
    comment: str,
    service_code: str | None,
    ticket: str | None,
) -> dict[str, Any]:
    """An operator's assessment of a provider (for one service or request, or overall)."""
    if provider_id not in catalogue.providers:
        raise DeskError(f"provider {provider_id!r} is not in the catalogue", 422)
    if service_code is not None and catalogue.get(service_code) is None:
        raise DeskError(f"service {service_code!r} is not in the catalogue", 422)
    if ticket is not None:
        requests.row_of(conn, ticket)
    with transaction(conn, immediate=True):
        cursor = conn.execute(
            "INSERT INTO assessments (ts_ms, assessor, provider_id, service_code, request_id, score, comment)"
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


def evaluations(
    conn: sqlite3.Connection,
    start_ms: int,
    end_ms: int,
    bys: tuple[evaluation.By, ...],
    period: evaluation.Period,
) -> dict[str, list[dict[str, Any]]]:
    """The evaluation of the requests filed in [start, end), grouped each way in `bys`, from one
    read of the requests (with their residents' ratings) and the assessments."""
    rows = [
        dict(r)
        for r in conn.execute(
            """SELECT r.id, r.service_code, r.service_group, r.provider_id, r.state, r.requested_ms,
                      r.expected_ms, r.completed_ms, g.score
               FROM requests r LEFT JOIN ratings g ON g.request_id = r.id
               WHERE r.requested_ms >= ? AND r.requested_ms < ?""",
            (start_ms, end_ms),
        )
    ]
    assessed = [
        dict(a)
        for a in conn.execute(
            "SELECT ts_ms, provider_id, service_code, score FROM assessments WHERE ts_ms >= ? AND ts_ms < ?",
            (start_ms, end_ms),
        )
    ]
    return {by: evaluation.evaluate(rows, assessed, start_ms, end_ms, by, period) for by in bys}
