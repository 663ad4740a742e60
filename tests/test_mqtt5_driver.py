"""The MQTT 5 driver (drivers/mqtt5.py) against a real Mosquitto, on its own.

What the gateway-level tests (test_faults.py, test_gateway_e2e.py) cannot see from outside:
acknowledgements wait for the pipeline, back-pressure stops reading, publications wait for the
connection and respect the broker's receive maximum, and a broker without MQTT 5 is named.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import mqtt5
import orjson
import paho.mqtt.client as paho
import pytest
from anyio import wait_all_tasks_blocked
from paho.mqtt.enums import CallbackAPIVersion

from drivers.mqtt import MqttDriver
from drivers.mqtt5 import Mqtt5Driver, _Connection
from gateway.broker import LocalBroker
from gateway.instruments import Instruments
from gateway.models import RawMessage
from gateway.settings import MqttSettings
from tests.harness import eventually
from tests.services import MosquittoProcess

pytestmark = pytest.mark.integration


class Holding:
    """An ingress that keeps every batch and acknowledges only when the test says so."""

    def __init__(self, block: asyncio.Event | None = None) -> None:
        self.messages: list[RawMessage] = []
        self.acks: list[Callable[[], None]] = []
        self._block = block

    async def put(self, batch: list[RawMessage], on_durable: Callable[[], None] | None = None) -> None:
        if self._block is not None:
            await self._block.wait()
        self.messages.extend(batch)
        if on_durable is not None:
            self.acks.append(on_durable)

    def acknowledge(self) -> None:
        for ack in self.acks:
            ack()
        self.acks.clear()

    def numbers(self) -> list[int]:
        return sorted(orjson.loads(payload)["seq"] for _, payload, _ in self.messages)


class Running:
    def __init__(self, driver: Mqtt5Driver, task: asyncio.Task[None]) -> None:
        self.driver, self.task = driver, task

    async def stop(self) -> None:
        await self.driver.stop()
        await asyncio.wait_for(self.task, 10)


async def start(port: int, ingress: Holding, client_id: str = "cgw-test", **kw: int) -> Running:
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{port}", keepalive_s=5)
    driver = Mqtt5Driver(settings, client_id, Instruments(), **kw)
    task = asyncio.create_task(driver.run(ingress))
    await eventually(lambda: driver.connected, 15, "the driver to connect")
    return Running(driver, task)


def publish(port: int, count: int, first: int = 0) -> None:
    """`count` numbered QoS 1 telemetry messages from a device, all acknowledged by the broker."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{first}")
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = [
        client.publish(f"cgw/v1/d{n % 7}/telemetry", orjson.dumps({"seq": n, "metrics": {"v": n}}), qos=1)
        for n in range(first, first + count)
    ]
    for info in infos:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


async def test_a_message_is_acknowledged_only_once_durable(mosquitto: MosquittoProcess) -> None:
    held = Holding()
    running = await start(mosquitto.port, held)
    await asyncio.to_thread(publish, mosquitto.port, 300)
    await eventually(lambda: len(held.messages) == 300, 15, "300 messages")
    # Not acknowledged, the connection lost: the broker delivers all of them again.
    running.driver._connection.close()  # type: ignore[union-attr]
    again = Holding()
    await eventually(lambda: not running.driver.connected, 15, "the connection to drop")
    await running.stop()
    running = await start(mosquitto.port, again)
    await eventually(lambda: len(again.messages) == 300, 15, "the 300 delivered again")
    assert again.numbers() == list(range(300))
    # Acknowledged now (the pipeline says durable): a new connection receives nothing more.
    again.acknowledge()
    await running.stop()
    third = Holding()
    running = await start(mosquitto.port, third)
    await asyncio.to_thread(publish, mosquitto.port, 1, first=300)
    # What the broker would redeliver comes when the session resumes, before anything new.
    await eventually(lambda: 300 in third.numbers(), 15, "the new message")
    assert third.numbers() == [300]
    third.acknowledge()
    await running.stop()


