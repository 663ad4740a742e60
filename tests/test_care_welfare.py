"""The welfare rules over a simulated month of the demo community (issue 18's figures).

The month (simulators/care.py, seed 1) runs in virtual time: 40 households with care profiles,
14 days for the baselines to learn, then 30 days evaluated with 12 injected incidents among late
mornings, outings, naps, guests and trips away. The figures asserted here are the ones
docs/care.md reports (`python -m simulators.care --seed 1` prints them).
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from gateway.care.welfare import SLOTS, DayRecord, WelfareEngine
from gateway.settings import CareSettings
from simulators.care import DAY_MS, MINUTE_MS, MonthResult, run_month, simulate

SEED = 1


@pytest.fixture(scope="module")
def month_result() -> MonthResult:
    month = simulate(SEED)
    # One household that consented withdraws half-way through the month.
    leaving = next(h.key for h in month.households if h.group == "other")
    return run_month(month, withdrawals={leaving: month.evaluated_from_ms + 10 * DAY_MS})


def test_the_month_is_the_issues_month(month_result: MonthResult) -> None:
    month = month_result.month
    at_risk = [h for h in month.households if h.consents and h.group in ("elderly_alone", "disabled")]
    assert len(at_risk) >= 30
    assert len(month.incidents) == 12
    assert (month.end_ms - month.evaluated_from_ms) // DAY_MS == 30


def test_every_incident_is_found_within_two_hours(month_result: MonthResult) -> None:
    late = [
        (d.incident, None if d.delay_ms is None else d.delay_ms / MINUTE_MS)
        for d in month_result.detections
        if d.delay_ms is None or d.delay_ms > 120 * MINUTE_MS
    ]
    assert late == []


def test_at_most_one_false_check_per_100_household_days(month_result: MonthResult) -> None:
    assert month_result.household_days >= 30 * 30
    assert month_result.false_per_100_household_days <= 1.0, [c.why for c in month_result.false_checks]


def test_each_incidents_check_reaches_its_grid_worker_and_escalates_when_unacknowledged(
    month_result: MonthResult,
) -> None:
    month = month_result.month
    workers = {w.worker_id: w.grid for w in month.workers}
    ack_within_ms = int(CareSettings().ack_within.total_seconds() * 1000)
    escalated = 0
    for detection in month_result.detections:
        check = detection.check
        assert check is not None and check.grid is not None
        assert check.acked_by is not None and workers[check.acked_by] == check.grid
        assert check.outcome == "needed_help"
        assert check.acked_ms is not None
        if check.acked_ms - check.raised_ms > ack_within_ms + 5 * MINUTE_MS:
            assert check.escalated_to == "care-centre"
            assert check.escalated_ms is not None and check.escalated_ms < check.acked_ms
            escalated += 1
        elif check.acked_ms - check.raised_ms < ack_within_ms:
            assert check.escalated_ms is None
    # Every check, not only the incidents': unacknowledged in time means escalated.
    for check in month_result.checks:
        assert check.acked_ms is not None
        if check.acked_ms - check.raised_ms > ack_within_ms + 5 * MINUTE_MS:
            assert check.escalated_ms is not None
    assert any(c.escalated_ms is not None for c in month_result.checks)


def test_a_household_that_withdraws_consent_is_never_analysed_again(month_result: MonthResult) -> None:
    ((household, count),) = month_result.withdrawn.items()
    assert count > 0
    assert month_result.analysed[household] == count
    withdrawn_at = month_result.month.evaluated_from_ms + 10 * DAY_MS
    assert not [c for c in month_result.checks if c.household == household and c.raised_ms > withdrawn_at]


def test_the_month_is_the_same_for_the_same_seed(month_result: MonthResult) -> None:
    again = simulate(SEED, days=3, warmup_days=1)
    assert [r.metrics for r in list(again.readings())[:50]] == [
        r.metrics for r in list(simulate(SEED, days=3, warmup_days=1).readings())[:50]
    ]


def _day(day: int, active: range, wake: int = 7 * 60) -> DayRecord:
    counts = tuple(3 if s in active else 0 for s in range(SLOTS))
    return DayRecord(day, counts, wake, (30,) * SLOTS, 22 * 60)


def test_night_time_quiet_is_normal_and_a_silent_morning_is_not() -> None:
    settings = CareSettings(min_baseline_days=7)
    engine = WelfareEngine(settings)
    offset = int(settings.utc_offset_hours * 3_600_000)
    today = 20_000
    engine.watch("1/1-101", [_day(today - n, range(14, 44)) for n in range(14, 0, -1)])
    midnight = today * DAY_MS - offset  # local midnight of the household's day
    engine.observe("1/1-101", midnight - 90 * MINUTE_MS, "water")  # 22:30 the evening before
    # Through the night and up to its usual waking plus the margin: nothing.
    for minute in range(0, 7 * 60 + 95, 5):
        assert engine.evaluate(midnight + minute * MINUTE_MS) == [], minute
    (alert,) = engine.evaluate(midnight + (7 * 60 + 95) * MINUTE_MS)
    assert alert.rule == "not_up"


def test_activity_of_a_household_not_watched_is_not_analysed() -> None:
    engine = WelfareEngine(
        CareSettings(baseline_days=7, min_baseline_days=7, morning_margin=timedelta(minutes=60))
    )
    engine.observe("2/2-202", 1_000, "water")
    assert engine.analysed == {}
    assert engine.evaluate(2_000) == []
