"""Top-down needs: grid workers' visits (入户探访) and questionnaires, and the needs they find.

A phone or tablet records visits offline and sends them later in a batch, each with its own id
and time: a visit already recorded (the same id) is a duplicate, never a second visit, so a
batch can be re-sent whole. Each need a visit names (a service code of the catalogue) joins the
household's open needs; the same need from the same visit once. The needs list ranks open needs
by the household's vulnerability (`WEIGHTS`, docs/care.md) and how long they have waited.

Functions over the care file's connection, run on the care desk's thread.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from gateway.care.households import CareNeeds, Group
from gateway.sqlite import transaction

Kind = Literal["visit", "questionnaire"]
DAY_MS = 86_400_000
# How much a need weighs by the household's group, before its age: the households least able
# to ask for themselves come first. A chronic illness adds CHRONIC_EXTRA.
WEIGHTS: dict[Group, float] = {"elderly_alone": 3.0, "disabled": 3.0, "infants": 2.0, "other": 1.0}
CHRONIC_EXTRA = 1.0
# A need's score grows by its weight once per this many days waited.
AGEING_DAYS = 7


@dataclass(frozen=True, slots=True)
class Visit:
    id: str  # the phone's own id for it: a re-sent batch repeats it
    household: str
    building: str
    kind: Kind
    ts_ms: int  # when it took place, as the phone recorded it
    worker: str
    note: str = ""
    answers: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # service codes


def record(conn: sqlite3.Connection, visit: Visit, received_ms: int) -> bool:
    """Record one visit and its needs; False when its id was recorded already."""
    with transaction(conn, immediate=True):
        done = conn.execute(
            "INSERT OR IGNORE INTO visits (id, household, building, kind, ts_ms, worker, note, answers,"
            " received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                visit.id,
                visit.household,
                visit.building,
                visit.kind,
                visit.ts_ms,
                visit.worker,
                visit.note,
                orjson.dumps(visit.answers).decode(),
                received_ms,
            ),
        ).rowcount
        if not done:
            return False
        for code in dict.fromkeys(visit.needs):
            conn.execute(
                "INSERT OR IGNORE INTO needs (household, building, service_code, note, visit_id, since_ms)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (visit.household, visit.building, code, visit.note, visit.id, visit.ts_ms),
            )
        return True


def of_household(conn: sqlite3.Connection, household: str, limit: int = 50) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT * FROM visits WHERE household = ? ORDER BY ts_ms DESC LIMIT ?", (household, limit)
    ).fetchall()
    return [{**dict(r), "answers": orjson.loads(r["answers"])} for r in rows]


def open_needs(conn: sqlite3.Connection, household: str | None = None) -> list[dict[str, Any]]:
    sql = "SELECT * FROM needs WHERE met_ms IS NULL" + (" AND household = ?" if household else "")
    return [dict(r) for r in conn.execute(sql + " ORDER BY since_ms", (household,) if household else ())]


def meet(conn: sqlite3.Connection, need_id: int, ts_ms: int) -> bool:
    with transaction(conn, immediate=True):
        return bool(
            conn.execute(
                "UPDATE needs SET met_ms = ? WHERE id = ? AND met_ms IS NULL", (ts_ms, need_id)
            ).rowcount
        )


def weight(group: Group, needs: CareNeeds | None) -> float:
    return WEIGHTS[group] + (CHRONIC_EXTRA if needs is not None and needs.chronic_illness else 0.0)


def ranked(items: list[dict[str, Any]], weights: dict[str, float], now_ms: int) -> list[dict[str, Any]]:
    """Open needs, heaviest first: weight × (1 + days waited / AGEING_DAYS)."""
    out = []
    for item in items:
        w = weights.get(item["household"], WEIGHTS["other"])
        waited = max(0, now_ms - item["since_ms"]) / DAY_MS
        out.append({**item, "weight": w, "score": round(w * (1 + waited / AGEING_DAYS), 3)})
    out.sort(key=lambda n: (-n["score"], n["since_ms"]))
    return out
