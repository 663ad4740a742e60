"""A simulated month of the community's care households, in virtual time, from a seed.

Households with care profiles (elderly living alone, disabled, families with infants, others),
each with its own rhythm: waking and bedtime, a burst of activity on getting up, meals, outings
through the door, a nap, night-time trips to the bathroom; and the noise of normal life: late
mornings, guests, trips away for days. Each flat has a water meter and an energy meter reporting
every `METER_INTERVAL_MS` (counters, as the profiles' `volume_m3` and `energy_kwh`), and a door
sensor reporting when it opens. Incidents are injected among them, with their ground truth: a
fall (everything stops in the middle of the day) or a resident who does not get up (its start
is the household's usual waking time, as nothing before it differs from a night's sleep).

Grid workers answer welfare checks after a delay drawn per check; some answer too late, so the
check escalates. `python -m simulators.care` runs the month through the welfare rules and prints
the figures that docs/care.md reports.

Everything is generated up front from `random.Random(seed)`: the same seed gives the same month.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from gateway.care.checks import WelfareCheck
from gateway.care.signals import ActivityReader
from gateway.care.welfare import WelfareEngine
from gateway.settings import CareSettings
from simulators.residents import UNITS_PER_FLOOR

Group = Literal["elderly_alone", "disabled", "infants", "other"]
MINUTE_MS = 60_000
DAY_MS = 86_400_000
METER_INTERVAL_MS = 10 * MINUTE_MS
UTC_OFFSET_MS = 8 * 3_600_000  # the community's local time (care.utc_offset_hours)
# 2026-11-01 00:00 local: the month starts on a known day, whatever day the test runs.
EPOCH_MS = 1_793_462_400_000
SILENT_AFTER_INCIDENT_MS = 10 * 3_600_000  # until the resident is found and cared for
# Gaps between activities at home are gamma-distributed with this shape: 1 would be pure chance
# (Poisson), higher is more regular. docs/care.md says why 4, and what a lower one does.
ROUTINE_SHAPE = 4.0
# A nap or a rest with the television lasts 20 minutes to this (docs/care.md shows what longer does).
REST_MAX_MIN = 45.0


@dataclass(frozen=True, slots=True)
class SimHousehold:
    key: str  # "building/unit", as the household register names it
    building: str
    unit: str
    group: Group
    consents: bool
    wake_min: int  # usual first activity, minutes after local midnight
    bed_min: int
    rate_per_h: float  # activities per waking hour, between the meals and the morning
    outings_per_day: float
    naps: bool


@dataclass(frozen=True, slots=True)
class Incident:
    household: str
    kind: Literal["fall", "not_up"]
    start_ms: int


@dataclass(frozen=True, slots=True)
class MeterReading:
    ts_ms: int
    household: str
    device_id: str
    kind: str  # water_meter | energy_meter | door_access
    metrics: dict[str, float]


@dataclass(frozen=True, slots=True)
class Worker:
    worker_id: str
    grid: str
    median_ack_min: float


@dataclass
class CareMonth:
    seed: int
    start_ms: int  # the first simulated day (local midnight)
    evaluated_from_ms: int  # after the warm-up days the baselines learn from
    end_ms: int
    households: list[SimHousehold]
    incidents: list[Incident]
    grids: dict[str, list[str]]  # grid -> buildings
    workers: list[Worker]
    # Days each household spent at home in the evaluated span (not away on a trip).
    home_days: dict[str, int] = field(default_factory=dict)
    _streams: list[list[MeterReading]] = field(default_factory=list)
    _rng: random.Random = field(default_factory=random.Random)

    def readings(self) -> Iterator[MeterReading]:
        """Every reading of every flat, in time order."""
        return heapq.merge(*self._streams, key=lambda r: r.ts_ms)

    def ack_delay_ms(self, worker: Worker) -> int:
        """How long `worker` takes to acknowledge a check (log-normal around their median)."""
        return int(worker.median_ack_min * math.exp(self._rng.gauss(0, 0.6)) * MINUTE_MS)

    def visit_ms(self) -> int:
        return int(self._rng.uniform(15, 40) * MINUTE_MS)


def _profiles(rng: random.Random, count: int, buildings: int, floors: int) -> list[SimHousehold]:
    # Mostly the households welfare checks are for; a few others to show the rules hold for them.
    share: tuple[tuple[Group, int], ...] = (
        ("elderly_alone", 24),
        ("disabled", 8),
        ("infants", 4),
        ("other", 4),
    )
    groups = [group for group, n in share for _ in range(n)]
    units = [
        (str(b), f"{b}-{f}{u:02d}")
        for b in range(1, buildings + 1)
        for f in range(1, floors + 1)
        for u in range(1, UNITS_PER_FLOOR + 1)
    ]
    chosen = rng.sample(units, count)
    out = []
    for i, (building, unit) in enumerate(chosen):
        group = groups[i % len(groups)]
        senior = group in ("elderly_alone", "disabled")
        out.append(
            SimHousehold(
                key=f"{building}/{unit}",
                building=building,
                unit=unit,
                group=group,
                consents=True,
                wake_min=int(rng.uniform(5.5, 7.5) * 60) if senior else int(rng.uniform(6.0, 8.0) * 60),
                bed_min=int(rng.uniform(21.0, 22.5) * 60) if senior else int(rng.uniform(22.0, 23.5) * 60),
                rate_per_h=rng.uniform(3.0, 4.5) if senior else rng.uniform(4.0, 6.0),
                outings_per_day=rng.uniform(0.8, 1.6),
                naps=senior and rng.random() < 0.6,
            )
        )
    return out


class _Flat:
    """One household's meters over the simulated span: what was used in each meter interval."""

    def __init__(self, household: SimHousehold, intervals: int, rng: random.Random) -> None:
        self.h = household
        self.water_l = [0.0] * intervals
        self.energy_wh = [0.0] * intervals
        self.doors: list[int] = []
        self.base_w = rng.uniform(50, 110)  # fridge, router, standby

    def use(self, rng: random.Random, offset_ms: int) -> None:
        i = offset_ms // METER_INTERVAL_MS
        if not 0 <= i < len(self.water_l):
            return
        if rng.random() < 0.55:
            self.water_l[i] += rng.uniform(2, 15)
        else:
            self.energy_wh[i] += rng.uniform(600, 2000) * rng.uniform(3, 15) / 60  # W for minutes

    def readings(self, start_ms: int, rng: random.Random) -> list[MeterReading]:
        out = []
        volume, energy = rng.uniform(10, 900), rng.uniform(1000, 30000) * 1000  # m³, Wh
        h = self.h
        for i in range(len(self.water_l)):
            ts = start_ms + (i + 1) * METER_INTERVAL_MS
            volume += self.water_l[i] / 1000
            base = self.base_w * (1 + rng.uniform(-0.15, 0.15)) * METER_INTERVAL_MS / 3_600_000
            energy += self.energy_wh[i] + base
            out.append(
                MeterReading(ts, h.key, f"{h.unit}-water", "water_meter", {"volume_m3": round(volume, 4)})
            )
            out.append(
                MeterReading(
                    ts, h.key, f"{h.unit}-energy", "energy_meter", {"energy_kwh": round(energy / 1000, 4)}
                )
            )
        for ts in self.doors:
            out.append(
                MeterReading(start_ms + ts, h.key, f"{h.unit}-door", "door_access", {"door_open": 1.0})
            )
            out.append(
                MeterReading(
                    start_ms + ts + MINUTE_MS, h.key, f"{h.unit}-door", "door_access", {"door_open": 0.0}
                )
            )
        out.sort(key=lambda r: r.ts_ms)
        return out


