"""The MQTT driver: the contract's device topics in, with QoS 1 and a persistent session.

docs/contract.md section 1: devices publish on `cgw/v1/{device_id}/{channel}` with QoS 1. The gateway
subscribes with QoS 1 and a persistent session (clean session off, fixed client id), so what
devices publish while the gateway restarts waits at the broker and is delivered when it is back.

paho-mqtt runs its network loop in its own thread; messages cross to the event loop through a
deque in batches (one wake-up for many messages, no per-message task). When the pipeline falls
behind, the paho thread waits, which stops reading the socket: back-pressure reaches the broker,
which holds the messages, instead of the gateway's memory growing.

Acknowledgements are manual: a QoS 1 message is acknowledged (PUBACK) only once the pipeline says
it is durable in the gateway (local store and outbox committed) or refused and dead-lettered.
A message the gateway dies holding is therefore redelivered by the broker, and the idempotent
writes downstream make the replay land once. An ack never crosses a reconnection: packet ids
are per connection, and the broker redelivers what the old connection left unacknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

from drivers.base import Ingress
from drivers.intake import MqttIntake
from gateway.models import RawMessage
from gateway.mqtt.mqtt311 import broker_client, refused, refused_filters
from gateway.topics import SUBSCRIPTIONS

log = logging.getLogger(__name__)


class MqttDriver(MqttIntake):
    """MQTT 3.1.1 through paho's network thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """MqttIntake's arguments; this adds the driver's own state."""
        super().__init__(*args, **kwargs)
        self._mids: deque[tuple[int, int, int]] = deque()  # (packet id, qos, connection) per message
        self._room = threading.Event()
        self._room.set()
        self._wake_scheduled = False
        self._client: paho.Client | None = None
        self._subscribe_mid: int | None = None  # the packet id of this connection's SUBSCRIBE

    async def run(self, ingress: Ingress) -> None:
        self._loop = asyncio.get_running_loop()
        client = self._make_client()
        self._client = client
        client.connect_async(self._settings.host, self._settings.port, self._settings.keepalive_s)
        client.loop_start()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._pending:
                    batch, acks = self._take(self._batch_size)
                    await ingress.put(batch, acks)
                    if len(self._pending) < self._max_pending // 2:
                        self._room.set()
                if self.link.stopping and not client.is_connected():
                    return
        finally:
            self.link.stopping = True
            self._room.set()
            client.disconnect()
            client.loop_stop()
            self.link.set_connected(False)

    async def stop(self) -> None:
        """Stop reading from the broker, hand over what was received, and let `run` return.

        Messages not yet received stay in the broker's persistent session for the next start.
        """
        self.link.stopping = True
        self._room.set()
        client = self._client
        if client is not None:
            await asyncio.to_thread(client.disconnect)
            await asyncio.to_thread(client.loop_stop)
        self._wake.set()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish to a device (acks, commands). Thread-safe; paho queues it while offline."""
        if self._client is None:
            raise RuntimeError("the MQTT driver is not running")
        self._client.publish(topic, payload, qos=qos, retain=retain)

    # -- paho side (network thread) ------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        client = broker_client(
            self._settings,
            self._client_id,
            self.link,
            clean_session=self._settings.clean_start,
            on_connect=self._on_connect,
            on_subscribe=self._on_subscribe,
            on_message=self._on_message,
        )
        client.on_disconnect = self._on_disconnect  # says more than the link's own
        client.max_queued_messages_set(10_000)
        return client

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if refused(self.link, reason):
            return
        self._generation += 1
        self._subscribe_mid = client.subscribe([(topic, 1) for topic in SUBSCRIPTIONS])[1]
        log.info(
            "connected to %s as %s (session present: %s)",
            self._settings.url,
            self._client_id,
            flags.session_present,
        )

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[Any], properties: Any
    ) -> None:
        """Ready once the broker has granted every subscription (SUBACK), not when asked."""
        if mid != self._subscribe_mid:
            return
        refusals = refused_filters(SUBSCRIPTIONS, reason_codes)
        if refusals:
            self.link.subscription_refused(refusals)
        else:
            self.link.set_connected(True)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        silent = reason.is_failure and self._closed_soon()
        self.link.lost(self._taken_over(certain=False) if silent else str(reason))

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            # Kept (and then refused with a reason) rather than dropped inside paho.
            topic = msg._topic.decode("utf-8", errors="replace")
        # The packet id goes in first: the event loop reads `_pending` and then `_mids`.
        self._mids.append((msg.mid, msg.qos, self._generation))
        self._pending.append((topic, bytes(msg.payload), time.time_ns() // 1_000_000))
        if not self._wake_scheduled and self._loop is not None:
            self._wake_scheduled = True
            self._loop.call_soon_threadsafe(self._wake_up)
        if len(self._pending) >= self._max_pending:
            # Hold the network thread until the pipeline has caught up to half the bound. The
            # timeout re-checks the length, so a wake-up that raced this clear() is not missed.
            low = self._max_pending // 2
            while len(self._pending) >= low and not self.link.stopping:
                self._room.clear()
                self._room.wait(timeout=0.2)

    # -- event-loop side -----------------------------------------------------------------------

    def _wake_up(self) -> None:
        self._wake_scheduled = False
        self._wake.set()

    def _take(self, n: int) -> tuple[list[RawMessage], Callable[[], None]]:
        pending, mids = self._pending, self._mids
        count = min(n, len(pending))
        batch = [pending.popleft() for _ in range(count)]
        ids = [mids.popleft() for _ in range(count)]
        client = self._client

        def acknowledge() -> None:
            if client is None:
                return
            current = self._generation
            for mid, qos, generation in ids:
                # A message of an earlier connection is redelivered by the broker to this one.
                if qos and generation == current:
                    client.ack(mid, qos)

        return batch, acknowledge
