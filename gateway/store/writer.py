"""The local store's single writer: batches in through a bounded queue, one SQLite thread out.

Everything the pipeline produces is written here in large transactions (one commit for many
messages), together with the outbound sinks' outbox rows, so one commit makes a message durable
for the box and for every sink. Only then are the batches' `on_durable` callbacks run (they
acknowledge the messages to the broker). The queue is bounded, so a slow disk slows the pipeline
instead of growing memory. Writes are idempotent: a replayed reading or event lands once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import orjson

from gateway import privacy
from gateway.clock import now_ms
from gateway.files import private_store
from gateway.instruments import Instruments
from gateway.limits import FloodNotes
from gateway.models import Batch, Device, event_id
from gateway.sqlite import SqliteThread, connect, migrate, transaction
from gateway.store.dead_letters import DeadLetterBudget, row_bytes
from gateway.store.outbox import Outbox, OutboxFull, OutboxRow
from gateway.store.schema import MIGRATIONS

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

MINUTE_MS = 60_000

# A sink's outbox rows for committed batches; the second argument is the commit's number in the
# telemetry rows' `batch` column when it inserted any (None: none), for a sink that refers to
# rows instead of copying them (gateway/store/outbox.py).
Encoder = Callable[[list[Batch], int | None], list[OutboxRow]]


SMALL_BATCH = 100  # readings: fewer, and a batch alone in the queue waits for company
# A held commit ends once it gathers this many readings: its fixed cost (a few pages) is spread
# thin by then, and a broker that allows fewer messages in flight than rate × interval (the
# shipped Mosquitto configuration allows 1,000) is not left waiting for the interval to end.
HELD_READINGS = 500
MAX_BATCHES = 64  # batches in one transaction when the queue holds a backlog


def _telemetry_only(batch: Batch) -> bool:
    """Telemetry (and device snapshots) alone: it may wait for the commit interval.

    Events, refusals and terminal messages are never held: an operator who sees an alarm on
    the live stream may acknowledge it at once, and that needs it in the store.
    """
    return not (batch.events or batch.dead_letters or batch.terminal or batch.records)


def _worth_holding(batch: Batch) -> bool:
    """Telemetry alone, and a little of it: worth a wait for company before a commit."""
    return _telemetry_only(batch) and len(batch.readings) < SMALL_BATCH


class StoreWriter:
    """Owns the write connection; `run()` is its task, `put()` feeds it."""

    def __init__(
        self,
        path: Path,
        instruments: Instruments,
        queue_size: int = 64,
        outbox: Outbox | None = None,
        encoders: list[Encoder] | None = None,
        group_commit_s: float = 0.0,
        dead_letter_max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._path = path
        self.dead_letters = DeadLetterBudget(dead_letter_max_bytes)
        self._group_commit_s = group_commit_s
        self._commit_awaited = asyncio.Event()  # a caller waits for a commit: hold nothing
        self._arrived = asyncio.Event()  # a batch was queued (the held commit looks at it)
        self._instruments = instruments
        self._outbox = outbox
        self._encoders = encoders or []
        self._listeners: list[Callable[[], None]] = []
        self._queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize=queue_size)
        # The one write connection, only ever used on its own thread.
        self._db = SqliteThread("store", lambda: connect(path))
        self._sync = "FULL"  # the connection's synchronous setting (connect() sets FULL)
        self._dirty_minutes: set[int] = set()
        self._trim_notes = FloodNotes()
        self.last_error: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> list[Device]:
        """Create or migrate the file; returns the devices remembered from earlier runs."""
        private_store(self._path)
        return await self._db.call(self._open)

    def _open(self, conn: sqlite3.Connection) -> list[Device]:
        self._sync = "FULL"
        migrate(conn, MIGRATIONS, "the local store")
        self.dead_letters.load(conn)
        self._dirty_minutes.update(_minutes_not_rolled_up(conn))
        if self._outbox is not None:
            self._outbox.load(conn)
        return [_device_from_row(row) for row in conn.execute(_SELECT_DEVICES)]

    async def put(self, batch: Batch) -> None:
        """Queue a batch for writing; waits while the queue is full (back-pressure)."""
        await self._queue.put(batch)
        self._arrived.set()
        self._instruments.queue_depth.labels(stage="store").set(self._queue.qsize())

    async def run(self) -> None:
        """Write batches until cancelled; several waiting batches go in one transaction."""
        while True:
            batches = [await self._queue.get()]
            # Commit interval: telemetry alone, in small batches, is held up to group_commit_s and
            # gathers what arrives meanwhile, so a steady trickle costs one commit (a few pages of
            # the WAL) per interval instead of one per message: that is the SD card's wear. It is
            # acknowledged to the broker only after the commit. A large batch is a backlog, not a
            # trickle, and anything else (an alarm, a refusal, a terminal message) ends the wait.
            if self._group_commit_s and _worth_holding(batches[0]) and not self._commit_awaited.is_set():
                loop = asyncio.get_running_loop()
                deadline = loop.time() + self._group_commit_s
                held = len(batches[0].readings)
                while held < HELD_READINGS and (remaining := deadline - loop.time()) > 0:
                    telemetry_only = True
                    while not self._queue.empty() and held < HELD_READINGS:
                        batches.append(self._queue.get_nowait())
                        held += len(batches[-1].readings)
                        telemetry_only = telemetry_only and _telemetry_only(batches[-1])
                    if not telemetry_only or self._commit_awaited.is_set():
                        break
                    self._arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), remaining)
            self._commit_awaited.clear()
            while not self._queue.empty() and len(batches) < MAX_BATCHES:
                batches.append(self._queue.get_nowait())
            await self._write_with_retry(batches)
            for batch in batches:
                for done in batch.on_durable:
                    done()
            for listener in self._listeners:
                listener()
            for _ in batches:
                self._queue.task_done()
            self._instruments.queue_depth.labels(stage="store").set(self._queue.qsize())

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Call `listener` (on the event loop) after each commit: the sinks wake up with it."""
        self._listeners.append(listener)

    async def put_durable(self, batch: Batch) -> None:
        """Queue a batch and wait until it is committed (for callers who answer a client)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def committed() -> None:
            if not done.done():
                done.set_result(None)

        batch.on_durable.append(committed)
        self._commit_awaited.set()
        await self.put(batch)
        await done

    async def drain(self) -> None:
        """Wait until everything queued so far is written."""
        await self._queue.join()

    async def close(self) -> None:
        await self._db.close()

    async def call(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run `fn(connection, *args)` on the writer thread (it owns the connection)."""
        return await self._db.call(fn, *args, **kwargs)

    @property
    def path(self) -> Path:
        return self._path

    def take_dirty_minutes(self, closed_before_ms: int) -> list[int]:
        """Minutes ended by `closed_before_ms` that received telemetry since their last roll-up.

        Called on the writer thread; minutes still open stay marked for the next round.
        """
        ready = sorted(m for m in self._dirty_minutes if m + MINUTE_MS <= closed_before_ms)
        self._dirty_minutes.difference_update(ready)
        return ready

    # -- writing -------------------------------------------------------------------------------

    async def _write_with_retry(self, batches: list[Batch]) -> None:
        delay = 0.5
        while True:
            try:
                started = time.perf_counter()
                await self._db.call(self._write, batches)
                self._instruments.store_write_seconds.observe(time.perf_counter() - started)
                self.last_error = None
                return
            except (sqlite3.Error, OutboxFull) as exc:
                # Disk full, locked, or an outbox that may not drop what it holds: keep the batch
                # and try again; the bounded queue upstream turns this into back-pressure.
                full = isinstance(exc, OutboxFull)
                self.last_error = str(exc) if full else f"local store write failed: {exc}"
                (log.warning if full else log.error)("%s; retrying in %.1f s", self.last_error, delay)
                await asyncio.sleep(delay)
                # An outbox waiting for a sink is checked often: the sink may drain at any moment.
                delay = min(delay * 2, 1.0 if full else 10.0)

    def _write(self, conn: sqlite3.Connection, batches: list[Batch]) -> None:
        # The commit's number in the telemetry rows' `batch`: the outbox's next id, unique as long
        # as each commit that inserts telemetry for a sink adds an outbox row (the reference
        # does). Read before the transaction: this thread is the only writer.
        commit_no = (conn.execute(_NEXT_BATCH).fetchone() or (0,))[0] + 1
        telemetry: list[tuple[str, str, int, float, int | None, int]] = []
        events: list[tuple[object, ...]] = []
        letters: list[tuple[object, ...]] = []
        letter_bytes = 0
        devices: dict[str, Device] = {}
        for batch in batches:
            for r in batch.readings:
                for metric, value in r.metrics.items():
                    telemetry.append((r.device_id, metric, r.ts_ms, value, r.seq, commit_no))
                self._dirty_minutes.add(r.ts_ms - r.ts_ms % MINUTE_MS)
            for e in batch.events:
                events.append(
                    (
                        event_id(e),
                        e.ts_ms,
                        e.device_id,
                        e.kind,
                        e.building,
                        e.type,
                        e.severity,
                        e.source,
                        e.message,
                        orjson.dumps(e.data, default=str).decode(),
                        int(e.alarm),
                    )
                )
            for d in batch.dead_letters:
                # Redacted and cut whatever the reason (gateway/privacy.py).
                kept = privacy.dead_letter_payload(d.channel, d.payload)
                letter_bytes += row_bytes(d.topic, d.reason, kept)
                letters.append(
                    (d.received_ms, d.topic, d.device_id, d.channel, d.reason_code, d.reason, kept)
                )
            for device in batch.devices:
                devices[device.device_id] = device
        # Telemetry alone is committed with synchronous=NORMAL: in WAL mode the commit is in the
        # WAL when COMMIT returns, so it survives the process being killed, but the WAL is not
        # fsynced until the next checkpoint or the next FULL commit, so a power cut may take the
        # last seconds of telemetry (docs/reliability.md). Events, refusals, terminal messages
        # and service records are committed with FULL: they survive a power cut too.
        sync = "NORMAL" if all(_telemetry_only(b) for b in batches) else "FULL"
        if sync != self._sync:
            conn.execute(f"PRAGMA synchronous={sync}")
            self._sync = sync
        with transaction(conn):
            changes = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO telemetry (device_id, metric, ts_ms, value, seq, batch) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                telemetry,
            )
            inserted = commit_no if conn.total_changes > changes else None
            conn.executemany(
                "INSERT OR IGNORE INTO events (id, ts_ms, device_id, kind, building, type, "
                "severity, source, message, data, alarm) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                events,
            )
            conn.executemany(
                "INSERT INTO dead_letters (received_ms, topic, device_id, channel, reason_code, "
                "reason, payload) VALUES (?,?,?,?,?,?,?)",
                letters,
            )
            trimmed = self.dead_letters.added(conn, letter_bytes) if letters else 0
            conn.executemany(_UPSERT_DEVICE, [_device_row(d) for d in devices.values()])
            forgotten = [(device_id,) for batch in batches for device_id in batch.forgotten]
            conn.executemany("DELETE FROM devices WHERE device_id = ?", forgotten)
            dropped = 0
            rows: list[OutboxRow] = []
            if self._outbox is not None:
                rows = [row for encode in self._encoders for row in encode(batches, inserted)]
                if rows:
                    dropped = self._outbox.append(conn, rows)
        self._instruments.store_writes.labels(table="telemetry").inc(len(telemetry))
        self._instruments.store_writes.labels(table="events").inc(len(events))
        self._instruments.store_writes.labels(table="dead_letters").inc(len(letters))
        if trimmed:
            self._instruments.dead_letters_trimmed.inc(trimmed)
            if self._trim_notes.should_log("dead_letters", now_ms()):
                log.warning(
                    "dead letters over store.dead_letter_max_bytes (%d bytes): deleted the %d oldest",
                    self.dead_letters.max_bytes,
                    trimmed,
                )
        if dropped:
            self._instruments.outbox_dropped.inc(dropped)
            log.warning("outbox full: dropped the %d oldest telemetry points", dropped)
        if self._outbox is not None:
            self._instruments.outbox_bytes.set(self._outbox.bytes)
            for sink in {row.sink for row in rows}:
                self._instruments.outbox_pending.labels(sink=sink).set(self._outbox.pending(sink))

    async def save_devices(self, devices: list[Device]) -> None:
        """Persist device snapshots (last values, presence) outside the pipeline's batches."""
        rows = [_device_row(d) for d in devices]

        await self._db.call(lambda conn: conn.executemany(_UPSERT_DEVICE, rows))


