"""Equity in the evaluation: are vulnerable households served as fast and as well as the rest?

The service figures by household group (gateway/care/households.py `group_of`): requests from
the group's units, how many were completed, the median hours to completion, the mean rating;
and the welfare checks: how many, the median minutes to acknowledgement, the share escalated.
Aggregates only: a group with fewer than `MIN_HOUSEHOLDS` households shows its count and no
figures, so none can be read back to one home. These are the only care figures fit for the
district (docs/care.md). Pure functions.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from gateway.care.checks import WelfareCheck
from gateway.care.households import GROUPS, Group

MIN_HOUSEHOLDS = 3


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def figures(
    groups: Mapping[str, Group],
    requests: Iterable[Mapping[str, Any]],
    checks: Iterable[WelfareCheck],
) -> list[dict[str, Any]]:
    """One row per group. `groups`: household ("building/unit") -> group, for every household
    with recorded needs; requests from other units count as "other"."""
    rows: dict[Group, dict[str, Any]] = {
        g: {
            "group": g,
            "households": 0,
            "requests": 0,
            "completed": 0,
            "_hours": [],
            "_scores": [],
            "checks": 0,
            "escalated": 0,
            "_ack": [],
        }
        for g in GROUPS
    }
    for group in groups.values():
        rows[group]["households"] += 1
    for r in requests:
        key = f"{r.get('building')}/{r.get('unit')}" if r.get("unit") else None
        row = rows[groups.get(key, "other") if key else "other"]
        row["requests"] += 1
        if r.get("completed_ms"):
            row["completed"] += 1
            row["_hours"].append((r["completed_ms"] - r["requested_ms"]) / 3_600_000)
        if r.get("rating") is not None:
            row["_scores"].append(float(r["rating"]))
    for c in checks:
        row = rows[groups.get(c.household, "other")]
        row["checks"] += 1
        row["escalated"] += c.escalated_ms is not None
        if c.acked_ms is not None:
            row["_ack"].append((c.acked_ms - c.raised_ms) / 60_000)
    out = []
    for row in rows.values():
        shown = row["households"] >= MIN_HOUSEHOLDS or row["group"] == "other"
        out.append(
            {
                "group": row["group"],
                "households": row["households"],
                "requests": row["requests"] if shown else None,
                "completed": row["completed"] if shown else None,
                "median_hours_to_complete": _median(row["_hours"]) if shown else None,
                "mean_rating": round(statistics.fmean(row["_scores"]), 2)
                if shown and row["_scores"]
                else None,
                "welfare_checks": row["checks"] if shown else None,
                "escalated_share": round(row["escalated"] / row["checks"], 3)
                if shown and row["checks"]
                else None,
                "median_minutes_to_acknowledge": _median(row["_ack"]) if shown else None,
            }
        )
    return out
