"""The MQTT 5 driver: the contract's device topics in, on the event loop, many messages per read.

The same promises as the paho driver (drivers/mqtt.py): QoS 1 subscriptions on a persistent
session, a PUBACK only once the pipeline says a message is durable or dead-lettered, no ack
across a reconnection, and back-pressure that reaches the broker. What differs is the cost.

Why not paho here: paho's network thread makes about six system calls per received message
(a select, three reads for one packet, and a wake-up byte through a socket pair for every
PUBACK), and that thread competes with the pipeline for the GIL. The gateway's intake was
bound by it (docs/performance.md). Here the connection is the gateway's asyncio MQTT 5
connection (gateway/mqtt/client.py's `Connection`): one read takes whatever the kernel holds
(hundreds of messages during a backlog), the `mqtt5` codec (Rust, sans-I/O) parses each packet in
a fraction of a microsecond, and a batch's PUBACKs go out in one write. The driver is ready once
the broker granted its subscriptions (SUBACK), not when it asked. The codec speaks MQTT 5 only;
for a broker without it, `mqtt.protocol: "3.1.1"` selects the paho driver.

Session: `clean_start` off with a session expiry of "never" is MQTT 5's persistent session,
what MQTT 3.1.1 calls clean session off. Back-pressure: past `max_pending` messages the
transport stops reading until the pipeline has taken half of them; the broker holds the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import mqtt5

from drivers.base import Ingress
from drivers.intake import MqttIntake
from gateway.models import RawMessage
from gateway.mqtt.client import (
    CLOSED_WITHOUT_A_WORD,
    MAX_PACKET_ID,
    Connection,
    ConnectRefused,
    NotMqtt5,
    connect_packet,
    open_connection,
    refused_filters,
)
from gateway.topics import SUBSCRIPTIONS

log = logging.getLogger(__name__)

MAX_QUEUED_OUT = 10_000  # publications kept while offline (acks and commands to devices)


class Mqtt5Driver(MqttIntake):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """MqttIntake's arguments; this adds the driver's own state."""
        super().__init__(*args, **kwargs)
        # Beside each pending message: (connection << 16 | packet id) for its ack, 0 for QoS 0.
        self._acks: deque[int] = deque()
        self._closed = asyncio.Event()  # set while there is no connection
        self._closed.set()
        self._connection: _Connection | None = None
        self._loop_thread = 0
        # Outgoing QoS 1 publications: waiting to be sent, and sent but not yet acknowledged.
        self._outgoing: deque[tuple[str, bytes, int, bool]] = deque()
        self._inflight: dict[int, bytes] = {}
        self._next_id = 0
        self._dropped_out = self._instruments.driver_errors.labels(driver=self.name, reason="publish_dropped")
        self._unacked = 0  # batches handed to the pipeline and not yet durable
        self._all_acked = asyncio.Event()
        self._all_acked.set()

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self, ingress: Ingress) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        connector = asyncio.create_task(self._connect_forever(), name="mqtt5-connect")
        try:
            await self._forward(ingress)
        finally:
            self.link.stopping = True
            await self._close()  # DISCONNECT first: a normal one keeps the session, drops the Will
            connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connector

    async def stop(self) -> None:
        """Stop reading from the broker, hand over what was received, and let `run` return.

        Messages not yet received stay in the broker's persistent session for the next start.
        """
        self.link.stopping = True
        if self._connection is not None:
            self._connection.pause()
        self._wake.set()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish to a device (acks, commands); kept while offline, up to MAX_QUEUED_OUT."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the MQTT driver is not running")
        if threading.get_ident() != self._loop_thread:
            loop.call_soon_threadsafe(self.publish, topic, payload, qos, retain)
            return
        if len(self._outgoing) + len(self._inflight) >= MAX_QUEUED_OUT:
            self._dropped_out.inc()
            log.warning("%d publications wait for %s: dropped one to %s", MAX_QUEUED_OUT, self.target, topic)
            return
        self._outgoing.append((topic, payload, qos, retain))
        self._send_outgoing()

    # -- the pipeline side -----------------------------------------------------------------------

    async def _forward(self, ingress: Ingress) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, acknowledge = self._take(self._batch_size)
                await ingress.put(batch, acknowledge)
                connection = self._connection
                if connection and not self.link.stopping and len(self._pending) < self._max_pending // 2:
                    connection.resume()
            if self.link.stopping:
                # The acks of batches still in the pipeline go out before DISCONNECT, so the next
                # start does not receive them again (the application's drain timeout bounds the
                # wait); with the connection gone they are void, and there is nothing to wait for.
                waits = [asyncio.ensure_future(e.wait()) for e in (self._all_acked, self._closed)]
                _, waiting = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for task in waiting:
                    task.cancel()
                return

    def _take(self, n: int) -> tuple[list[RawMessage], Callable[[], None]]:
        pending, acks = self._pending, self._acks
        count = min(n, len(pending))
        batch = [pending.popleft() for _ in range(count)]
        ids = [acks.popleft() for _ in range(count)]
        self._unacked += 1
        self._all_acked.clear()

        def acknowledge() -> None:
            self._unacked -= 1
            if not self._unacked:
                self._all_acked.set()
            connection = self._connection
            if connection is None:
                return  # the broker redelivers them to the next connection
            current = connection.generation << 16
            packets = [
                mqtt5.PubAckPacket(key & MAX_PACKET_ID).write()
                for key in ids
                if key & MAX_PACKET_ID and key & ~MAX_PACKET_ID == current
            ]
            if packets:
                connection.write(b"".join(packets))

        return batch, acknowledge

    def _received(self, packets: list[mqtt5.PublishPacket], generation: int) -> None:
        """Called by connection number `generation` with every PUBLISH of one read."""
        now_ms = time.time_ns() // 1_000_000
        generation <<= 16
        pending, acks = self._pending, self._acks
        for packet in packets:
            pending.append((packet.topic, packet.payload, now_ms))
            acks.append(generation | packet.packet_id if packet.packet_id else 0)
        self._wake.set()
        if len(pending) >= self._max_pending and self._connection is not None:
            self._connection.pause()

    # -- the broker side -------------------------------------------------------------------------

    async def _connect_forever(self) -> None:
        delay = 1.0
        while not self.link.stopping:
            try:
                if await self._session():
                    delay = 1.0
            except (OSError, TimeoutError):  # ssl.SSLError and ConnectionError are OSErrors
                await asyncio.to_thread(self.link.unreachable)  # it tries a connection itself
            if self.link.stopping:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _session(self) -> bool:
        """One connection, from CONNECT until it is lost; True if the broker accepted it."""
        s = self._settings
        # Numbered before CONNECT: the broker's first PUBLISHes may come in the CONNACK's read.
        self._generation = generation = (self._generation + 1) & 0xFFFF
        connect = connect_packet(s, self._client_id, clean_start=s.clean_start)
        try:
            connection, connack = await open_connection(s, connect, lambda: _Connection(self, generation))
        except NotMqtt5 as exc:
            self.link.failing(
                f"{self.target} did not accept MQTT 5's CONNECT ({exc}; a broker without MQTT 5? "
                "Then set CGW_MQTT__PROTOCOL=3.1.1)"
            )
            return False
        except ConnectRefused as exc:
            self.link.refused(exc.reason)
            return False
        self._connection = connection
        self._closed.clear()
        try:
            # Ready once the broker answers this (SUBACK), not now.
            connection.write(
                mqtt5.SubscribePacket(
                    self._packet_id(),
                    [mqtt5.TopicFilter(topic, max_qos=mqtt5.QoS.AT_LEAST_ONCE) for topic in SUBSCRIPTIONS],
                ).write()
            )
            # MQTT 5: unacknowledged publications are sent again, marked as duplicates.
            for packet in self._inflight.values():
                connection.write(bytes([packet[0] | 0x08]) + packet[1:])
            log.info(
                "connected to %s as %s (MQTT 5, session present: %s)",
                s.url,
                self._client_id,
                connack.session_present,
            )
            self._send_outgoing()
            if self.link.stopping:
                connection.pause()
            await connection.run_keepalive(s.keepalive_s)
            return True
        finally:
            if self._connection is connection:
                self._connection = None
                self._closed.set()
                why = connection.why_closed
                if why == CLOSED_WITHOUT_A_WORD and self._closed_soon():
                    why = self._taken_over(certain=False)
                self.link.lost(why)
            connection.abort()

    def _subscribed(self, suback: mqtt5.SubAckPacket) -> None:
        """The broker answered the SUBSCRIBE: ready, or not and why."""
        refusals = refused_filters(SUBSCRIPTIONS, suback)
        if refusals:
            self.link.subscription_refused(refusals)
        else:
            self.link.set_connected(True)

    async def _close(self) -> None:
        connection = self._connection
        if connection is None:
            return
        self._connection = None
        self._closed.set()
        self.link.set_connected(False)
        connection.write(mqtt5.DisconnectPacket().write())
        # The broker closes its side once it has read everything before DISCONNECT (the last
        # acks): waiting for that keeps a quick restart's new connection from overtaking them.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(connection.lost), 2.0)
        connection.close()

    def _packet_id(self) -> int:
        for _ in range(MAX_PACKET_ID):
            self._next_id = self._next_id % MAX_PACKET_ID + 1
            if self._next_id not in self._inflight:
                return self._next_id
        raise RuntimeError("no free MQTT packet id")

    def _send_outgoing(self) -> None:
        connection = self._connection
        if connection is None:
            return
        while self._outgoing and len(self._inflight) < connection.receive_max:
            topic, payload, qos, retain = self._outgoing.popleft()
            if qos:
                mid = self._packet_id()
                packet = mqtt5.PublishPacket(
                    topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE, retain=retain, packet_id=mid
                ).write()
                self._inflight[mid] = packet
            else:
                packet = mqtt5.PublishPacket(topic, payload, retain=retain).write()
            connection.write(packet)

    def _acknowledged(self, packet_id: int) -> None:
        if self._inflight.pop(packet_id, None) is not None and self._outgoing:
            self._send_outgoing()


TAKEN_OVER = mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER


class _Connection(Connection):
    """One connection of the driver, numbered: an ack made for an earlier one is void."""

    def __init__(self, driver: Mqtt5Driver, generation: int) -> None:
        super().__init__(self._publishes, self._packet, log, driver.target)
        self._driver = driver
        self.generation = generation

    def _publishes(self, packets: list[mqtt5.PublishPacket]) -> None:
        self._driver._received(packets, self.generation)

    def _packet(self, packet: Any) -> None:
        match packet:
            case mqtt5.PubAckPacket():
                self._driver._acknowledged(packet.packet_id)
            case mqtt5.SubAckPacket():
                self._driver._subscribed(packet)
            case mqtt5.DisconnectPacket() if (
                packet.reason_code == mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER
            ):
                self.why_closed = self._driver._taken_over(certain=True)
            case _:
                pass