_NEXT_BATCH = "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'"

_DEVICE_COLUMNS = (
    "device_id, kind, source, building, floor, unit, fw, battery, rssi, online, first_seen_ms, "
    "last_seen_ms, presence_ms, last_ts_ms, last_seq, last_values, pinned_kind"
)
_SELECT_DEVICES = f"SELECT {_DEVICE_COLUMNS} FROM devices"
# Updated in place (not INSERT OR REPLACE, which deletes and appends the row again, touching the
# table's last page and its index as well as the row's own page).
_UPSERT_DEVICE = (
    f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (device_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _DEVICE_COLUMNS.split(", ")[1:])
)


def _minutes_not_rolled_up(conn: sqlite3.Connection) -> set[int]:
    """Minutes of raw telemetry after the last roll-up: an earlier run's marks were in memory."""
    (last,) = conn.execute("SELECT max(minute_ms) FROM rollup_1m").fetchone()
    rows = conn.execute(
        "SELECT DISTINCT ts_ms - ts_ms % ? FROM telemetry WHERE ts_ms >= ?",
        (MINUTE_MS, -(2**62) if last is None else last + MINUTE_MS),
    )
    return {minute for (minute,) in rows}


def _device_row(d: Device) -> tuple[object, ...]:
    return (
        d.device_id,
        d.kind,
        d.source,
        d.building,
        d.floor,
        d.unit,
        d.fw,
        d.battery,
        d.rssi,
        int(d.online),
        d.first_seen_ms,
        d.last_seen_ms,
        d.presence_ms,
        d.last_ts_ms,
        d.last_seq,
        orjson.dumps(d.last_values).decode(),
        int(d.pinned_kind),
    )


def _device_from_row(row: tuple[Any, ...]) -> Device:
    (device_id, kind, source, building, floor, unit, fw, battery, rssi, online, first_seen,
     last_seen, presence, last_ts, last_seq, last_values, pinned) = row  # fmt: skip
    return Device(
        device_id=device_id,
        kind=kind,
        source=source,
        building=building,
        floor=floor,
        unit=unit,
        fw=fw,
        battery=battery,
        rssi=rssi,
        online=bool(online),
        first_seen_ms=first_seen,
        last_seen_ms=last_seen,
        presence_ms=presence,
        last_ts_ms=last_ts,
        last_seq=last_seq,
        last_values=orjson.loads(last_values),
        pinned_kind=bool(pinned),
    )
