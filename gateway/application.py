"""The composition root: builds every component from the settings and runs their lifecycles.

`Gateway.run()` locks the data folder (gateway/store/lock.py), opens the store, then runs
drivers, pipeline, store writer, maintenance, sinks and the API as tasks of one TaskGroup.
`stop()` drains in order: drivers stop taking input, the pipeline empties, the store and the
sinks flush, then the API closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import uvicorn

from drivers.base import Driver
from drivers.intake import MqttIntake
from drivers.mqtt5 import Mqtt5Driver
from gateway.api.app import create_app
from gateway.api.context import ApiContext, DeviceReads
from gateway.api.headers import allowed_names
from gateway.care.desk import CareDesk
from gateway.clock import FLOOR_SAVE_S, ClockWatch, read_floor, save_floor
from gateway.instruments import Instruments
from gateway.limits import DeviceRateLimit, KeyedRateLimit
from gateway.pipeline.decode import TimeWindow
from gateway.pipeline.process import Processor
from gateway.pipeline.route import Router
from gateway.pipeline.run import Pipeline
from gateway.profiles import load_profiles
from gateway.registry import DeviceRegistry, load_inventory
from gateway.rules import AlarmEngine
from gateway.services import schema as services_schema
from gateway.services.actions import Actions
from gateway.services.catalogue import load_catalogue
from gateway.services.context import ServiceContext
from gateway.services.deadlines import Deadlines
from gateway.services.desk import ServiceDesk
from gateway.services.households import HouseholdRegister
from gateway.services.refusals import Refusals
from gateway.services.relay import RecordRelay
from gateway.settings import Settings
from gateway.sinks.drain import OutboxDrain
from gateway.sinks.influx import InfluxSink
from gateway.sqlite import SqliteThread
from gateway.store.lock import DataDirLock
from gateway.store.maintenance import StoreMaintenance, rollup_delay_ms
from gateway.store.outbox import Outbox
from gateway.store.queries import StoreReader
from gateway.store.writer import StoreWriter
from gateway.stream import StreamHub
from gateway.wear import WearMeter

if TYPE_CHECKING:
    from gateway.uplink.sink import UplinkSink

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 15.0
CLOCK_CHECK_S = 5.0  # how often the wall clock is compared with the monotonic one


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our TaskGroup: the application, not uvicorn, owns the signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Gateway:
    """One running gateway. Build it, `await run()`, call `stop()` to shut down cleanly."""

    def __init__(
        self,
        settings: Settings,
        extra_drivers: list[Driver] | None = None,
        data_lock: DataDirLock | None = None,
    ) -> None:
        """`data_lock`: the data folder's lock when the caller holds it already (the demo, which
        starts its broker there first); otherwise `run()` takes and releases its own."""
        self.settings = settings
        self._own_lock = data_lock is None
        self.data_lock = data_lock or DataDirLock(settings.data_dir)
        self.instruments = Instruments()
        self.profiles = load_profiles(settings.profiles_dir)
        self.inventory = (
            load_inventory(settings.inventory, self.profiles) if settings.inventory is not None else []
        )
        self.registry = DeviceRegistry(
            self.profiles,
            settings.registration,
            settings.registration_max_devices,
            int(settings.registration_idle.total_seconds() * 1000),
        )
        # The gateway's time: the wall clock, kept above the newest time saved in the data folder
        # (a box without a real-time clock boots in 1970), watched for jumps (gateway/clock.py).
        self.clock = ClockWatch(floor_ms=read_floor(settings.data_dir))
        self.alarms = AlarmEngine(self.profiles)
        self.catalogue = load_catalogue(settings.services.catalogue, settings.services.stall_after)
        # services.sqlite3: one connection on one thread, which the desk, the actions, the
        # deadline loop, the relay and the API's reads all call (one writer, so none races).
        self.services = SqliteThread(
            "services", functools.partial(services_schema.connect, settings.services_db_path)
        )
        self.refusals = Refusals(self.instruments)
        self.relay = RecordRelay(self.services)
        service_context = ServiceContext(
            self.services,
            self.catalogue,
            settings.community,
            self.instruments,
            self.refusals,
            HouseholdRegister.load(settings.services.households),
            self.clock,
        )
        self.desk = ServiceDesk(service_context)
        self.hub = StreamHub(
            self.instruments,
            settings.api.stream_queue,
            settings.api.stream_max_subscribers,
            settings.api.stream_max_per_token,
        )
        self.outbox = Outbox(settings.outbox.max_bytes, settings.outbox.when_full)
        self.influx = (
            InfluxSink(settings.influx, settings.community, self.instruments, settings.db_path, self.outbox)
            if settings.influx.enabled
            else None
        )
        self.uplink = (
            _uplink_sink()(
                settings.uplink,
                settings.uplink_client_id,
                settings.community,
                self.instruments,
                settings.db_path,
                self.outbox,
            )
            if settings.uplink.enabled
            else None
        )
        self.sinks: list[OutboxDrain] = [s for s in (self.influx, self.uplink) if s is not None]
        self.writer = StoreWriter(
            settings.db_path,
            self.instruments,
            settings.pipeline.queue_size,
            self.outbox,
            [sink.encode for sink in self.sinks],
            group_commit_s=settings.store.group_commit_ms / 1000,
            dead_letter_max_bytes=settings.store.dead_letter_max_bytes,
        )
        for sink in self.sinks:
            self.writer.on_commit(sink.wake)
        self.reader = StoreReader(settings.db_path, int(settings.store.raw_retention.total_seconds() * 1000))
        # Every 5 minutes: pruning a few rows off the old end costs nothing more done rarely, and
        # roll-ups wait an hour anyway (gateway/store/maintenance.py).
        self.maintenance = StoreMaintenance(
            self.writer,
            settings.store,
            interval_s=300.0,
            rollup_delay_ms=rollup_delay_ms(settings.store),
            clock=self.clock,
        )
        driver = Mqtt5Driver if settings.mqtt.protocol == "5" else _paho_driver()
        self.mqtt: MqttIntake = driver(
            settings.mqtt, settings.mqtt_client_id, self.instruments, settings.pipeline.batch_size
        )
        self.drivers: list[Driver] = [self.mqtt, *(extra_drivers or [])]
        if settings.modbus.devices:
            from drivers.modbus import ModbusDriver  # pymodbus only where Modbus is used

            self.drivers.append(ModbusDriver(settings.modbus, self.instruments))
        window = TimeWindow(
            max_future_ms=int(settings.pipeline.max_future.total_seconds() * 1000),
            max_past_ms=int(settings.pipeline.max_past.total_seconds() * 1000),
        )
        self.processor = Processor(
            self.profiles,
            self.registry,
            self.alarms,
            self.instruments,
            window,
            settings.mqtt.max_payload_bytes,
            DeviceRateLimit(settings.pipeline.device_rate_limit, settings.pipeline.backlog_allowance),
            self.clock,
        )
        self.router = Router(self.writer, self.hub, self.desk, self.relay, self.mqtt.publish)
        self.actions = Actions(service_context, self.relay, self.router.deliver)
        self.deadlines = Deadlines(
            service_context, self.router.deliver, settings.privacy, settings.services.check_interval_s
        )
        self.care = CareDesk(
            settings.care_db_path,
            settings.care,
            self.catalogue,
            self.actions,
            self.services,
            self.registry,
            self.clock,
        )
        self.router.observers.append(self.care.observe)
        if self.uplink is not None:
            from gateway.uplink.commands import DistrictCommands, summaries  # with the uplink only

            commands = DistrictCommands(
                settings.community,
                self.actions,
                self.registry,
                self.profiles,
                self.mqtt.publish,
                self.uplink.send_snapshots,
                self.writer,
                self.router.record,
                int(settings.uplink.command_lifetime.total_seconds() * 1000),
                self.clock,
            )
            self.uplink.serve(functools.partial(summaries, self.services, self.catalogue), commands.handle)
        self.pipeline = Pipeline(
            self.processor,
            self.router,
            self.registry,
            self.instruments,
            settings.pipeline.queue_size,
            settings.pipeline.presence_sweep_s,
        )
        self.api = create_app(
            ApiContext(
                community=settings.community,
                registry=self.registry,
                profiles=self.profiles,
                reader=self.reader,
                hub=self.hub,
                instruments=self.instruments,
                token_digests=settings.auth.digests(),
                write_limit=KeyedRateLimit(settings.auth.write_rate_limit),
                readiness=self.readiness,
                alarms_active=self.alarms.active,
                services=self.services,
                catalogue=self.catalogue,
                actions=self.actions,
                care=self.care,
                open311_keyless_reads=settings.services.open311_keyless_reads,
                device_reads=DeviceReads(settings.privacy.device_read_window.total_seconds()),
                clock=self.clock,
            ),
            max_body_bytes=settings.api.max_body_bytes,
            allowed_hosts=allowed_names(settings.api.allowed_hosts, settings.api.host),
        )
        self.wear = WearMeter(settings.data_dir)
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._server: _EmbeddedServer | None = None
        self._socket: socket.socket | None = None

    @property
    def api_port(self) -> int:
        """The port the API listens on (useful when the settings asked for port 0)."""
        if self._socket is None:
            raise RuntimeError("the API is not bound yet")
        port: int = self._socket.getsockname()[1]
        return port

    def readiness(self) -> dict[str, dict[str, Any]]:
        checks: dict[str, dict[str, Any]] = {
            "broker": {
                "ok": self.mqtt.connected,
                "detail": f"connected to {self.settings.mqtt.url}"
                if self.mqtt.connected
                else (self.mqtt.last_error or f"connecting to {self.settings.mqtt.url}"),
            },
        }
        free = shutil.disk_usage(self.settings.data_dir).free
        low = self.settings.store.min_free_bytes
        store_ok = self.writer.last_error is None and free > low
        checks["local_store"] = {
            "ok": store_ok,
            "detail": self.writer.last_error
            or (
                f"{free // (1024 * 1024)} MiB free"
                if free > low
                else f"only {free // (1024 * 1024)} MiB free in {self.settings.data_dir}"
            ),
        }
        # Information, never a reason to be not ready: how fast this box wears its storage, and
        # whether its wall clock jumped (a box without a real-time clock syncing late).
        checks["disk_writes"] = {"ok": True, "detail": self.wear.summary()}
        checks["clock"] = {"ok": True, "detail": self.clock.summary()}
        if self.influx is not None:
            checks["timeseries"] = {
                "ok": self.influx.healthy,
                "detail": self.influx.last_error or f"writing to {self.settings.influx.url}",
            }
        if self.uplink is not None:
            # Not ready is not down: the outbox keeps what the district has not taken yet.
            checks["uplink"] = {
                "ok": self.uplink.reachable,
                "detail": self.uplink.last_error or f"connected to {self.settings.uplink.url}",
            }
        return checks

    async def _watch_clock(self) -> None:
        """Look for jumps; save the gateway's time as the next run's floor every hour."""
        loop = asyncio.get_running_loop()
        save_at = loop.time()
        while True:
            if loop.time() >= save_at:
                save_floor(self.settings.data_dir, self.clock.now_ms())
                save_at = loop.time() + FLOOR_SAVE_S
            await asyncio.sleep(CLOCK_CHECK_S)
            self.clock.check()

    def stop(self) -> None:
        """Ask the gateway to drain and stop; `run()` returns when it has."""
        self._stop.set()

    async def run(self) -> None:
        self.data_lock.acquire()  # a second gateway on this folder stops here, naming the first
        try:
            await self._run()
        finally:
            if self._own_lock:
                self.data_lock.release()

    async def _run(self) -> None:
        self.registry.restore(await self.writer.open())
        self.registry.apply_inventory(self.inventory)
        await self.services.call(services_schema.version)  # opened and migrated before serving
        await self.care.open()
        self._socket = _bind(self.settings.api.host, self.settings.api.port)
        tls = self.settings.api
        config = uvicorn.Config(
            self.api,
            log_level="warning",
            access_log=False,
            lifespan="off",
            # No WebSocket route (the live stream is SSE): without this uvicorn imports the
            # websockets library to answer upgrades, memory the idle gateway keeps for nothing.
            ws="none",
            # uvicorn's own TLS, for a box without a reverse proxy in front (docs/install.md).
            ssl_certfile=str(tls.tls_certfile) if tls.tls_certfile else None,
            ssl_keyfile=str(tls.tls_keyfile) if tls.tls_keyfile else None,
        )
        self._server = _EmbeddedServer(config)
        try:
            async with asyncio.TaskGroup() as tg:
                background = [
                    tg.create_task(self.writer.run(), name="store-writer"),
                    tg.create_task(self.maintenance.run(), name="store-maintenance"),
                    tg.create_task(self.pipeline.run(), name="pipeline"),
                    tg.create_task(self.deadlines.run(), name="service-deadlines"),
                    tg.create_task(self.care.run(), name="care-desk"),
                    tg.create_task(self._watch_clock(), name="clock-watch"),
                ]
                background.extend(tg.create_task(sink.run(), name=f"{sink.name}-sink") for sink in self.sinks)
                inputs = [
                    tg.create_task(driver.run(self.pipeline), name=f"driver-{driver.name}")
                    for driver in self.drivers
                ]
                api = tg.create_task(self._server.serve(sockets=[self._socket]), name="api")
                self.ready.set()
                log.info(
                    "gateway for community %s running: API on %s://%s:%d",
                    self.settings.community,
                    "https" if tls.tls_certfile else "http",
                    self.settings.api.host,
                    self.api_port,
                )
                await self._stop.wait()
                await self._shutdown(inputs, background, api)
        finally:
            await self._close()
        log.info("gateway for community %s stopped", self.settings.community)

    async def _shutdown(
        self, inputs: list[asyncio.Task[None]], background: list[asyncio.Task[None]], api: asyncio.Task[None]
    ) -> None:
        log.info("stopping: draining the pipeline, the local store and the sinks")
        for driver in self.drivers:
            await driver.stop()
        # Drivers hand over what they already received, then return on their own.
        _, late = await asyncio.wait(inputs, timeout=DRAIN_TIMEOUT_S)
        for task in late:
            task.cancel()
        await asyncio.gather(*inputs, return_exceptions=True)
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                await self.pipeline.drain()
                await self.writer.drain()
                # Last values and last-seen times, saved in bulk only every few minutes while running.
                await self.writer.save_devices(self.registry.all())
                self.registry.newcomers.flush_all()
                for sink in self.sinks:
                    # One that cannot reach its far side keeps its backlog on disk for the next run.
                    if sink.reachable:
                        await sink.drain(DRAIN_TIMEOUT_S)
        except TimeoutError:
            log.warning("drain did not finish within %.0f s; stopping anyway", DRAIN_TIMEOUT_S)
        await self.maintenance.run_once()
        if self._server is not None:
            self._server.should_exit = True
        await asyncio.gather(api, return_exceptions=True)
        for task in background:
            task.cancel()

    async def _close(self) -> None:
        save_floor(self.settings.data_dir, self.clock.now_ms())
        for sink in self.sinks:
            await sink.close()
        await self.care.close()
        self.refusals.flush_all()
        await self.relay.close()
        await self.services.close()
        await self.writer.close()
        await self.reader.close()
        if self._socket is not None:
            self._socket.close()


# Imported when configured: paho (MQTT 3.1.1 driver, the district uplink) is memory a box on the
# default MQTT 5 driver without an uplink does not need.
def _paho_driver() -> type[MqttIntake]:
    from drivers.mqtt import MqttDriver

    return MqttDriver


def _uplink_sink() -> type[UplinkSink]:
    from gateway.uplink.sink import UplinkSink

    return UplinkSink


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it Nagle and delayed ACKs add ~40 ms to every small response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port} ({exc.strerror}): set CGW_API__HOST / CGW_API__PORT"
        ) from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock
