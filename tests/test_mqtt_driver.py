"""The MQTT 3.1.1 driver (drivers/mqtt.py: paho's network thread) against a real Mosquitto, on
its own, with what it shares with the MQTT 5 driver and the uplink (gateway/mqtt/link.py: refusals).

The same promises as tests/test_mqtt5_driver.py: a message is acknowledged only once the
pipeline says it is durable, back-pressure holds the broker's backlog at the broker and loses
nothing, publications made while the broker is away go out when it is back, and a refused login
names the settings to check.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import SecretStr

from drivers.mqtt import MqttDriver
from gateway.credentials import hash_password
from gateway.instruments import Instruments
from gateway.settings import MqttSettings
from tests.harness import eventually
from tests.services import MosquittoProcess
from tests.test_mqtt5_driver import Holding, publish

pytestmark = pytest.mark.integration


class Running:
    def __init__(self, driver: MqttDriver, task: asyncio.Task[None]) -> None:
        self.driver, self.task = driver, task

    async def stop(self) -> None:
        await self.driver.stop()
        await asyncio.wait_for(self.task, 10)


async def start(settings: MqttSettings, ingress: Holding, client_id: str = "cgw-311", **kw: int) -> Running:
    driver = MqttDriver(settings, client_id, Instruments(), **kw)
    task = asyncio.create_task(driver.run(ingress))
    await eventually(lambda: driver.connected, 15, "the driver to connect")
    return Running(driver, task)


def at(port: int) -> MqttSettings:
    return MqttSettings(url=f"mqtt://127.0.0.1:{port}", keepalive_s=5, protocol="3.1.1")


async def test_a_message_is_acknowledged_only_once_durable(mosquitto: MosquittoProcess) -> None:
    held = Holding()
    running = await start(at(mosquitto.port), held)
    await asyncio.to_thread(publish, mosquitto.port, 200)
    await eventually(lambda: len(held.messages) == 200, 15, "200 messages")
    # Not acknowledged when the driver stops: the broker delivers all of them again.
    await running.stop()
    again = Holding()
    running = await start(at(mosquitto.port), again)
    await eventually(lambda: len(again.messages) == 200, 15, "the 200 delivered again")
    assert again.numbers() == list(range(200))
    # Acknowledged now: a new start receives only what is new (a marker published after). The
    # acks are in paho's queue; a QoS 1 publication behind them is answered once the broker has
    # read them. (A stop right away may lose acks still queued: those messages come again, and
    # the idempotent stores absorb them.)
    again.acknowledge()
    client = running.driver._client
    assert client is not None
    await asyncio.to_thread(client.publish("cgw/v1/probe/cmd", b"", qos=1).wait_for_publish, 10)
    await running.stop()
    third = Holding()
    running = await start(at(mosquitto.port), third)
    await asyncio.to_thread(publish, mosquitto.port, 1, first=200)
    await eventually(lambda: 200 in third.numbers(), 15, "the marker")
    assert third.numbers() == [200]
    third.acknowledge()
    await running.stop()


async def test_back_pressure_holds_the_backlog_at_the_broker_and_loses_nothing(
    mosquitto: MosquittoProcess,
) -> None:
    gate = asyncio.Event()
    held = Holding(block=gate)
    running = await start(at(mosquitto.port), held, batch_size=50, max_pending=200)
    await asyncio.to_thread(publish, mosquitto.port, 3000)
    # The pipeline takes nothing: paho's thread stops reading once 200 wait.
    await eventually(lambda: not running.driver._room.is_set(), 15, "the network thread to wait")
    assert 200 <= len(running.driver._pending) + 50 < 3000
    gate.set()
    await eventually(lambda: len(held.messages) == 3000, 30, "all 3000 after the pipeline catches up")
    assert held.numbers() == list(range(3000))
    held.acknowledge()
    await running.stop()


async def test_publications_made_while_the_broker_is_away_go_out_when_it_is_back(
    mosquitto: MosquittoProcess,
) -> None:
    received: list[bytes] = []
    listener = paho.Client(CallbackAPIVersion.VERSION2, client_id="listener", clean_session=False)
    listener.on_message = lambda _c, _u, msg: received.append(bytes(msg.payload))
    listener.on_connect = lambda c, *_: c.subscribe("cgw/v1/+/cmd", qos=1)
    listener.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # paho types the delays as int; it takes float seconds
    listener.connect("127.0.0.1", mosquitto.port)
    listener.loop_start()
    try:
        running = await start(at(mosquitto.port), Holding())
        await eventually(lambda: listener.is_connected(), 10, "the listener")
        mosquitto.stop()
        await eventually(lambda: not running.driver.connected, 15, "the driver to notice")
        for n in range(20):
            running.driver.publish(f"cgw/v1/d{n}/cmd", str(n).encode())
        mosquitto.start()
        await eventually(lambda: len(received) == 20, 40, "the 20 publications")
        assert sorted(received) == sorted(str(n).encode() for n in range(20))
        await running.stop()
    finally:
        listener.loop_stop()
        listener.disconnect()


async def test_a_refused_login_names_the_settings_to_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text(f"cgw:{hash_password('right')}\n")
    broker = MosquittoProcess(tmp_path / "broker", extra=f"allow_anonymous false\npassword_file {passwd}\n")
    broker.start()
    try:
        settings = at(broker.port).model_copy(
            update={"username": "cgw", "password": SecretStr("pw-not-this-one")}
        )
        driver = MqttDriver(settings, "cgw-refused", Instruments())
        task = asyncio.create_task(driver.run(Holding()))
        with caplog.at_level(logging.ERROR, logger="drivers.mqtt"):
            error = await eventually(lambda: driver.last_error, 15, "the refusal")
        assert "refused the connection" in error and not driver.connected
        assert (
            "CGW_MQTT__USERNAME / CGW_MQTT__PASSWORD" in caplog.text and "pw-not-this-one" not in caplog.text
        )
        await driver.stop()
        await asyncio.wait_for(task, 10)
        # The right password: connected, and the error is gone.
        right = settings.model_copy(update={"password": SecretStr("right")})
        running = await start(right, Holding(), client_id="cgw-right")
        assert running.driver.last_error is None
        await running.stop()
    finally:
        broker.kill()
