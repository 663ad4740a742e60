"""Running a simulated community against a broker: `simulate()`, used by `cgw simulate` and the demo.

Every device is its own MQTT client with its own Last Will; connections are opened with limited
concurrency so a broker is not hit by hundreds at the same millisecond.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from simulators.community import Community, build_community
from simulators.device import SimulatedDevice
from simulators.faults import parse_faults

__all__ = ["Simulation", "SimulationConfig", "SimulationStats", "parse_faults", "simulate"]


@dataclass
class SimulationConfig:
    broker_url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    community: str = "community"
    seed: int = 42
    buildings: int = 6
    floors: int = 6
    interval_scale: float = 1.0  # multiplies every device's publish interval
    speed: float = 1.0  # simulated seconds per real second (daily cycles, rare events)
    duration_s: float | None = None
    faults: dict[str, float] = field(default_factory=dict)  # fault → probability per publish
    connect_concurrency: int = 20


@dataclass
class SimulationStats:
    devices: int
    connected: int
    published: dict[str, int]

    def __str__(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.published.items()))
        return f"{self.devices} devices ({self.connected} connected at the end); published: {parts}"


class Simulation:
    """A community of simulated devices; `run()` until stopped, `trigger()` faults on demand."""

    def __init__(self, config: SimulationConfig) -> None:
        parts = urlsplit(config.broker_url)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ValueError(f"broker URL must be mqtt://host:port, got {config.broker_url!r}")
        self.config = config
        self.community: Community = build_community(
            config.community, config.seed, config.buildings, config.floors
        )
        self.counters: Counter[str] = Counter()
        start_real = time.time()

        def sim_clock() -> float:
            return start_real + (time.time() - start_real) * config.speed

        self.devices = {
            d.device_id: SimulatedDevice(
                d,
                (parts.hostname, parts.port or 1883),
                (config.username, config.password),
                config.seed,
                config.interval_scale,
                sim_clock,
                config.faults,
                self.counters,
            )
            for d in self.community.devices
        }

    def trigger(self, fault: str, device_id: str | None = None) -> None:
        """Make `fault` happen at the next publish of one device (or of every device)."""
        targets = [self.devices[device_id]] if device_id else list(self.devices.values())
        for device in targets:
            device.faults.trigger(fault)

    @property
    def connected(self) -> int:
        return sum(1 for d in self.devices.values() if d.connected.is_set())

    async def wait_connected(self, timeout: float = 60) -> None:
        await asyncio.wait_for(asyncio.gather(*(d.connected.wait() for d in self.devices.values())), timeout)

    async def run(self, stop: asyncio.Event) -> SimulationStats:
        gate = asyncio.Semaphore(self.config.connect_concurrency)
        async with asyncio.TaskGroup() as tg:
            for device in self.devices.values():
                tg.create_task(device.run(stop, gate), name=f"sim-{device.device.device_id}")
            if self.config.duration_s is not None:
                tg.create_task(_stop_after(stop, self.config.duration_s))
        return SimulationStats(len(self.devices), self.connected, dict(self.counters))


async def _stop_after(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        stop.set()


async def simulate(
    config: SimulationConfig,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[Community], None] | None = None,
) -> SimulationStats:
    """Run the community until `stop` is set or `duration_s` passes; devices end offline cleanly."""
    simulation = Simulation(config)
    if on_ready is not None:
        on_ready(simulation.community)
    return await simulation.run(stop or asyncio.Event())
