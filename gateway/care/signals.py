"""From a flat's device readings to the welfare rules' activities (gateway/care/welfare.py).

What counts as someone's activity, per kind of device in a home (docs/care.md, "Signals"):

- `water_meter`: the volume grew by `WATER_STEP_M3` or more since the last reading, or the flow
  reading is at least `FLOW_LPM`: a tap, a flush, a shower.
- `energy_meter`: the mean power over the reading's interval (from the energy counter, else the
  power reading) is `care.energy_step_w` above the flat's floor, the lowest mean of the last day
  (fridge and router, which run whether anyone is home or not): a kettle, a cooker, a washer.
- `door_access`: the door opened (the rules read a door followed by nothing inside as "out").
- `emergency_button`: pressed (the service desk opens its follow-up request as well).

One `ActivityReader` per gateway (or simulation): it remembers each device's last reading.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.care.welfare import Source

WATER_STEP_M3 = 0.0005  # half a litre: a tap opened, not a meter's rounding
FLOW_LPM = 0.5
FLOOR_WINDOW_MS = 86_400_000  # the energy floor is the lowest interval mean of the last day
KINDS = frozenset({"water_meter", "energy_meter", "door_access", "emergency_button"})


@dataclass(frozen=True, slots=True)
class Activity:
    source: Source
    since_ms: int  # it happened after this and by the reading's time (a meter's interval)


@dataclass(slots=True)
class _Last:
    ts_ms: int
    value: float
    means: deque[tuple[int, float]] = field(default_factory=deque)  # (ts, mean power W)


class ActivityReader:
    def __init__(self, energy_step_w: float) -> None:
        self._energy_step_w = energy_step_w
        self._last: dict[tuple[str, str], _Last] = {}

    def forget(self, device_id: str) -> None:
        for key in [k for k in self._last if k[0] == device_id]:
            del self._last[key]

    def activity(
        self, device_id: str, kind: str, ts_ms: int, metrics: Mapping[str, float]
    ) -> Activity | None:
        """The activity a reading shows, or None (also for a reading older than the last one)."""
        match kind:
            case "water_meter":
                since = self._since(device_id, "volume_m3", ts_ms)
                grew = self._grew(device_id, "volume_m3", ts_ms, metrics)
                used = (grew is not None and grew >= WATER_STEP_M3) or metrics.get(
                    "flow_lpm", 0.0
                ) >= FLOW_LPM
                return Activity("water", since) if used else None
            case "energy_meter":
                since = self._since(device_id, "energy_kwh", ts_ms)
                return Activity("energy", since) if self._energy(device_id, ts_ms, metrics) else None
            case "door_access":
                return Activity("door", ts_ms) if metrics.get("door_open", 0.0) >= 0.5 else None
            case "emergency_button":
                return Activity("button", ts_ms) if metrics.get("pressed", 0.0) >= 0.5 else None
        return None

    def _since(self, device_id: str, metric: str, ts_ms: int) -> int:
        """Since when a counter's reading covers: its previous reading (or the reading itself)."""
        last = self._last.get((device_id, metric))
        return last.ts_ms if last is not None and last.ts_ms < ts_ms else ts_ms

    def _grew(self, device_id: str, metric: str, ts_ms: int, metrics: Mapping[str, float]) -> float | None:
        value = metrics.get(metric)
        if value is None:
            return None
        last = self._last.get((device_id, metric))
        if last is not None and ts_ms <= last.ts_ms:
            return None
        self._last[(device_id, metric)] = _Last(ts_ms, value)
        return None if last is None else value - last.value

    def _energy(self, device_id: str, ts_ms: int, metrics: Mapping[str, float]) -> bool:
        key = (device_id, "energy_kwh")
        last = self._last.get(key)
        value = metrics.get("energy_kwh")
        if value is not None and last is not None and ts_ms > last.ts_ms:
            mean_w = (value - last.value) * 3.6e9 / (ts_ms - last.ts_ms)
        elif value is None and "power_w" in metrics:
            mean_w = metrics["power_w"]
        else:
            mean_w = None
        if value is not None and (last is None or ts_ms > last.ts_ms):
            kept = last.means if last is not None else deque()
            self._last[key] = last = _Last(ts_ms, value, kept)
        elif last is None:
            self._last[key] = last = _Last(ts_ms, 0.0)
        if mean_w is None:
            return False
        means = last.means
        while means and means[0][0] < ts_ms - FLOOR_WINDOW_MS:
            means.popleft()
        # The floor of the day, kept as a monotonic deque: the oldest entry is the lowest.
        while means and means[-1][1] >= mean_w:
            means.pop()
        means.append((ts_ms, mean_w))
        return mean_w - means[0][1] >= self._energy_step_w
