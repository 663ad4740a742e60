"""InfluxDB line protocol, built directly as strings (no per-point objects on the hot path).

docs/contract.md section 2: "Telemetry: measurement = the device's kind; tags `community`,
`device_id`, `building`; fields = the metrics; time = the reading's `ts`." Events and presence
changes go to `device_event` and `device_presence`; the service loop writes `service_request`
(one point per lifecycle step), `rating` and `service_usage` (docs/timeseries.md). Times are epoch ms.
Metric fields are always floats (`1.0`, never `1i`) so a field never changes type in InfluxDB.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.models import DeviceEvent, PresenceChange, Reading

_MEASUREMENT = str.maketrans({",": "\\,", " ": "\\ ", "\n": "\\n", "\r": "\\r", "\\": "\\\\"})
_TAG = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ ", "\n": "\\n", "\r": "\\r", "\\": "\\\\"})
_STRING = str.maketrans({'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r"})


def _tags(pairs: tuple[tuple[str, str | None], ...]) -> str:
    # Empty tag values are not allowed by the protocol: such tags are left out.
    return "".join(f",{key}={value.translate(_TAG)}" for key, value in pairs if value)


def reading_lines(reading: Reading, community: str, out: list[str]) -> None:
    """Append the line for one reading (all its metrics as fields of one point)."""
    fields = ",".join(f"{name.translate(_TAG)}={float(value)!r}" for name, value in reading.metrics.items())
    tags = _tags((("building", reading.building), ("community", community), ("device_id", reading.device_id)))
    out.append(f"{reading.kind.translate(_MEASUREMENT)}{tags} {fields} {reading.ts_ms}")


def event_line(event: DeviceEvent, community: str) -> str:
    tags = _tags(
        (
            ("building", event.building),
            ("community", community),
            ("device_id", event.device_id),
            ("kind", event.kind),
            ("severity", event.severity),
            ("source", event.source),
            ("type", event.type),
        )
    )
    data = orjson.dumps(event.data, default=str).decode().translate(_STRING)
    fields = (
        f'message="{event.message.translate(_STRING)}",data="{data}",'
        f"alarm={'true' if event.alarm else 'false'}"
    )
    return f"device_event{tags} {fields} {event.ts_ms}"


def presence_line(change: PresenceChange, community: str) -> str:
    tags = _tags(
        (
            ("building", change.building),
            ("community", community),
            ("device_id", change.device_id),
            ("kind", change.kind),
            ("reason", change.reason),
        )
    )
    state = "online" if change.online else "offline"
    return (
        f'device_presence{tags} online={"true" if change.online else "false"},state="{state}" {change.ts_ms}'
    )


def _string(value: str) -> str:
    return f'"{value.translate(_STRING)}"'


def service_record_lines(record: dict[str, Any], community: str) -> list[str]:
    """The lines of one service record (`step_record` and `rating_record` in gateway/services/)."""
    kind = record["kind"]
    if kind == "step":
        return service_step_lines(record, community)
    if kind == "rating":
        return [rating_line(record["request"], record["score"], record["ts_ms"], community)]
    if kind == "line":  # kept by a version before services migration 3
        return [record["line"]]
    raise ValueError(f"unknown service record kind {kind!r}")


def service_step_lines(step: dict[str, Any], community: str) -> list[str]:
    """One `service_request` point per lifecycle step; a completion also adds `service_usage`.

    The ticket is a tag so that two requests changing state in the same millisecond stay two
    points (requests are few enough that this does not strain the series index).
    """
    r = step["request"]
    ts_ms: int = step["ts_ms"]
    tags = _tags(
        (
            ("building", r["building"]),
            ("community", community),
            ("provider", r["provider_id"]),
            ("service_code", r["service_code"]),
            ("service_group", r["service_group"]),
            ("service_request_id", r["id"]),
            ("source", r["source"]),
            ("state", step["to"]),
        )
    )
    fields = (
        f"from_state={_string(step['from'] or '')},actor={_string(step['actor'])},"
        f"overdue={'true' if ts_ms > r['expected_ms'] else 'false'},count=1i"
    )
    lines = [f"service_request{tags} {fields} {ts_ms}"]
    if step["to"] == "completed":
        usage_tags = _tags(
            (
                ("building", r["building"]),
                ("community", community),
                ("provider", r["provider_id"]),
                ("service_code", r["service_code"]),
                ("service_group", r["service_group"]),
                ("service_request_id", r["id"]),
            )
        )
        hours = (ts_ms - r["requested_ms"]) / 3_600_000
        on_time = "true" if ts_ms <= r["expected_ms"] else "false"
        lines.append(
            f"service_usage{usage_tags} hours_to_complete={hours!r},on_time={on_time},count=1i {ts_ms}"
        )
    return lines


def rating_line(request: dict[str, Any], score: int, ts_ms: int, community: str) -> str:
    tags = _tags(
        (
            ("community", community),
            ("provider", request["provider_id"]),
            ("service_code", request["service_code"]),
            ("service_group", request["service_group"]),
            ("service_request_id", request["id"]),
        )
    )
    return f"rating{tags} score={score}i {ts_ms}"
