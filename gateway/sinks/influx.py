"""The InfluxDB v2 sink: drains its durable outbox to `/api/v2/write`, in order, retrying.

docs/contract.md section 2: written "to `/api/v2/write` (InfluxDB 2.x/3.x, or any server that accepts
that API)". The store writer encodes every committed batch into this sink's outbox rows
(`encode`), in the same transaction as the local store, so nothing acknowledged to the broker is
only in memory. The drain (gateway/sinks/drain.py) takes the oldest rows (up to `batch_size`
points) and deletes them once InfluxDB has them.

What each answer means (docs/timeseries.md): 2xx, written; 413, too large, so the batch is sent
in halves (and later batches in pieces of the size that went through) until each piece is
accepted; only a single line refused as too large on its own is dropped, since no retry can ever
send it; 401/403/404, kept and retried, naming the setting to fix; any other 4xx but 408/429,
the data is refused for good and dropped, counted; 408, 429, 5xx or no answer, kept and retried
with backoff, waiting at least as long as the server's `Retry-After` asks.
"""

from __future__ import annotations

import http.client
import logging
import sqlite3
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import orjson

from gateway.instruments import Instruments
from gateway.models import Batch, Reading
from gateway.settings import InfluxSettings
from gateway.sinks.drain import OutboxDrain
from gateway.sinks.lineprotocol import event_line, presence_line, reading_lines, service_record_lines
from gateway.sinks.writeapi import Answer, WriteApi
from gateway.store.outbox import Outbox, OutboxRow, Reference, Shipment, rows_of

log = logging.getLogger(__name__)


