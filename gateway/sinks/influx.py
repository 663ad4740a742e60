"""The InfluxDB v2 sink: drains its durable outbox with `influxdb-client`, in order, retrying.

docs/contract.md section 2: written "to `/api/v2/write` (InfluxDB 2.x/3.x, or any server that accepts
that API)". The store writer encodes every committed batch into this sink's outbox rows
(`encode`), in the same transaction as the local store, so nothing acknowledged to the broker is
only in memory. The drain (gateway/sinks/drain.py) takes the oldest rows (up to `batch_size`
points) and deletes them once InfluxDB has them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException
from urllib3.exceptions import HTTPError as Urllib3Error

from gateway.settings import InfluxSettings
from gateway.sinks.drain import OutboxDrain
from gateway.sinks.lineprotocol import event_line, presence_line, reading_lines, service_record_lines
from gateway.stats import GatewayMetrics
from gateway.store.outbox import Outbox, OutboxRow, Taken, rows_of

if TYPE_CHECKING:
    from gateway.pipeline.process import Processed

log = logging.getLogger(__name__)


class InfluxSink(OutboxDrain):
    """Line protocol into the outbox; batches of it to `/api/v2/write`."""

    name = "influx"

    def __init__(
        self, settings: InfluxSettings, community: str, metrics: GatewayMetrics, db_path: Path, outbox: Outbox
    ) -> None:
        super().__init__(metrics, db_path, outbox, settings.batch_size, settings.flush_interval_s)
        self._settings = settings
        self._community = community
        self.target = f"InfluxDB at {settings.url}"
        self._client = InfluxDBClient(
            url=settings.url,
            token=settings.token.get_secret_value(),
            org=settings.org,
            timeout=int(settings.timeout_s * 1000),
        )
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)

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
            for record in batch.records:
                important.extend(service_record_lines(record, community))
        return rows_of(self.name, important, telemetry)

    async def _send(self, taken: Taken) -> bool:
        """One write request; True when the rows are done with (written, or refused for good)."""
        try:
            await self._call(self._post, taken.body)
        except ApiException as exc:
            return self._refused(exc, taken.points)
        except (Urllib3Error, OSError) as exc:
            self._fail(f"cannot reach InfluxDB at {self._settings.url}: {exc}", taken.points)
            return False
        self._sent(taken.points)
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

    async def _close_client(self) -> None:
        await self._call(self._client.close)
