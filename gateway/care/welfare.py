"""The welfare rules: a consenting household's own rhythm is its baseline; a silence it does not
explain raises a welfare check.

Fed activity per household (`observe`: water or energy used, the door, the emergency button, a
check-in; gateway/care/signals.py turns meter readings into these), asked every few minutes
(`evaluate`) which households need a knock on the door. The same code runs over the simulated
month in the tests (simulators/care.py) and over live readings in the gateway
(gateway/care/desk.py); it keeps no clock of its own, every call says what time it is.

Two rules (docs/care.md gives the thresholds, the method and the expected false-alarm rate):

- **not up**: no activity since the household's day began (`care.day_start_hour`) by its median
  waking time of its baseline days plus `care.morning_margin`.
- **quiet too long**: after waking, the activity the household's baseline expected since its last
  activity (the sum of its rates per half hour of the day, so night-time quiet expects nothing and
  the hour after breakfast expects a lot) reached `care.surprise`, and the quiet lasted at least
  `care.min_quiet`.

A household whose last signal was its door (and nothing inside since) is out: no rule fires until
something inside shows it is back. Days on which it never woke at home (travel) are left out of
its baseline. A household the engine does not watch (no consent, or consent withdrawn) is not
analysed: its activity is dropped on arrival, and `forget` drops what was learnt.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from gateway.settings import CareSettings

Source = Literal["water", "energy", "door", "button", "checkin"]
Rule = Literal["not_up", "quiet_too_long"]
SOURCES: tuple[Source, ...] = ("water", "energy", "door", "button", "checkin")

MINUTE_MS = 60_000
DAY_MS = 86_400_000
SLOT_MIN = 30  # the baseline's rates are per half hour of the day
SLOTS = 1440 // SLOT_MIN
# Activity this close to the last counted one is the same activity (a meter and the door of one
# moment, or readings of one shower), so a busy minute does not count as a busy hour.
SAME_ACTIVITY_MS = 5 * MINUTE_MS
# Waking is a first activity followed by another within this: a night-time trip to the toilet
# just after the day began is not the morning.
WAKE_CONFIRM_MS = 30 * MINUTE_MS
# Where bedtimes are looked for: from EVENING_MIN to NIGHT_END_MIN (minutes after midnight).
EVENING_MIN = 18 * 60
NIGHT_END_MIN = 4 * 60
# The quiet rule leaves alone a quiet begun this close to the household's usual bedtime (or
# after it): going to bed a little early is not an incident; the morning rule watches the night.
BED_MARGIN_MIN = 45
# "This morning" for the morning rule: from this long before the household's usual waking (an
# earlier trip to the bathroom is the night's).
MORNING_FROM_MIN = 60
# The longest usual quiet at a time of day is the longest begun within this many half hours of it.
USUAL_REACH = 2
# A half hour's rate is capped: one unusually busy baseline cannot make an hour's quiet alarming.
MAX_RATE_PER_H = 6.0


@dataclass(frozen=True, slots=True)
class DayRecord:
    """One of a household's days, as its baseline keeps it (no times finer than half an hour)."""

    day: int  # days since the epoch, of the household's day (local, from care.day_start_hour)
    counts: tuple[int, ...]  # activities per half hour of the clock, SLOTS of them
    wake_min: int | None  # minutes after local midnight of the day's waking; None: not up at home
    # Per half hour: the longest quiet span (minutes) that began in it, awake and at home (0: none).
    longest: tuple[int, ...] = (0,) * SLOTS

    # The day's last activity that followed another within WAKE_CONFIRM_MS, in the evening
    # (minutes after midnight): its bedtime. A lone trip to the bathroom at night is not.
    bed_min: int | None = None

    @property
    def at_home(self) -> bool:
        return self.wake_min is not None


@dataclass(frozen=True, slots=True)
class Alert:
    """A rule that fired: the welfare check to raise."""

    household: str
    rule: Rule
    raised_ms: int
    quiet_since_ms: int  # the last activity seen (or the start of the day, for not_up)
    expected: float  # activities the baseline expected in the quiet span
    why: str


