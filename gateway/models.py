"""Plain data that flows through the pipeline.

These are the hot-path records: cheap slotted dataclasses, built once per reading and handed
from stage to stage in lists (batches). Pydantic models live only at the edges (settings, API,
data files); nothing here validates itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[Severity, ...] = get_args(Severity)  # mildest first
# How a device became known: the installer's inventory, its own birth message, or its traffic.
Source = Literal["inventory", "birth", "auto"]
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
    # ts_ms is the gateway's receive time (the device sent none): it moves when the gateway's
    # clock jumps, and the alarm engine shifts what it is timing with it (gateway/rules.py).
    stamped_here: bool = False


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


class Rejected(ValueError):
    """A message the gateway refuses; str() is `"<reason code>: <detail>"`."""


@dataclass(slots=True)
class Device:
    """What the gateway knows about one device; also the row the API shows."""

    device_id: str
    kind: str
    source: Source
    building: str | None = None
    floor: int | None = None
    unit: str | None = None
    fw: str | None = None
    battery: float | None = None
    rssi: float | None = None
    online: bool = False
    first_seen_ms: int | None = None
    last_seen_ms: int | None = None
    presence_ms: int | None = None  # when `online` last changed
    last_ts_ms: int | None = None
    last_seq: int | None = None
    last_values: dict[str, float] = field(default_factory=dict)
    pinned_kind: bool = False  # kind and location come from the inventory

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "kind": self.kind,
            "source": self.source,
            "building": self.building,
            "floor": self.floor,
            "unit": self.unit,
            "fw": self.fw,
            "battery": self.battery,
            "rssi": self.rssi,
            "online": self.online,
            "first_seen_ms": self.first_seen_ms,
            "last_seen_ms": self.last_seen_ms,
            "presence_ms": self.presence_ms,
            "last_ts_ms": self.last_ts_ms,
            "last_seq": self.last_seq,
            "last_values": dict(self.last_values),
        }


@dataclass(slots=True)
class TerminalMessage:
    """A `request`, `rating` or `vote` message that passed the pipeline's checks."""

    device_id: str
    channel: str
    obj: dict[str, Any]
    ts_ms: int
    received_ms: int
    topic: str
    payload: bytes
    building: str | None = None
    # Set when the pipeline already refused it (e.g. `not_a_terminal`): the desk only answers,
    # dead-letters and counts it, the same way as its own refusals.
    refused: str | None = None


@dataclass(slots=True)
class Batch:
    """What the pipeline made of one batch of raw messages: the records the store, the sinks, the
    uplink, the service desk and the live stream each read their part of."""

    readings: list[Reading] = field(default_factory=list)
    events: list[DeviceEvent] = field(default_factory=list)
    presence: list[PresenceChange] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    devices: list[Device] = field(default_factory=list)  # changed, to persist
    terminal: list[TerminalMessage] = field(default_factory=list)  # for the service desk
    records: list[dict[str, Any]] = field(default_factory=list)  # service records (desk)
    forgotten: list[str] = field(default_factory=list)  # idle self-registered devices, to delete
    # Called once everything above is durable (local store and outbox): acks to the broker.
    on_durable: list[Callable[[], None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.readings
            or self.events
            or self.presence
            or self.dead_letters
            or self.devices
            or self.terminal
            or self.forgotten
        )
