"""The gateway's MQTT 5 client (gateway/mqtt/client.py) against a real Mosquitto: it waits for
the broker's answers (CONNACK, SUBACK, PUBACK). Its refusals (a login, a subscription) are tested
beside the broker that refuses them, in tests/test_mqtt_subscriptions.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import mqtt5
import pytest

from gateway.broker import LocalBroker
from gateway.mqtt.client import Client, NotMqtt5
from gateway.settings import MqttSettings
from tests.services import MosquittoProcess

pytestmark = pytest.mark.integration


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


async def test_a_broker_without_mqtt5_is_named(tmp_path: Path) -> None:
    amqtt = LocalBroker(tmp_path, prefer_mosquitto=False)  # MQTT 3.1.1 only
    url = await amqtt.start()
    try:
        with pytest.raises(NotMqtt5):
            await asyncio.wait_for(Client(MqttSettings(url=url), "cgw-client").connect(), 30)
    finally:
        await amqtt.stop()
