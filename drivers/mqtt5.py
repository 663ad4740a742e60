"""The MQTT 5 driver: the contract's device topics in, on the event loop, many messages per read.

The same promises as the paho driver (drivers/mqtt.py): QoS 1 subscriptions on a persistent
session, a PUBACK only once the pipeline says a message is durable or dead-lettered, no ack
across a reconnection, and back-pressure that reaches the broker. What differs is the cost.

Why not paho here: paho's network thread makes about six system calls per received message
(a select, three reads for one packet, and a wake-up byte through a socket pair for every
PUBACK), and that thread competes with the pipeline for the GIL. The gateway's intake was
bound by it (docs/performance.md). Here the connection is an asyncio protocol: one read takes
whatever the kernel holds (hundreds of messages during a backlog), the `mqtt5` codec (Rust,
sans-I/O) parses each packet in a fraction of a microsecond, and a batch's PUBACKs go out in one
write. The codec speaks MQTT 5 only; for a broker without it, `mqtt.protocol: "3.1.1"` selects
the paho driver.

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
from gateway.instruments import Instruments
from gateway.models import RawMessage
from gateway.mqtt.tls import tls_context
from gateway.settings import MqttSettings
from gateway.topics import SUBSCRIPTIONS

log = logging.getLogger(__name__)

NEVER_EXPIRES = 0xFFFFFFFF  # session expiry interval: the broker keeps the session for good
CONNECT_TIMEOUT_S = 5.0  # as paho's
MAX_QUEUED_OUT = 10_000  # publications kept while offline (acks and commands to devices)
MAX_PACKET_ID = 0xFFFF


class Mqtt5Driver(MqttIntake):
    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        instruments: Instruments,
        batch_size: int = 2000,
        max_pending: int = 20_000,
    ) -> None:
        super().__init__(settings, client_id, instruments, batch_size, max_pending)
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
        loop = asyncio.get_running_loop()
        context = tls_context(s) if s.tls else None
        # Numbered before CONNECT: the broker's first PUBLISHes may come in the CONNACK's read.
        self._generation = generation = (self._generation + 1) & 0xFFFF
        transport, connection = await asyncio.wait_for(
            loop.create_connection(
                lambda: _Connection(self, generation),
                s.host,
                s.port,
                ssl=context,
                server_hostname=s.host if s.tls else None,
            ),
            CONNECT_TIMEOUT_S,
        )
        try:
            connection.write(
                mqtt5.ConnectPacket(
                    self._client_id,
                    username=s.username,
                    password=s.password.get_secret_value().encode() if s.password else None,
                    clean_start=s.clean_start,
                    session_expiry_interval=0 if s.clean_start else NEVER_EXPIRES,
                    keep_alive=s.keepalive_s,
                ).write()
            )
            try:
                connack = await asyncio.wait_for(connection.connack, CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                # An MQTT 3.1.1 broker answers MQTT 5's CONNECT with a CONNACK of its own
                # version, or not at all (amqtt), and closes: say what to set.
                why = connection.why_closed if isinstance(exc, OSError) else "no answer"
                self.link.failing(
                    f"{self.target} did not accept MQTT 5's CONNECT ({why}; a broker without MQTT 5? "
                    "Then set CGW_MQTT__PROTOCOL=3.1.1)"
                )
                return False
            if connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
                self.link.refused(connack.reason_code.name.lower().replace("_", " "))
                return False
            self._connection = connection
            self._closed.clear()
            connection.receive_max = connack.receive_max
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
            if not transport.is_closing():
                transport.abort()

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


CLOSED_WITHOUT_A_WORD = "the connection closed"


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: parses what arrives, hands PUBLISHes over per read."""

    def __init__(self, driver: Mqtt5Driver, generation: int) -> None:
        self._driver = driver
        self.generation = generation
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._last_in = time.monotonic()
        self.receive_max = 65535
        self.connack: asyncio.Future[mqtt5.ConnAckPacket] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.why_closed = CLOSED_WITHOUT_A_WORD

    # asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.why_closed = str(exc) or type(exc).__name__
        if not self.lost.done():
            self.lost.set_result(None)
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(self.why_closed))

    def data_received(self, data: bytes) -> None:
        self._last_in = time.monotonic()
        buffer = self._buffer
        buffer += data
        publishes: list[mqtt5.PublishPacket] = []
        view = memoryview(buffer)
        position = 0
        try:
            while position < len(buffer):
                try:
                    packet, size = mqtt5.read(view[position:])
                except IndexError:
                    break  # the rest of the packet is still on its way
                except Exception as exc:  # the codec's errors are protocol errors
                    self._fail(f"protocol error from the broker: {exc}")
                    return
                position += size
                if type(packet) is mqtt5.PublishPacket:
                    publishes.append(packet)
                else:
                    self._control(packet)
        finally:
            view.release()
            del buffer[:position]
            if publishes:
                self._driver._received(publishes, self.generation)

    def _control(self, packet: Any) -> None:
        if isinstance(packet, mqtt5.PubAckPacket):
            self._driver._acknowledged(packet.packet_id)
        elif isinstance(packet, mqtt5.ConnAckPacket):
            if not self.connack.done():
                self.connack.set_result(packet)
        elif isinstance(packet, mqtt5.SubAckPacket):
            # Ready only now that the broker has answered every subscription.
            refusals = [
                (topic, code.name.lower().replace("_", " "))
                for topic, code in zip(SUBSCRIPTIONS, packet.reason_codes, strict=False)
                if code.value >= 0x80  # the codes are Rust enums: compare values
            ]
            if refusals:
                self._driver.link.subscription_refused(refusals)
            else:
                self._driver.link.set_connected(True)
        elif isinstance(packet, mqtt5.DisconnectPacket):
            if packet.reason_code == mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER:
                self.why_closed = self._driver._taken_over(certain=True)
            else:
                reason = packet.reason_code.name.lower().replace("_", " ")
                self.why_closed = f"the broker disconnected: {reason}"
        # PINGRESP only refreshes `_last_in`.

    def _fail(self, why: str) -> None:
        self.why_closed = why
        log.error("%s: %s", self._driver.target, why)
        if self._transport is not None:
            self._transport.abort()

    # used by the driver

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self._transport is not None and not self._transport.is_closing():
            self._paused = False
            self._last_in = time.monotonic()  # nothing was read while paused
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def run_keepalive(self, keepalive_s: int) -> None:
        """PINGREQ every half keep-alive; returns when the connection is lost or found dead."""
        interval = keepalive_s / 2
        ping = mqtt5.PingReqPacket().write()
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(self.lost), interval)
                return
            except TimeoutError:
                pass
            # While reading is paused nothing comes in, and that is not the broker's fault.
            if not self._paused and time.monotonic() - self._last_in > keepalive_s * 1.5:
                self._fail(f"no answer for {keepalive_s * 1.5:.0f} s (keep-alive)")
                return
            self.write(ping)
