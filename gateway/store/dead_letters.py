"""The dead-letter table's byte budget: the oldest refusals go first when it is full.

Refused messages are kept so an installer can see why (docs/reliability.md), for
`store.dead_letter_retention`; a device that sends junk fast enough could still fill the SD card
within that time. So the table also has a budget of bytes (`store.dead_letter_max_bytes`):
each row counts its payload, reason and topic plus `ROW_OVERHEAD`, and when a write takes the
total over the budget the oldest rows are deleted in the same transaction until it is back under
`TRIM_TO` of it (so a full table is not trimmed on every write). Used on the writer's thread only.
"""

from __future__ import annotations

import sqlite3

ROW_OVERHEAD = 64  # ids, times, codes and SQLite's own record header, roughly
TRIM_TO = 0.9
_SIZE = "LENGTH(payload) + LENGTH(reason) + LENGTH(topic) + ?"


def row_bytes(topic: str, reason: str, payload: bytes) -> int:
    return len(payload) + len(reason) + len(topic) + ROW_OVERHEAD


class DeadLetterBudget:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0

    def load(self, conn: sqlite3.Connection) -> None:
        self.bytes = conn.execute(
            f"SELECT COALESCE(SUM({_SIZE}), 0) FROM dead_letters", (ROW_OVERHEAD,)
        ).fetchone()[0]

    def added(self, conn: sqlite3.Connection, nbytes: int) -> int:
        """Rows of `nbytes` in all were inserted; returns how many old rows were deleted."""
        self.bytes += nbytes
        if self.bytes <= self.max_bytes:
            return 0
        target = int(self.max_bytes * TRIM_TO)
        deleted = 0
        while self.bytes > target:
            rows = conn.execute(
                f"SELECT id, {_SIZE} FROM dead_letters ORDER BY id LIMIT 500", (ROW_OVERHEAD,)
            ).fetchall()
            if not rows:
                self.bytes = 0
                break
            last = rows[-1][0]
            for ident, size in rows:
                self.bytes -= size
                if self.bytes <= target:
                    last = ident
                    break
            deleted += conn.execute("DELETE FROM dead_letters WHERE id <= ?", (last,)).rowcount
        return deleted

    def prune(self, conn: sqlite3.Connection, received_before_ms: int) -> None:
        """Delete what is past its retention, keeping the count right."""
        freed = conn.execute(
            f"SELECT COALESCE(SUM({_SIZE}), 0) FROM dead_letters WHERE received_ms < ?",
            (ROW_OVERHEAD, received_before_ms),
        ).fetchone()[0]
        conn.execute("DELETE FROM dead_letters WHERE received_ms < ?", (received_before_ms,))
        self.bytes = max(0, self.bytes - freed)
