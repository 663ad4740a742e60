"""Load generators: several publisher processes, so the load is not the bottleneck.

`fill` publishes a fixed number of telemetry messages as fast as the broker takes them (used to
pre-fill a consumer's persistent session); `steady` publishes at a given rate until stopped.
Each process has its own paho client and its own share of the devices.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

BASE_MS = int(time.time() * 1000) - 6 * 3600 * 1000  # six hours ago: inside the accepted window


def device_id(i: int) -> str:
    return f"bench-{i:05d}"


def telemetry(n: int, devices: int) -> tuple[str, bytes]:
    """Message number `n`: from device n % devices, its own time one ms after message n-1."""
    body = {"ts": BASE_MS + n, "seq": n, "metrics": {"pm25": 10.0 + n % 50, "temp_c": 21.5}}
    return f"cgw/v1/{device_id(n % devices)}/telemetry", orjson.dumps(body)


def _client(port: int, name: str) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    return client


def _fill_part(port: int, first: int, count: int, step: int, devices: int) -> None:
    client = _client(port, f"bench-fill-{first}")
    infos = []
    for k in range(count):
        topic, payload = telemetry(first + k * step, devices)
        infos.append(client.publish(topic, payload, qos=1))
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def fill(port: int, messages: int, devices: int, processes: int = 4) -> float:
    """Publish messages 0..messages-1 (interleaved over the processes); returns the seconds taken."""
    started = time.perf_counter()
    workers = [
        mp.Process(target=_fill_part, args=(port, p, len(range(p, messages, processes)), processes, devices))
        for p in range(processes)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
        if w.exitcode != 0:
            raise RuntimeError(f"publisher process failed ({w.exitcode})")
    return time.perf_counter() - started


Make = Callable[[int, int], tuple[str, bytes]]


def _steady_part(
    port: int, part: int, parts: int, rate: float, devices: int, stop: Any, make: Make, sent: Any
) -> None:
    client = _client(port, f"bench-steady-{part}-{time.monotonic_ns()}")
    interval = 1.0 / rate
    started = time.monotonic()
    k = 0
    while not stop.is_set():
        topic, payload = make(part + k * parts, devices)
        client.publish(topic, payload, qos=1)
        k += 1
        ahead = started + k * interval - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    with sent.get_lock():
        sent.value += k
    client.disconnect()
    client.loop_stop()


class Steady:
    """Publishers at `rate` messages per second in all, until `stop()`; `sent` counts them."""

    def __init__(self, port: int, rate: float, devices: int, processes: int = 2,
                 make: Callable[[int, int], tuple[str, bytes]] = telemetry) -> None:  # fmt: skip
        self._stop = mp.Event()
        self._sent = mp.Value("q", 0)
        self._workers = [
            mp.Process(
                target=_steady_part,
                args=(port, p, processes, rate / processes, devices, self._stop, make, self._sent),
            )
            for p in range(processes)
        ]

    def __enter__(self) -> Steady:
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> int:
        self._stop.set()
        for w in self._workers:
            w.join(30)
        return int(self._sent.value)
