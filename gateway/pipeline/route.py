"""Route stage: hand each processed batch to the local store, the sinks, the stream and the desk.

The store and the sink are reached through bounded queues, so when either falls behind the
pipeline waits (and with it the driver and the broker) instead of losing acknowledged data.
Terminal messages and device events go to the service desk, whose output (acks to terminals,
request updates, alarms) is delivered here too, the same way for every source.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from gateway.models import DeviceEvent, PresenceChange, Reading, event_id
from gateway.pipeline.process import Processed
from gateway.services.desk import DeskOutput, ServiceDesk
from gateway.store.writer import StoreWriter
from gateway.stream import StreamHub

log = logging.getLogger(__name__)
Publish = Callable[[str, bytes], None]


class Sink(Protocol):
    """An outbound time-series sink (InfluxDB today)."""

    async def submit(
        self, readings: list[Reading], events: list[DeviceEvent], presence: list[PresenceChange]
    ) -> None: ...

    async def submit_lines(self, lines: list[str]) -> None:
        """Already-built lines that must not be dropped (service records)."""


class Router:
    def __init__(
        self,
        store: StoreWriter,
        sinks: list[Sink],
        hub: StreamHub,
        desk: ServiceDesk | None = None,
        publish: Publish | None = None,
    ) -> None:
        self._store = store
        self._sinks = sinks
        self._hub = hub
        self._desk = desk
        self._publish = publish

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
        if self._desk is not None and (processed.terminal or processed.events):
            await self.deliver(await self._desk.handle(processed.terminal, processed.events))

    async def deliver(self, output: DeskOutput) -> None:
        """The service desk's output: durable in the desk already, now told to the world."""
        for name, data in output.stream:
            self._hub.publish(name, data)
        for event in output.events:
            self._hub.publish("alarm" if event.alarm else "event", event_payload(event))
        if output.events or output.dead_letters:
            await self._store.put(Processed(events=output.events, dead_letters=output.dead_letters))
        for sink in self._sinks:
            if output.events:
                await sink.submit([], output.events, [])
            if output.lines:
                await sink.submit_lines(output.lines)
        for topic, payload in output.acks:
            if self._publish is None:
                continue
            try:
                self._publish(topic, orjson.dumps(payload))
            except RuntimeError as exc:  # the MQTT driver is not running (shutting down)
                log.warning("could not send %s: %s", topic, exc)


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
