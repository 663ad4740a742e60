"""Tables of the care file (`care.sqlite3` in the data folder), and the migrations that bring an
older file up to date (run by gateway/sqlite.py's `migrate`).

Kept apart from the services' file: withdrawing consent deletes a household's care data here
without touching its service requests, and a backup can leave the most sensitive file out.
"""

from __future__ import annotations

MIGRATIONS: list[list[str]] = [
    # 1: the care register, consents, learnt days, visits and needs, welfare checks
    [
        """CREATE TABLE households (
            household TEXT PRIMARY KEY, building TEXT NOT NULL, unit TEXT NOT NULL,
            elderly INTEGER NOT NULL, living_alone INTEGER NOT NULL, mobility INTEGER NOT NULL,
            chronic_illness INTEGER NOT NULL, disability INTEGER NOT NULL, infants INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL, updated_by TEXT NOT NULL)""",
        """CREATE TABLE consents (
            id INTEGER PRIMARY KEY, household TEXT NOT NULL, purpose TEXT NOT NULL,
            granted INTEGER NOT NULL, ts_ms INTEGER NOT NULL, by TEXT NOT NULL)""",
        "CREATE INDEX consents_household ON consents (household, purpose, id)",
        """CREATE TABLE days (
            household TEXT NOT NULL, day INTEGER NOT NULL, record TEXT NOT NULL,
            PRIMARY KEY (household, day)) WITHOUT ROWID""",
        """CREATE TABLE visits (
            id TEXT PRIMARY KEY, household TEXT NOT NULL, building TEXT NOT NULL, kind TEXT NOT NULL,
            ts_ms INTEGER NOT NULL, worker TEXT NOT NULL, note TEXT NOT NULL, answers TEXT NOT NULL,
            received_ms INTEGER NOT NULL)""",
        "CREATE INDEX visits_household ON visits (household, ts_ms)",
        """CREATE TABLE needs (
            id INTEGER PRIMARY KEY, household TEXT NOT NULL, building TEXT NOT NULL,
            service_code TEXT NOT NULL, note TEXT NOT NULL, visit_id TEXT, since_ms INTEGER NOT NULL,
            met_ms INTEGER, UNIQUE (visit_id, service_code))""",
        "CREATE INDEX needs_open ON needs (met_ms, household)",
        """CREATE TABLE checks (
            id TEXT PRIMARY KEY, household TEXT NOT NULL, building TEXT NOT NULL, grid TEXT,
            rule TEXT NOT NULL, raised_ms INTEGER NOT NULL, quiet_since_ms INTEGER NOT NULL,
            why TEXT NOT NULL, ticket TEXT, acked_ms INTEGER, acked_by TEXT, escalated_ms INTEGER,
            escalated_to TEXT, closed_ms INTEGER, closed_by TEXT, outcome TEXT, note TEXT NOT NULL)""",
        "CREATE INDEX checks_open ON checks (closed_ms, raised_ms)",
        "CREATE INDEX checks_household ON checks (household, raised_ms)",
    ],
]
