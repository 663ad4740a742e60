"""The InfluxDB v2 sink: batched line-protocol writes with `influxdb-client`, retried in order.

CONTRACT.md section 2: written "to `/api/v2/write` (InfluxDB 2.x/3.x, or any server that accepts
that API)". Lines wait in a bounded in-memory buffer while the server is unreachable. When it is
full, the oldest telemetry goes first (counted); events and presence changes are kept in favour
of telemetry. (The durable on-disk outbox replaces this buffer with issue 4.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException
from urllib3.exceptions import HTTPError as Urllib3Error

from gateway.models import DeviceEvent, PresenceChange, Reading
from gateway.settings import InfluxSettings
from gateway.sinks.lineprotocol import event_line, presence_line, reading_lines
from gateway.stats import GatewayMetrics

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


class InfluxSink:
    """`submit()` from the pipeline, `run()` as a task, `drain()` and `close()` on shutdown."""

    name = "influx"

    def __init__(self, settings: InfluxSettings, community: str, metrics: GatewayMetrics) -> None:
        self._settings = settings
        self._community = community
        self._client = InfluxDBClient(
            url=settings.url,
            token=settings.token.get_secret_value(),
            org=settings.org,
            timeout=int(settings.timeout_s * 1000),
        )
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)
        self._telemetry: deque[str] = deque()
        self._important: deque[str] = deque()  # events and presence: dropped last
        self._inflight: list[str] = []
        self._wake = asyncio.Event()
        self._healthy = True
        self.last_error: str | None = None
        m = metrics
        self._written = m.sink_points.labels(sink=self.name, outcome="written")
        self._failed = m.sink_points.labels(sink=self.name, outcome="failed")
        self._rejected = m.sink_points.labels(sink=self.name, outcome="rejected")
        self._dropped = m.sink_points.labels(sink=self.name, outcome="dropped")
        self._dropped_events = m.sink_points.labels(sink=self.name, outcome="dropped_event")
        self._seconds = m.sink_write_seconds.labels(sink=self.name)
        self._buffered = m.sink_buffered.labels(sink=self.name)
        self._up = m.sink_up.labels(sink=self.name)
        self._up.set(1)

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def buffered(self) -> int:
        return len(self._telemetry) + len(self._important) + len(self._inflight)

    async def submit(
        self, readings: list[Reading], events: list[DeviceEvent], presence: list[PresenceChange]
    ) -> None:
        community = self._community
        lines: list[str] = []
        for reading in readings:
            reading_lines(reading, community, lines)
        self._telemetry.extend(lines)
        self._important.extend(event_line(e, community) for e in events)
        self._important.extend(presence_line(p, community) for p in presence)
        self._enforce_bound()
        self._buffered.set(self.buffered)
        if len(self._telemetry) + len(self._important) >= self._settings.batch_size:
            self._wake.set()

    async def submit_lines(self, lines: list[str]) -> None:
        """Service records: kept in favour of telemetry, like events."""
        self._important.extend(lines)
        self._enforce_bound()
        self._buffered.set(self.buffered)
        self._wake.set()

    def _enforce_bound(self) -> None:
        excess = self.buffered - self._settings.buffer_points
        if excess <= 0:
            return
        dropped = min(excess, len(self._telemetry))
        for _ in range(dropped):
            self._telemetry.popleft()
        self._dropped.inc(dropped)
        excess -= dropped
        if excess > 0:
            dropped_events = min(excess, len(self._important))
            for _ in range(dropped_events):
                self._important.popleft()
            self._dropped_events.inc(dropped_events)
        log.warning("InfluxDB buffer full (%d points): dropped the oldest", self._settings.buffer_points)

    async def run(self) -> None:
        backoff = 0.5
        while True:
            if not self._inflight and not (self._telemetry or self._important):
                try:
                    await asyncio.wait_for(self._wake.wait(), self._settings.flush_interval_s)
                except TimeoutError:
                    pass
                self._wake.clear()
            if not self._inflight:
                self._inflight = self._take(self._settings.batch_size)
                if not self._inflight:
                    continue
            if await self._write(self._inflight):
                self._inflight = []
                backoff = 0.5
                self._buffered.set(self.buffered)
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until the buffer is written (or `timeout_s` passes); True when empty."""
        deadline = time.monotonic() + timeout_s
        while self.buffered and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.05)
        return not self.buffered

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)

    def _take(self, n: int) -> list[str]:
        batch: list[str] = []
        for source in (self._important, self._telemetry):
            while source and len(batch) < n:
                batch.append(source.popleft())
        return batch

    async def _write(self, lines: list[str]) -> bool:
        """One write request; True when the lines are done with (written, or refused for good)."""
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self._post, "\n".join(lines))
        except ApiException as exc:
            return self._refused(exc, lines)
        except (Urllib3Error, OSError) as exc:
            self._fail(f"cannot reach InfluxDB at {self._settings.url}: {exc}", lines)
            return False
        self._seconds.observe(time.perf_counter() - started)
        self._written.inc(len(lines))
        if not self._healthy:
            log.info("InfluxDB at %s is writable again", self._settings.url)
        self._healthy = True
        self.last_error = None
        self._up.set(1)
        return True

    def _post(self, body: str) -> None:
        precision: WritePrecision = WritePrecision.MS  # type: ignore[assignment]
        self._write_api.write(
            bucket=self._settings.bucket, org=self._settings.org, record=body, write_precision=precision
        )

    def _refused(self, exc: ApiException, lines: list[str]) -> bool:
        status = exc.status or 0
        body = (
            (exc.body or b"").decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body or "")
        )
        if status in (401, 403):
            self._fail(f"InfluxDB refused the token ({status}): check CGW_INFLUX__TOKEN", lines)
            return False
        if status == 404:
            self._fail(
                f"InfluxDB has no org {self._settings.org!r} / bucket {self._settings.bucket!r} (404): "
                "check CGW_INFLUX__ORG and CGW_INFLUX__BUCKET",
                lines,
            )
            return False
        if 400 <= status < 500 and status not in (408, 429):
            # The data itself is refused and would be refused forever: do not block the rest.
            self._rejected.inc(len(lines))
            log.error("InfluxDB rejected %d lines (%d): %s", len(lines), status, body[:300])
            return True
        self._fail(f"InfluxDB answered {status}: {body[:200]}", lines)
        return False

    def _fail(self, message: str, lines: list[str]) -> None:
        if self._healthy or message != self.last_error:
            log.warning("%s; keeping %d points and retrying", message, self.buffered)
        self._healthy = False
        self.last_error = message
        self._failed.inc(len(lines))
        self._up.set(0)
