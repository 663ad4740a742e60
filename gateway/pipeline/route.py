"""Route stage: hand each processed batch to the local store, the time-series sink and the stream.

The store and the sink are reached through bounded queues, so when either falls behind the
pipeline waits (and with it the driver and the broker) instead of losing acknowledged data.
"""

from __future__ import annotations

from typing import Any, Protocol

from gateway.models import DeviceEvent, PresenceChange, Reading, event_id
from gateway.pipeline.process import Processed
from gateway.store.writer import StoreWriter
from gateway.stream import StreamHub


class Sink(Protocol):
    """An outbound time-series sink (InfluxDB today)."""

    async def submit(
        self, readings: list[Reading], events: list[DeviceEvent], presence: list[PresenceChange]
    ) -> None: ...


class Router:
    def __init__(self, store: StoreWriter, sinks: list[Sink], hub: StreamHub) -> None:
        self._store = store
        self._sinks = sinks
        self._hub = hub

    async def route(self, processed: Processed) -> None:
        # Live stream first: it never blocks, and operators see an alarm as early as possible.
        # Presence goes before events: a device comes online before what it then reports.
        for change in processed.presence:
            self._hub.publish("presence", presence_payload(change))
        for event in processed.events:
            self._hub.publish("alarm" if event.alarm else "event", event_payload(event))
        await self._store.put(processed)
        if processed.readings or processed.events or processed.presence:
            for sink in self._sinks:
                await sink.submit(processed.readings, processed.events, processed.presence)


def event_payload(event: DeviceEvent) -> dict[str, Any]:
    """An event as the API and the stream show it (same fields as GET /api/v1/events)."""
    return {
        "id": event_id(event),
        "ts_ms": event.ts_ms,
        "device_id": event.device_id,
        "kind": event.kind,
        "building": event.building,
        "type": event.type,
        "severity": event.severity,
        "source": event.source,
        "message": event.message,
        "data": event.data,
        "alarm": event.alarm,
        "acked": False,
    }


def presence_payload(change: PresenceChange) -> dict[str, Any]:
    return {
        "device_id": change.device_id,
        "kind": change.kind,
        "building": change.building,
        "online": change.online,
        "state": "online" if change.online else "offline",
        "reason": change.reason,
        "ts_ms": change.ts_ms,
    }
