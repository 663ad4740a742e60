"""The InfluxDB v2 sink: drains its durable outbox with `influxdb-client`, in order, retrying.

CONTRACT.md section 2: written "to `/api/v2/write` (InfluxDB 2.x/3.x, or any server that accepts
that API)". The store writer encodes every committed batch into this sink's outbox rows
(`encode`), in the same transaction as the local store, so nothing acknowledged to the broker is
only in memory. `run()` takes the oldest rows (up to `batch_size` points), writes them, and
deletes them once InfluxDB has them; while InfluxDB is unreachable they stay on disk, and after
an outage the backlog drains in order, as fast as InfluxDB takes it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException
from urllib3.exceptions import HTTPError as Urllib3Error

from gateway.settings import InfluxSettings
from gateway.sinks.lineprotocol import event_line, presence_line, reading_lines
from gateway.stats import GatewayMetrics
from gateway.store.outbox import Outbox, OutboxRow, Taken
from gateway.store.schema import connect

if TYPE_CHECKING:
    from gateway.pipeline.process import Processed

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 5.0  # a write attempt every 5 s costs nothing, and the backlog starts soon after


class InfluxSink:
    """`encode()` for the writer; `run()` as a task; `drain()` and `close()` on shutdown."""

    name = "influx"

    def __init__(
        self, settings: InfluxSettings, community: str, metrics: GatewayMetrics, db_path: Path, outbox: Outbox
    ) -> None:
        self._settings = settings
        self._community = community
        self._db_path = db_path
        self._outbox = outbox
        self._client = InfluxDBClient(
            url=settings.url,
            token=settings.token.get_secret_value(),
            org=settings.org,
            timeout=int(settings.timeout_s * 1000),
        )
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)
        # One thread owns the outbox connection and does the HTTP writes, in order.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cgw-influx")
        self._conn: sqlite3.Connection | None = None
        self._wake = asyncio.Event()
        self._healthy = True
        self.last_error: str | None = None
        m = metrics
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
    def buffered(self) -> int:
        """Points in the outbox that InfluxDB has not accepted yet."""
        return self._outbox.pending(self.name)

    # -- the writer's side: what goes into the outbox --------------------------------------------

    def encode(self, batches: list[Processed]) -> list[OutboxRow]:
        """Line protocol for committed batches: one telemetry row and one row of the rest."""
        community = self._community
        telemetry: list[str] = []
        important: list[str] = []
        for batch in batches:
            for reading in batch.readings:
                reading_lines(reading, community, telemetry)
            important.extend(event_line(e, community) for e in batch.events)
            important.extend(presence_line(p, community) for p in batch.presence)
            important.extend(batch.lines)
        rows = []
        if important:
            rows.append(OutboxRow(self.name, True, "\n".join(important), len(important)))
        if telemetry:
            rows.append(OutboxRow(self.name, False, "\n".join(telemetry), len(telemetry)))
        return rows

    def wake(self) -> None:
        """New rows were committed."""
        self._wake.set()

    # -- the sink's side ---------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = 0.5
        while True:
            taken = await self._call(self._take)
            if taken is None:
                self._buffered.set(0)
                self._pending.set(0)
                self._age.set(0)
                try:
                    await asyncio.wait_for(self._wake.wait(), self._settings.flush_interval_s)
                except TimeoutError:
                    pass
                self._wake.clear()
                continue
            self._buffered.set(self.buffered)
            self._pending.set(self.buffered)
            if taken.oldest_ms is not None:
                self._age.set(max(0.0, time.time() - taken.oldest_ms / 1000))
            if await self._write(taken):
                await self._call(self._outbox.acknowledge, self._connection(), self.name, taken)
                backoff = 0.5
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until the outbox of this sink is empty (or `timeout_s` passes); True when empty.

        What is left stays on disk and is sent after the next start.
        """
        deadline = time.monotonic() + timeout_s
        while self.buffered and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.05)
        return not self.buffered

    async def close(self) -> None:
        def close() -> None:
            self._client.close()  # type: ignore[no-untyped-call]
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._call(close)
        self._thread.shutdown(wait=True)

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect(self._db_path)
        return self._conn

    def _take(self) -> Taken | None:
        return self._outbox.take(self._connection(), self.name, self._settings.batch_size)

    async def _write(self, taken: Taken) -> bool:
        """One write request; True when the rows are done with (written, or refused for good)."""
        started = time.perf_counter()
        try:
            await self._call(self._post, taken.body)
        except ApiException as exc:
            return self._refused(exc, taken.points)
        except (Urllib3Error, OSError) as exc:
            self._fail(f"cannot reach InfluxDB at {self._settings.url}: {exc}", taken.points)
            return False
        self._seconds.observe(time.perf_counter() - started)
        self._written.inc(taken.points)
        if not self._healthy:
            log.info("InfluxDB at %s is writable again; sending the backlog", self._settings.url)
        self._healthy = True
        self.last_error = None
        self._up.set(1)
        return True

    def _post(self, body: str) -> None:
        precision: WritePrecision = WritePrecision.MS  # type: ignore[assignment]
        self._write_api.write(
            bucket=self._settings.bucket, org=self._settings.org, record=body, write_precision=precision
        )

    def _refused(self, exc: ApiException, points: int) -> bool:
        status = exc.status or 0
        body = (
            (exc.body or b"").decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body or "")
        )
        if status in (401, 403):
            self._fail(f"InfluxDB refused the token ({status}): check CGW_INFLUX__TOKEN", points)
            return False
        if status == 404:
            self._fail(
                f"InfluxDB has no org {self._settings.org!r} / bucket {self._settings.bucket!r} (404): "
                "check CGW_INFLUX__ORG and CGW_INFLUX__BUCKET",
                points,
            )
            return False
        if 400 <= status < 500 and status not in (408, 429):
            # The data itself is refused and would be refused forever: do not block the rest.
            self._rejected.inc(points)
            log.error("InfluxDB rejected %d lines (%d): %s", points, status, body[:300])
            return True
        self._fail(f"InfluxDB answered {status}: {body[:200]}", points)
        return False

    def _fail(self, message: str, points: int) -> None:
        if self._healthy or message != self.last_error:
            log.warning("%s; keeping %d points in the outbox and retrying", message, self.buffered)
        self._healthy = False
        self.last_error = message
        self._failed.inc(points)
        self._up.set(0)
