"""The simulated community's layout: buildings, floors and the devices in them, from a seed.

Per floor: air quality, smoke, water leak, emergency button and door access; per building: two
elevators, an energy meter, a water meter and a footfall counter; plus three self-service
terminals in the community service station. Six buildings of six floors make 213 devices.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STATION = "station"
TERMINALS = 3

# Real seconds between readings, before the simulation's interval scale; all well below the
# profiles' heartbeat timeouts (120 s and more).
INTERVALS_S = {
    "air_quality": 10.0,
    "smoke_detector": 30.0,
    "water_leak": 30.0,
    "emergency_button": 30.0,
    "door_access": 15.0,
    "elevator": 5.0,
    "energy_meter": 10.0,
    "water_meter": 10.0,
    "footfall_counter": 15.0,
    "service_terminal": 10.0,
}
_PER_FLOOR = (
    ("aq", "air_quality"),
    ("smoke", "smoke_detector"),
    ("leak", "water_leak"),
    ("sos", "emergency_button"),
    ("door", "door_access"),
)


@dataclass(frozen=True, slots=True)
class SimDevice:
    device_id: str
    kind: str
    building: str
    floor: int | None
    unit: str | None
    fw: str
    battery: float | None
    interval_s: float
    floors: int  # of its building, for elevators

    @property
    def location(self) -> dict[str, Any]:
        loc: dict[str, Any] = {"building": self.building}
        if self.floor is not None:
            loc["floor"] = self.floor
        if self.unit is not None:
            loc["unit"] = self.unit
        return loc


@dataclass(frozen=True)
class Community:
    name: str
    seed: int
    devices: list[SimDevice] = field(default_factory=list)

    def inventory(self) -> list[dict[str, Any]]:
        """The installer-inventory entries for every device."""
        return [{"device_id": d.device_id, "kind": d.kind, "location": d.location} for d in self.devices]

    def write_inventory(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        header = f"# Inventory of the simulated community {self.name!r} (seed {self.seed})\n"
        path.write_text(
            header + yaml.safe_dump({"devices": self.inventory()}, sort_keys=False, allow_unicode=True)
        )


def build_community(name: str, seed: int, buildings: int = 6, floors: int = 6) -> Community:
    """The same seed gives the same devices, ids, firmware and batteries."""
    rng = random.Random(seed)
    devices: list[SimDevice] = []

    def add(
        device_id: str, kind: str, building: str, floor: int | None, unit: str | None, floors_: int = floors
    ) -> None:
        battery = round(rng.uniform(55, 100), 0) if kind in _BATTERY_KINDS else None
        fw = f"{rng.choice((1, 2))}.{rng.randint(0, 9)}.{rng.randint(0, 20)}"
        devices.append(
            SimDevice(device_id, kind, building, floor, unit, fw, battery, INTERVALS_S[kind], floors_)
        )

    for b in range(1, buildings + 1):
        for f in range(1, floors + 1):
            for short, kind in _PER_FLOOR:
                unit = f"{b}-{f}{rng.randint(1, 4):02d}" if kind == "emergency_button" else None
                add(f"b{b:02d}-f{f:02d}-{short}", kind, str(b), f, unit)
        add(f"b{b:02d}-elev-1", "elevator", str(b), None, None)
        add(f"b{b:02d}-elev-2", "elevator", str(b), None, None)
        add(f"b{b:02d}-energy", "energy_meter", str(b), None, None)
        add(f"b{b:02d}-water", "water_meter", str(b), None, None)
        add(f"b{b:02d}-footfall", "footfall_counter", str(b), None, None)
    for t in range(1, TERMINALS + 1):
        add(f"station-term-{t}", "service_terminal", STATION, 1, None)
    return Community(name, seed, devices)


_BATTERY_KINDS = {"smoke_detector", "water_leak", "emergency_button"}
