"""Believable, seeded signals per device kind, driven by simulated time.

Each model keeps its own state (counters, episodes, faults) and returns the metrics of one
reading plus any event a rare happening produces (smoke, emergency press, elevator fault,
leak, forced door). Rates are per simulated hour, so `speed` runs days of life in minutes.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, field
from typing import Any

from simulators.community import SimDevice

Event = dict[str, Any]


def hour_of_day(sim_s: float) -> float:
    return (sim_s / 3600.0) % 24.0


def daily(sim_s: float, peak_hour: float) -> float:
    """A smooth daily cycle in [0, 1], highest at `peak_hour`."""
    return 0.5 + 0.5 * math.cos((hour_of_day(sim_s) - peak_hour) / 24.0 * 2 * math.pi)


def commute(sim_s: float) -> float:
    """Morning and evening peaks (7-9h and 18-21h) in [0, 1]."""
    h = hour_of_day(sim_s)
    return max(math.exp(-((h - 8.0) ** 2) / 1.5), math.exp(-((h - 19.5) ** 2) / 3.0))


@dataclass
class Signal:
    """Base: a per-device random source and the probability helper."""

    device: SimDevice
    seed: int
    rng: random.Random = field(init=False)
    last_sim_s: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed ^ zlib.crc32(self.device.device_id.encode()))

    def chance(self, per_hour: float, dt_s: float) -> bool:
        return self.rng.random() < 1 - math.exp(-per_hour * dt_s / 3600.0)

    def step(self, sim_s: float) -> tuple[dict[str, float], list[Event]]:
        dt = 0.0 if self.last_sim_s is None else max(0.0, sim_s - self.last_sim_s)
        self.last_sim_s = sim_s
        return self.sample(sim_s, dt)

    def sample(self, sim_s: float, dt: float) -> tuple[dict[str, float], list[Event]]:
        raise NotImplementedError


@dataclass
class AirQuality(Signal):
    episode_until: float = 0.0
    episode_level: float = 0.0

    def sample(self, sim_s: float, dt: float) -> tuple[dict[str, float], list[Event]]:
        if sim_s >= self.episode_until and self.chance(0.08, dt):
            self.episode_until = sim_s + self.rng.uniform(15, 60) * 60
            self.episode_level = self.rng.uniform(85, 160)
        base = 12 + 18 * daily(sim_s, 8.5) + self.rng.gauss(0, 3)
        pm25 = self.episode_level + self.rng.gauss(0, 5) if sim_s < self.episode_until else base
        pm25 = max(1.0, pm25)
        temp = 18 + 9 * daily(sim_s, 15) + self.rng.gauss(0, 0.3)
        return {
            "pm25": round(pm25, 1),
            "pm10": round(pm25 * self.rng.uniform(1.3, 1.7), 1),
            "co2_ppm": round(420 + 900 * daily(sim_s, 21) + self.rng.gauss(0, 30)),
            "temp_c": round(temp, 2),
            "humidity_pct": round(min(95, max(25, 55 + 15 * daily(sim_s, 5) + self.rng.gauss(0, 2))), 1),
        }, []


@dataclass
class BatteryAlarm(Signal):
    """A battery-powered detector or button whose alarm comes now and then and lasts a while."""

    alarm_until: float = 0.0
    battery: float = 90.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.battery = self.device.battery or 90.0

    drain_per_hour: float = 0.01  # battery points

    def alarm(
        self,
        sim_s: float,
        dt: float,
        per_hour: float,
        minutes: tuple[float, float] | float,
        type_: str,
        message: str,
    ) -> tuple[bool, list[Event]]:
        """Whether the alarm is on at `sim_s` (it lasts `minutes`, or a random span within them),
        and its critical event when it has just come; the battery drains meanwhile."""
        events: list[Event] = []
        if sim_s >= self.alarm_until and self.chance(per_hour, dt):
            lasts = minutes if isinstance(minutes, float) else self.rng.uniform(*minutes)
            self.alarm_until = sim_s + lasts * 60
            events.append({"type": type_, "severity": "critical", "message": message})
        self.battery = max(5.0, self.battery - dt / 3600 * self.drain_per_hour)
        return sim_s < self.alarm_until, events


@dataclass
class Smoke(BatteryAlarm):
    def sample(self, sim_s: float, dt: float) -> tuple[dict[str, float], list[Event]]:
        message = f"smoke detected on floor {self.device.floor}"
        smoking, events = self.alarm(sim_s, dt, 0.004, (3, 15), "smoke_alarm", message)
        return {
            "smoke": 1.0 if smoking else 0.0,
            "temp_c": round(21 + 4 * daily(sim_s, 15) + (12 if smoking else 0) + self.rng.gauss(0, 0.3), 1),
            "battery_pct": round(self.battery, 1),
        }, events


@dataclass
class Leak(BatteryAlarm):
    def sample(self, sim_s: float, dt: float) -> tuple[dict[str, float], list[Event]]:
        message = f"water detected in building {self.device.building}"
        leaking, events = self.alarm(sim_s, dt, 0.003, (20, 90), "water_leak", message)
        return {
            "leak": 1.0 if leaking else 0.0,
            "temp_c": round(16 + 3 * daily(sim_s, 15) + self.rng.gauss(0, 0.2), 1),
            "battery_pct": round(self.battery, 1),
        }, events


@dataclass
class EmergencyButton(BatteryAlarm):
    drain_per_hour: float = 0.005

    def sample(self, sim_s: float, dt: float) -> tuple[dict[str, float], list[Event]]:
        message = f"emergency button pressed in unit {self.device.unit}"
        pressed, events = self.alarm(sim_s, dt, 0.01, 1.0, "emergency_press", message)
        return {"pressed": 1.0 if pressed else 0.0, "battery_pct": round(self.battery, 1)}, events


@dataclass
class Elevator(Signal):
    floor: int = 1
    trips: float = 0.0
    fault_until: float = 0.0
    fault_code: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.trips = float(self.rng.randint(10_000, 90_000))

    def sample(self, sim_s: float, dt: float) -> tuple[dict[str, float], list[Event]]:
        events: list[Event] = []
        if sim_s >= self.fault_until:
            self.fault_code = 0
            if self.chance(0.02, dt):
                self.fault_until = sim_s + self.rng.uniform(5, 40) * 60
                self.fault_code = self.rng.randint(1, 20)
                events.append(
                    {
                        "type": "fault",
                        "severity": "warning",
                        "data": {"code": self.fault_code},
                        "message": f"controller fault {self.fault_code}",
                    }
                )
        busy = 0.15 + 0.8 * commute(sim_s)
        running = 0.0
        door = 0.0
        if self.fault_code == 0:
            trips = self.rng.random() < busy
            if trips:
                running = 1.0 if self.rng.random() < 0.6 else 0.0
                door = 1.0 - running
                self.floor = self.rng.randint(1, max(1, self.device.floors))
                self.trips += max(1, round(busy * dt / 30))
        return {
            "floor": float(self.floor),
            "running": running,
            "door_open": door,
            "load_kg": round(self.rng.uniform(0, 450) * running, 1),
            "trips_total": self.trips,
            "fault_code": float(self.fault_code),
        }, events


@dataclass
class Door(Signal):
    entries: float = 0.0
    denied: float = 0.0

    def sample(self, sim_s: float, dt: float) -> tuple[dict[str, float], list[Event]]:
        events: list[Event] = []
        rate = (2 + 40 * commute(sim_s)) * dt / 3600
        self.entries += self.rng.randint(0, max(0, round(rate * 2)))
        if self.rng.random() < 0.05:
            self.denied += 1
        if self.chance(0.002, dt):
            events.append({"type": "forced_open", "severity": "warning", "message": "door forced open"})
        return {
            "door_open": 1.0 if self.rng.random() < 0.1 + 0.3 * commute(sim_s) else 0.0,
            "entries_total": self.entries,
            "denied_total": self.denied,
        }, events


@dataclass
class EnergyMeter(Signal):
    energy: float = 0.0
    sag_until: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.energy = round(self.rng.uniform(1e4, 9e4), 1)

    def sample(self, sim_s: float, dt: float) -> tuple[dict[str, float], list[Event]]:
        power = 2000 + 38000 * max(daily(sim_s, 20), 0.6 * commute(sim_s)) + self.rng.gauss(0, 500)
        power = max(500.0, power)
        self.energy += power * dt / 3600 / 1000
        if sim_s >= self.sag_until and self.chance(0.01, dt):
            self.sag_until = sim_s + self.rng.uniform(2, 10) * 60
        voltage = self.rng.uniform(188, 196) if sim_s < self.sag_until else 220 + self.rng.gauss(0, 2.5)
        return {
            "energy_kwh": round(self.energy, 3),
            "power_w": round(power, 1),
            "voltage_v": round(voltage, 1),
            "current_a": round(power / voltage / 3, 2),
        }, []


@dataclass
class WaterMeter(Signal):
    volume: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.volume = round(self.rng.uniform(1e3, 9e3), 3)

    def sample(self, sim_s: float, dt: float) -> tuple[dict[str, float], list[Event]]:
        flow = max(0.0, 5 + 150 * commute(sim_s) + self.rng.gauss(0, 4))
        self.volume += flow * dt / 60 / 1000
        return {"volume_m3": round(self.volume, 4), "flow_lpm": round(flow, 2)}, []


@dataclass
class Footfall(Signal):
    visitors: float = 0.0

    def sample(self, sim_s: float, dt: float) -> tuple[dict[str, float], list[Event]]:
        self.visitors += self.rng.randint(0, max(0, round((5 + 200 * commute(sim_s)) * dt / 3600 * 2)))
        return {
            "visitors_total": self.visitors,
            "occupancy": float(round(10 + 250 * daily(sim_s, 19) * self.rng.uniform(0.8, 1.0))),
        }, []


@dataclass
class Terminal(Signal):
    sessions: float = 0.0

    def sample(self, sim_s: float, dt: float) -> tuple[dict[str, float], list[Event]]:
        open_hours = 8 <= hour_of_day(sim_s) < 20
        load = (0.3 + daily(sim_s, 10)) if open_hours else 0.0
        self.sessions += self.rng.randint(0, max(0, round(30 * load * dt / 3600 * 2)))
        return {
            "sessions_total": self.sessions,
            "queue_length": float(self.rng.randint(0, round(12 * load))),
            "cpu_temp_c": round(42 + 15 * load + self.rng.gauss(0, 1), 1),
        }, []


MODELS: dict[str, type[Signal]] = {
    "air_quality": AirQuality,
    "smoke_detector": Smoke,
    "water_leak": Leak,
    "emergency_button": EmergencyButton,
    "elevator": Elevator,
    "door_access": Door,
    "energy_meter": EnergyMeter,
    "water_meter": WaterMeter,
    "footfall_counter": Footfall,
    "service_terminal": Terminal,
}


def signal_for(device: SimDevice, seed: int) -> Signal:
    return MODELS[device.kind](device, seed)
