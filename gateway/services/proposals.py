"""Proposals and the households' votes on them: what the community decides to ask the street
office for, answering needs on the ranked list (gateway/services/needs.py).

Plain functions over the services' connection, run on the services' `SqliteThread`. A vote
counts once per household, and only for a household in the installer's register whose PIN or
card matches (gateway/services/households.py).
"""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson

from gateway.services.households import HouseholdRegister
from gateway.services.intake import CHOICES, NewVote
from gateway.services.refusals import DeskError
from gateway.sqlite import transaction


def create(
    conn: sqlite3.Connection,
    title: str,
    description: str,
    needs: list[str],
    closes_ms: int | None,
    actor: str,
    now_ms: int,
) -> dict[str, Any]:
    with transaction(conn, immediate=True):
        seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM proposals").fetchone()[0]
        pid = f"P-{seq:04d}"
        conn.execute(
            "INSERT INTO proposals (seq, id, title, description, needs, created_ms, created_by, closes_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, pid, title, description, orjson.dumps(needs).decode(), now_ms, actor, closes_ms),
        )
    return _known(conn, pid)


def get(conn: sqlite3.Connection, pid: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM proposals WHERE id = ?", (pid,)).fetchone()
    return None if row is None else _view(conn, row)


def listing(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every proposal, oldest first."""
    return [_view(conn, r) for r in conn.execute("SELECT * FROM proposals ORDER BY seq").fetchall()]


def close(conn: sqlite3.Connection, pid: str, now_ms: int, filed: bool) -> dict[str, Any]:
    """End the voting (and mark it filed with the street office when `filed`)."""
    _known(conn, pid)
    with transaction(conn, immediate=True):
        conn.execute("UPDATE proposals SET closed_ms = COALESCE(closed_ms, ?) WHERE id = ?", (now_ms, pid))
        if filed:
            conn.execute("UPDATE proposals SET filed_ms = COALESCE(filed_ms, ?) WHERE id = ?", (now_ms, pid))
    return _known(conn, pid)


def vote(
    conn: sqlite3.Connection, register: HouseholdRegister, vote: NewVote, now_ms: int
) -> tuple[str, dict[str, Any]]:
    """A vote checked against the household register, then recorded (one per household):
    "accepted", or "duplicate" for a re-sent one; a second vote is refused."""
    if not len(register):
        raise DeskError(
            "no_register: votes count only for households in the register, and the installer "
            "has provided none (services.households)",
            409,
        )
    if not register.verify(vote.household, vote.secret):
        # The household is not named: refusals are logged and dead-lettered.
        raise DeskError(
            "household_not_verified: the household is not in the register, or its PIN or card does not match",
            403,
        )
    proposal = _known(conn, vote.proposal_id)
    if vote.vote_key is not None:
        known = conn.execute("SELECT 1 FROM votes WHERE vote_key = ?", (vote.vote_key,)).fetchone()
        if known is not None:
            return "duplicate", proposal
    if not proposal["open"] or (proposal["closes_ms"] is not None and vote.ts_ms >= proposal["closes_ms"]):
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
    return "accepted", _known(conn, vote.proposal_id)


def _known(conn: sqlite3.Connection, pid: str) -> dict[str, Any]:
    proposal = get(conn, pid)
    if proposal is None:
        raise DeskError(f"no proposal {pid[:64]!r}", 404)
    return proposal


def _view(conn: sqlite3.Connection, row: sqlite3.Row) -> dict[str, Any]:
    counts = dict.fromkeys(CHOICES, 0)
    for choice, n in conn.execute(
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
