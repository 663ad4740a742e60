"""`cgw demo`: a complete community on one machine with no outside services.

Starts a private broker (Mosquitto if installed, else the embedded amqtt), writes the simulated
community's inventory, makes API tokens, runs the gateway and the simulated devices together,
and prints where to look.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gateway.api.headers import WILDCARDS
from gateway.application import Gateway
from gateway.broker import LocalBroker, free_port, port_open
from gateway.services import requests
from gateway.settings import Settings
from gateway.store.lock import DataDirLock
from simulators.community import TERMINALS, build_community
from simulators.residents import Hotspot, ServiceSimConfig, ServiceSimulation, write_household_register
from simulators.run import SimulationConfig, simulate

log = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    data_dir: Path = Path("./cgw-demo-data")
    community: str = "sunrise"
    buildings: int = 6
    floors: int = 6
    seed: int = 42
    speed: float = 60.0
    interval_scale: float = 1.0
    faults: dict[str, float] = field(default_factory=dict)
    broker_url: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    duration_s: float | None = None
    prefer_mosquitto: bool = True
    service_days: int = 7  # a simulated history of the service loop, filled in on first start


@dataclass(frozen=True)
class DemoPlace:
    """Where the demo runs: what the flags, the environment and the settings file chose."""

    data_dir: Path
    community: str
    api_host: str
    api_port: int


# The demo's own defaults, the lowest layer (below the settings file and the environment).
DEMO_PLACE = DemoPlace(Path("./cgw-demo-data"), "sunrise", "127.0.0.1", 8080)


def chosen(
    base: Settings,
    *,
    data_dir: Path | None = None,
    community: str | None = None,
    api_host: str | None = None,
    api_port: int | None = None,
) -> DemoPlace:
    """A flag (not None) wins over the environment, the environment over the settings file
    (both already in `base`, environment first), the file over the demo's defaults."""

    def pick(flag: Any, section: BaseModel, name: str, default: Any) -> Any:
        if flag is not None:
            return flag
        return getattr(section, name) if name in section.model_fields_set else default

    return DemoPlace(
        data_dir=pick(data_dir, base, "data_dir", DEMO_PLACE.data_dir),
        community=pick(community, base, "community", DEMO_PLACE.community),
        api_host=pick(api_host, base.api, "host", DEMO_PLACE.api_host),
        api_port=pick(api_port, base.api, "port", DEMO_PLACE.api_port),
    )


@dataclass
class DemoInfo:
    api_url: str
    broker_url: str
    broker_kind: str
    tokens: dict[str, str]
    devices: int
    data_dir: Path
    service_days: int


def demo_tokens() -> dict[str, str]:
    """One fresh token per role; printed once, held by the gateway only as digests."""
    return {role: secrets.token_urlsafe(18) for role in ("viewer", "terminal", "operator", "installer")}


async def run_demo(
    options: DemoOptions,
    base: Settings,
    on_ready: Callable[[DemoInfo], None],
    stop: asyncio.Event | None = None,
) -> None:
    """Run until `stop` is set, the duration ends, or the task is cancelled."""
    stop = stop or asyncio.Event()
    # Locked before anything is written there: a second demo on this folder stops here.
    lock = DataDirLock(options.data_dir)
    lock.acquire()
    try:
        await _run_demo(options, base, on_ready, stop, lock)
    finally:
        lock.release()


