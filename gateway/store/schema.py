"""Tables of the local store, and the migrations that bring an older file up to date.

`gateway.sqlite.migrate` applies them (`PRAGMA user_version` holds the schema version; each
migration is a list of statements applied in one transaction, so an upgrade either completes or
leaves the old schema intact).
"""

from __future__ import annotations

MIGRATIONS: list[list[str]] = [
    # 1: telemetry, roll-ups, events, dead letters, devices
    [
        """CREATE TABLE telemetry (
            device_id TEXT NOT NULL, metric TEXT NOT NULL, ts_ms INTEGER NOT NULL,
            value REAL NOT NULL, seq INTEGER,
            PRIMARY KEY (device_id, metric, ts_ms)) WITHOUT ROWID""",
        "CREATE INDEX telemetry_ts ON telemetry (ts_ms)",
        """CREATE TABLE rollup_1m (
            device_id TEXT NOT NULL, metric TEXT NOT NULL, minute_ms INTEGER NOT NULL,
            n INTEGER NOT NULL, sum REAL NOT NULL, min REAL NOT NULL, max REAL NOT NULL,
            PRIMARY KEY (device_id, metric, minute_ms)) WITHOUT ROWID""",
        "CREATE INDEX rollup_minute ON rollup_1m (minute_ms)",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, device_id TEXT NOT NULL,
            kind TEXT NOT NULL, building TEXT, type TEXT NOT NULL, severity TEXT NOT NULL,
            source TEXT NOT NULL, message TEXT NOT NULL, data TEXT NOT NULL,
            alarm INTEGER NOT NULL, acked_ms INTEGER, acked_by TEXT, ack_note TEXT)""",
        "CREATE INDEX events_ts ON events (ts_ms)",
        "CREATE INDEX events_device ON events (device_id, ts_ms)",
        "CREATE INDEX events_open_alarms ON events (alarm, acked_ms, ts_ms)",
        """CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY AUTOINCREMENT, received_ms INTEGER NOT NULL,
            topic TEXT NOT NULL, device_id TEXT, channel TEXT, reason_code TEXT NOT NULL,
            reason TEXT NOT NULL, payload BLOB NOT NULL)""",
        "CREATE INDEX dead_letters_received ON dead_letters (received_ms)",
        """CREATE TABLE devices (
            device_id TEXT PRIMARY KEY, kind TEXT NOT NULL, source TEXT NOT NULL,
            building TEXT, floor INTEGER, unit TEXT, fw TEXT, battery REAL, rssi REAL,
            online INTEGER NOT NULL, first_seen_ms INTEGER, last_seen_ms INTEGER,
            presence_ms INTEGER, last_ts_ms INTEGER, last_seq INTEGER,
            last_values TEXT NOT NULL, pinned_kind INTEGER NOT NULL)""",
    ],
    # 2: the durable outbox of the outbound sinks (gateway/store/outbox.py)
    [
        """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT, sink TEXT NOT NULL, important INTEGER NOT NULL,
            body TEXT NOT NULL, points INTEGER NOT NULL)""",
        "CREATE INDEX outbox_sink ON outbox (sink, id)",
        "CREATE INDEX outbox_droppable ON outbox (important, id)",
    ],
    # 3: when each outbox row was written, so the age of a sink's backlog can be watched
    ["ALTER TABLE outbox ADD COLUMN created_ms INTEGER"],
    # 4: the district's commands already carried out, so a repeated id is not carried out again
    [
        """CREATE TABLE district_commands (
            id TEXT PRIMARY KEY, action TEXT NOT NULL, received_ms INTEGER NOT NULL,
            expires_ms INTEGER NOT NULL, reply TEXT)""",
        "CREATE INDEX district_commands_expires ON district_commands (expires_ms)",
    ],
    # 5: wear of the SD card (docs/performance.md, "Write budget"). Telemetry is one tree ordered
    # by time (device and metric after it), so a commit touches its last page or two instead of
    # one page per device of a tree ordered by device; `batch` names the commit that inserted
    # a row. The outbox refers to a commit's telemetry (batch, from_ms..to_ms) instead of copying
    # it, and loses its two indexes (a few rows, read in id order, need none).
    [
        "ALTER TABLE telemetry RENAME TO telemetry_v4",
        """CREATE TABLE telemetry (
            ts_ms INTEGER NOT NULL, device_id TEXT NOT NULL, metric TEXT NOT NULL,
            value REAL NOT NULL, seq INTEGER, batch INTEGER NOT NULL,
            PRIMARY KEY (ts_ms, device_id, metric)) WITHOUT ROWID""",
        "INSERT INTO telemetry (ts_ms, device_id, metric, value, seq, batch) "
        "SELECT ts_ms, device_id, metric, value, seq, 0 FROM telemetry_v4",
        "DROP TABLE telemetry_v4",
        "ALTER TABLE outbox ADD COLUMN batch INTEGER",
        "ALTER TABLE outbox ADD COLUMN from_ms INTEGER",
        "ALTER TABLE outbox ADD COLUMN to_ms INTEGER",
        "ALTER TABLE outbox ADD COLUMN size INTEGER",
        "DROP INDEX outbox_sink",
        "DROP INDEX outbox_droppable",
    ],
]
