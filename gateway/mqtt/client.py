"""The gateway's asyncio MQTT 5 client, on the `mqtt5` codec (Rust, sans-I/O).

Two layers. `Connection` is one TCP (or TLS) connection as an asyncio protocol: one read takes
whatever the kernel holds, the codec parses every packet in it, and the PUBLISHes of one read are
handed over together (the device driver, drivers/mqtt5.py, takes hundreds per read during a
backlog); `open_connection` makes one and waits for the broker's CONNACK. `Client` is the plain
client on top, for `cgw doctor`, the tests and the simulators: it waits for the broker's answer to
everything it asks, as aiomqtt does. `subscribe` returns once SUBACK granted every filter and
raises `SubscriptionRefused` (naming each filter and reason code) otherwise, `publish` at QoS 1
returns once PUBACK arrived, and a lost connection fails whatever still waits with
`ConnectionLost`.

The codec speaks MQTT 5 only: a broker without it (amqtt, the demo's embedded broker) is met by
paho's MQTT 3.1.1 (gateway/mqtt/mqtt311.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import mqtt5

from gateway.mqtt.tls import tls_context
from gateway.settings import BrokerSettings

NEVER_EXPIRES = 0xFFFFFFFF  # session expiry interval: the broker keeps the session for good
CONNECT_TIMEOUT_S = 5.0  # as paho's
ANSWER_TIMEOUT_S = 15.0  # for SUBACK and PUBACK on a live connection
MAX_PACKET_ID = 0xFFFF
CLOSED_WITHOUT_A_WORD = "the connection closed"

log = logging.getLogger(__name__)

C = TypeVar("C", bound="Connection")


class MqttError(Exception):
    """Something an MQTT broker did or did not do; the message says what."""


class ConnectRefused(MqttError):
    """The broker answered CONNECT with a failure reason code (bad login, not authorized…)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotMqtt5(MqttError):
    """The broker closed or kept silent after MQTT 5's CONNECT: likely an MQTT 3.1.1 broker."""


