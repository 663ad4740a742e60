"""Running a simulated community against a broker: `simulate()`, used by `cgw simulate` and the demo.

Every device is its own MQTT client with its own Last Will; connections are opened with limited
concurrency so a broker is not hit by hundreds at the same millisecond. `retain=False` (what
`cgw simulate` uses against a shared broker) publishes births and Last Wills without the retain
flag, so nothing of the simulation stays on the broker after it ends.
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
    # The contract's devices retain their birth. On a shared broker a retained status would
    # outlive the simulation, and a gateway with open registration would take it for a device.
    retain: bool = True


@dataclass
class SimulationStats:
    devices: int
    connected: int
    published: dict[str, int]
    elapsed_s: float = 0.0

    @property
    def messages(self) -> int:
        return sum(v for k, v in self.published.items() if not k.startswith("fault:"))

    def progress(self) -> str:
        """One line while running: how long, how many connected, how much published."""
        return (
            f"{self.elapsed_s:.0f} s: {self.connected}/{self.devices} devices connected, "
            f"{self.messages:,} messages published ({_breakdown(self.published)})"
        )

    def summary(self) -> str:
        """The final line, in words."""
        faults = {k.removeprefix("fault:"): v for k, v in self.published.items() if k.startswith("fault:")}
        injected = f"; faults injected: {_breakdown(faults)}" if faults else ""
        return (
            f"Simulated {self.devices} devices for {self.elapsed_s:.0f} s: {self.messages:,} messages "
            f"published ({_breakdown(self.published)}){injected}."
        )


def _breakdown(counts: dict[str, int]) -> str:
    shown = [f"{v:,} {k}" for k, v in sorted(counts.items()) if not k.startswith("fault:")]
    return ", ".join(shown) or "none"


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
        self._started = time.monotonic()

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
                retain=config.retain,
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

    def stats(self) -> SimulationStats:
        """What the simulation has done so far."""
        return SimulationStats(
            len(self.devices), self.connected, dict(self.counters), time.monotonic() - self._started
        )

    async def run(
        self,
        stop: asyncio.Event,
        progress: Callable[[SimulationStats], None] | None = None,
        progress_every_s: float = 10.0,
    ) -> SimulationStats:
        """Run until `stop`; `progress` is called every `progress_every_s` seconds while running."""
        self._started = time.monotonic()
        gate = asyncio.Semaphore(self.config.connect_concurrency)
        async with asyncio.TaskGroup() as tg:
            for device in self.devices.values():
                tg.create_task(device.run(stop, gate), name=f"sim-{device.device.device_id}")
            if self.config.duration_s is not None:
                tg.create_task(_stop_after(stop, self.config.duration_s), name="sim-duration")
            if progress is not None:
                tg.create_task(self._report(stop, progress, progress_every_s), name="sim-progress")
        return self.stats()

    async def _report(
        self, stop: asyncio.Event, progress: Callable[[SimulationStats], None], every_s: float
    ) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except TimeoutError:
                progress(self.stats())


async def _stop_after(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        stop.set()


async def simulate(
    config: SimulationConfig,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[Community], None] | None = None,
    progress: Callable[[SimulationStats], None] | None = None,
    progress_every_s: float = 10.0,
) -> SimulationStats:
    """Run the community until `stop` is set or `duration_s` passes; devices end offline cleanly."""
    simulation = Simulation(config)
    if on_ready is not None:
        on_ready(simulation.community)
    return await simulation.run(stop or asyncio.Event(), progress, progress_every_s)
