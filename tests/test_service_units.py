"""Unit tests of the service loop's pure parts: lifecycle, intake checks, hotspots, evaluation."""

from __future__ import annotations

import math
import random
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.services import evaluation, lifecycle, needs, relay, schema
from gateway.services.catalogue import CatalogueError, load_catalogue
from gateway.services.intake import IntakeError, terminal_request, terminal_vote
from gateway.sinks.lineprotocol import service_record_lines
from simulators.residents import UNITS_PER_FLOOR, voting_households

CATALOGUE = load_catalogue()


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        (["triaged", "assigned", "in_service", "completed", "evaluated", "closed"], True),
        (
            [
                "triaged",
                "planned",
                "assigned",
                "assigned",
                "in_service",
                "completed",
                "reopened",
                "in_service",
            ],
            True,
        ),
        (["merged"], True),
        (["rejected", "reopened", "triaged"], True),
        (["in_service"], False),
        (["triaged", "completed"], False),
        (["merged", "reopened"], False),
        (["triaged", "assigned", "in_service", "completed", "closed", "evaluated"], False),
    ],
)
def test_lifecycle_paths(path: list[lifecycle.State], ok: bool) -> None:
    current: lifecycle.State = "submitted"
    try:
        for target in path:
            lifecycle.check(current, target)
            current = target
    except lifecycle.TransitionError as exc:
        assert not ok, exc
        assert "allowed:" in str(exc)
    else:
        assert ok


def test_every_state_is_reachable_and_open311_status_is_binary() -> None:
    reachable = {"submitted"}
    frontier = ["submitted"]
    while frontier:
        for target in lifecycle.ALLOWED[frontier.pop()]:  # type: ignore[index]
            if target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == set(lifecycle.STATES)
    assert {lifecycle.open311_status(s) for s in lifecycle.STATES} == {"open", "closed"}


def request(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "request_id": "r-1",
        "service_code": "elderly.meal_delivery",
        "description": "lunch",
        "location": {"building": "3", "unit": "2-301", "floor": 2},
        "attributes": {"meal": "lunch"},
    }
    body.update(overrides)
    return body


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"request_id": None}, "schema: request_id"),
        ({"request_id": "has space"}, "schema: request_id"),
        ({"service_code": "nope"}, "unknown_service"),
        ({"service_code": 5}, "schema: service_code"),
        ({"attributes": {}}, "missing_attribute"),
        ({"attributes": {"meal": "brunch"}}, "must be one of"),
        ({"attributes": {"meal": "lunch", "colour": "red"}}, "not defined"),
        ({"attributes": []}, "attributes must be an object"),
        ({"location": "3-201"}, "location must be an object"),
        ({"location": {"building": "3", "floor": "high"}}, "floor must be an integer"),
        ({"description": "x" * 5000}, "longer than"),
        ({"contact": 5}, "contact must be a string"),
    ],
)
def test_terminal_requests_are_checked(overrides: dict[str, object], reason: str) -> None:
    with pytest.raises(IntakeError, match=reason):
        terminal_request(CATALOGUE, "term-1", request(**overrides), 1, None)


def test_a_good_terminal_request() -> None:
    new = terminal_request(CATALOGUE, "term-1", request(), 1000, None)
    assert new.request_key == "term-1|r-1" and new.building == "3" and new.unit == "2-301" and new.floor == 2
    assert new.service.deadline_ms == 86_400_000 and new.attributes == {"meal": "lunch"}


def test_votes_need_a_household_and_a_choice() -> None:
    body = {
        "vote_id": "v1",
        "proposal_id": "P-0001",
        "household": {"building": "1", "unit": "1-101"},
        "choice": "yes",
    }
    assert terminal_vote("t", body, 5).household == "1/1-101"
    with pytest.raises(IntakeError, match="household needs both"):
        terminal_vote("t", {**body, "household": {"building": "1"}}, 5)
    with pytest.raises(IntakeError, match="choice"):
        terminal_vote("t", {**body, "choice": "maybe"}, 5)


