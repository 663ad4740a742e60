"""A box without a real-time clock: the wall clock jumps when NTP syncs. Jumps are seen and told;
presence time-outs keep to the monotonic clock; a boot in 1970 stamps above the floor and accepts
devices' times; alarm durations, service deadlines and retention hold across a jump forward of a
year and back of hours. The clocks here are the test's own: nothing sleeps."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import orjson
import pytest

from gateway.clock import BUILD_FLOOR_MS, ClockJump, ClockWatch, read_floor, save_floor
from gateway.instruments import Instruments
from gateway.models import Batch, RawMessage, Reading
from gateway.pipeline.decode import TimeWindow
from gateway.pipeline.process import Processor
from gateway.presence import PresenceTracker
from gateway.profiles import load_profiles
from gateway.registry import DeviceRegistry
from gateway.rules import AlarmEngine
from gateway.services import schema
from gateway.services.actions import Actions
from gateway.services.catalogue import load_catalogue
from gateway.services.context import ServiceContext
from gateway.services.deadlines import Deadlines
from gateway.services.intake import NewRequest
from gateway.services.refusals import Refusals
from gateway.services.relay import RecordRelay
from gateway.settings import StoreSettings
from gateway.sqlite import SqliteThread
from gateway.store.maintenance import StoreMaintenance
from gateway.store.writer import StoreWriter

YEAR_S = 365 * 86_400


class Clocks:
    """A wall clock and a monotonic clock the test moves; `step` moves the wall clock alone."""

    def __init__(self, wall: float = 1_700_000_000.0) -> None:
        self.wall_s, self.mono_s = wall, 1000.0

    def wall(self) -> float:
        return self.wall_s

    def mono(self) -> float:
        return self.mono_s

    def wall_ms(self) -> int:
        return int(self.wall_s * 1000)

    def tick(self, seconds: float) -> None:
        self.wall_s += seconds
        self.mono_s += seconds

    def step(self, seconds: float) -> None:
        self.wall_s += seconds


def test_steady_clocks_are_no_jump() -> None:
    clocks = Clocks()
    watch = ClockWatch(clocks.wall, clocks.mono)
    for _ in range(100):
        clocks.tick(5)
        clocks.step(0.001)  # an NTP slew is a rate change, not a step
        assert watch.check() is None
    assert watch.jumps == 0 and "no jump" in watch.summary()


@pytest.mark.parametrize(
    ("step_s", "said"), [(3 * 3600, "forward by 3.0 h"), (-YEAR_S, "back by 365.0 days")]
)
def test_a_jump_is_seen_logged_and_summarised(
    caplog: pytest.LogCaptureFixture, step_s: float, said: str
) -> None:
    clocks = Clocks()
    watch = ClockWatch(clocks.wall, clocks.mono)
    clocks.tick(5)
    clocks.step(step_s)
    with caplog.at_level(logging.WARNING, logger="gateway.clock"):
        jump = watch.check()
    assert jump is not None and abs(jump.by_ms - step_s * 1000) < 1
    assert any("clock jumped" in r.getMessage() for r in caplog.records)
    assert said in watch.summary() and watch.jumps == 1
    clocks.tick(5)
    assert watch.check() is None  # after the jump, steady again


def presence(clocks: Clocks) -> tuple[PresenceTracker, DeviceRegistry, float]:
    profiles = load_profiles()
    registry = DeviceRegistry(profiles, "open")
    tracker = PresenceTracker(registry, profiles, clocks.mono)
    return tracker, registry, profiles.generic.heartbeat_timeout_s


@pytest.mark.parametrize("step_s", [YEAR_S, -YEAR_S, 6 * 3600, -6 * 3600])
def test_a_clock_jump_neither_drops_nor_holds_a_device(step_s: float) -> None:
    clocks = Clocks()
    tracker, registry, timeout_s = presence(clocks)
    device = registry.resolve("jumpy-1", clocks.wall_ms())
    assert tracker.seen(device, clocks.wall_ms(), "message") is not None  # online
    clocks.step(step_s)  # NTP syncs: the wall clock moves by hours or a year
    clocks.tick(timeout_s / 2)
    assert tracker.sweep(clocks.wall_ms()) == []  # a forward jump does not drop it
    clocks.tick(timeout_s / 2 + 1)
    changes = tracker.sweep(clocks.wall_ms())  # a backward jump does not hold it online
    assert [(c.device_id, c.online, c.reason) for c in changes] == [("jumpy-1", False, "timeout")]
    assert changes[0].ts_ms == clocks.wall_ms()  # stamped with the (now corrected) wall clock


def test_a_device_from_an_earlier_run_times_out_at_most_one_timeout_after_start() -> None:
    clocks = Clocks()
    tracker, registry, timeout_s = presence(clocks)
    device = registry.resolve("restored-1", clocks.wall_ms())
    device.online, device.last_seen_ms = True, clocks.wall_ms() + int(YEAR_S * 1000)  # seen "in the future"
    assert tracker.sweep(clocks.wall_ms()) == []
    clocks.tick(timeout_s + 1)
    assert [c.device_id for c in tracker.sweep(clocks.wall_ms())] == ["restored-1"]


# -- a boot without a set clock, and what keeps time of its own ---------------------------------

FLOOR_S = 1_790_000_000.0  # the newest time the gateway recorded before the box went off
REAL_S = FLOOR_S + 3 * 86_400  # the real time at the next boot: the box was off three days


def boot_in_1970() -> tuple[Clocks, ClockWatch]:
    """A box whose wall clock starts at 1970; the kernel does not say NTP synchronised it."""
    clocks = Clocks(wall=30.0)
    return clocks, ClockWatch(clocks.wall, clocks.mono, floor_ms=int(FLOOR_S * 1000), synced=lambda: False)


def ntp_sync(clocks: Clocks) -> None:
    clocks.step(REAL_S + (clocks.mono_s - 1000.0) - clocks.wall_s)


def test_a_boot_in_1970_stamps_above_the_floor_until_ntp_sets_the_clock() -> None:
    clocks, watch = boot_in_1970()
    assert not watch.is_set and watch.was_unset and watch.summary().startswith("NOT SET")
    assert watch.now_ms() == int(FLOOR_S * 1000)  # never earlier than what is already recorded
    clocks.tick(90)
    assert watch.check() is None  # the estimate runs with the monotonic clock: no jump
    assert watch.now_ms() == int((FLOOR_S + 90) * 1000)
    assert clocks.wall_ms() + watch.correction_ms() == watch.now_ms()  # a driver's stamp, corrected
    told: list[ClockJump] = []
    watch.on_jump(told.append)
    ntp_sync(clocks)
    jump = watch.check()
    assert watch.is_set and watch.now_ms() == clocks.wall_ms() and watch.correction_ms() == 0
    # The jump is the estimate's error (the three days the box was off), not the 56 years the
    # wall clock moved; stamps made in [from_ms, before_ms] were off by it.
    assert jump is not None and told == [jump]
    assert jump.by_ms == 3 * 86_400_000 and jump.from_ms == int(FLOOR_S * 1000)
    assert jump.before_ms == int((FLOOR_S + 90) * 1000)
    assert watch.summary().startswith("set; the clock jumped forward by 3.0 days")
    clocks.step(-YEAR_S)  # once set, a later step back is a jump, not "unset" again
    assert watch.is_set and watch.check() is not None


def test_the_floor_is_saved_and_a_synchronised_kernel_overrides_it(tmp_path: Path) -> None:
    assert read_floor(tmp_path) == BUILD_FLOOR_MS  # never ran here: this code's own date
    save_floor(tmp_path, int(FLOOR_S * 1000))
    assert read_floor(tmp_path) == int(FLOOR_S * 1000)
    save_floor(tmp_path, 5)  # an older time does not lower it below the build's
    assert read_floor(tmp_path) == BUILD_FLOOR_MS
    clocks = Clocks(wall=30.0)
    synced = ClockWatch(clocks.wall, clocks.mono, floor_ms=int(FLOOR_S * 1000), synced=lambda: True)
    assert synced.is_set  # the floor was wrong (saved by a clock that ran ahead): NTP says so


def processor(watch: ClockWatch) -> Processor:
    profiles = load_profiles()
    window = TimeWindow(max_future_ms=600_000, max_past_ms=7 * 86_400_000)
    return Processor(
        profiles,
        DeviceRegistry(profiles, "open"),
        AlarmEngine(profiles),
        Instruments(),
        window,
        65_536,
        clock=watch,
    )


def message(clocks: Clocks, device: str, channel: str, body: Mapping[str, object]) -> RawMessage:
    return (f"cgw/v1/{device}/{channel}", orjson.dumps(body), clocks.wall_ms())  # the driver's stamp


def test_devices_times_are_accepted_while_the_clock_is_not_set() -> None:
    clocks, watch = boot_in_1970()
    proc = processor(watch)
    clocks.tick(60)
    right = int(REAL_S * 1000) + 60_000  # a device with a good clock: days ahead of the estimate
    out = proc.process(
        [
            message(clocks, "aq-1", "telemetry", {"ts": right, "metrics": {"pm25": 10}}),
            message(clocks, "aq-2", "telemetry", {"metrics": {"pm25": 10}}),
        ]
    )
    assert out.dead_letters == []  # nothing refused as "from the future": nothing lost
    assert [(r.ts_ms, r.stamped_here) for r in out.readings] == [
        (right, False),
        (watch.now_ms(), True),  # the gateway's own stamp: its estimate, not 1970
    ]
    ntp_sync(clocks)
    clocks.tick(60)
    ahead = clocks.wall_ms() + 3 * 86_400_000  # once set, the window holds again
    out = proc.process([message(clocks, "aq-1", "telemetry", {"ts": ahead, "metrics": {"pm25": 10}})])
    assert out.readings == [] and "in the future" in out.dead_letters[0].reason


@pytest.mark.parametrize("step_s", [YEAR_S, -6 * 3600])
def test_an_alarm_duration_is_timed_across_a_jump(step_s: float) -> None:
    """pm25_high: above 75 for 5 min. Readings without `ts` are stamped by the gateway."""
    clocks = Clocks()
    watch = ClockWatch(clocks.wall, clocks.mono)
    proc = processor(watch)
    polluted = {"metrics": {"pm25": 100}}

    def alarms() -> list[str]:
        out = proc.process([message(clocks, "aq-1", "telemetry", polluted)])
        assert len(out.readings) == 1  # never ignored as "late" after a step back
        return [e.type for e in out.events]

    proc.process([message(clocks, "aq-1", "status", {"state": "online", "kind": "air_quality"})])
    assert alarms() == []
    clocks.tick(60)
    clocks.step(step_s)
    assert alarms() == []  # held for a minute, whatever the wall clock says
    clocks.tick(3 * 60)
    assert alarms() == []
    clocks.tick(60)
    assert alarms() == ["pm25_high"]  # five minutes of real time: raised, once


@pytest.mark.parametrize("step_s", [YEAR_S, -6 * 3600])
async def test_a_deadline_is_kept_across_a_jump(tmp_path: Path, step_s: float) -> None:
    """elderly.emergency_followup is due in 30 min: overdue then, not at once nor hours late."""
    clocks = Clocks()
    watch = ClockWatch(clocks.wall, clocks.mono)
    catalogue = load_catalogue()
    db = SqliteThread("services", lambda: schema.connect(tmp_path / "services.sqlite3"))
    instruments = Instruments()
    services = ServiceContext(db, catalogue, "c", instruments, Refusals(instruments), clock=watch)

    async def nowhere(_: object) -> None:
        return None

    actions = Actions(services, RecordRelay(db), nowhere)
    deadlines = Deadlines(services, nowhere)
    try:
        service = catalogue.get("elderly.emergency_followup")
        assert service is not None
        await actions.file(NewRequest(service, "a fall in 3-2-201", watch.now_ms(), "open311"), "test")
        clocks.tick(60)
        clocks.step(step_s)
        watch.check()
        assert (await deadlines.check(watch.now_ms())).events == []  # not overdue at once
        clocks.tick(28 * 60)
        assert (await deadlines.check(watch.now_ms())).events == []
        clocks.tick(2 * 60)
        overdue = await deadlines.check(watch.now_ms())
        assert [e.type for e in overdue.events] == ["request_overdue"]  # 31 min: due, not hours late
    finally:
        await db.close()


@pytest.mark.parametrize("step_s", [YEAR_S, -6 * 3600])
async def test_retention_deletes_nothing_at_once_and_keeps_nothing_for_ever(
    tmp_path: Path, step_s: float
) -> None:
    clocks = Clocks()
    watch = ClockWatch(clocks.wall, clocks.mono)
    writer = StoreWriter(tmp_path / "cgw.sqlite3", Instruments())
    await writer.open()
    settings = StoreSettings(raw_retention=timedelta(days=2))
    maintenance = StoreMaintenance(writer, settings, clock=watch)

    async def kept() -> int:
        return int(
            await writer.call(lambda conn: conn.execute("SELECT count(*) FROM telemetry").fetchone()[0])
        )

    try:
        await writer._write_with_retry(
            [Batch(readings=[Reading("d1", "generic", watch.now_ms(), {"v": 1.0})])]
        )
        clocks.tick(60)
        clocks.step(step_s)
        await maintenance.run_once()
        assert await kept() == 1  # a year forward deletes nothing at once
        clocks.tick(0.9 * 86_400)
        await maintenance.run_once()
        assert await kept() == 1  # and keeps at least half the retention in real time
        clocks.tick(1.1 * 86_400 + max(0.0, -step_s))
        await maintenance.run_once()
        assert await kept() == 0  # gone by its retention (plus a step back): not kept for ever
    finally:
        await writer.close()


def test_the_floor_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        save_floor(tmp_path, int(FLOOR_S * 1000))
    finally:
        os.umask(old)
    assert (tmp_path / "clock-floor").stat().st_mode & 0o777 == 0o600


def test_a_jump_forward_forgets_no_self_registered_device_at_once() -> None:
    clocks = Clocks()
    watch = ClockWatch(clocks.wall, clocks.mono)
    profiles = load_profiles()
    window = TimeWindow(max_future_ms=600_000, max_past_ms=7 * 86_400_000)
    registry = DeviceRegistry(profiles, "open", idle_ms=30 * 86_400_000)  # registration_idle: 30 d
    proc = Processor(profiles, registry, AlarmEngine(profiles), Instruments(), window, 65_536, clock=watch)
    proc.process([message(clocks, "self-1", "telemetry", {"metrics": {"v": 1}})])
    clocks.tick(60)
    clocks.step(YEAR_S)
    assert proc.sweep().forgotten == []  # a year on the wall clock, a minute in real time
    clocks.tick(31 * 86_400)
    assert proc.sweep().forgotten == ["self-1"]  # silent for a month of real time: forgotten


def test_cgw_doctor_says_the_clock_is_not_set_and_what_to_do(tmp_path: Path) -> None:
    from gateway.doctor import _clock_floor

    save_floor(tmp_path, int(FLOOR_S * 1000))
    boot = _clock_floor(tmp_path, now=lambda: 30_000, synced=lambda: False)  # 1970
    assert not boot.ok and not boot.blocking  # a WARN: the gateway runs on its estimate
    assert "not set" in boot.detail and "clock-floor" in boot.detail
    assert _clock_floor(tmp_path, now=lambda: 30_000, synced=lambda: True).ok  # NTP says it is right
    assert _clock_floor(tmp_path, now=lambda: int(REAL_S * 1000), synced=lambda: False).ok


async def test_a_district_command_is_not_refused_while_the_clock_is_not_set(tmp_path: Path) -> None:
    """The district's `expires_ms` is in real time: days ahead of a box booted in 1970's estimate."""
    from gateway.services import schema as services_schema
    from gateway.services.actions import Actions
    from gateway.services.context import ServiceContext
    from gateway.services.refusals import Refusals
    from gateway.services.relay import RecordRelay
    from gateway.sqlite import SqliteThread
    from gateway.uplink.commands import DistrictCommands

    clocks, watch = boot_in_1970()
    profiles = load_profiles()
    writer = StoreWriter(tmp_path / "cgw.sqlite3", Instruments())
    instruments = Instruments()
    services = SqliteThread("services", lambda: services_schema.connect(tmp_path / "services.sqlite3"))

    async def nowhere(_: object) -> None:
        return None

    context = ServiceContext(services, load_catalogue(), "c", instruments, Refusals(instruments), clock=watch)
    actions = Actions(context, RecordRelay(services), nowhere)

    async def no_snapshot() -> int:
        return 0

    commands = DistrictCommands(
        "c",
        actions,
        DeviceRegistry(profiles, "open"),
        profiles,
        lambda topic, payload: None,
        no_snapshot,
        writer,
        nowhere,
        3_600_000,
        watch,
    )
    await writer.open()
    try:
        clocks.tick(60)
        real_ms = int(REAL_S * 1000) + 60_000
        ping = {"id": "p-1", "action": "ping", "expires_ms": real_ms + 60_000}
        reply = await commands.handle(orjson.dumps(ping))
        assert reply["ok"] and reply["result"]["ts_ms"] == watch.now_ms()  # the estimate, not 1970
        ntp_sync(clocks)
        ahead = {"id": "p-2", "action": "ping", "expires_ms": clocks.wall_ms() + 3 * 86_400_000}
        reply = await commands.handle(orjson.dumps(ahead))
        assert not reply["ok"] and "ahead" in reply["error"]  # once set, the lifetime holds again
    finally:
        await services.close()
        await writer.close()