def _day(
    flat: _Flat,
    rng: random.Random,
    day_ms: int,
    silent_from: int | None = None,
    no_wake: bool = False,
    leave_min: float | None = None,
    back_min: float | None = None,
) -> None:
    """One day (day_ms: its local midnight, as an offset from the start). `silent_from`: an
    incident then (nothing more happens); `leave_min`: leaves for a trip then; `back_min`: comes
    back from one then (the day before it was spent away)."""
    h = flat.h
    stop = min(
        silent_from if silent_from is not None else 1 << 62, day_ms + int((leave_min or 1440) * MINUTE_MS)
    )

    def at(minute: float) -> int:
        return day_ms + int(minute * MINUTE_MS)

    def act(minute: float) -> None:
        if at(minute) < stop:
            flat.use(rng, at(minute))

    late = rng.uniform(30, 90) if rng.random() < 0.08 else 0.0
    wake = h.wake_min + rng.gauss(0, 15) + late
    bed = h.bed_min + rng.gauss(0, 20)
    if back_min is None:
        for _ in range(_poisson(rng, 0.8)):  # the bathroom at night
            act(rng.uniform(0, wake - 60) if rng.random() < 0.5 else rng.uniform(bed + 30, 1440))
    if no_wake:
        return
    if back_min is None:
        # Getting up: the bathroom, the kettle, washing, breakfast.
        for m in sorted(rng.uniform(0, 50) for _ in range(rng.randint(4, 6))):
            act(wake + m)
    else:
        flat.doors.append(at(back_min))
        wake = back_min - 50
    busy: list[tuple[float, float]] = []  # out of the flat
    for _ in range(_poisson(rng, h.outings_per_day)):
        leave = rng.uniform(wake + 90, bed - 120)
        back = leave + rng.uniform(40, 180)
        overlaps = any(a - 20 <= back and leave <= b + 20 for a, b in busy)  # 20 min at home between
        if not overlaps and not at(leave) <= stop < at(back):  # an incident happens at home
            busy.append((leave, back))
    outings = list(busy)
    if h.naps:  # after lunch, most days
        nap = rng.uniform(12.8, 13.8) * 60
        busy.append((nap, nap + rng.uniform(20, REST_MAX_MIN)))
    if rng.random() < 0.5:  # an hour with the television or a book, in the afternoon or evening
        rest = rng.choice((rng.uniform(15, 16.5), rng.uniform(19, 20.5))) * 60
        busy.append((rest, rest + rng.uniform(20, REST_MAX_MIN)))
    guests = rng.random() < 0.1
    minute = wake + 50
    while minute < bed:
        meal = 690 <= minute % 1440 <= 750 or 1050 <= minute % 1440 <= 1110
        rate = h.rate_per_h * (2.0 if meal else 1.0) * (1.6 if guests else 1.0)
        # Daily life at home follows routines: gaps more regular than chance (gamma, shape 4).
        minute += rng.gammavariate(ROUTINE_SHAPE, 60 / rate / ROUTINE_SHAPE)
        if minute >= bed:
            break
        if not any(a <= minute < b for a, b in busy):
            act(minute)
    for leave, back in outings:
        if at(leave) < stop:
            flat.doors.append(at(leave))
            if at(back) < stop:
                flat.doors.append(at(back))
                act(back + rng.uniform(1, 6))  # home again: a light, the kettle, washing hands
    if guests:
        visit = at(rng.uniform(wake + 120, bed - 60))
        if visit < stop:
            flat.doors.append(visit)
    if leave_min is not None and at(leave_min) < (silent_from or 1 << 62):
        flat.doors.append(at(leave_min))