class InfluxSink(OutboxDrain):
    """Line protocol into the outbox; batches of it to `/api/v2/write`."""

    name = "influx"

    def __init__(
        self,
        settings: InfluxSettings,
        community: str,
        instruments: Instruments,
        db_path: Path,
        outbox: Outbox,
    ) -> None:
        super().__init__(instruments, db_path, outbox, settings.batch_size, settings.flush_interval_s)
        self._settings = settings
        self._community = community
        self.target = f"InfluxDB at {settings.url}"
        self._api = WriteApi(settings)
        self._max_lines: int | None = None  # learnt from a 413: the most lines InfluxDB took at once
        self._learning = False  # after a 413, until the batch is sent: _max_lines grows to what goes

    def encode(self, batches: list[Batch], commit_no: int | None) -> list[OutboxRow]:
        """Line protocol for committed batches' events and records (one row), and references to
        the telemetry the commit inserted (rendered by `expand` when the sink takes them)."""
        community = self._community
        important: list[str] = []
        for batch in batches:
            important.extend(event_line(e, community) for e in batch.events)
            important.extend(presence_line(p, community) for p in batch.presence)
            for record in batch.records:
                important.extend(service_record_lines(record, community))
        rows = rows_of(self.name, important, [])
        if commit_no is not None:
            readings = sorted((r for batch in batches for r in batch.readings), key=lambda r: r.ts_ms)
            rows.extend(self._reference(group, commit_no) for group in _spans(readings))
        return rows

    def _reference(self, readings: list[Reading], commit_no: int) -> OutboxRow:
        # The reference carries each device's tags as they were at this commit (a device renamed
        # or moved later keeps its earlier points where they were).
        tags = orjson.dumps({r.device_id: (r.kind, r.building) for r in readings}).decode()
        ref = Reference(commit_no, readings[0].ts_ms, readings[-1].ts_ms)
        return OutboxRow(self.name, False, tags, len(readings), ref=ref, size=_line_bytes(readings))

    def expand(self, conn: sqlite3.Connection, ref: Reference, context: str) -> list[str]:
        """The lines of a reference's telemetry rows: one point per reading (its metrics are
        adjacent in the table's order), tagged as `context` (device -> kind, building) says."""
        tags: dict[str, tuple[str, str | None]] = orjson.loads(context) if context else {}
        lines: list[str] = []
        reading: Reading | None = None
        for ts_ms, device_id, metric, value in conn.execute(
            "SELECT ts_ms, device_id, metric, value FROM telemetry "
            "WHERE ts_ms BETWEEN ? AND ? AND batch = ? ORDER BY ts_ms, device_id, metric",
            (ref.from_ms, ref.to_ms, ref.batch),
        ):
            if reading is None or reading.device_id != device_id or reading.ts_ms != ts_ms:
                if reading is not None:
                    reading_lines(reading, self._community, lines)
                kind, building = tags.get(device_id, ("generic", None))
                reading = Reading(device_id, kind, ts_ms, {}, building=building)
            reading.metrics[metric] = value
        if reading is not None:
            reading_lines(reading, self._community, lines)
        return lines

    async def _send(self, shipment: Shipment) -> bool:
        """Write requests for what `shipment` holds; True when the rows are done with (written, or
        refused for good). After a partial failure the whole of it is sent again: InfluxDB keeps
        one value per series and time, so the pieces already written land once."""
        lines = shipment.body.split("\n")
        step = self._max_lines or len(lines)
        try:
            for start in range(0, len(lines), step):
                if not await self._write(lines[start : start + step]):
                    return False
            return True
        finally:
            self._learning = False

    async def _write(self, lines: list[str]) -> bool:
        try:
            answer = await self._blocking(self._api.post, "\n".join(lines).encode())
        except (OSError, http.client.HTTPException) as exc:
            self._fail(f"cannot reach InfluxDB at {self._settings.url}: {exc}", len(lines))
            return False
        if answer.ok:
            if self._learning and len(lines) > (self._max_lines or 0):
                self._max_lines = len(lines)
            self._sent(len(lines))
            return True
        if answer.status == 413:
            return await self._split(lines)
        return self._refused(answer, len(lines))

    async def _split(self, lines: list[str]) -> bool:
        """413: the request was too large, not the data bad. Halves, until each piece goes."""
        if len(lines) == 1:
            self._rejected.inc(1)
            log.error("InfluxDB refuses a line as too large even on its own (413): %s", lines[0][:300])
            return True
        if self._max_lines is None or len(lines) <= self._max_lines:
            # Pieces of the size in use are refused: the size is learnt again, as the largest piece
            # that goes through while this batch is halved. Not from the halving itself: a line
            # too large on its own is halved down to, and must not leave later batches one line
            # a request.
            log.warning("InfluxDB refused %d lines as too large (413); sending smaller pieces", len(lines))
            self._max_lines = None
            self._learning = True
        half = len(lines) // 2
        return await self._write(lines[:half]) and await self._write(lines[half:])

    def _refused(self, answer: Answer, points: int) -> bool:
        status, body = answer.status, answer.text
        if status in (401, 403):
            if not self._settings.token.get_secret_value().strip():
                # Said as such: no Authorization header was sent at all.
                self._fail(
                    f"InfluxDB refused the write ({status}): the token is empty; set CGW_INFLUX__TOKEN",
                    points,
                )
            else:
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
        wait = retry_after_s(answer.retry_after, time.time())
        if wait is not None:
            self._retry_after(wait)
        self._fail(f"InfluxDB answered {status}: {body[:200]}", points)
        return False

    async def _close_client(self) -> None:
        await self._blocking(self._api.close)


# Readings further apart in time than this go in separate references: the sink reads a
# reference's span of the table (all devices) to find its commit's rows, so a straggler stamped
# a day ago must not make it read the whole day.
SPAN_GAP_MS = 60_000


def _spans(readings: list[Reading]) -> list[list[Reading]]:
    """Readings (sorted by time) in groups without a gap of more than SPAN_GAP_MS."""
    spans: list[list[Reading]] = []
    for r in readings:
        if spans and r.ts_ms - spans[-1][-1].ts_ms <= SPAN_GAP_MS:
            spans[-1].append(r)
        else:
            spans.append([r])
    return spans


def _line_bytes(readings: list[Reading]) -> int:
    """About what the readings' lines take (gateway/sinks/lineprotocol.py), without writing
    them: measurement, tags and time, and per field its name and a value."""
    size = 0
    for r in readings:
        size += len(r.kind) + len(r.device_id) + len(r.building or "") + 60
        size += sum(len(name) + 12 for name in r.metrics)
    return size


def retry_after_s(value: str | None, now: float) -> float | None:
    """Seconds to wait from an HTTP `Retry-After` header: delta-seconds or an HTTP-date
    (RFC 9110 section 10.2.3); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None