class SubscriptionRefused(MqttError):
    """SUBACK refused topic filters: `refusals` holds (filter, reason) for each."""

    def __init__(self, refusals: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{topic} ({reason})" for topic, reason in refusals))
        self.refusals = refusals


class ConnectionLost(MqttError):
    """The connection ended while an answer was awaited."""


def words(code: Any) -> str:
    """A reason code as words: NOT_AUTHORIZED -> "not authorized"."""
    return str(code.name).lower().replace("_", " ")


def refused_filters(filters: Sequence[str], suback: mqtt5.SubAckPacket) -> list[tuple[str, str]]:
    """The filters a SUBACK refused, with its reason; the codes are Rust enums: compare values."""
    return [
        (topic, words(code))
        for topic, code in zip(filters, suback.reason_codes, strict=False)
        if code.value >= 0x80
    ]


class Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: parses what arrives, hands PUBLISHes over per read and every
    other packet but CONNACK and PINGRESP one by one."""

    def __init__(
        self,
        on_publishes: Callable[[list[mqtt5.PublishPacket]], None],
        on_packet: Callable[[Any], None],
        logger: logging.Logger = log,
        target: str = "the broker",
    ) -> None:
        self._on_publishes = on_publishes
        self._on_packet = on_packet
        self._log = logger
        self._target = target
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._last_in = time.monotonic()
        self.receive_max = 65535
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[mqtt5.ConnAckPacket] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
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
                    self.fail(f"protocol error from the broker: {exc}")
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
                self._on_publishes(publishes)

    def _control(self, packet: Any) -> None:
        match packet:
            case mqtt5.ConnAckPacket():
                if not self.connack.done():
                    self.connack.set_result(packet)
            case mqtt5.DisconnectPacket():
                self.why_closed = f"the broker disconnected: {words(packet.reason_code)}"
                self._on_packet(packet)
            case mqtt5.PingRespPacket():
                pass  # it only refreshes `_last_in`
            case _:
                self._on_packet(packet)

    def fail(self, why: str) -> None:
        """Close the connection because of `why` (logged)."""
        self.why_closed = why
        self._log.error("%s: %s", self._target, why)
        if self._transport is not None:
            self._transport.abort()

    # used by the owner

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

    def abort(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()

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
                self.fail(f"no answer for {keepalive_s * 1.5:.0f} s (keep-alive)")
                return
            self.write(ping)


def connect_packet(
    s: BrokerSettings, client_id: str, *, clean_start: bool, will: mqtt5.Will | None = None
) -> mqtt5.ConnectPacket:
    """CONNECT from broker settings; `clean_start` off asks for a session that never expires
    (MQTT 3.1.1's clean session off)."""
    return mqtt5.ConnectPacket(
        client_id,
        username=s.username,
        password=s.password.get_secret_value().encode() if s.password else None,
        clean_start=clean_start,
        session_expiry_interval=0 if clean_start else NEVER_EXPIRES,
        keep_alive=s.keepalive_s,
        will=will,
    )


async def open_connection(
    s: BrokerSettings,
    connect: mqtt5.ConnectPacket,
    make: Callable[[], C],
) -> tuple[C, mqtt5.ConnAckPacket]:
    """TCP (TLS for mqtts://), CONNECT, and the broker's CONNACK.

    Raises OSError or TimeoutError when the broker cannot be reached, `NotMqtt5` when it does not
    answer MQTT 5's CONNECT, `ConnectRefused` when it refuses it; the connection is closed then.
    """
    loop = asyncio.get_running_loop()
    _, connection = await asyncio.wait_for(
        loop.create_connection(
            make,
            s.host,
            s.port,
            ssl=tls_context(s) if s.tls else None,
            server_hostname=s.host if s.tls else None,
        ),
        CONNECT_TIMEOUT_S,
    )
    try:
        connection.write(connect.write())
        try:
            connack = await asyncio.wait_for(asyncio.shield(connection.connack), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            # An MQTT 3.1.1 broker answers MQTT 5's CONNECT with a CONNACK of its own version, or
            # not at all (amqtt), and closes.
            raise NotMqtt5(connection.why_closed if isinstance(exc, OSError) else "no answer") from exc
        if connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            raise ConnectRefused(words(connack.reason_code))
    except BaseException:
        connection.abort()
        raise
    connection.receive_max = connack.receive_max
    return connection, connack


class Client:
    """An MQTT 5 client that awaits the broker's answers: `async with Client(...) as client`.

    `clean_start` off gives a session that never expires (MQTT 3.1.1's clean session off);
    `will` is published by the broker if the connection is lost without DISCONNECT.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        *,
        clean_start: bool = True,
        will: mqtt5.Will | None = None,
        max_in_flight: int = 100,
    ) -> None:
        self._settings = settings
        self._client_id = client_id
        self._clean_start = clean_start
        self._will = will
        self._max_in_flight = max_in_flight
        self._connection: Connection | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}  # packet id -> its answer
        self._room: asyncio.Semaphore | None = None
        self._messages: asyncio.Queue[mqtt5.PublishPacket] = asyncio.Queue()
        self.session_present = False

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.lost.done()

    async def connect(self) -> None:
        s = self._settings
        packet = connect_packet(s, self._client_id, clean_start=self._clean_start, will=self._will)
        connection, connack = await open_connection(
            s, packet, lambda: Connection(self._publishes, self._packet, log, f"the broker {s.url}")
        )
        self._connection = connection
        self.session_present = connack.session_present
        self._room = asyncio.Semaphore(min(self._max_in_flight, connack.receive_max))
        self._keepalive = asyncio.create_task(self._watch(connection), name=f"mqtt[{self._client_id}]")

    async def subscribe(self, filters: Sequence[str], qos: int = 1) -> None:
        """Subscribe and wait for SUBACK; `SubscriptionRefused` names every refused filter."""
        packet_id = self._packet_id()
        topic_filters = [mqtt5.TopicFilter(topic, max_qos=mqtt5.QoS(qos)) for topic in filters]
        suback: mqtt5.SubAckPacket = await self._ask(
            packet_id, mqtt5.SubscribePacket(packet_id, topic_filters).write()
        )
        refusals = refused_filters(filters, suback)
        if refusals:
            raise SubscriptionRefused(refusals)

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish; at QoS 1 return once the broker acknowledged it (PUBACK)."""
        if not qos:
            self._live().write(mqtt5.PublishPacket(topic, payload, retain=retain).write())
            return
        assert self._room is not None
        async with self._room:  # the broker's receive maximum
            packet_id = self._packet_id()
            packet = mqtt5.PublishPacket(
                topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE, retain=retain, packet_id=packet_id
            )
            puback: mqtt5.PubAckPacket = await self._ask(packet_id, packet.write())
        if puback.reason_code.value >= 0x80:
            raise MqttError(f"the broker refused the publication to {topic}: {words(puback.reason_code)}")

    async def messages(self) -> AsyncIterator[mqtt5.PublishPacket]:
        """What the subscriptions bring, acknowledged as it is taken; ends with the connection."""
        while True:
            getting = asyncio.ensure_future(self._messages.get())
            waits: list[asyncio.Future[Any]] = [getting, self._live().lost]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not getting.done():
                getting.cancel()
                return
            packet = getting.result()
            if packet.qos == mqtt5.QoS.AT_LEAST_ONCE and packet.packet_id is not None:
                self._live().write(mqtt5.PubAckPacket(packet.packet_id).write())
            yield packet

    async def disconnect(self) -> None:
        """DISCONNECT (the broker drops the Will) and wait for the broker to close."""
        connection = self._connection
        if connection is None:
            return
        if not connection.lost.done():
            connection.write(mqtt5.DisconnectPacket().write())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(connection.lost), 2.0)
            connection.close()
        await self._stopped()

    async def drop(self) -> None:
        """End the connection without DISCONNECT, as a device losing power: the broker publishes
        the Will."""
        connection = self._connection
        if connection is not None:
            connection.abort()
        await self._stopped()

    # -- inside --------------------------------------------------------------------------------

    def _live(self) -> Connection:
        connection = self._connection
        if connection is None or connection.lost.done():
            why = connection.why_closed if connection else "not connected"
            raise ConnectionLost(f"{self._settings.url}: {why}")
        return connection

    def _packet_id(self) -> int:
        for _ in range(MAX_PACKET_ID):
            self._next_id = self._next_id % MAX_PACKET_ID + 1
            if self._next_id not in self._waiting:
                return self._next_id
        raise MqttError("no free MQTT packet id")

    async def _ask(self, packet_id: int, data: bytes) -> Any:
        connection = self._live()
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[packet_id] = answer
        try:
            connection.write(data)
            return await asyncio.wait_for(answer, ANSWER_TIMEOUT_S)
        finally:
            self._waiting.pop(packet_id, None)

    def _publishes(self, packets: list[mqtt5.PublishPacket]) -> None:
        for packet in packets:
            self._messages.put_nowait(packet)

    def _packet(self, packet: Any) -> None:
        match packet:
            case mqtt5.PubAckPacket() | mqtt5.SubAckPacket() | mqtt5.UnsubAckPacket():
                answer = self._waiting.get(packet.packet_id)
                if answer is not None and not answer.done():
                    answer.set_result(packet)
            case _:
                pass  # DISCONNECT: `why_closed` already says why

    async def _watch(self, connection: Connection) -> None:
        await connection.run_keepalive(self._settings.keepalive_s)
        lost = ConnectionLost(f"{self._settings.url}: {connection.why_closed}")
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(lost)

    async def _stopped(self) -> None:
        task, self._keepalive = self._keepalive, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._connection = None
