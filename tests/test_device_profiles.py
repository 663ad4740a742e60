"""Device profiles (YAML data) and the alarm rules they drive."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gateway.models import DeviceEvent, Reading, Severity
from gateway.profiles import ProfileError, load_profiles
from gateway.rules import AlarmEngine
from simulators.community import build_community
from simulators.signals import signal_for

PROFILES = load_profiles()
KINDS = {
    "air_quality",
    "smoke_detector",
    "water_leak",
    "elevator",
    "door_access",
    "energy_meter",
    "water_meter",
    "emergency_button",
    "footfall_counter",
    "service_terminal",
    "generic",
}
MIN = 60_000


def test_every_required_kind_is_shipped_with_metrics_and_a_heartbeat() -> None:
    assert set(PROFILES.kinds) >= KINDS
    for kind in KINDS - {"generic"}:
        profile = PROFILES.get(kind)
        assert profile is not None and profile.metrics, kind
        assert profile.heartbeat_timeout_s > 0
        for name, spec in profile.metrics.items():
            assert spec.type in ("gauge", "counter") and spec.unit is not None, (kind, name)


def test_validate_metrics_accepts_good_values_and_names_each_refusal() -> None:
    aq = PROFILES.get("air_quality")
    assert aq is not None
    assert aq.validate_metrics({"pm25": 12, "temp_c": -3.5}) == {"pm25": 12.0, "temp_c": -3.5}
    for raw, code in [
        ({}, "schema"),
        ([1], "schema"),
        ({"pm25": "high"}, "schema"),
        ({"pm25": math.nan}, "schema"),
        ({"pm25": math.inf}, "schema"),
        ({"pm99": 1}, "unknown_metric"),
        ({"pm25": -1}, "out_of_range"),
        ({"humidity_pct": 101}, "out_of_range"),
    ]:
        with pytest.raises(ValueError, match=rf"^{code}: "):
            aq.validate_metrics(raw)
    # The generic profile takes any well-named metric.
    assert PROFILES.generic.validate_metrics({"anything_1": True}) == {"anything_1": 1.0}


def test_smoke_and_emergency_events_are_always_critical() -> None:
    for kind in ("smoke_detector", "emergency_button"):
        profile = PROFILES.get(kind)
        assert profile is not None
        assert profile.event_severity("anything", "info") == "critical"
        assert profile.event_severity("anything", None) == "critical"
    elevator = PROFILES.get("elevator")
    assert elevator is not None and elevator.event_severity("fault", "info") == "warning"
    assert elevator.event_severity("fault", "critical") == "critical"  # the stronger one wins


def test_a_broken_profile_names_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("kind: bad\nmetrics:\n  x: {unit: m, min: 5, max: 1}\n")
    with pytest.raises(ProfileError, match=r"bad.yaml line 3: metrics.x: min 5.0 is above max 1.0"):
        load_profiles(tmp_path)
    (tmp_path / "bad.yaml").write_text("kind: bad\nrules:\n  - {id: r, metric: nope, above: 1}\n")
    with pytest.raises(ProfileError, match=r"bad.yaml line 1: .*'nope' is not a metric"):
        load_profiles(tmp_path)


def test_an_installer_profile_adds_a_kind(tmp_path: Path) -> None:
    (tmp_path / "noise.yaml").write_text(
        "kind: noise_meter\nheartbeat_timeout: 2m\nmetrics:\n  db: {unit: dB, min: 0, max: 140}\n"
    )
    profiles = load_profiles(tmp_path)
    noise = profiles.get("noise_meter")
    assert noise is not None and noise.heartbeat_timeout_s == 120 and "air_quality" in profiles


def reading(ts_ms: int, kind: str = "air_quality", **metrics: float) -> Reading:
    return Reading("dev-1", kind, ts_ms, dict(metrics), None, "3")


def test_pm25_above_75_for_5_minutes_raises_a_warning_once_with_hysteresis() -> None:
    engine = AlarmEngine(PROFILES)
    assert engine.observe(reading(0, pm25=80)) == []
    assert engine.observe(reading(4 * MIN, pm25=90)) == []  # not yet 5 minutes
    [raised] = engine.observe(reading(5 * MIN, pm25=85))
    assert (raised.type, raised.severity, raised.source) == ("pm25_high", "warning", "rule")
    assert raised.data["since_ms"] == 0 and engine.active("dev-1") == ["pm25_high"]
    assert engine.observe(reading(6 * MIN, pm25=95)) == []  # raised once
    assert engine.observe(reading(7 * MIN, pm25=70)) == []  # below 75 but above the clear level 60
    [cleared] = engine.observe(reading(8 * MIN, pm25=50))
    assert (cleared.type, cleared.severity) == ("pm25_high_cleared", "info")
    assert engine.active("dev-1") == []


def test_a_dip_restarts_the_duration_and_late_readings_do_not_move_state() -> None:
    engine = AlarmEngine(PROFILES)
    engine.observe(reading(0, pm25=80))
    engine.observe(reading(3 * MIN, pm25=40))  # the condition broke
    assert engine.observe(reading(6 * MIN, pm25=80)) == []
    assert engine.observe(reading(2 * MIN, pm25=99)) == []  # older than the newest: ignored
    assert engine.observe(reading(10 * MIN, pm25=80)) == []
    assert [e.type for e in engine.observe(reading(11 * MIN, pm25=80))] == ["pm25_high"]


def test_a_counter_going_backwards_is_flagged() -> None:
    engine = AlarmEngine(PROFILES)
    assert engine.observe(reading(0, "energy_meter", energy_kwh=100)) == []
    assert engine.observe(reading(MIN, "energy_meter", energy_kwh=101)) == []
    [reset] = engine.observe(reading(2 * MIN, "energy_meter", energy_kwh=3))
    assert (reset.type, reset.severity) == ("counter_reset", "warning")
    assert reset.data == {"metric": "energy_kwh", "previous": 101.0, "value": 3.0}


def test_forget_drops_a_devices_state() -> None:
    engine = AlarmEngine(PROFILES)
    engine.observe(reading(0, pm25=80))
    engine.observe(reading(5 * MIN, pm25=80))
    assert engine.active("dev-1") == ["pm25_high"]
    engine.forget("dev-1")
    assert engine.active("dev-1") == []


def press(ts_ms: int, severity: Severity = "critical") -> DeviceEvent:
    return DeviceEvent(
        "dev-1", "emergency_button", ts_ms, "emergency_press", severity, "pressed", {}, "device", "3"
    )


def alarms(events: list[DeviceEvent]) -> list[str]:
    return [e.type for e in events if e.alarm]


def test_one_emergency_press_is_one_critical_alarm() -> None:
    """The simulated button reports a press both ways (its event and `pressed` = 1), as real
    ones do: one alarm to acknowledge, whichever arrives first."""
    button = next(d for d in build_community("sunrise", 42, 1, 1).devices if d.kind == "emergency_button")
    signal = signal_for(button, seed=42)
    t = 0.0
    while True:  # until the simulated resident presses it
        metrics, events = signal.step(t)
        if events:
            break
        t += 30
    engine = AlarmEngine(PROFILES)
    [event] = events
    recorded = [
        engine.reported(
            DeviceEvent(
                button.device_id, button.kind, 1000, event["type"], event["severity"], "", {}, "device"
            )
        ),
        *engine.observe(Reading(button.device_id, button.kind, 1000, metrics, 1, "1")),
    ]
    assert alarms(recorded) == ["emergency_press"] and recorded[0].severity == "critical"
    # Released: the rule clears (information), and the next press is an alarm again.
    [cleared] = engine.observe(Reading(button.device_id, button.kind, 70_000, {"pressed": 0.0}, 2, "1"))
    assert (cleared.type, cleared.severity) == ("emergency_pressed_cleared", "info")
    assert engine.reported(press(80_000)).severity == "critical"


def test_a_press_seen_first_as_the_metric_makes_the_event_information() -> None:
    engine = AlarmEngine(PROFILES)
    [raised] = engine.observe(reading(0, "emergency_button", pressed=1))
    assert (raised.type, raised.severity) == ("emergency_pressed", "critical")
    late = engine.reported(press(10))
    assert late.severity == "info" and late.data["alarm"] == "emergency_pressed"
    # A button that reports only events: each press is its own alarm.
    engine = AlarmEngine(PROFILES)
    assert [engine.reported(press(t)).severity for t in (0, MIN, 2 * MIN)] == ["critical"] * 3
