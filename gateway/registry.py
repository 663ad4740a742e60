"""The device registry: who is known, of which kind, where, and whether they may speak.

docs/contract.md section 1: "A device is known by its `status` birth message (`kind` names its device
profile) or by the installer's inventory; the inventory wins where both speak. Registration policy
is configurable: `open` (unknown devices are registered as kind `generic`), `closed` (their
messages are rejected, counted and kept in the dead-letter store with the reason)."
Under `closed` a birth message does not register a device: only the inventory does.
Under `open`, at most `registration_max_devices` devices may register themselves (more are
refused as `registration_full`), and one not heard for `registration_idle` is forgotten, so junk
ids cannot be registered without end nor kept forever.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.datafiles import parse_error_line
from gateway.logsummary import LogSummary
from gateway.models import Device, Rejected
from gateway.profiles import ProfileSet

log = logging.getLogger(__name__)


class InventoryError(Exception):
    """The installer's inventory file is wrong; the message names the file and the entry."""


class _Location(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    building: str | None = None
    floor: int | None = None
    unit: str | None = None


class _InventoryEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    kind: str
    location: _Location = _Location()


class _Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    devices: list[_InventoryEntry] = Field(default_factory=list)


def load_inventory(path: Path, profiles: ProfileSet) -> list[Device]:
    """Read the installer's inventory YAML; every entry must name a known profile."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise InventoryError(f"inventory {path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise InventoryError(f"inventory {path}{parse_error_line(exc)}: not valid YAML") from exc
    try:
        inventory = _Inventory.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise InventoryError(f"inventory {path}: {loc}: {err['msg']}") from exc
    devices: list[Device] = []
    seen: set[str] = set()
    for i, entry in enumerate(inventory.devices):
        if entry.kind not in profiles:
            raise InventoryError(
                f"inventory {path}: devices.{i} ({entry.device_id}): kind {entry.kind!r} is not a "
                f"device profile (known: {', '.join(profiles.kinds)})"
            )
        if entry.device_id in seen:
            raise InventoryError(f"inventory {path}: devices.{i}: {entry.device_id} is listed twice")
        seen.add(entry.device_id)
        devices.append(
            Device(
                device_id=entry.device_id,
                kind=entry.kind,
                source="inventory",
                building=entry.location.building,
                floor=entry.location.floor,
                unit=entry.location.unit,
                pinned_kind=True,
            )
        )
    return devices


class DeviceRegistry:
    """Known devices by id, with the registration policy applied to newcomers."""

    def __init__(
        self,
        profiles: ProfileSet,
        policy: Literal["open", "closed"],
        max_self_registered: int = 1000,
        idle_ms: int | None = None,
    ) -> None:
        self._profiles = profiles
        self._policy = policy
        self._max_self = max_self_registered
        self._idle_ms = idle_ms
        self._devices: dict[str, Device] = {}
        self._dirty: set[str] = set()
        # New devices are told in a few lines an hour, not one each (gateway/logsummary.py).
        self.newcomers = LogSummary(log)

    # -- loading -------------------------------------------------------------------------------

    def restore(self, devices: list[Device]) -> None:
        """Devices remembered by the local store from an earlier run (presence unknown: offline)."""
        for device in devices:
            if device.kind not in self._profiles:
                device.kind = "generic"
            device.online = False
            self._devices[device.device_id] = device

    def apply_inventory(self, entries: list[Device]) -> None:
        """The inventory wins over births: pin kind and location of every listed device."""
        for entry in entries:
            known = self._devices.get(entry.device_id)
            if known is None:
                self._devices[entry.device_id] = entry
            else:
                known.kind = entry.kind
                known.building, known.floor, known.unit = entry.building, entry.floor, entry.unit
                known.source = "inventory"
                known.pinned_kind = True
            self._dirty.add(entry.device_id)
        if self._policy == "closed":
            listed = {entry.device_id for entry in entries}
            # Devices that registered themselves under an earlier `open` policy are forgotten.
            for device_id in [d for d, dev in self._devices.items() if dev.source != "inventory"]:
                if device_id not in listed:
                    del self._devices[device_id]

    # -- lookups -------------------------------------------------------------------------------

    @property
    def self_registered(self) -> int:
        return sum(1 for d in self._devices.values() if d.source != "inventory")

    def _admit(self, device_id: str) -> None:
        """Room for one more device that registers itself, or the refusal."""
        if self._policy == "closed":
            raise Rejected(f"unknown_device: {device_id} is not in the inventory (registration is closed)")
        # Counted only when a newcomer arrives (rare), so the hot path does not pay for it.
        if self.self_registered >= self._max_self:
            raise Rejected(
                f"registration_full: {self._max_self} devices registered themselves already "
                "(registration_max_devices); list this one in the inventory"
            )

    def forget_idle(self, now_ms: int) -> list[str]:
        """Forget devices that registered themselves and have not been heard for
        `registration_idle`; returns their ids (the store deletes their rows)."""
        if self._idle_ms is None:
            return []
        cutoff = now_ms - self._idle_ms
        idle = [
            device_id
            for device_id, d in self._devices.items()
            if d.source != "inventory" and (d.last_seen_ms or d.first_seen_ms or 0) < cutoff
        ]
        for device_id in idle:
            del self._devices[device_id]
            self._dirty.discard(device_id)
        if idle:
            log.info("forgot %d devices not heard for registration_idle: %s", len(idle), ", ".join(idle[:10]))
        return idle

    def get(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def __len__(self) -> int:
        return len(self._devices)

    def all(self) -> list[Device]:
        return list(self._devices.values())

    def resolve(self, device_id: str, received_ms: int) -> Device:
        """The device a non-birth message comes from, registering it as generic under `open`."""
        device = self._devices.get(device_id)
        if device is not None:
            return device
        self._admit(device_id)
        device = Device(device_id=device_id, kind="generic", source="auto", first_seen_ms=received_ms)
        self._devices[device_id] = device
        self._dirty.add(device_id)
        self.newcomers.note("registered unknown devices as generic (registration is open)", device_id)
        return device

    def on_birth(self, device_id: str, payload: dict[str, Any], received_ms: int) -> Device:
        """Apply a `status` message's descriptive fields; the inventory's kind and place stay."""
        device = self._devices.get(device_id)
        kind = payload.get("kind")
        if kind is not None and (not isinstance(kind, str) or kind not in self._profiles):
            raise Rejected(
                f"unknown_kind: status kind {kind!r} is not a device profile "
                f"(known: {', '.join(self._profiles.kinds)})"
            )
        if device is None:
            self._admit(device_id)
            device = Device(
                device_id=device_id,
                kind=kind or "generic",
                source="birth" if kind else "auto",
                first_seen_ms=received_ms,
            )
            self._devices[device_id] = device
        if not device.pinned_kind:
            if kind:
                device.kind = kind
                device.source = "birth"
            location = payload.get("location")
            if isinstance(location, dict):
                building, floor, unit = location.get("building"), location.get("floor"), location.get("unit")
                device.building = None if building is None else str(building)[:64]
                device.floor = floor if isinstance(floor, int) and not isinstance(floor, bool) else None
                device.unit = None if unit is None else str(unit)[:64]
        elif kind and kind != device.kind:
            log.warning(
                "device %s announces kind %s; the inventory says %s and wins", device_id, kind, device.kind
            )
        fw, battery, rssi = payload.get("fw"), payload.get("battery"), payload.get("rssi")
        if isinstance(fw, str):
            device.fw = fw[:64]
        if isinstance(battery, int | float) and not isinstance(battery, bool):
            device.battery = float(battery)
        if isinstance(rssi, int | float) and not isinstance(rssi, bool):
            device.rssi = float(rssi)
        self._dirty.add(device_id)
        return device

    def mark_dirty(self, device_id: str) -> None:
        self._dirty.add(device_id)

    def take_dirty(self) -> list[Device]:
        """Devices changed since the last call, for the store to persist."""
        dirty = [self._devices[d] for d in self._dirty if d in self._devices]
        self._dirty.clear()
        return dirty
