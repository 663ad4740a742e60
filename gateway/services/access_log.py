"""The access log: every read of residents' personal data, who made it, when, of which records.

PIPL asks that reads of personal information be accountable (docs/privacy.md). Each API answer
that carries personal data to a role allowed to read it (gateway/privacy.py), each live-stream
item of a request sent to such a reader, and each `cgw residents export`, adds one entry: the
reader (the token's name, else its id), its role, the endpoint, and the tickets (or households)
read. Installers list it (`GET /api/v1/access-log`); entries older than
`privacy.access_log_retention` are deleted by the services' periodic task
(gateway/services/deadlines.py).

Functions over the services' connection (gateway/services/schema.py), run on the services' thread.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.sqlite import Where, transaction

SCHEMA = [
    """CREATE TABLE access_log (
        id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, who TEXT NOT NULL, role TEXT NOT NULL,
        token_id TEXT NOT NULL, endpoint TEXT NOT NULL, records TEXT NOT NULL, count INTEGER NOT NULL)""",
    "CREATE INDEX access_log_ts ON access_log (ts_ms)",
]
# An answer lists at most 1000 requests; an entry names them all, so none is read unrecorded.
MAX_RECORDS = 1000


@dataclass(frozen=True, slots=True)
class Access:
    ts_ms: int
    who: str  # the token's name (`cgw token --name`), else its id
    role: str
    token_id: str
    endpoint: str  # e.g. "GET /api/v1/requests/{ticket}"
    records: tuple[str, ...]  # tickets, or "household:<building>/<unit>"


def record(conn: sqlite3.Connection, access: Access) -> None:
    records = list(dict.fromkeys(access.records))[:MAX_RECORDS]
    with transaction(conn, immediate=True):
        conn.execute(
            "INSERT INTO access_log (ts_ms, who, role, token_id, endpoint, records, count)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                access.ts_ms,
                access.who,
                access.role,
                access.token_id,
                access.endpoint,
                orjson.dumps(records).decode(),
                len(records),
            ),
        )


def listing(
    conn: sqlite3.Connection,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    who: str | None = None,
    record_id: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Entries, newest first; `record_id` keeps those that read that ticket (or household)."""
    where = Where()
    where.given("ts_ms >= ?", since_ms)
    where.given("ts_ms < ?", until_ms)
    where.equal(who=who)
    where.given("EXISTS (SELECT 1 FROM json_each(access_log.records) WHERE value = ?)", record_id)
    sql = f"SELECT * FROM access_log{where} ORDER BY ts_ms DESC, id DESC LIMIT ? OFFSET ?"
    rows = conn.execute(sql, (*where.args, limit, offset)).fetchall()
    return [{**dict(row), "records": orjson.loads(row["records"])} for row in rows]


def prune(conn: sqlite3.Connection, before_ms: int) -> int:
    """Delete the entries older than `before_ms` (the retention); how many went."""
    with transaction(conn, immediate=True):
        return conn.execute("DELETE FROM access_log WHERE ts_ms < ?", (before_ms,)).rowcount
