"""Roll-ups and retention for the local store, run periodically on the writer's thread.

Roll-ups are recomputed from raw telemetry for every minute that received data, never
accumulated, so a replayed or late reading cannot count twice. Raw telemetry is kept for
`store.raw_retention` (48 h), minute roll-ups and events for `store.rollup_retention` (90 days).

Queries read raw telemetry for everything inside its retention (gateway/store/queries.py), so a
minute's roll-up is needed only before its raw rows go. The gateway rolls a minute up an hour
after it closed (`rollup_delay_ms`), a few hundred rows at once: the roll-up table is ordered
by device, and touching each device's page once an hour instead of every minute is most of
what it costs the SD card (docs/performance.md, "Write budget").

Retention goes by `ClockWatch.retention_ms()` (gateway/clock.py): a forward jump of the wall
clock (NTP syncing a box without a real-time clock) deletes nothing at once; retention catches
up at twice real time.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
from pathlib import Path

from gateway.clock import ClockWatch
from gateway.settings import StoreSettings
from gateway.sqlite import connect, transaction
from gateway.store.writer import MINUTE_MS, StoreWriter

log = logging.getLogger(__name__)

# A minute is rolled up once it has been closed this long, so stragglers of that minute are in.
SETTLE_MS = 5_000
ROLLUP_DELAY_MS = 3_600_000  # the gateway's own delay: an hour's minutes in one transaction


def rollup_delay_ms(settings: StoreSettings) -> int:
    """An hour, or half the raw retention when that is shorter: a minute is rolled up well
    before its raw rows are pruned."""
    return max(SETTLE_MS, min(ROLLUP_DELAY_MS, int(settings.raw_retention.total_seconds() * 500)))


ROOM_CHECK_S = 5.0  # how often free space is looked at (one statvfs call)
GIVE_WAY_SHARE = 10  # raw telemetry deleted per step when the disk is nearly full: the oldest tenth


class StoreMaintenance:
    """Periodic roll-up and pruning, and room kept on a filling disk; `run()` is one task of the
    application.

    Before the disk is full, raw telemetry gives way (docs/reliability.md, "A full disk"): when
    the data folder has less than `store.min_free_bytes` free and the store's file has no free
    pages of its own left, the oldest tenth of raw telemetry is rolled up and deleted. Its
    pages are reused by what comes next, so the file stops growing; roll-ups, events, dead
    letters and service records are kept. The outbox's references to deleted readings render
    nothing (those points are not sent). At a full disk, writes fail and are retried: nothing is
    acknowledged, the broker keeps it, and the gateway goes on once there is room again.
    """

    def __init__(
        self,
        writer: StoreWriter,
        settings: StoreSettings,
        interval_s: float = 30.0,
        rollup_delay_ms: int = SETTLE_MS,
        clock: ClockWatch | None = None,
    ) -> None:
        self._writer = writer
        self._clock = clock or ClockWatch()
        self._settings = settings
        self._interval_s = interval_s
        self._rollup_delay_ms = rollup_delay_ms

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self._interval_s
        while True:
            await asyncio.sleep(min(ROOM_CHECK_S, max(0.0, due - loop.time())))
            await self.keep_room()
            if loop.time() >= due:
                due = loop.time() + self._interval_s
                await self.run_once()

    async def keep_room(self) -> int:
        """Raw telemetry gives way when the disk is nearly full; returns readings deleted."""
        free = shutil.disk_usage(self._writer.path.parent).free
        if free >= self._settings.min_free_bytes:
            return 0
        try:
            deleted: int = await self._writer.call(self._give_way)
        except sqlite3.Error as exc:
            log.error("could not make room in the local store (will retry): %s", exc)
            return 0
        if deleted:
            log.warning(
                "the disk is nearly full (%d MiB free, store.min_free_bytes is %d MiB): deleted the "
                "oldest %d raw readings to make room (their roll-ups, events and service records stay)",
                free // 2**20,
                self._settings.min_free_bytes // 2**20,
                deleted,
            )
        return deleted

    def _give_way(self, conn: sqlite3.Connection) -> int:
        """Delete the oldest raw telemetry, a tenth at a time, until the file holds a quarter of
        `min_free_bytes` in free pages of its own (or no raw telemetry is left)."""
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        want_pages = self._settings.min_free_bytes // 4 // page_size
        deleted = 0
        while conn.execute("PRAGMA freelist_count").fetchone()[0] < want_pages:
            (count,) = conn.execute("SELECT count(*) FROM telemetry").fetchone()
            if not count:
                break
            chunk = max(1_000, count // GIVE_WAY_SHARE)
            row = conn.execute("SELECT ts_ms FROM telemetry ORDER BY ts_ms LIMIT 1 OFFSET ?", (chunk,))
            (kept_ts,) = row.fetchone() or (2**62,)
            # Roll up the minutes about to go, so they keep their figures.
            rollup(conn, self._writer.take_dirty_minutes(kept_ts - kept_ts % MINUTE_MS))
            with transaction(conn):
                gone = conn.execute("DELETE FROM telemetry WHERE ts_ms < ?", (kept_ts,)).rowcount
                if not gone:  # the oldest tenth all share one time: that time goes too
                    gone = conn.execute("DELETE FROM telemetry WHERE ts_ms <= ?", (kept_ts,)).rowcount
                deleted += gone
        return deleted

    async def run_once(self, now_ms: int | None = None, *, settle: bool = True) -> None:
        now = self._clock.retention_ms() if now_ms is None else now_ms
        try:
            await self._writer.call(self._work, now, settle)
        except sqlite3.Error as exc:
            log.error("local store maintenance failed (will retry): %s", exc)

    def _work(self, conn: sqlite3.Connection, now_ms: int, settle: bool) -> None:
        limit = now_ms - self._rollup_delay_ms if settle else now_ms + MINUTE_MS
        rollup(conn, self._writer.take_dirty_minutes(limit))
        prune(conn, now_ms, self._settings)
        self._writer.dead_letters.prune(
            conn, now_ms - int(self._settings.dead_letter_retention.total_seconds() * 1000)
        )


def rollup(conn: sqlite3.Connection, minutes: list[int]) -> None:
    """Recompute the 1-minute roll-ups of the given minutes from raw telemetry."""
    for start, end in _ranges(minutes):
        with transaction(conn):
            conn.execute(
                "INSERT OR REPLACE INTO rollup_1m (device_id, metric, minute_ms, n, sum, min, max) "
                "SELECT device_id, metric, ts_ms - (ts_ms % 60000), count(*), sum(value), "
                "min(value), max(value) FROM telemetry WHERE ts_ms >= ? AND ts_ms < ? "
                "GROUP BY device_id, metric, ts_ms - (ts_ms % 60000)",
                (start, end),
            )


def prune(conn: sqlite3.Connection, now_ms: int, settings: StoreSettings) -> None:
    """Delete what is past its retention."""
    raw_cutoff = now_ms - int(settings.raw_retention.total_seconds() * 1000)
    rollup_cutoff = now_ms - int(settings.rollup_retention.total_seconds() * 1000)
    conn.execute("DELETE FROM telemetry WHERE ts_ms < ?", (raw_cutoff,))
    conn.execute("DELETE FROM rollup_1m WHERE minute_ms < ?", (rollup_cutoff,))
    conn.execute("DELETE FROM events WHERE ts_ms < ?", (rollup_cutoff,))
    # Dead letters: by the writer's DeadLetterBudget, which keeps their byte count.


def forget_dead_letters(db_path: Path, words: list[str]) -> int:
    """Delete the dead letters whose payload or reason holds any of `words` (a resident erased:
    docs/privacy.md; letters refused before redaction may name them); how many went."""
    conn = connect(db_path)
    deleted = 0
    try:
        conn.execute("PRAGMA secure_delete=ON")  # overwritten on disk, not left in free pages
        with transaction(conn, immediate=True):
            for word in (w for w in words if w):
                deleted += conn.execute(
                    "DELETE FROM dead_letters"
                    " WHERE instr(CAST(payload AS TEXT), ?) > 0 OR instr(reason, ?) > 0",
                    (word, word),
                ).rowcount
    finally:
        conn.close()
    return deleted


def _ranges(minutes: list[int]) -> list[tuple[int, int]]:
    """Contiguous [start, end) spans covering the sorted minutes."""
    spans: list[tuple[int, int]] = []
    for minute in minutes:
        if spans and spans[-1][1] == minute:
            spans[-1] = (spans[-1][0], minute + MINUTE_MS)
        else:
            spans.append((minute, minute + MINUTE_MS))
    return spans