async def test_a_clean_stop_sends_the_acks_of_batches_still_in_the_pipeline(
    mosquitto: MosquittoProcess,
) -> None:
    held = Holding()
    running = await start(mosquitto.port, held)
    await asyncio.to_thread(publish, mosquitto.port, 50)
    await eventually(lambda: len(held.messages) == 50, 15, "50 messages")
    stopping = asyncio.create_task(running.stop())
    await (
        wait_all_tasks_blocked()
    )  # every task waits (I/O, a timer, an event): stop() has got as far as it can
    assert not stopping.done(), "stop() waits for the pipeline's acknowledgements"
    held.acknowledge()
    await stopping
    after = Holding()
    running = await start(mosquitto.port, after)
    await asyncio.to_thread(publish, mosquitto.port, 1, first=50)  # a marker after anything owed
    await eventually(lambda: after.messages, 15, "the marker")
    assert after.numbers() == [50]
    after.acknowledge()
    await running.stop()


async def test_back_pressure_stops_reading_and_loses_nothing(mosquitto: MosquittoProcess) -> None:
    gate = asyncio.Event()
    held = Holding(block=gate)
    running = await start(mosquitto.port, held, batch_size=50, max_pending=200)
    await asyncio.to_thread(publish, mosquitto.port, 3000)
    connection = running.driver._connection
    await eventually(lambda: connection is not None and connection._paused, 15, "reading to stop")
    # One batch of 50 waits in the pipeline's put; reading stopped once 200 were pending (what
    # one read brought in may go past the bound, the broker's backlog may not).
    pending = len(running.driver._pending)
    assert running.driver._connection is not None and running.driver._connection._paused
    assert 200 <= pending + 50 < 3000, pending
    gate.set()
    await eventually(lambda: len(held.messages) == 3000, 15, "all 3000 after the pipeline catches up")
    assert held.numbers() == list(range(3000))
    held.acknowledge()
    await running.stop()


async def test_publications_wait_for_the_connection_and_respect_receive_maximum(tmp_path: Path) -> None:
    # Mosquitto grants a receive maximum of 2 in flight: a client that sends more is disconnected.
    strict = MosquittoProcess(tmp_path / "strict", extra="max_inflight_messages 2\n")
    strict.start()
    try:
        received: list[bytes] = []
        got_all = threading.Event()
        listener = paho.Client(CallbackAPIVersion.VERSION2, client_id="listener")

        def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
            received.append(bytes(msg.payload))
            if len(received) == 60:
                got_all.set()

        listener.on_message = on_message
        # Subscribed on every connect: the broker is stopped and started below.
        listener.on_connect = lambda c, *_: c.subscribe("cgw/v1/+/cmd", qos=1)
        listener.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # paho types the delays as int; it takes float seconds
        listener.connect("127.0.0.1", strict.port)
        listener.loop_start()
        settings = MqttSettings(url=f"mqtt://127.0.0.1:{strict.port}", keepalive_s=5)
        driver = Mqtt5Driver(settings, "cgw-out", Instruments())
        held = Holding()
        # The broker is down while the first 30 are published: they wait in the driver.
        strict.stop()
        task = asyncio.create_task(driver.run(held))
        await eventually(lambda: driver.last_error is not None, 15, "a first attempt to connect")
        for n in range(30):
            driver.publish(f"cgw/v1/d{n}/cmd", str(n).encode())
        strict.start()
        await eventually(lambda: driver.connected, 40, "the driver to connect")
        await asyncio.to_thread(driver.publish, "cgw/v1/x/cmd", b"from another thread")
        for n in range(30, 59):
            driver.publish(f"cgw/v1/d{n}/cmd", str(n).encode())
        assert await asyncio.to_thread(got_all.wait, 20), f"received {len(received)} of 60"
        assert sorted(received) == sorted([str(n).encode() for n in range(59)] + [b"from another thread"])
        assert driver.connected and driver.last_error is None
        await driver.stop()
        await asyncio.wait_for(task, 10)
        listener.disconnect()
        listener.loop_stop()
    finally:
        strict.stop()


async def test_a_broker_without_mqtt5_is_named_with_the_setting_to_change(tmp_path: Path) -> None:
    amqtt = LocalBroker(tmp_path, prefer_mosquitto=False)  # amqtt speaks MQTT 3.1.1 only
    url = await amqtt.start()
    try:
        driver = Mqtt5Driver(MqttSettings(url=url), "cgw-old", Instruments())
        task = asyncio.create_task(driver.run(Holding()))
        await eventually(lambda: driver.last_error is not None, 15, "an error")
        assert not driver.connected
        assert "CGW_MQTT__PROTOCOL=3.1.1" in (driver.last_error or "")
        await driver.stop()
        await asyncio.wait_for(task, 10)
    finally:
        await amqtt.stop()