def test_catalogue_errors_name_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "catalogue.yaml"
    bad.write_text(
        "groups:\n  a: {name_zh: 甲, name_en: A, priority: 3}\nproviders:\n"
        "  - {id: p, name_zh: 乙, name_en: P, type: public}\nservices:\n"
        "  - {service_code: a.b, name_zh: 丙, name_en: C, group: zzz, description: d,\n"
        "     deadline: 1d, providers: [p]}\n"
    )
    with pytest.raises(CatalogueError, match=r"catalogue.yaml line 6: services.0: group 'zzz' is not one of"):
        load_catalogue(bad)
    bad.write_text("groups: [\n")
    with pytest.raises(CatalogueError, match="line 2: not valid YAML"):
        load_catalogue(bad)


def test_poisson_tail_matches_the_direct_sum() -> None:
    for k, lam in [(0, 1.0), (1, 0.5), (3, 0.2), (10, 4.0), (40, 30.0)]:
        direct = 1 - sum(math.exp(-lam) * lam**i / math.factorial(i) for i in range(k))
        assert needs.poisson_tail(k, lam) == pytest.approx(direct, rel=1e-9, abs=1e-15)


def sig(ts: int, group: str = "facility", building: str = "3", source: str = "terminal") -> needs.Signal:
    return needs.Signal(ts, f"{group}.x", group, building, source)


def test_a_burst_against_a_quiet_baseline_is_a_hotspot_and_steady_demand_is_not() -> None:
    day = needs.DAY_MS
    steady = [sig(i * 3_600_000, "elderly", "1") for i in range(14 * 24)]  # one an hour, every hour
    burst = [sig(13 * day + i * 600_000) for i in range(12)] + [sig(13 * day + 5, source="sensor")]
    found = needs.hotspots(steady + burst, 13 * day, 14 * day, 0)
    assert [(h["service_group"], h["building"]) for h in found] == [("facility", "3")]
    assert found[0]["sources"] == {"resident": 12, "sensor": 1} and "p = " in found[0]["why"]
    assert needs.hotspots(steady, 13 * day, 14 * day, 0) == []


def test_needs_list_merges_by_service_and_building_and_counts_households() -> None:
    def req(i: int, code: str, building: str, unit: str | None, group: str = "facility") -> dict[str, object]:
        household = f"{building}/{unit}" if unit else None
        return {
            "id": f"r{i}",
            "service_code": code,
            "service_group": group,
            "building": building,
            "household": household,
            "requested_ms": 0,
            "overdue": False,
        }

    listed = needs.needs_list(
        [
            req(1, "facility.elevator", "3", "3-101"),
            req(2, "facility.elevator", "3", "3-101"),
            req(3, "facility.elevator", "3", "3-502"),
            req(4, "culture.activity", "1", None, "culture"),
        ],
        [needs.Signal(0, "facility.elevator", "facility", "3", "sensor")],
        {"facility": 4, "culture": 1},
        0,
    )
    assert listed[0]["need_id"] == "facility.elevator@3" and listed[0]["households"] == 2
    assert listed[0]["sensor_signals"] == 1 and listed[0]["score"] == 4 * (2 + 0.5)
    assert listed[1]["households"] == 1 and [n["rank"] for n in listed] == [1, 2]


def row(
    state: str, completed: int | None, score: int | None = None, group: str = "repair"
) -> dict[str, object]:
    return {
        "id": "x",
        "service_code": f"{group}.x",
        "service_group": group,
        "provider_id": "p",
        "state": state,
        "requested_ms": 0,
        "expected_ms": 10 * 3_600_000,
        "completed_ms": completed,
        "score": score,
    }


def test_evaluation_definitions() -> None:
    h = 3_600_000
    rows: list[Mapping[str, Any]] = [
        row("evaluated", 2 * h, 5),
        row("closed", 12 * h, 2),
        row("completed", 4 * h),
        row("in_service", None),
        row("rejected", None),
        row("merged", None),
        row("completed", 1 * h, group="complaint"),
        row("rejected", None, group="complaint"),
        row("triaged", None, group="complaint"),
    ]
    f = evaluation.figures(rows, [{"score": 4}, {"score": 3}])
    assert (f["requests"], f["valid"], f["completed"]) == (9, 6, 4)
    assert f["completion_rate"] == 4 / 6 and f["on_time"] == 3 and f["on_time_rate"] == 3 / 4
    assert f["satisfaction_mean"] == 3.5 and f["satisfaction_rate"] == 0.5
    assert (f["complaints"], f["complaints_resolved"], f["complaint_resolution_rate"]) == (2, 1, 0.5)
    assert f["median_hours_to_complete"] == 3.0  # of 1, 2, 4, 12
    assert f["p90_hours_to_complete"] == 12.0  # nearest rank: ceil(0.9 × 4) = 4th
    assert f["assessment_mean"] == 3.5
    empty = evaluation.figures([], [])
    assert empty["completion_rate"] is None and empty["median_hours_to_complete"] is None


