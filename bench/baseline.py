"""The baseline: a bare paho-mqtt subscriber that only receives and parses the telemetry.

It reads the same pre-filled persistent session the gateway reads, so both are timed on the same
work: from the first message delivered to the last.
"""

from __future__ import annotations

import threading
import time

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

CLIENT_ID = "bench-baseline"


def _client() -> paho.Client:
    return paho.Client(CallbackAPIVersion.VERSION2, client_id=CLIENT_ID, clean_session=False)


def register(port: int) -> None:
    """Create the persistent session (subscribed), then leave: the broker queues from now on."""
    client = _client()
    done = threading.Event()
    client.on_subscribe = lambda *_: done.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe("cgw/v1/+/telemetry", qos=1)
    done.wait(10)
    client.disconnect()
    client.loop_stop()


def drain(port: int, messages: int, timeout_s: float = 600) -> float:
    """Receive and parse `messages` queued messages; returns messages per second."""
    client = _client()
    count = 0
    first = last = 0.0
    done = threading.Event()

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        nonlocal count, first, last
        orjson.loads(msg.payload)
        if count == 0:
            first = time.perf_counter()
        count += 1
        if count >= messages:
            last = time.perf_counter()
            done.set()

    client.on_message = on_message
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        if not done.wait(timeout_s):
            raise RuntimeError(f"baseline received {count} of {messages}")
    finally:
        client.disconnect()
        client.loop_stop()
    return messages / (last - first)
