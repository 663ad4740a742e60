"""Plain data that flows through the pipeline.

These are the hot-path records: cheap slotted dataclasses, built once per reading and handed
from stage to stage in lists (batches). Pydantic models live only at the edges (settings, API,
data files); nothing here validates itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "critical")
# The district platform, as the actor of its commands and the source of their events.
DISTRICT = "district"

# What a driver hands to the pipeline: (topic, payload, received_at in epoch ms).
# A tuple, not an object: one is made per MQTT message at the highest rate in the gateway.
RawMessage = tuple[str, bytes, int]


@dataclass(slots=True)
class Reading:
    """One timestamped set of metric values from one device."""

    device_id: str
    kind: str
    ts_ms: int
    metrics: dict[str, float]
    seq: int | None = None
    building: str | None = None


@dataclass(slots=True)
class DeviceEvent:
    """Something that happened: reported by a device, raised by an alarm rule or by presence.

    `alarm` marks the events an operator must see and acknowledge (warning and critical ones,
    and rule alarms); `source` says who produced it: "device", "rule" or "gateway".
    """

    device_id: str
    kind: str
    ts_ms: int
    type: str
    severity: Severity
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    source: str = "device"
    building: str | None = None

    @property
    def alarm(self) -> bool:
        return self.severity != "info"


@dataclass(slots=True)
class PresenceChange:
    """A device went online or offline; `reason` is birth, will, timeout, message or status."""

    device_id: str
    kind: str
    ts_ms: int
    online: bool
    reason: str
    building: str | None = None


@dataclass(slots=True)
class DeadLetter:
    """A message the gateway refused, kept with the reason so an installer can see why."""

    received_ms: int
    topic: str
    device_id: str | None
    reason: str
    payload: bytes
    channel: str | None = None

    @property
    def reason_code(self) -> str:
        """The short label used for counters: the text before the first colon."""
        return self.reason.split(":", 1)[0]


def event_id(event: DeviceEvent) -> int:
    """A stable 63-bit id for an event, the same however often the event is replayed.

    Derived from what makes the event unique, so the live stream can name an event before the
    store has written it, and a redelivered device event lands once (the store ignores a known id).
    """
    key = f"{event.device_id}|{event.ts_ms}|{event.type}|{event.source}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1
