"""Readiness waits for the broker's SUBACK: a refused subscription keeps the gateway not ready,
and the log, /readyz and `cgw doctor` name the topic filter and the broker's reason.

Against a real Mosquitto whose ACL refuses the gateway's user the `vote` channel, for both
device drivers (MQTT 5 and paho's MQTT 3.1.1).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from drivers.intake import MqttIntake
from drivers.mqtt import MqttDriver
from drivers.mqtt5 import Mqtt5Driver
from gateway.application import Gateway
from gateway.doctor import _broker
from gateway.instruments import Instruments
from gateway.mqtt.client import Client, ConnectRefused, SubscriptionRefused
from gateway.settings import MqttSettings
from gateway.topics import SUBSCRIPTIONS
from tests.harness import eventually, gateway_settings
from tests.services import MosquittoProcess
from tests.test_mqtt5_driver import Holding

pytestmark = pytest.mark.integration

REFUSED = "cgw/v1/+/vote"


# Mosquitto's `acl_file` never refuses a SUBSCRIBE (it filters what it delivers); its dynamic
# security plugin does, with a SUBACK reason code, as a district's or an operator's broker may.
DYNSEC = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")


def broker_refusing(folder: Path, refused: tuple[str, ...]) -> MosquittoProcess:
    """Mosquitto with the user `cgw` (password `pw`), refused the `refused` topic filters."""
    folder.mkdir()
    salt = os.urandom(12)
    password = hashlib.pbkdf2_hmac("sha512", b"pw", salt, 101)
    acls = [{"acltype": "subscribePattern", "topic": t, "allow": False, "priority": 1} for t in refused]
    config = {
        "clients": [
            {
                "username": "cgw",
                "password": base64.b64encode(password).decode(),
                "salt": base64.b64encode(salt).decode(),
                "iterations": 101,
                "roles": [{"rolename": "gateway"}],
            }
        ],
        "roles": [{"rolename": "gateway", "acls": acls}],
        "defaultACLAccess": {
            "publishClientSend": True,
            "publishClientReceive": True,
            "subscribe": True,
            "unsubscribe": True,
        },
    }
    (folder / "dynsec.json").write_text(json.dumps(config))
    return MosquittoProcess(
        folder / "mosquitto",
        extra=f"allow_anonymous false\nplugin {DYNSEC}\nplugin_opt_config_file {folder / 'dynsec.json'}\n",
    )


@pytest.fixture
def strict_broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """Mosquitto that refuses the gateway's user the `vote` channel."""
    broker = broker_refusing(tmp_path / "strict", (REFUSED,))
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture
def open_broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """The same broker refusing nothing."""
    broker = broker_refusing(tmp_path / "open", ())
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


def settings(port: int, protocol: str) -> MqttSettings:
    return MqttSettings(
        url=f"mqtt://127.0.0.1:{port}",
        keepalive_s=5,
        protocol=protocol,
        username="cgw",
        password=SecretStr("pw"),
    )


@pytest.mark.parametrize(
    ("driver_class", "protocol", "reason"),
    [(Mqtt5Driver, "5", "not authorized"), (MqttDriver, "3.1.1", "Unspecified error")],
)
async def test_a_refused_subscription_keeps_the_driver_not_ready_and_says_which(
    strict_broker: MosquittoProcess,
    caplog: pytest.LogCaptureFixture,
    driver_class: type[MqttIntake],
    protocol: str,
    reason: str,
) -> None:
    driver = driver_class(settings(strict_broker.port, protocol), f"cgw-acl-{protocol}", Instruments())
    task = asyncio.create_task(driver.run(Holding()))
    try:
        with caplog.at_level(logging.ERROR, logger=type(driver).__module__):
            error = await eventually(lambda: driver.last_error, 15, "the refused subscription")
        assert f"refused the subscription to {REFUSED} ({reason})" in error
        assert "CGW_MQTT__USERNAME" in error
        assert not driver.connected
        assert error in caplog.text
    finally:
        await driver.stop()
        await asyncio.wait_for(task, 10)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_granted_subscription_makes_the_driver_ready(
    open_broker: MosquittoProcess, protocol: str
) -> None:
    driver_class = Mqtt5Driver if protocol == "5" else MqttDriver
    driver = driver_class(settings(open_broker.port, protocol), f"cgw-ok-{protocol}", Instruments())
    task = asyncio.create_task(driver.run(Holding()))
    try:
        await eventually(lambda: driver.connected, 15, "the driver to be ready")
        assert driver.last_error is None
    finally:
        await driver.stop()
        await asyncio.wait_for(task, 10)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_doctor_names_the_refused_subscription(strict_broker: MosquittoProcess, protocol: str) -> None:
    finding = _broker(
        "broker",
        settings(strict_broker.port, protocol),
        "CGW_MQTT",
        5.0,
        mqtt5=protocol == "5",
        subscribe=SUBSCRIPTIONS,
    )
    assert not finding.ok
    assert f"refused the subscription to {REFUSED}" in finding.detail


async def test_a_refused_subscription_raises_naming_the_filter(strict_broker: MosquittoProcess) -> None:
    async with Client(settings(strict_broker.port, "5"), "cgw-client") as client:
        await client.subscribe(["cgw/v1/+/telemetry"])
        with pytest.raises(SubscriptionRefused) as refused:
            await client.subscribe(["cgw/v1/+/status", REFUSED])
        assert refused.value.refusals == [(REFUSED, "not authorized")]


async def test_a_refused_login_raises_with_the_brokers_reason(strict_broker: MosquittoProcess) -> None:
    wrong = settings(strict_broker.port, "5").model_copy(update={"password": SecretStr("wrong")})
    with pytest.raises(ConnectRefused) as refused:
        await Client(wrong, "cgw-client").connect()
    # Mosquitto's dynamic security says "not authorized" for a wrong password too.
    assert refused.value.reason == "not authorized"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_readyz_names_the_refused_filter_and_reason(
    strict_broker: MosquittoProcess, tmp_path: Path, protocol: str
) -> None:
    mqtt = settings(strict_broker.port, protocol)
    gateway = Gateway(gateway_settings(tmp_path, mqtt.url, mqtt=mqtt))
    task = asyncio.create_task(gateway.run())
    try:
        await eventually(lambda: gateway.mqtt.last_error, 15, "the refused subscription")
        broker = gateway.readiness()["broker"]
        assert not broker["ok"] and f"refused the subscription to {REFUSED} (" in broker["detail"]
    finally:
        gateway.stop()
        await asyncio.wait_for(task, 30)
