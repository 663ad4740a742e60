"""The gateway's MQTT 5 client (gateway/mqtt/client.py) against a real Mosquitto: it waits for
the broker's answers (CONNACK, SUBACK, PUBACK) and says clearly when one is a refusal."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import mqtt5
import pytest
from pydantic import SecretStr

from gateway.broker import LocalBroker
from gateway.mqtt.client import Client, ConnectRefused, NotMqtt5, SubscriptionRefused
from gateway.settings import MqttSettings
from tests.services import MosquittoProcess
from tests.test_mqtt_subscriptions import REFUSED, broker_refusing

pytestmark = pytest.mark.integration


@pytest.fixture
def strict_broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """Mosquitto refusing the user `cgw` the `vote` channel (tests/test_mqtt_subscriptions.py)."""
    broker = broker_refusing(tmp_path / "strict", (REFUSED,))
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


def at(port: int, password: str = "pw") -> MqttSettings:
    return MqttSettings(
        url=f"mqtt://127.0.0.1:{port}", keepalive_s=5, username="cgw", password=SecretStr(password)
    )


async def test_publish_waits_for_puback_and_a_subscriber_receives_it(mosquitto: MosquittoProcess) -> None:
    url = MqttSettings(url=mosquitto.url)
    async with Client(url, "listener") as listener, Client(url, "device") as device:
        await listener.subscribe(["cgw/v1/+/telemetry"])
        messages = listener.messages()
        await device.publish("cgw/v1/d1/telemetry", b'{"seq":1}', qos=1)
        packet = await anext(messages)
        assert (packet.topic, packet.payload) == ("cgw/v1/d1/telemetry", b'{"seq":1}')


async def test_a_dropped_connection_publishes_the_will(mosquitto: MosquittoProcess) -> None:
    url = MqttSettings(url=mosquitto.url)
    will = mqtt5.Will("cgw/v1/d2/status", payload=b'{"state":"offline"}', qos=mqtt5.QoS.AT_LEAST_ONCE)
    async with Client(url, "listener") as listener:
        await listener.subscribe(["cgw/v1/+/status"])
        messages = listener.messages()
        device = Client(url, "d2", will=will)
        await device.connect()
        await device.drop()
        packet = await anext(messages)
        assert (packet.topic, packet.payload) == ("cgw/v1/d2/status", b'{"state":"offline"}')


async def test_a_refused_subscription_raises_naming_the_filter(strict_broker: MosquittoProcess) -> None:
    async with Client(at(strict_broker.port), "cgw-client") as client:
        await client.subscribe(["cgw/v1/+/telemetry"])
        with pytest.raises(SubscriptionRefused) as refused:
            await client.subscribe(["cgw/v1/+/status", REFUSED])
        assert refused.value.refusals == [(REFUSED, "not authorized")]


async def test_a_refused_login_raises_with_the_brokers_reason(strict_broker: MosquittoProcess) -> None:
    with pytest.raises(ConnectRefused) as refused:
        await Client(at(strict_broker.port, "wrong"), "cgw-client").connect()
    # Mosquitto's dynamic security says "not authorized" for a wrong password too.
    assert refused.value.reason == "not authorized"


async def test_a_broker_without_mqtt5_is_named(tmp_path: Path) -> None:
    amqtt = LocalBroker(tmp_path, prefer_mosquitto=False)  # MQTT 3.1.1 only
    url = await amqtt.start()
    try:
        with pytest.raises(NotMqtt5):
            await asyncio.wait_for(Client(MqttSettings(url=url), "cgw-client").connect(), 30)
    finally:
        await amqtt.stop()
