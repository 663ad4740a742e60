"""The district's commands already taken, by id: each is carried out once.

A command is claimed (its id written) before it is carried out and its reply kept after, each
in its own commit on the writer's connection. A command whose id is known is never carried out
again: the district gets the first reply back. If the gateway stopped between the claim and the
reply, the outcome is unknown and said so; it is not carried out a second time (at most once).
An id is forgotten once its command has expired by more than the longest lifetime, since an
expired command is refused anyway.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson


def claim(
    conn: sqlite3.Connection, ident: str, action: str, now_ms: int, expires_ms: int
) -> dict[str, Any] | None:
    """Write the id if it is new (returns None); otherwise its first reply (`{}` if none yet)."""
    cursor = conn.execute(
        "INSERT OR IGNORE INTO district_commands (id, action, received_ms, expires_ms) VALUES (?, ?, ?, ?)",
        (ident, action, now_ms, expires_ms),
    )
    if cursor.rowcount == 1:
        return None
    row = conn.execute("SELECT reply FROM district_commands WHERE id = ?", (ident,)).fetchone()
    reply: dict[str, Any] = orjson.loads(row[0]) if row and row[0] else {}
    return reply


def settle(conn: sqlite3.Connection, ident: str, reply: dict[str, Any]) -> None:
    conn.execute("UPDATE district_commands SET reply = ? WHERE id = ?", (orjson.dumps(reply).decode(), ident))


def forget(conn: sqlite3.Connection, expired_before_ms: int) -> int:
    """Drop the ids of commands that expired before `expired_before_ms`; returns how many."""
    return conn.execute("DELETE FROM district_commands WHERE expires_ms < ?", (expired_before_ms,)).rowcount
