"""`cgw simulate` as a user runs it, against a real Mosquitto and a gateway: what it says it
published is what crossed the broker, and its devices are the gateway's devices.

(Its progress lines and that it leaves nothing retained: tests/test_simulated_community.py.)
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from tests.harness import api, eventually, gateway_settings, running
from tests.services import MosquittoProcess, free_port

pytestmark = pytest.mark.integration


class Counting:
    """Every message on the devices' topics, by channel; subscribed (SUBACK) before it returns."""

    def __init__(self, port: int) -> None:
        self.channels: Counter[str] = Counter()
        self.marker = threading.Event()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="counting")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("cgw/v1/+/+", qos=1)
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        device, channel = msg.topic.split("/")[2:4]
        if device == "zz-marker":
            self.marker.set()
        elif channel in ("status", "telemetry", "event"):
            self.channels[channel] += 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def test_what_cgw_simulate_reports_is_what_the_broker_and_the_gateway_saw(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    counting = Counting(mosquitto.port)
    inventory = tmp_path / "inventory.yaml"
    try:
        async with running(gateway_settings(tmp_path / "gw", mosquitto.url)) as gw, api(gw) as client:
            process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "gateway.cli", "simulate", "--broker", mosquitto.url),
                *("--buildings", "1", "--floors", "2", "--interval-scale", "0.05", "--duration", "3"),
                *("--inventory", str(inventory)),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), 60)
            assert process.returncode == 0, err.decode()
            # Everything it published went before the marker, which comes from another client
            # after it exited: the broker has passed all of it on once the marker is here.
            counting.client.publish("cgw/v1/zz-marker/status", b"{}", qos=1).wait_for_publish(10)
            assert await asyncio.to_thread(counting.marker.wait, 10), "no marker"
            last = out.decode().splitlines()[-1]
            match = re.fullmatch(
                r"Simulated (\d+) devices for \d+ s: ([\d,]+) messages published \((.*)\)\.", last
            )
            assert match, last
            reported = {name: int(n.replace(",", "")) for n, name in
                        (part.split(" ") for part in match[3].split(", "))}  # fmt: skip
            assert reported == dict(counting.channels) and reported["telemetry"] > 0
            assert sum(reported.values()) == int(match[2].replace(",", ""))

            # Its devices, as its inventory lists them, are the gateway's, each of its kind.
            listed = {d["device_id"]: d["kind"] for d in yaml.safe_load(inventory.read_text())["devices"]}
            assert len(listed) == int(match[1])

            async def known() -> dict[str, str] | None:
                items = (await client.get("/api/v1/devices", params={"limit": 1000})).json()["items"]
                found = {d["device_id"]: d["kind"] for d in items if d["device_id"] != "zz-marker"}
                return found if found == listed else None

            await eventually(known, 15, "the simulated devices in the gateway")
    finally:
        counting.close()


def _simulate(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gateway.cli", "simulate", "--buildings", "1", "--floors", "1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_a_bad_broker_url_or_duration_is_one_line_and_exit_2() -> None:
    result = _simulate("--broker", "http://x")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --broker: must start with mqtt:// or mqtts://, got 'http://x'"
    result = _simulate("--duration", "-1")
    assert result.returncode == 2 and "--duration" in result.stderr and "Traceback" not in result.stderr
    demo = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--duration", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert demo.returncode == 2 and "--duration" in demo.stderr


def test_no_broker_is_said_and_fails() -> None:
    result = _simulate("--broker", f"mqtt://127.0.0.1:{free_port()}", "--duration", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: no device could connect to mqtt://127.0.0.1:" in result.stderr
