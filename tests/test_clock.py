"""A box without a real-time clock: the wall clock jumps when NTP syncs. Jumps are seen and told,
and presence time-outs keep to the monotonic clock. The clocks here are the test's own."""

from __future__ import annotations

import logging

import pytest

from gateway.clock import ClockWatch
from gateway.presence import PresenceTracker
from gateway.profiles import load_profiles
from gateway.registry import DeviceRegistry

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
    assert any("wall clock jumped" in r.getMessage() for r in caplog.records)
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