def _poisson(rng: random.Random, mean: float) -> int:
    k, p, limit = 0, 1.0, math.exp(-mean)
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def simulate(
    seed: int = 1,
    days: int = 30,
    warmup_days: int = 14,
    households: int = 40,
    incidents: int = 12,
    buildings: int = 6,
    floors: int = 6,
) -> CareMonth:
    """`warmup_days` for the baselines to learn, then `days` evaluated, with `incidents` in them."""
    rng = random.Random(seed)
    profiles = _profiles(rng, households, buildings, floors)
    total_days = warmup_days + days
    intervals = total_days * DAY_MS // METER_INTERVAL_MS
    flats = {h.key: _Flat(h, intervals, rng) for h in profiles}
    at_risk = [h for h in profiles if h.group in ("elderly_alone", "disabled")]
    injected: list[Incident] = []
    incident_days: dict[tuple[str, int], Incident] = {}
    for n, h in enumerate(rng.sample(at_risk, incidents)):
        d = warmup_days + rng.randrange(days)
        day_ms = EPOCH_MS + d * DAY_MS
        if n % 4 == 3:
            chosen = Incident(h.key, "not_up", day_ms + h.wake_min * MINUTE_MS)
        else:
            start = rng.uniform(h.wake_min + 90, h.bed_min - 150)
            chosen = Incident(h.key, "fall", day_ms + int(start * MINUTE_MS))
        injected.append(chosen)
        incident_days[(h.key, d)] = chosen
    home_days = {h.key: 0 for h in profiles}
    for h in profiles:
        flat = flats[h.key]
        d = 0
        while d < total_days:
            incident = incident_days.get((h.key, d))
            trip = rng.randint(1, 4)
            free = not any((h.key, x) in incident_days for x in range(d, d + trip + 2))
            if free and d >= 2 and d + trip < total_days and rng.random() < 1 / 45:
                # A trip away: leaves one morning, back on the evening of a later day.
                _day(flat, rng, d * DAY_MS, leave_min=rng.uniform(8.5, 10.5) * 60)
                _day(flat, rng, (d + trip) * DAY_MS, back_min=rng.uniform(16, 19) * 60)
                d += trip + 1
                continue
            if incident is not None:
                silent = incident.start_ms - EPOCH_MS
                _day(flat, rng, d * DAY_MS, silent, incident.kind == "not_up")
                if d >= warmup_days:
                    home_days[h.key] += 1
                d += 1 + SILENT_AFTER_INCIDENT_MS // DAY_MS
                continue
            _day(flat, rng, d * DAY_MS)
            if d >= warmup_days:
                home_days[h.key] += 1
            d += 1
    grids = {"G1": ["1", "2"], "G2": ["3", "4"], "G3": ["5", "6"]}
    workers = [Worker(f"{g.lower()}-w{n}", g, rng.uniform(6, 16)) for g in grids for n in (1, 2)]
    month = CareMonth(
        seed=seed,
        start_ms=EPOCH_MS,
        evaluated_from_ms=EPOCH_MS + warmup_days * DAY_MS,
        end_ms=EPOCH_MS + total_days * DAY_MS,
        households=profiles,
        incidents=sorted(injected, key=lambda i: i.start_ms),
        grids=grids,
        workers=workers,
        home_days=home_days,
        _rng=random.Random(seed + 1),
    )
    month._streams = [flats[h.key].readings(EPOCH_MS, rng) for h in profiles]
    return month


