"""Route stage: hand each batch to the live stream, the service desk and the local store.

The store writer is reached through a bounded queue and commits the batch together with every
sink's outbox rows, which the sinks then drain on their own (gateway/sinks/drain.py); so when the
store falls behind the pipeline waits (and with it the driver and the broker) instead of losing
acknowledged data, and a slow sink costs disk, not memory.
Terminal messages and device events go to the service desk, whose output (acks to terminals,
request updates, alarms) is delivered here too, the same way for every source.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson

from gateway.models import Batch, DeviceEvent, PresenceChange, event_id
from gateway.services.desk import DeskOutput, ServiceDesk
from gateway.services.relay import RecordRelay
from gateway.store.writer import StoreWriter
from gateway.stream import StreamHub

log = logging.getLogger(__name__)
Publish = Callable[[str, bytes], None]


class Router:
    def __init__(
        self,
        store: StoreWriter,
        hub: StreamHub,
        desk: ServiceDesk | None = None,
        relay: RecordRelay | None = None,
        publish: Publish | None = None,
    ) -> None:
        self._store = store
        self._hub = hub
        self._desk = desk
        self._relay = relay
        self._publish = publish
        # Told of every batch first, on the loop, and must not block (the care desk's activity).
        self.observers: list[Callable[[Batch], None]] = []

    async def route(self, batch: Batch) -> None:
        for observe in self.observers:
            observe(batch)
        # Live stream first: it never blocks, and operators see an alarm as early as possible.
        # Presence goes before events: a device comes online before what it then reports.
        for change in batch.presence:
            self._hub.publish("presence", presence_payload(change))
        for event in batch.events:
            self._hub.publish("alarm" if event.alarm else "event", event_payload(event))
        output: DeskOutput | None = None
        if self._desk is not None and (batch.terminal or batch.events):
            # Durable in the desk before anything is acknowledged to a terminal.
            output = await self._desk.handle(batch.terminal, batch.events)
            self._live(output)
            batch.events.extend(output.events)
            batch.dead_letters.extend(output.dead_letters)
            await self._hand_on(batch)
        # One commit makes the batch durable in the local store and in every sink's outbox;
        # the batch's on_durable callbacks (broker acks) run after it.
        await self._store.put(batch)
        if output is not None:
            self._send_acks(output)

    async def deliver(self, output: DeskOutput) -> None:
        """The services' own output (operators' actions, deadline checks): durable, then told."""
        self._live(output)
        batch = Batch(events=output.events, dead_letters=output.dead_letters)
        await self._hand_on(batch)
        if output or batch.records or batch.dead_letters:
            await self._store.put_durable(batch)
        self._send_acks(output)

    async def record(self, event: DeviceEvent) -> None:
        """An event of the gateway's own making (a district command): live, then durable."""
        self._hub.publish("alarm" if event.alarm else "event", event_payload(event))
        await self._store.put_durable(Batch(events=[event]))

    def _live(self, output: DeskOutput) -> None:
        for name, data in output.stream:
            self._hub.publish(name, data)
        for event in output.events:
            self._hub.publish("alarm" if event.alarm else "event", event_payload(event))

    async def _hand_on(self, batch: Batch) -> None:
        """Service records kept since the last batch (and refusals over the API) go with this one."""
        if self._relay is not None:
            await self._relay.hand_on(batch)

    def _send_acks(self, output: DeskOutput) -> None:
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