def test_evaluation_periods_follow_utc_calendar() -> None:
    assert evaluation.period_start(1_700_000_000_000, "day", 0) == 1_699_920_000_000
    monday = evaluation.period_start(1_700_000_000_000, "week", 0)
    assert (monday // 86_400_000 + 3) % 7 == 0  # 1970-01-01 was a Thursday
    assert evaluation.nearest_rank([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.9) == 9


def test_upgrade_carries_unsent_lines_over_as_records(tmp_path: Path) -> None:
    """Services migration 3: lines an older version kept, and had not forwarded, still go out."""
    path = tmp_path / "services.sqlite3"
    old = sqlite3.connect(path)
    for statements in schema.MIGRATIONS[:2]:
        for statement in statements:
            old.execute(statement)
    old.executemany(
        "INSERT INTO outbox_lines (body) VALUES (?)", [("rating,community=c score=4i 1",), ("b x=1 2",)]
    )
    old.execute("PRAGMA user_version=2")
    old.commit()
    old.close()

    conn = schema.connect(path)
    try:
        upto, records = relay.unsent(conn, 0)
        lines = [line for r in records for line in service_record_lines(r, "c")]
        assert lines == ["rating,community=c score=4i 1", "b x=1 2"]
        relay.forget(conn, upto)
        assert conn.execute("SELECT COUNT(*) FROM outbox_records").fetchone()[0] == 0
    finally:
        conn.close()


def test_a_community_smaller_than_the_voters_lets_every_household_vote() -> None:
    """One building of two floors has 8 households: asking for 40 voters used to loop forever."""
    drawn = voting_households(random.Random(7), buildings=1, floors=2, voters=40)
    assert len(drawn) == 1 * 2 * UNITS_PER_FLOOR
    assert sorted(drawn) == sorted(f"1/1-{f}{u:02d}" for f in (1, 2) for u in range(1, UNITS_PER_FLOOR + 1))
    assert len(voting_households(random.Random(7), buildings=9, floors=6, voters=40)) == 40


async def test_the_relay_hands_each_record_on_once_and_forgets_it_once_durable(tmp_path: Path) -> None:
    """One counter: a record goes with one batch only, and leaves services.sqlite3 when that
    batch is durable; a refusal over the API goes with the next batch."""
    from gateway.models import Batch, DeadLetter
    from gateway.sqlite import SqliteThread

    db = SqliteThread("services", lambda: schema.connect(tmp_path / "services.sqlite3"))
    hand_off = relay.RecordRelay(db)
    try:
        await db.call(relay.keep, [{"kind": "line", "line": "a x=1 1"}, {"kind": "line", "line": "b x=2 2"}])
        letter = DeadLetter(1, "api/vote", "t", "already_voted: again", b"{}", "vote")
        hand_off.hold(letter)
        first = Batch()
        await hand_off.hand_on(first)
        assert [r["line"] for r in first.records] == ["a x=1 1", "b x=2 2"]
        assert first.dead_letters == [letter]
        await db.call(relay.keep, [{"kind": "line", "line": "c x=3 3"}])
        second = Batch()
        await hand_off.hand_on(second)  # before the first is durable: only what came since
        assert [r["line"] for r in second.records] == ["c x=3 3"] and not second.dead_letters
        for done in first.on_durable:
            done()
        await hand_off.close()  # waits for the forgetting
        kept = await db.call(lambda conn: [r[0] for r in conn.execute("SELECT body FROM outbox_records")])
        assert len(kept) == 1 and "c x=3 3" in kept[0]
        nothing = Batch()
        await hand_off.hand_on(nothing)
        assert not nothing.records and not nothing.on_durable
    finally:
        await db.close()
