"""What the district sees: committed batches turned into uplink items, one JSON object each.

Each item belongs to a stream (`requests`, `ratings`, `alarms`, `commands`, `telemetry`,
`needs`, `evaluation`), which becomes the last level of its topic, `cgw/v1/up/{community}/{stream}`
(docs/uplink.md). Every item has a `key` that is the same each time the item is sent, so the
district can drop the copies at-least-once delivery may make after a fault.

Personal data stays in the community: a request goes up as an allow-list of fields
(`gateway/privacy.py` UPLINK_REQUEST_FIELDS, each documented in docs/uplink.md): its building and
floor, never the unit, household, address, coordinates, photo, contact or any free text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from gateway import privacy
from gateway.models import DISTRICT, Batch, DeviceEvent, Reading
from gateway.pipeline.route import event_payload
from gateway.store.outbox import OutboxRow, rows_of

# Snapshots: the district wants the latest on connecting, so they are published retained.
SNAPSHOTS = frozenset({"needs", "evaluation"})


class TelemetryChoice:
    """The `uplink.telemetry` selectors: whole kinds, or single metrics of a kind."""

    def __init__(self, selectors: Iterable[str]) -> None:
        self._kinds: set[str] = set()
        self._metrics: dict[str, set[str]] = {}
        for selector in selectors:
            kind, _, metric = selector.partition(".")
            if metric:
                self._metrics.setdefault(kind, set()).add(metric)
            else:
                self._kinds.add(kind)

    def __bool__(self) -> bool:
        return bool(self._kinds or self._metrics)

    def pick(self, reading: Reading) -> dict[str, float]:
        if reading.kind in self._kinds:
            return reading.metrics
        wanted = self._metrics.get(reading.kind)
        if not wanted:
            return {}
        return {k: v for k, v in reading.metrics.items() if k in wanted}


def encode(batches: list[Batch], choice: TelemetryChoice, sink: str) -> list[OutboxRow]:
    """Outbox rows for the uplink: one row of what is never dropped, one row of telemetry."""
    important: list[str] = []
    telemetry: list[str] = []
    for batch in batches:
        important.extend(_line("alarms", alarm_item(e)) for e in batch.events if e.alarm)
        # The district's own commands, carried out or refused: its record of what it asked.
        important.extend(_line("commands", command_item(e)) for e in batch.events if e.source == DISTRICT)
        for record in batch.records:
            item = record_item(record)
            if item is not None:
                important.append(_line(*item))
        if choice:
            for reading in batch.readings:
                metrics = choice.pick(reading)
                if metrics:
                    telemetry.append(_line("telemetry", telemetry_item(reading, metrics)))
    return rows_of(sink, important, telemetry)


def snapshot_row(stream: str, item: dict[str, Any], sink: str) -> OutboxRow:
    return OutboxRow(sink, True, _line(stream, item), 1)


def _line(stream: str, item: dict[str, Any]) -> str:
    # A tab cannot occur in a stream name, and orjson escapes it inside the JSON.
    return f"{stream}\t{orjson.dumps(item).decode()}"


def parse(body: str) -> Iterator[tuple[str, bytes]]:
    """(stream, item JSON) for each line of taken outbox rows."""
    for line in body.split("\n"):
        stream, _, item = line.partition("\t")
        yield stream, item.encode()


def command_item(event: DeviceEvent) -> dict[str, Any]:
    """A district command's event as the API shows it, keyed by its event id (the district's own
    words coming back: nothing of a resident's)."""
    item = event_payload(event)
    item["key"] = str(item.pop("id"))  # 64 bits: more than a JavaScript number holds exactly
    del item["acked"]  # acknowledgements are the community's own business
    return item


# An alarm's fields and `data` keys the district receives (docs/uplink.md): what happened, where
# and to which request, never text a device or a person wrote.
ALARM_FIELDS = ("key", "ts_ms", "device_id", "kind", "building", "type", "severity", "source", "alarm")
ALARM_DATA = frozenset(
    {
        "metric",
        "value",
        "previous",
        "since_ms",
        "alarm",
        "reason",
        "service_request_id",
        "service_code",
        "state",
        "provider_id",
        "expected_ms",
    }
)
# Sources whose `message` the gateway writes itself from its own templates (rules, presence, the
# service desk); a device's message is its own free text and stays home.
TEMPLATED = frozenset({"rule", "gateway", "service_desk"})


def alarm_item(event: DeviceEvent) -> dict[str, Any]:
    """An alarm as an allow-list of fields, keyed by its event id."""
    whole = command_item(event)
    item = {name: whole[name] for name in ALARM_FIELDS}
    item["data"] = {
        k: v
        for k, v in event.data.items()
        if k in ALARM_DATA
        and (isinstance(v, int | float | bool) or (isinstance(v, str) and len(v) <= 128) or v is None)
    }
    if event.source in TEMPLATED:
        item["message"] = event.message
    return item


def telemetry_item(reading: Reading, metrics: dict[str, float]) -> dict[str, Any]:
    return {
        "key": f"{reading.device_id}:{reading.ts_ms}",
        "ts_ms": reading.ts_ms,
        "device_id": reading.device_id,
        "kind": reading.kind,
        "building": reading.building,
        "metrics": metrics,
    }


def record_item(record: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The desk's service record as an uplink item (None: an older version's bare line)."""
    kind = record["kind"]
    if kind == "step":
        request = privacy.uplink_request(record["request"])
        key = f"{request['id']}:{record['to']}:{record['ts_ms']}"
        step = {
            "from": record["from"],
            "to": record["to"],
            "ts_ms": record["ts_ms"],
            "actor": record["actor"],
        }
        return "requests", {"key": key, **request, "step": step}
    if kind == "rating":
        request = record["request"]
        return "ratings", {
            "key": f"{request['id']}:rating",
            "service_request_id": request["id"],
            "service_code": request["service_code"],
            "service_group": request["service_group"],
            "provider_id": request["provider_id"],
            "building": request["building"],
            "score": record["score"],
            "ts_ms": record["ts_ms"],
        }
    return None