@dataclass(frozen=True, slots=True)
class Detection:
    incident: Incident
    check: WelfareCheck | None  # the first check raised for it; None: missed

    @property
    def delay_ms(self) -> int | None:
        return None if self.check is None else self.check.raised_ms - self.incident.start_ms


@dataclass
class MonthResult:
    month: CareMonth
    detections: list[Detection]
    false_checks: list[WelfareCheck]
    checks: list[WelfareCheck]
    household_days: int  # consenting households' evaluated days
    analysed: dict[str, int]  # the engine's count per household (gateway/care/welfare.py)
    withdrawn: dict[str, int]  # the same count, taken when the household withdrew its consent

    @property
    def false_per_100_household_days(self) -> float:
        return 100 * len(self.false_checks) / self.household_days


def run_month(
    month: CareMonth,
    settings: CareSettings | None = None,
    withdrawals: dict[str, int] | None = None,
) -> MonthResult:
    """The month's readings through the welfare rules, with grid workers answering the checks.

    `withdrawals`: household -> when it withdraws its consent (the engine forgets it then).
    """
    settings = settings or CareSettings()
    engine = WelfareEngine(settings)
    reader = ActivityReader(settings.energy_step_w)
    for h in month.households:
        if h.consents:
            engine.watch(h.key)
    step_ms = int(settings.evaluate_every.total_seconds() * 1000)
    ack_within_ms = int(settings.ack_within.total_seconds() * 1000)
    by_key = {h.key: h for h in month.households}
    workers = {w.grid: [x for x in month.workers if x.grid == w.grid] for w in month.workers}
    grid_of = {b: g for g, buildings in month.grids.items() for b in buildings}
    pending = sorted((ts, h) for h, ts in (withdrawals or {}).items())
    checks: list[WelfareCheck] = []
    withdrawn: dict[str, int] = {}  # household -> times analysed when it withdrew
    answers: list[tuple[int, int, str]] = []  # (ack time, check index, worker), a heap
    readings = month.readings()
    upcoming = next(readings, None)
    now = month.start_ms
    while now <= month.end_ms:
        while pending and pending[0][0] <= now:
            gone = pending.pop(0)[1]
            engine.forget(gone)
            withdrawn[gone] = engine.analysed.get(gone, 0)
        while upcoming is not None and upcoming.ts_ms <= now:
            seen = reader.activity(upcoming.device_id, upcoming.kind, upcoming.ts_ms, upcoming.metrics)
            if seen is not None:
                engine.observe(upcoming.household, upcoming.ts_ms, seen.source, seen.since_ms)
            upcoming = next(readings, None)
        for alert in engine.evaluate(now):
            if now < month.evaluated_from_ms:
                continue  # the warm-up: baselines are still being learnt
            h = by_key[alert.household]
            grid = grid_of.get(h.building)
            check = WelfareCheck(
                f"wc-{len(checks) + 1}",
                h.key,
                h.building,
                grid,
                alert.rule,
                alert.raised_ms,
                alert.quiet_since_ms,
                alert.why,
            )
            checks.append(check)
            worker = month._rng.choice(workers[grid]) if grid else None
            if worker is not None:
                heapq.heappush(answers, (now + month.ack_delay_ms(worker), len(checks) - 1, worker.worker_id))
        for check in checks:
            if check.due_escalation(now, ack_within_ms):
                check.escalate(now, settings.escalate_to)
        while answers and answers[0][0] <= now:
            at, index, worker_id = heapq.heappop(answers)
            check = checks[index]
            check.acknowledge(worker_id, at)
            hurt = _incident_at(month, check.household, check.raised_ms) is not None
            check.close("needed_help" if hurt else "fine", worker_id, at + month.visit_ms())
        now += step_ms
    detections = []
    false_checks = []
    for incident in month.incidents:
        found = [
            c
            for c in checks
            if c.household == incident.household
            and incident.start_ms <= c.raised_ms <= incident.start_ms + SILENT_AFTER_INCIDENT_MS
        ]
        detections.append(Detection(incident, found[0] if found else None))
    for check in checks:
        if _incident_at(month, check.household, check.raised_ms) is None:
            false_checks.append(check)
    evaluated_days = (month.end_ms - month.evaluated_from_ms) // DAY_MS
    consenting = [h for h in month.households if h.consents and h.key not in (withdrawals or {})]
    return MonthResult(
        month,
        detections,
        false_checks,
        checks,
        evaluated_days * len(consenting),
        dict(engine.analysed),
        withdrawn,
    )


