"""One simulated device: its own MQTT client, Last Will, birth, telemetry loop and faults.

Publishes exactly what the contract says a device publishes: a retained birth on `status`, QoS 1
telemetry with increasing `seq` (sometimes batched), events for rare happenings, and a retained
`{"state":"offline"}` as Last Will and on clean shutdown (`retain=False`: the same, not retained).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import zlib
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import orjson

from gateway import clock
from simulators.community import SimDevice
from simulators.faults import BURST_SIZE, SKEW_MS, FaultPlan, malformed_payload
from simulators.signals import signal_for

log = logging.getLogger(__name__)

OFFLINE = orjson.dumps({"state": "offline"})
BATCHING_KINDS = {"water_meter"}  # meters that buffer readings and send them as a batch
BATCH_OF = 3


# A burst (the demo's week of service history) keeps many QoS 1 publishes in flight on purpose;
# aiomqtt would log a warning for each one past 10.
BURST_IN_FLIGHT = 1000


class SimulatedDevice:
    def __init__(
        self,
        device: SimDevice,
        broker: tuple[str, int],
        credentials: tuple[str | None, str | None],
        seed: int,
        interval_scale: float,
        sim_clock: Callable[[], float],
        faults: dict[str, float],
        counters: Counter[str],
        *,
        retain: bool = True,
    ) -> None:
        self.device = device
        self._retain = retain
        self._broker = broker
        self._credentials = credentials
        self._signal = signal_for(device, seed)
        self._interval = device.interval_s * interval_scale
        self._sim_clock = sim_clock
        self._rng = random.Random(seed ^ zlib.crc32(device.device_id.encode()) ^ 0x5A5A)
        self.faults = FaultPlan(faults, self._rng)
        self._counters = counters
        self._seq = 0
        self._batch: list[dict[str, Any]] = []
        # Half the devices stamp RFC 3339 strings, half epoch ms: both are in the contract.
        self._rfc3339 = zlib.crc32(device.device_id.encode()) % 2 == 0
        self.connected = asyncio.Event()
        self._topic = f"cgw/v1/{device.device_id}/"

    def _ts(self, ms: int) -> int | str:
        if self._rfc3339:
            return (
                datetime.fromtimestamp(ms / 1000, UTC)
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z")
            )
        return ms

    def _client(self) -> aiomqtt.Client:
        user, password = self._credentials
        client = aiomqtt.Client(
            self._broker[0],
            self._broker[1],
            username=user,
            password=password,
            identifier=f"sim-{self.device.device_id}",
            clean_session=True,
            keepalive=60,
            will=aiomqtt.Will(self._topic + "status", OFFLINE, qos=1, retain=self._retain),
        )
        client.pending_calls_threshold = BURST_IN_FLIGHT
        return client

    async def run(self, stop: asyncio.Event, start_gate: asyncio.Semaphore) -> None:
        """Connect, report until `stop`, reconnecting after dropped connections."""
        backoff = 1.0
        while not stop.is_set():
            try:
                async with start_gate:
                    client = self._client()
                    await client.__aenter__()
                dropped = False
                try:
                    await self._birth(client)
                    backoff = 1.0
                    dropped = await self._report(client, stop)
                    if not dropped:
                        await client.publish(self._topic + "status", OFFLINE, qos=1, retain=self._retain)
                        self._counters["status"] += 1
                finally:
                    self.connected.clear()
                    try:
                        # After a drop there is nobody to say goodbye to: do not wait the full
                        # client timeout for a DISCONNECT that cannot be acknowledged.
                        await asyncio.wait_for(client.__aexit__(None, None, None), 2 if dropped else None)
                    except (aiomqtt.MqttError, TimeoutError):
                        pass  # the connection is already gone (dropped on purpose or by the broker)
                if dropped:
                    await _sleep_or_stop(stop, self._rng.uniform(2, 5))
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                log.debug("%s: %s; reconnecting in %.0f s", self.device.device_id, exc, backoff)
                await _sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, 30.0)

    async def _birth(self, client: aiomqtt.Client) -> None:
        birth: dict[str, Any] = {
            "state": "online",
            "kind": self.device.kind,
            "location": self.device.location,
            "fw": self.device.fw,
            "rssi": self._rng.randint(-90, -45),
        }
        if self.device.battery is not None:
            birth["battery"] = self.device.battery
        await client.publish(self._topic + "status", orjson.dumps(birth), qos=1, retain=self._retain)
        self._counters["status"] += 1
        self.connected.set()

    async def _report(self, client: aiomqtt.Client, stop: asyncio.Event) -> bool:
        """Publish readings until stop; True when a disconnect fault dropped the connection."""
        # Spread devices over their interval so they do not all publish at once.
        await _sleep_or_stop(stop, self._rng.uniform(0, self._interval))
        while not stop.is_set():
            faults = self.faults.draw()
            if "disconnect" in faults:
                self._counters["fault:disconnect"] += 1
                self._drop(client)
                return True
            await self._publish_reading(client, faults)
            await _sleep_or_stop(stop, self._interval * self._rng.uniform(0.9, 1.1))
        return False

    def _drop(self, client: aiomqtt.Client) -> None:
        # End the TCP connection under paho without sending DISCONNECT: the broker sees a lost
        # connection and publishes the Last Will, as it would for a device losing power.
        # shutdown(), not close(): the event loop still watches the descriptor, and a closed
        # number reused by the next connection would be read by the old client's callbacks.
        sock = client._client.socket()
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone

    def _reading(self, ts_ms: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        metrics, events = self._signal.step(self._sim_clock())
        self._seq += 1
        return {"ts": self._ts(ts_ms), "seq": self._seq, "metrics": metrics}, events

    async def _publish_reading(self, client: aiomqtt.Client, faults: set[str]) -> None:
        now_ms = clock.now_ms()
        reading, events = self._reading(now_ms)
        if "clock_skew" in faults:
            reading["ts"] = self._ts(now_ms + self._rng.choice((SKEW_MS, -SKEW_MS * 30 * 24)))
            self._counters["fault:clock_skew"] += 1
        for event in events:
            await client.publish(
                self._topic + "event", orjson.dumps({"ts": self._ts(now_ms), **event}), qos=1
            )
            self._counters["event"] += 1
        if "malformed" in faults:
            metric = next(iter(reading["metrics"]))
            await client.publish(self._topic + "telemetry", malformed_payload(self._rng, metric), qos=1)
            self._counters["fault:malformed"] += 1
        if self.device.kind in BATCHING_KINDS and "clock_skew" not in faults:
            self._batch.append(reading)
            if len(self._batch) >= BATCH_OF:
                await self._send(client, {"batch": self._batch})
                self._batch = []
        else:
            await self._send(client, reading)
        if "duplicate" in faults:
            await self._send(client, reading)
            self._counters["fault:duplicate"] += 1
        if "burst" in faults:
            self._counters["fault:burst"] += 1
            base = clock.now_ms()
            for i in range(BURST_SIZE):
                burst, _ = self._reading(base + i + 1)
                await self._send(client, burst)

    async def _send(self, client: aiomqtt.Client, payload: dict[str, Any]) -> None:
        await client.publish(self._topic + "telemetry", orjson.dumps(payload), qos=1)
        self._counters["telemetry"] += 1


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
