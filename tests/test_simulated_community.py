"""The simulators: the seeded community, its signals over a simulated week, faults, Last Will."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from collections import Counter
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.profiles import load_profiles
from simulators.community import build_community
from simulators.faults import FaultPlan, parse_faults
from simulators.run import Simulation, SimulationConfig
from simulators.signals import signal_for
from tests.harness import eventually

PROFILES = load_profiles()
WEEK_S = 7 * 24 * 3600


def test_the_community_is_seeded_and_has_every_kind() -> None:
    community = build_community("sunrise", 42)
    assert len(community.devices) == 213
    kinds = Counter(d.kind for d in community.devices)
    assert set(kinds) == {p.kind for p in PROFILES} - {"generic"}
    assert len({d.device_id for d in community.devices}) == 213
    assert build_community("sunrise", 42) == community
    assert build_community("sunrise", 43).devices != community.devices


def test_every_signal_stays_valid_for_its_profile_over_a_simulated_week() -> None:
    community = build_community("sunrise", 42, buildings=2, floors=2)
    events: Counter[str] = Counter()
    for device in community.devices:
        signal = signal_for(device, seed=42)
        profile = PROFILES.get(device.kind)
        assert profile is not None
        counters: dict[str, float] = {}
        step = max(device.interval_s, 60.0)
        t = 0.0
        while t < WEEK_S:
            metrics, happened = signal.step(t)
            profile.validate_metrics(metrics)  # raises with the reason if a value is off
            for name, value in metrics.items():
                if profile.metrics[name].type == "counter":
                    assert value >= counters.get(name, 0.0), (device.device_id, name, t)
                    counters[name] = value
            for event in happened:
                events[event["type"]] += 1
            t += step
    # Rare happenings do happen in a week of two buildings.
    assert events["fault"] + events["forced_open"] > 0, events


def test_faults_parse_and_refuse_clearly() -> None:
    assert parse_faults("disconnect=0.01, malformed=0.5") == {"disconnect": 0.01, "malformed": 0.5}
    assert parse_faults("") == {}
    for text, fragment in [
        ("sneeze=0.1", "unknown fault 'sneeze'"),
        ("burst", "needs a rate"),
        ("burst=lots", "is not a number"),
        ("burst=2", "between 0 and 1"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            parse_faults(text)


def test_a_triggered_fault_fires_once() -> None:
    import random

    plan = FaultPlan({}, random.Random(1))
    plan.trigger("duplicate")
    assert plan.draw() == {"duplicate"} and plan.draw() == set()
    with pytest.raises(ValueError):
        plan.trigger("explode")


async def test_a_dropped_device_is_announced_offline_by_its_last_will(mosquitto: Any) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    watcher = paho.Client(CallbackAPIVersion.VERSION2)
    watcher.on_message = lambda c, u, m: seen.append((m.topic, orjson.loads(m.payload)))
    watcher.connect("127.0.0.1", mosquitto.port)
    watcher.subscribe("cgw/v1/+/status", qos=1)
    watcher.loop_start()
    config = SimulationConfig(broker_url=mosquitto.url, buildings=1, floors=1, interval_scale=0.05, seed=3)
    simulation = Simulation(config)
    stop = asyncio.Event()
    task = asyncio.create_task(simulation.run(stop))
    try:
        await simulation.wait_connected(20)
        simulation.trigger("disconnect", "b01-elev-1")

        async def will() -> bool:
            return ("cgw/v1/b01-elev-1/status", {"state": "offline"}) in seen

        await eventually(will, 10.0, "the Last Will of b01-elev-1")
        # It comes back with a new birth.
        births = [p for t, p in seen if t == "cgw/v1/b01-elev-1/status" and p["state"] == "online"]

        async def reborn() -> bool:
            return len(
                [p for t, p in seen if t == "cgw/v1/b01-elev-1/status" and p["state"] == "online"]
            ) > len(births)

        await eventually(reborn, 15.0, "b01-elev-1 back online")
    finally:
        stop.set()
        stats = await asyncio.wait_for(task, 20)
        watcher.loop_stop()
    assert stats.published["fault:disconnect"] == 1


def test_cgw_simulate_reports_progress_and_leaves_nothing_retained(mosquitto: Any) -> None:
    """`cgw simulate` as a user runs it against a shared broker: a line at the start, progress
    while it runs, a final line in words, and no retained status left for a gateway to find."""
    run = subprocess.run(
        [
            *(sys.executable, "-m", "gateway.cli", "simulate", "--broker", mosquitto.url),
            *("--buildings", "1", "--floors", "1", "--interval-scale", "0.05"),
            *("--duration", "3", "--progress", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "60"},
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == f"Simulating 13 devices of community 'sunrise' on {mosquitto.url} for 3 s"
    assert any(
        re.fullmatch(r"\d+ s: \d+/13 devices connected, [\d,]+ messages published \(.*\)", x) for x in lines
    )
    assert re.fullmatch(
        r"Simulated 13 devices for \d+ s: [\d,]+ messages published \([\d,]+ status, [\d,]+ telemetry.*\)\.",
        lines[-1],
    ), lines[-1]
    assert "connected=" not in run.stdout

    # Retained messages reach a new subscriber before anything published after its SUBACK: once
    # the marker arrives, every retained status would have arrived before it.
    seen: list[str] = []
    marker = threading.Event()
    subscribed = threading.Event()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        seen.append(message.topic)
        if message.topic == "cgw/v1/zz-marker/status":
            marker.set()

    watcher = paho.Client(CallbackAPIVersion.VERSION2)
    watcher.on_message = on_message
    watcher.on_subscribe = lambda *args: subscribed.set()
    watcher.connect("127.0.0.1", mosquitto.port)
    watcher.loop_start()
    try:
        watcher.subscribe("cgw/v1/+/status", qos=1)
        assert subscribed.wait(10)
        watcher.publish("cgw/v1/zz-marker/status", b"{}", qos=1)
        assert marker.wait(10)
    finally:
        watcher.loop_stop()
    assert seen == ["cgw/v1/zz-marker/status"]