async def _run_demo(
    options: DemoOptions,
    base: Settings,
    on_ready: Callable[[DemoInfo], None],
    stop: asyncio.Event,
    lock: DataDirLock,
) -> None:
    community = build_community(options.community, options.seed, options.buildings, options.floors)
    inventory = options.data_dir / "inventory.yaml"
    community.write_inventory(inventory)
    broker: LocalBroker | None = None
    broker_url = options.broker_url
    broker_kind = "external"
    protocol = base.mqtt.protocol
    if broker_url is None:
        broker = LocalBroker(options.data_dir, prefer_mosquitto=options.prefer_mosquitto)
        broker_url = await broker.start()
        broker_kind = broker.kind
        protocol = broker.protocol
    api_port = options.api_port
    if api_port and port_open(options.api_host, api_port):
        api_port = free_port(options.api_host)
        log.info("port %d is taken; the demo API uses %d instead", options.api_port, api_port)
    tokens = demo_tokens()
    # The simulated households' register, so their votes count (docs/privacy.md).
    households = options.data_dir / "households.yaml"
    if not households.exists():
        write_household_register(households, options.seed, options.buildings, options.floors)
    settings = base.model_copy(
        update={
            "community": options.community,
            "data_dir": options.data_dir,
            "inventory": inventory,
            "mqtt": base.mqtt.model_copy(update={"url": broker_url, "client_id": "", "protocol": protocol}),
            "api": base.api.model_copy(
                update={
                    "host": options.api_host,
                    "port": api_port,
                    "allowed_hosts": _demo_hosts(base, options),
                }
            ),
            "services": base.services.model_copy(update={"households": households}),
            "auth": base.auth.model_copy(
                update={
                    "tokens": {**base.auth.tokens, **{t: r for r, t in tokens.items()}},
                    # The demo fills in a week of operators' work in ~20 s through the API.
                    "write_rate_limit": "",
                }
            ),
        }
    )
    gateway = Gateway(settings, data_lock=lock)
    sim_stop = asyncio.Event()
    sim_config = SimulationConfig(
        broker_url=broker_url,
        community=options.community,
        seed=options.seed,
        buildings=options.buildings,
        floors=options.floors,
        interval_scale=options.interval_scale,
        speed=options.speed,
        faults=options.faults,
    )
    try:
        async with asyncio.TaskGroup() as tg:
            gw_task = tg.create_task(gateway.run(), name="gateway")
            await _first(gateway.ready.wait(), gw_task)
            sim_task = tg.create_task(simulate(sim_config, sim_stop), name="simulator")
            history_task: asyncio.Task[None] | None = None
            if options.service_days and not await gateway.services.call(requests.listing, limit=1):
                spot = min(3, options.buildings)  # building 3's elevator breaks on the last day
                history = ServiceSimConfig(
                    broker_url=broker_url,
                    api_url=f"http://127.0.0.1:{gateway.api_port}",
                    operator_token=tokens["operator"],
                    terminals=tuple(f"station-term-{t}" for t in range(1, TERMINALS + 1)),
                    seed=options.seed,
                    days=options.service_days,
                    buildings=options.buildings,
                    floors=options.floors,
                    hotspot=Hotspot(building=str(spot), device_id=f"b{spot:02d}-elev-1"),
                )
                history_task = tg.create_task(_service_history(history), name="service-history")
            on_ready(
                DemoInfo(
                    api_url=f"http://{options.api_host}:{gateway.api_port}",
                    broker_url=broker_url,
                    broker_kind=broker_kind,
                    tokens=tokens,
                    devices=len(community.devices),
                    data_dir=options.data_dir,
                    service_days=options.service_days,
                )
            )
            try:
                async with asyncio.timeout(options.duration_s):
                    await stop.wait()
            except TimeoutError:
                pass
            if history_task is not None and not history_task.done():
                # Stopped before the history was filled in: the next start fills in none (the
                # desk is no longer empty), which is said here rather than failing mid-request.
                history_task.cancel()
                log.info("stopped before the service history was complete")
            # Devices go offline cleanly first, so the gateway records it, then the gateway drains.
            sim_stop.set()
            await sim_task
            gateway.stop()
            await gw_task
    finally:
        if broker is not None:
            await broker.stop()


async def _service_history(config: ServiceSimConfig) -> None:
    """A week of residents' needs, providers' work, ratings and votes, so every view has data."""
    try:
        result = await ServiceSimulation(config).run()
    except Exception:  # the demo goes on without history; the reason is in the log
        log.exception("could not fill in the simulated service history")
        return
    days = f"{config.days} day" + ("" if config.days == 1 else "s")
    log.info("service history ready: %d requests over %s", len(result.requests), days)


async def _first(waiter: Coroutine[Any, Any, Any], task: asyncio.Task[None]) -> None:
    """Wait for `waiter`, but fail at once if `task` ends first (e.g. a port in use)."""
    wait_task = asyncio.ensure_future(waiter)
    done, _ = await asyncio.wait({wait_task, task}, return_when=asyncio.FIRST_COMPLETED)
    if task in done and wait_task not in done:
        wait_task.cancel()
        task.result()
        raise RuntimeError("the gateway stopped before it was ready")


def _demo_hosts(base: Settings, options: DemoOptions) -> list[str]:
    """A demo on a wildcard address (`--host 0.0.0.0`) is shown to others by whatever name or
    address they use, so it answers to any; otherwise the installer's list (api.allowed_hosts)."""
    return ["*"] if options.api_host in WILDCARDS else list(base.api.allowed_hosts)