@dataclass(slots=True)
class _Household:
    days: deque[DayRecord]
    day: int | None = None
    counts: list[int] = field(default_factory=lambda: [0] * SLOTS)
    longest: list[int] = field(default_factory=lambda: [0] * SLOTS)
    wake_ms: int | None = None
    first_ms: int | None = None  # a first activity waiting for its confirmation
    busy_ms: int | None = None  # the latest activity that followed another within WAKE_CONFIRM_MS
    last_inside_ms: int | None = None  # last activity that shows someone inside
    inside_since_ms: int = 0  # ... which happened at some time after this (a meter's interval)
    last_door_ms: int | None = None
    door_returns: bool = False  # the last door opened while the household was out
    last_counted_ms: int = 0
    fired_for: int | None = None  # the quiet span (its start) already alerted
    # The baseline, derived from `days` whenever they change.
    cumulative: list[float] = field(default_factory=list)  # expected activities up to each slot, 2 days
    median_wake_min: int | None = None
    usual_quiet: list[int] = field(default_factory=lambda: [0] * SLOTS)  # minutes, per half hour
    usual_bed_day_min: int | None = None  # minutes after the day's start
    home_days: int = 0


class WelfareEngine:
    """The rules over every watched household; `evaluate` returns the alerts due at `now_ms`."""

    def __init__(self, settings: CareSettings) -> None:
        self._s = settings
        self._offset_ms = int(settings.utc_offset_hours * 3_600_000)
        self._day_start_ms = settings.day_start_hour * 3_600_000
        self._min_quiet_min = int(settings.min_quiet.total_seconds() // 60)
        self._max_quiet_min = int(settings.max_quiet.total_seconds() // 60)
        self._quiet_margin_min = int(settings.quiet_margin.total_seconds() // 60)
        self._margin_min = int(settings.morning_margin.total_seconds() // 60)
        self._households: dict[str, _Household] = {}
        self._closed: list[tuple[str, DayRecord]] = []
        # How often each household was analysed (an activity counted or a rule evaluated): a
        # household whose consent was withdrawn must never move again (tests/test_care_welfare.py).
        self.analysed: dict[str, int] = {}

    # -- who is watched -------------------------------------------------------------------------

    def watch(self, household: str, days: Iterable[DayRecord] = ()) -> None:
        """Start analysing a consenting household, from its stored days (oldest first)."""
        state = _Household(deque(days, maxlen=self._s.baseline_days))
        self._households[household] = state
        self._rebuild(state)

    def forget(self, household: str) -> None:
        """Consent withdrawn: stop at once and drop what was learnt (the caller deletes the stored days)."""
        self._households.pop(household, None)
        self._closed = [(h, d) for h, d in self._closed if h != household]

    def watching(self, household: str) -> bool:
        return household in self._households

    @property
    def households(self) -> list[str]:
        return list(self._households)

    def learning(self, household: str) -> bool:
        """Whether the household has too few days at home yet for its rules to run."""
        state = self._households.get(household)
        return state is None or state.home_days < self._s.min_baseline_days

    def take_closed_days(self) -> list[tuple[str, DayRecord]]:
        """Days that ended since the last call, for the caller to store."""
        out, self._closed = self._closed, []
        return out

    # -- time ---------------------------------------------------------------------------------

    def _day(self, ts_ms: int) -> int:
        return (ts_ms + self._offset_ms - self._day_start_ms) // DAY_MS

    def _clock_min(self, ts_ms: int) -> int:
        return ((ts_ms + self._offset_ms) // MINUTE_MS) % 1440

    def _day_min(self, clock_min: int) -> int:
        """Minutes after the household's day began (care.day_start_hour), from a clock minute."""
        return (clock_min - self._s.day_start_hour * 60) % 1440

    def _day_start(self, day: int) -> int:
        return day * DAY_MS + self._day_start_ms - self._offset_ms

    # -- input --------------------------------------------------------------------------------

    def observe(self, household: str, ts_ms: int, source: Source, since_ms: int | None = None) -> None:
        """One activity of a household; ignored unless the household is watched.

        `since_ms`: a meter's reading says only that something was used since its last reading,
        so a door that opened after `since_ms` may have come after the activity (leaving home).
        """
        state = self._households.get(household)
        if state is None:
            return
        self.analysed[household] = self.analysed.get(household, 0) + 1
        self._roll(household, state, ts_ms)
        if source == "door":
            # A door opened while out is a return (unless the last door was one, with nothing
            # inside since: then this one leaves again): after a return, a meter's reading taken
            # after the door shows someone home, even when its interval began before the door.
            state.door_returns = self._out(state) and not (state.door_returns and self._door_only(state))
            state.last_door_ms = max(state.last_door_ms or 0, ts_ms)
        elif ts_ms >= (state.last_inside_ms or 0):
            state.last_inside_ms = ts_ms
            state.inside_since_ms = ts_ms if since_ms is None else min(since_ms, ts_ms)
        if ts_ms - state.last_counted_ms < SAME_ACTIVITY_MS or self._day(ts_ms) != state.day:
            return  # the same activity, or a late reading of a day already closed
        previous, state.last_counted_ms = state.last_counted_ms, ts_ms
        if ts_ms - previous <= WAKE_CONFIRM_MS and source != "door":
            state.busy_ms = ts_ms
        door = state.last_door_ms or 0
        alerted = state.fired_for == previous
        if (
            state.wake_ms is not None
            and source != "door"
            and previous >= state.wake_ms
            and door < previous
            and not alerted
        ):
            # A quiet span at home while awake ended: remember the longest of each half hour
            # (not one that raised a welfare check: an incident is not the household's habit).
            slot = self._clock_min(previous) // SLOT_MIN
            state.longest[slot] = max(state.longest[slot], (ts_ms - previous) // MINUTE_MS)
        state.counts[self._clock_min(ts_ms) // SLOT_MIN] += 1
        if state.wake_ms is None:
            if state.first_ms is not None and ts_ms - state.first_ms <= WAKE_CONFIRM_MS:
                state.wake_ms = state.first_ms
            else:
                # When it happened: the middle of the meter's interval (a door: its moment).
                began = ts_ms if since_ms is None else max(since_ms, ts_ms - SAME_ACTIVITY_MS * 3)
                state.first_ms = (began + ts_ms) // 2

    def _roll(self, household: str, state: _Household, ts_ms: int) -> None:
        """Close the household's day when `ts_ms` belongs to a later one."""
        day = self._day(ts_ms)
        if state.day is None:
            state.day = day
            return
        if day <= state.day:
            return
        wake = None if state.wake_ms is None else self._clock_min(state.wake_ms)
        last = state.last_counted_ms
        slot = self._clock_min(last) // SLOT_MIN
        evening = slot * SLOT_MIN >= EVENING_MIN or slot * SLOT_MIN < NIGHT_END_MIN
        if (
            state.wake_ms is not None
            and last >= state.wake_ms
            and (state.last_door_ms or 0) < last
            and evening
        ):
            # The day's last quiet runs to its end: its sleep.
            span = (self._day_start(state.day + 1) - last) // MINUTE_MS
            state.longest[slot] = max(state.longest[slot], span)
        bed = None
        if state.busy_ms is not None and state.wake_ms is not None and state.busy_ms >= state.wake_ms:
            clock = self._clock_min(state.busy_ms)
            bed = clock if clock >= EVENING_MIN or clock < NIGHT_END_MIN else None
        record = DayRecord(state.day, tuple(state.counts), wake, tuple(state.longest), bed)
        state.days.append(record)
        self._closed.append((household, record))
        state.day, state.counts, state.wake_ms, state.first_ms = day, [0] * SLOTS, None, None
        state.busy_ms = None
        state.longest = [0] * SLOTS
        self._rebuild(state)

    def _rebuild(self, state: _Household) -> None:
        home = [d for d in state.days if d.at_home]
        state.home_days = len(home)
        wakes = [d.wake_min for d in home if d.wake_min is not None]
        state.median_wake_min = int(statistics.median(wakes)) if wakes else None
        beds = [self._day_min(d.bed_min) for d in home if d.bed_min is not None]
        state.usual_bed_day_min = int(statistics.median(beds)) if beds else None
        rates = [
            min(MAX_RATE_PER_H, sum(d.counts[s] for d in home) / len(home) * (60 / SLOT_MIN)) if home else 0.0
            for s in range(SLOTS)
        ]
        cumulative = [0.0]
        for s in range(2 * SLOTS):
            cumulative.append(cumulative[-1] + rates[s % SLOTS] * SLOT_MIN / 60)
        state.cumulative = cumulative
        longest = [max((d.longest[s] for d in home), default=0) for s in range(SLOTS)]
        # A span that began within an hour either side counts too: habits drift.
        state.usual_quiet = [
            max(longest[(s + k) % SLOTS] for k in range(-USUAL_REACH, USUAL_REACH + 1)) for s in range(SLOTS)
        ]

    # -- the rules ----------------------------------------------------------------------------

    def expected(self, household: str, start_ms: int, end_ms: int) -> float:
        """Activities the household's baseline expects between two times (less than a day apart)."""
        state = self._households[household]
        return self._expected(state, start_ms, end_ms)

    def _expected(self, state: _Household, start_ms: int, end_ms: int) -> float:
        if end_ms <= start_ms:
            return 0.0
        end_ms = min(end_ms, start_ms + DAY_MS - MINUTE_MS)
        a = self._clock_min(start_ms) / SLOT_MIN
        b = a + (end_ms - start_ms) / MINUTE_MS / SLOT_MIN
        return _at(state.cumulative, b) - _at(state.cumulative, a)

    def evaluate(self, now_ms: int) -> list[Alert]:
        """The alerts due now: at most one per quiet span of each household."""
        alerts = []
        for household, state in self._households.items():
            self.analysed[household] = self.analysed.get(household, 0) + 1
            self._roll(household, state, now_ms)
            if state.home_days < self._s.min_baseline_days or state.day is None:
                continue
            alert = self._check(household, state, now_ms)
            if alert is not None:
                state.fired_for = alert.quiet_since_ms
                alerts.append(alert)
        return alerts

    def _check(self, household: str, state: _Household, now_ms: int) -> Alert | None:
        last_inside = state.last_inside_ms or 0
        if self._out(state):
            return None  # out since the door: nothing inside since says anyone is home
        day_start = self._day_start(state.day or 0)
        if state.wake_ms is None:
            since = max(day_start, last_inside)
            if state.median_wake_min is None or state.fired_for == since:
                return None
            if state.last_door_ms is not None and state.last_door_ms >= day_start:
                return None  # the door opened today: up, and out and back (or a visitor)
            wake_day_min = self._day_min(state.median_wake_min)
            if last_inside >= day_start + (wake_day_min - MORNING_FROM_MIN) * MINUTE_MS:
                return None  # something this morning already (its waking not yet confirmed)
            due_min = state.median_wake_min + self._margin_min
            if (now_ms - day_start) // MINUTE_MS < wake_day_min + self._margin_min:
                return None
            return Alert(
                household,
                "not_up",
                now_ms,
                since,
                self._expected(state, since, now_ms),
                f"no activity this morning by {_hhmm(due_min)} "
                f"(usually up by {_hhmm(state.median_wake_min)})",
            )
        since = last_inside
        bed = state.usual_bed_day_min
        if bed is not None and (
            self._day_min(self._clock_min(since)) >= bed - BED_MARGIN_MIN
            or self._day_min(self._clock_min(now_ms)) >= bed
        ):
            return None  # about its bedtime, or later: the night, watched by the morning rule
        quiet_min = (now_ms - since) // MINUTE_MS
        if state.fired_for == since or quiet_min < self._quiet_limit_min(state, since):
            return None
        expected = self._expected(state, since, now_ms)
        if expected < self._s.surprise:
            return None
        return Alert(
            household,
            "quiet_too_long",
            now_ms,
            since,
            expected,
            f"no activity for {quiet_min} min, when its usual rhythm would have shown "
            f"{expected:.1f} activities (its longest usual quiet at this time: "
            f"{state.usual_quiet[self._clock_min(since) // SLOT_MIN]} min)",
        )

    @staticmethod
    def _out(state: _Household) -> bool:
        """Whether the household's last signal was its door: left (or let someone in) and
        nothing inside since."""
        door = state.last_door_ms
        if door is None:
            return False
        if state.door_returns:
            return (state.last_inside_ms or 0) < door
        return door >= state.inside_since_ms

    @staticmethod
    def _door_only(state: _Household) -> bool:
        """Nothing inside since the last door (a return followed at once by leaving again)."""
        return state.last_door_ms is not None and (state.last_inside_ms or 0) < state.last_door_ms

    def _quiet_limit_min(self, state: _Household, since_ms: int) -> int:
        """How long a quiet span begun at `since_ms` may last: the household's longest at that
        time of day plus the margin, within care.min_quiet and care.max_quiet (its bedtime is
        left to the morning rule, above)."""
        usual = state.usual_quiet[self._clock_min(since_ms) // SLOT_MIN]
        return min(max(usual + self._quiet_margin_min, self._min_quiet_min), self._max_quiet_min)


def _at(cumulative: list[float], position: float) -> float:
    """The cumulative expectation at a fractional slot position (linear within a slot)."""
    whole = int(position)
    return cumulative[whole] + (cumulative[whole + 1] - cumulative[whole]) * (position - whole)


def _hhmm(minutes: int) -> str:
    return f"{(minutes // 60) % 24:02d}:{minutes % 60:02d}"
