"""Alarm rules: thresholds held for a duration with hysteresis, and counters going backwards.

Evaluated on the readings' own timestamps, so a replayed backlog raises the same alarms at the
same times as live data would. A condition that starts at t0 raises once at the first reading
where it still holds and t - t0 >= `for`; it clears (an info event `<rule>_cleared`) only past
the clear level. Readings older than the newest seen for a metric are ignored here.

Readings the gateway stamped (the device sent no `ts`) are timed by the gateway's clock, which
jumps when a box without a real-time clock syncs: `clock_jumped` shifts what is being timed for
them by the jump, so a forward jump does not raise an alarm whose condition held for seconds,
and a back jump does not make every later reading look late for hours. Readings with the
device's own time are left alone: the gateway's clock did not move theirs.

A rule with `event` is one happening reported two ways: the device's event of that type raises
it (and stays the alarm), and the metric crossing then raises nothing more; when the metric
crossed first, the device's event is recorded as information, not a second alarm.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gateway.clock import ClockJump
from gateway.models import DeviceEvent, Reading
from gateway.profiles import AlarmRule, DeviceProfile, ProfileSet


@dataclass(slots=True)
class _RuleState:
    since_ms: int | None = None  # when the condition began holding (pending or raised)
    raised: bool = False
    by_event: bool = False  # raised by the device's own event (a rule with `event`)


class AlarmEngine:
    """Per-device rule state; fed every accepted reading by the pipeline task."""

    def __init__(self, profiles: ProfileSet) -> None:
        self._profiles = profiles
        self._rules: dict[tuple[str, str], _RuleState] = {}
        self._last_ts: dict[tuple[str, str], int] = {}
        self._last_counter: dict[tuple[str, str], float] = {}
        self._stamped_here: set[str] = set()  # devices whose latest reading the gateway stamped

    def observe(self, reading: Reading) -> list[DeviceEvent]:
        profile = self._profiles.get(reading.kind) or self._profiles.generic
        events: list[DeviceEvent] = []
        fresh: dict[str, float] = {}
        if reading.stamped_here:
            self._stamped_here.add(reading.device_id)
        else:
            self._stamped_here.discard(reading.device_id)
        for metric, value in reading.metrics.items():
            key = (reading.device_id, metric)
            last = self._last_ts.get(key)
            if last is not None and reading.ts_ms <= last:
                continue  # a duplicate or a late reading cannot move rule state backwards
            self._last_ts[key] = reading.ts_ms
            fresh[metric] = value
            spec = profile.metrics.get(metric)
            if spec is not None and spec.type == "counter":
                self._check_counter(reading, metric, value, events)
        if fresh:
            for rule in profile.rules:
                current = fresh.get(rule.metric)
                if current is not None:
                    self._apply(rule, profile, reading, current, events)
        return events

    def reported(self, event: DeviceEvent) -> DeviceEvent:
        """A device's event as recorded: information when a rule already raised the same
        happening from the metric; otherwise the alarm, and the rule raised with it."""
        profile = self._profiles.get(event.kind) or self._profiles.generic
        for rule in profile.rules:
            if rule.event != event.type:
                continue
            state = self._rules.setdefault((event.device_id, rule.id), _RuleState())
            if state.raised and not state.by_event:
                return replace(event, severity="info", data={**event.data, "alarm": rule.id})
            state.raised, state.by_event = True, True
            state.since_ms = state.since_ms or event.ts_ms
        return event

    def active(self, device_id: str) -> list[str]:
        """Rule ids raised now for a device."""
        return sorted(rule for (dev, rule), state in self._rules.items() if dev == device_id and state.raised)

    def forget(self, device_id: str) -> None:
        for table in (self._rules, self._last_ts, self._last_counter):
            for key in [k for k in table if k[0] == device_id]:
                del table[key]
        self._stamped_here.discard(device_id)

    def clock_jumped(self, jump: ClockJump) -> None:
        """The gateway's clock jumped: move the times kept for readings it stamped by as much."""
        for key in [k for k in self._last_ts if k[0] in self._stamped_here]:
            self._last_ts[key] += jump.by_ms
        for (device_id, _), state in self._rules.items():
            if device_id in self._stamped_here and state.since_ms is not None:
                state.since_ms += jump.by_ms

    def _apply(
        self, rule: AlarmRule, profile: DeviceProfile, reading: Reading, value: float, out: list[DeviceEvent]
    ) -> None:
        state = self._rules.setdefault((reading.device_id, rule.id), _RuleState())
        if state.raised:
            if rule.cleared(value):
                state.raised, state.since_ms, state.by_event = False, None, False
                out.append(self._event(rule, profile, reading, value, cleared=True))
            return
        if not rule.breached(value):
            state.since_ms = None  # the condition broke before `for` elapsed
            return
        if state.since_ms is None:
            state.since_ms = reading.ts_ms
        if reading.ts_ms - state.since_ms >= rule.for_ms:
            state.raised = True
            out.append(self._event(rule, profile, reading, value, cleared=False, since_ms=state.since_ms))

    def _check_counter(self, reading: Reading, metric: str, value: float, out: list[DeviceEvent]) -> None:
        key = (reading.device_id, metric)
        previous = self._last_counter.get(key)
        self._last_counter[key] = value
        if previous is not None and value < previous:
            out.append(
                DeviceEvent(
                    device_id=reading.device_id,
                    kind=reading.kind,
                    ts_ms=reading.ts_ms,
                    type="counter_reset",
                    severity="warning",
                    message=f"{metric} went backwards from {previous:g} to {value:g} "
                    "(meter reset or replaced?)",
                    data={"metric": metric, "previous": previous, "value": value},
                    source="rule",
                    building=reading.building,
                )
            )

    @staticmethod
    def _event(
        rule: AlarmRule,
        profile: DeviceProfile,
        reading: Reading,
        value: float,
        *,
        cleared: bool,
        since_ms: int | None = None,
    ) -> DeviceEvent:
        unit = profile.metrics[rule.metric].unit if rule.metric in profile.metrics else ""
        text = (
            rule.message
            or f"{rule.metric} {'above' if rule.above is not None else 'below'} {rule.threshold:g}"
        )
        data: dict[str, object] = {
            "rule": rule.id,
            "metric": rule.metric,
            "value": value,
            "threshold": rule.threshold,
        }
        if cleared:
            return DeviceEvent(
                device_id=reading.device_id,
                kind=reading.kind,
                ts_ms=reading.ts_ms,
                type=f"{rule.id}_cleared",
                severity="info",
                message=f"cleared: {text} (now {value:g}{(' ' + unit) if unit else ''})",
                data=data,
                source="rule",
                building=reading.building,
            )
        data["since_ms"] = since_ms
        return DeviceEvent(
            device_id=reading.device_id,
            kind=reading.kind,
            ts_ms=reading.ts_ms,
            type=rule.id,
            severity=rule.severity,
            message=f"{text} (now {value:g}{(' ' + unit) if unit else ''})",
            data=data,
            source="rule",
            building=reading.building,
        )
