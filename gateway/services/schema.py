"""The services' SQLite file (`services.sqlite3`): its migrations and how it is opened.

Separate from the telemetry store (`cgw.sqlite3` beside it) so a burst of sensor data never
delays a resident's request. One connection, on the services' `SqliteThread`, writes it; each
aggregate module (`requests`, `ratings`, `proposals`, `access_log`, `residents`) is plain
functions over that connection, each write one transaction committed with synchronous=FULL
before the caller acknowledges anything.
"""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

from gateway.files import private_store
from gateway.services import access_log, residents
from gateway.sqlite import connect as connect_file
from gateway.sqlite import migrate, transaction

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


def connect(path: Path) -> sqlite3.Connection:
    """Open (create, migrate) the services' file; rows read as `sqlite3.Row`."""
    private_store(path)
    conn = connect_file(path)
    conn.row_factory = sqlite3.Row
    # What is emptied or deleted is overwritten on disk, not left in free pages, so no copy of
    # the file made afterwards (a backup) holds it (docs/privacy.md).
    conn.execute("PRAGMA secure_delete=ON")
    migrate(conn, MIGRATIONS, str(path))
    with transaction(conn, immediate=True):
        # The box's secret that rating codes are derived from (gateway/services/ratings.py).
        conn.execute(
            "INSERT OR IGNORE INTO box_secrets (name, value) VALUES ('rating', ?)", (secrets.token_bytes(32),)
        )
    return conn


def version(conn: sqlite3.Connection) -> int:
    """The file's schema version; called once at start, so the file is opened (and migrated, or
    refused as too new) before anything is served."""
    number: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return number
