"""What every outbound sink does with its durable outbox: take in order, send, delete, retry.

The store writer appends a sink's rows in the same transaction as the local store (the sink's
`encode`). A sink's `run()` takes the oldest rows, hands them to `_send` and deletes them once the
far side has them; while the far side is unreachable they stay on disk, and after an outage the
backlog drains in order. Subclasses (InfluxDB, the district uplink) only say how to send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ParamSpec, TypeVar

from gateway.instruments import Instruments
from gateway.models import Batch
from gateway.sqlite import SqliteThread, connect
from gateway.store.outbox import Outbox, OutboxRow, Reference, Shipment

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

LINGER_S = 0.1  # short: the end of a burst waits this long for the far side, no more
MAX_BACKOFF_S = 5.0  # an attempt every 5 s costs nothing, and the backlog starts soon after
# A far side's Retry-After is honoured up to this: the backlog is safe on disk either way, and a
# misconfigured proxy asking for hours must not leave the sink silent that long.
MAX_RETRY_AFTER_S = 300.0


class OutboxDrain(ABC):
    """`encode()` for the writer; `run()` as a task; `drain()` and `close()` on shutdown."""

    name: str
    target: str  # where the sink sends to, for logs and /readyz

    def __init__(
        self,
        instruments: Instruments,
        db_path: Path,
        outbox: Outbox,
        batch_points: int,
        idle_s: float,
    ) -> None:
        self._outbox = outbox
        self._batch_points = batch_points
        self._idle_s = idle_s
        self._draining = False
        # The sink's own connection to the outbox, on its own thread. NORMAL: a delete lost to a
        # power cut only sends those points again (InfluxDB keeps one value per series and time),
        # and a FULL commit's fsync here would make the writer's next commit dirty the WAL's last
        # page again (docs/reliability.md).
        self._db = SqliteThread(self.name, lambda: connect(db_path, synchronous="NORMAL"))
        # The far side's blocking client on a thread of its own, so its calls run in order (the
        # client is closed after a send still under way) and never on the event loop.
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cgw-{self.name}-send")
        self._wake = asyncio.Event()
        self._healthy = True
        self.last_error: str | None = None
        self._retry_after_s = 0.0  # the far side's own wait before the next attempt (Retry-After)
        m = instruments
        self._written = m.sink_points.labels(sink=self.name, outcome="written")
        self._failed = m.sink_points.labels(sink=self.name, outcome="failed")
        self._rejected = m.sink_points.labels(sink=self.name, outcome="rejected")
        self._seconds = m.sink_write_seconds.labels(sink=self.name)
        self._buffered = m.sink_buffered.labels(sink=self.name)
        self._pending = m.outbox_pending.labels(sink=self.name)
        self._age = m.outbox_age.labels(sink=self.name)
        self._up = m.sink_up.labels(sink=self.name)
        self._up.set(1)

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def reachable(self) -> bool:
        """Worth waiting for at shutdown: its far side answered last time."""
        return self._healthy

    @property
    def buffered(self) -> int:
        """Points in the outbox that the far side has not accepted yet."""
        return self._outbox.pending(self.name)

    @abstractmethod
    def encode(self, batches: list[Batch], commit_no: int | None) -> list[OutboxRow]:
        """The outbox rows of committed batches (runs on the writer's thread, in its transaction);
        `commit_no` names the telemetry rows the commit inserted, for a reference."""

    def expand(self, conn: sqlite3.Connection, ref: Reference, context: str) -> list[str]:
        """Lines of the telemetry rows a reference names, with the `context` its `encode` wrote
        (gateway/store/outbox.py); a sink that writes references renders them, others never
        meet one."""
        return []

    @abstractmethod
    async def _send(self, shipment: Shipment) -> bool:
        """Send what `shipment` holds; True when done with (sent, or refused for good), else retry."""

    @abstractmethod
    async def _close_client(self) -> None:
        """Close the far side's client (through `_blocking` when that blocks)."""

    def wake(self) -> None:
        """New rows were committed."""
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.5
        last_sent = 0.0
        while True:
            shipment = await self._db.call(self._take)
            if shipment is None:
                self._buffered.set(0)
                self._pending.set(0)
                self._age.set(0)
                try:
                    await asyncio.wait_for(self._wake.wait(), self._idle_s)
                except TimeoutError:
                    pass
                self._wake.clear()
                continue
            # All that waits, and less than a batch: it waits for more, up to LINGER_S after the
            # last send, so a trickle is ten requests a second, not one per commit of the local
            # store. (Rows are not split, so a backlog's batches are part-full too: they go.)
            wait = last_sent + LINGER_S - loop.time()
            trickle = shipment.points >= self.buffered and shipment.points < self._batch_points
            if wait > 0 and trickle and not self._draining:
                await self._linger(wait)
                continue
            self._buffered.set(self.buffered)
            self._pending.set(self.buffered)
            if shipment.oldest_ms is not None:
                self._age.set(max(0.0, time.time() - shipment.oldest_ms / 1000))
            started = time.perf_counter()
            if not shipment.body:  # references to telemetry pruned meanwhile: nothing left to send
                await self._db.call(self._outbox.acknowledge, self.name, shipment)
                continue
            if await self._send(shipment):
                self._seconds.observe(time.perf_counter() - started)
                await self._db.call(self._outbox.acknowledge, self.name, shipment)
                last_sent = loop.time()
                backoff = 0.5
            else:
                await asyncio.sleep(max(backoff, self._retry_after_s))
                self._retry_after_s = 0.0
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until the outbox of this sink is empty (or `timeout_s` passes); True when empty.

        What is left stays on disk and is sent after the next start.
        """
        self._draining = True  # no lingering from now on
        deadline = time.monotonic() + timeout_s
        while self.buffered and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.05)
        return not self.buffered

    async def close(self) -> None:
        await self._close_client()
        await self._blocking(lambda: None)  # a send still under way ends first
        self._sender.shutdown(wait=True)
        await self._db.close()

    async def _blocking(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking call of the far side's client on the sink's sending thread, in order."""
        return await asyncio.get_running_loop().run_in_executor(self._sender, lambda: fn(*args, **kwargs))

    async def _linger(self, seconds: float) -> None:
        """Wait `seconds`, or less if a full batch is ready or the sink is draining."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.buffered < self._batch_points and not self._draining:
            self._wake.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    def _take(self, conn: sqlite3.Connection) -> Shipment | None:
        return self._outbox.take(conn, self.name, self._batch_points, self.expand)

    # -- outcomes, for the subclasses ------------------------------------------------------------

    def _sent(self, points: int) -> None:
        self._written.inc(points)
        if not self._healthy:
            log.info("%s is reachable again; sending the backlog", self.target)
        self._healthy = True
        self.last_error = None
        self._up.set(1)

    def _retry_after(self, seconds: float) -> None:
        """The far side asked to wait `seconds` before the next attempt (at most MAX_RETRY_AFTER_S)."""
        self._retry_after_s = min(max(seconds, 0.0), MAX_RETRY_AFTER_S)

    def _fail(self, message: str, points: int) -> None:
        if self._healthy or message != self.last_error:
            log.warning("%s; keeping %d points in the outbox and retrying", message, self.buffered)
        self._healthy = False
        self.last_error = message
        self._failed.inc(points)
        self._up.set(0)
