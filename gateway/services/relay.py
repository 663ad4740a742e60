"""Service records on their way from `services.sqlite3` to the local store's outbox.

A lifecycle step or a rating is kept as a record (JSON) in `outbox_records`, in the same
transaction as the change it describes, so no acknowledged change loses its record. The relay
hands the records on with the next batch the local store commits, and forgets them here once
that batch is durable (at least once: a record handed on again after a crash is idempotent, as
each sink's encoding of it is). Each sink encodes a record its own way
(gateway/sinks/lineprotocol.py, gateway/uplink/items.py).
"""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson


def keep(conn: sqlite3.Connection, records: list[dict[str, Any]]) -> None:
    """Keep records for the sinks; called inside the transaction of the change they describe."""
    conn.executemany(
        "INSERT INTO outbox_records (body) VALUES (?)", [(orjson.dumps(r).decode(),) for r in records]
    )


def unsent(conn: sqlite3.Connection, after: int) -> tuple[int, list[dict[str, Any]]]:
    """The records kept after id `after`, in order, and the last one's id (`after` if none)."""
    rows = conn.execute("SELECT id, body FROM outbox_records WHERE id > ? ORDER BY id", (after,)).fetchall()
    return (rows[-1][0] if rows else after), [orjson.loads(r[1]) for r in rows]


def forget(conn: sqlite3.Connection, upto: int) -> None:
    """The local store's outbox has every record up to `upto`: they need not be kept here."""
    conn.execute("DELETE FROM outbox_records WHERE id <= ?", (upto,))