async def test_an_upgrade_from_the_mqtt_3_driver_keeps_the_queued_messages(
    mosquitto: MosquittoProcess,
) -> None:
    # The session an older gateway (paho, MQTT 3.1.1) left at the broker, with the same client id.
    old = paho.Client(CallbackAPIVersion.VERSION2, client_id="cgw-upgraded", clean_session=False)
    subacked = threading.Event()
    old.on_subscribe = lambda *_: subacked.set()
    old.connect("127.0.0.1", mosquitto.port)
    old.loop_start()
    assert old.subscribe("cgw/v1/+/telemetry", qos=1)[0] == paho.MQTT_ERR_SUCCESS
    assert await asyncio.to_thread(subacked.wait, 10), "no SUBACK"
    old.disconnect()
    old.loop_stop()
    # Devices publish while it is being upgraded.
    await asyncio.to_thread(publish, mosquitto.port, 100)
    held = Holding()
    running = await start(mosquitto.port, held, client_id="cgw-upgraded")
    await eventually(lambda: len(held.messages) == 100, 15, "the 100 queued during the upgrade")
    assert held.numbers() == list(range(100))
    held.acknowledge()
    await running.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_client_taking_over_the_client_id_is_named(
    mosquitto: MosquittoProcess, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two gateways with one community name on one broker knock each other off: the log says so."""
    settings = MqttSettings(url=mosquitto.url, keepalive_s=5, protocol=protocol)
    kind = Mqtt5Driver if protocol == "5" else MqttDriver
    driver = kind(settings, "cgw-twin", Instruments())
    task = asyncio.create_task(driver.run(Holding()))
    await eventually(lambda: driver.connected, 15, "the driver to connect")
    other = paho.Client(CallbackAPIVersion.VERSION2, client_id="cgw-twin")
    other.connect("127.0.0.1", mosquitto.port)
    other.loop_start()
    try:

        def named() -> list[str]:
            return [r.getMessage() for r in caplog.records if "client id 'cgw-twin'" in r.getMessage()]

        [line, *_] = await eventually(named, 15, "the takeover named in the log")
        # Mosquitto closes the older connection without a DISCONNECT (a broker that sends one with
        # "session taken over" is named for certain, drivers/mqtt5.py): a drop right after
        # connecting is named as the likely cause.
        cause = (
            "the broker closed the connection soon after it was made, as it does when another "
            "client connected with this gateway's client id 'cgw-twin'"
        )
        assert line == (
            f"lost {driver.target}: {cause} (a second gateway for the same community on this broker? "
            "give each its own CGW_COMMUNITY or CGW_MQTT__CLIENT_ID); reconnecting"
        )
    finally:
        other.disconnect()
        other.loop_stop()
        await driver.stop()
        await asyncio.wait_for(task, 10)


async def test_a_broker_that_says_session_taken_over_is_named_for_certain() -> None:
    """A unit test of the connection's parser: an MQTT 5 broker may say why it closes (Mosquitto,
    above, does not)."""
    driver = Mqtt5Driver(MqttSettings(url="mqtt://127.0.0.1:1"), "cgw-twin", Instruments())
    connection = _Connection(driver, 0)
    connection.data_received(
        mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER).write()
    )
    assert connection.why_closed == (
        "another client connected with this gateway's client id 'cgw-twin' and took over its session "
        "(a second gateway for the same community on this broker? give each its own CGW_COMMUNITY or "
        "CGW_MQTT__CLIENT_ID)"
    )


def test_one_connections_lines_are_under_its_drivers_logger(caplog: pytest.LogCaptureFixture) -> None:
    """The shared connection code (gateway/mqtt/link.py) logs under the driver's own module's name."""
    driver = Mqtt5Driver(MqttSettings(), "cgw-x", Instruments())
    with caplog.at_level("ERROR"):
        driver.link.refused("bad user name or password")
    assert [record.name for record in caplog.records] == ["drivers.mqtt5"]