def _incident_at(month: CareMonth, household: str, ts_ms: int) -> Incident | None:
    for incident in month.incidents:
        if (
            incident.household == household
            and incident.start_ms <= ts_ms <= incident.start_ms + SILENT_AFTER_INCIDENT_MS
        ):
            return incident
    return None


def summary(result: MonthResult) -> str:
    month = result.month
    delays = [d.delay_ms / MINUTE_MS for d in result.detections if d.delay_ms is not None]
    missed = [d for d in result.detections if d.check is None]
    escalated = [c for c in result.checks if c.escalated_ms is not None]
    lines = [
        f"seed {month.seed}: {len(month.households)} households "
        f"({sum(h.group in ('elderly_alone', 'disabled') for h in month.households)} at risk), "
        f"{result.household_days} consenting household-days evaluated",
        f"incidents: {len(month.incidents)}, found: {len(delays)}, missed: {len(missed)}",
        "detection delays (min): " + ", ".join(f"{d:.0f}" for d in sorted(delays)),
        f"longest detection: {max(delays, default=0):.0f} min",
        f"welfare checks: {len(result.checks)}, false: {len(result.false_checks)} "
        f"({result.false_per_100_household_days:.2f} per 100 household-days)",
        f"escalated to the care centre (not acknowledged within the time): {len(escalated)}",
    ]
    for d in missed:
        lines.append(f"  missed: {d.incident.household} {d.incident.kind} at {_local(d.incident.start_ms)}")
    for check in result.false_checks:
        lines.append(f"  false: {check.household} {check.rule} at {_local(check.raised_ms)}: {check.why}")
    return "\n".join(lines)


def _local(ts_ms: int) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.gmtime((ts_ms + UTC_OFFSET_MS) / 1000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args()
    print(summary(run_month(simulate(args.seed, args.days))))


if __name__ == "__main__":
    main()
