"""Numbered telemetry and service requests, published the way real devices do (QoS 1, persistent).

Every telemetry message carries a number `n` (metric `v`, `ts` = base + n), so a test can check
that each number arrives exactly once wherever it should (tests/test_faults.py, test_uplink.py).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

DEVICES = 10
REQUEST_EVERY = 40  # one service request per this many telemetry messages


class Publisher:
    """Devices and a service terminal, publishing with QoS 1 from one persistent session.

    paho keeps what the broker has not acknowledged and sends it again after a reconnect, as a
    real device library does; so a broker restart loses nothing on this side either.
    """

    def __init__(self, port: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="fault-devices", clean_session=False)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.1, 1)  # type: ignore[arg-type]  # paho types the delays as int; it takes float seconds
        self._acked: set[int] = set()
        self._acks = threading.Condition()  # notified on each PUBACK (paho's network thread)

        def acknowledged(_c: paho.Client, _u: object, mid: int, _rc: object, _p: object) -> None:
            with self._acks:
                self._acked.add(mid)
                self._acks.notify_all()

        self.client.on_publish = acknowledged
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.sent = 0
        self.requests: list[str] = []
        self.base_ms = int(time.time() * 1000) - 3_600_000  # ts = base + number: one point per number
        self._infos: list[paho.MQTTMessageInfo] = []
        # Only a service terminal files requests (docs/privacy.md): its birth, retained, as real
        # devices publish it, so a gateway that subscribes later still learns what it is.
        birth = {"state": "online", "kind": "service_terminal", "location": {"building": "1"}}
        self._infos.append(
            self.client.publish("cgw/v1/fault-term/status", orjson.dumps(birth), qos=1, retain=True)
        )

    def publish(self, count: int, rate: float = 1000.0) -> None:
        """`count` telemetry messages at about `rate` per second."""
        started, interval = time.monotonic(), 1.0 / rate
        for i in range(count):
            n = self.sent
            body = {"ts": self.base_ms + n, "seq": n, "metrics": {"v": n}}
            self._send(f"cgw/v1/fault-{n % DEVICES}/telemetry", body)
            if n % REQUEST_EVERY == 0:
                request_id = f"req-{n}"
                self.requests.append(request_id)
                request = {
                    "request_id": request_id,
                    "service_code": "elderly.home_visit",
                    "description": request_id,
                    "location": {"building": "1", "unit": "1-101"},
                }
                self._send("cgw/v1/fault-term/request", request)
            self.sent += 1
            ahead = started + (i + 1) * interval - time.monotonic()
            if ahead > 0.002:
                time.sleep(ahead)  # pacing to `rate`, as a device sends: no wait for anything

    def publish_for(self, seconds: float, rate: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.publish(max(1, int(rate // 10)), rate)

    def _send(self, topic: str, body: dict[str, Any]) -> None:
        self._infos.append(self.client.publish(topic, orjson.dumps(body), qos=1))

    def wait_acknowledged(self, timeout: float = 60) -> None:
        # Not `is_published()`: it raises for a message published while disconnected, which paho
        # still holds and sends after the reconnect (what this test relies on).
        with self._acks:
            if not self._acks.wait_for(lambda: all(info.mid in self._acked for info in self._infos), timeout):
                raise AssertionError("the broker did not acknowledge every publish")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
