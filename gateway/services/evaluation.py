"""Effect evaluation: satisfaction and process figures by period, service, group or provider.

The definitions (docs/services.md, "Evaluation") in one place:
- a request belongs to the period in which it was filed (`requested_ms`);
- valid requests: all but `rejected` and `merged` ones;
- completed: valid requests with a completion time (a reopened request counts again only once
  it is completed again);
- completion rate = completed / valid; on-time rate = completed by `expected_ms` / completed;
- satisfaction mean = mean resident score; satisfaction rate = share of scores 4 and 5;
- complaints: valid requests of the `complaint` group; resolution rate = completed / valid complaints;
- time to complete (hours) = completion - filing; median (midpoint of the two middle values
  for an even count) and 90th percentile (nearest rank: the smallest value with at least 90 %
  of values at or below it);
- assessments: third-party scores given in the period, mean.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

Period = Literal["all", "day", "week", "month"]
By = Literal["overall", "service", "group", "provider"]
HOUR_MS = 3_600_000
# The evaluation's span when nobody says: a month of ratings, enough for a provider's figures.
SPAN_MS = 30 * 24 * HOUR_MS


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def figures(rows: list[Mapping[str, Any]], assessments: list[Mapping[str, Any]]) -> dict[str, Any]:
    """All figures for one set of requests (rows of the evaluation query) and assessments."""
    valid = [r for r in rows if r["state"] not in ("rejected", "merged")]
    completed = [r for r in valid if r["completed_ms"] is not None]
    on_time = [r for r in completed if r["completed_ms"] <= r["expected_ms"]]
    scores = [r["score"] for r in rows if r["score"] is not None]
    complaints = [r for r in valid if r["service_group"] == "complaint"]
    resolved = [r for r in complaints if r["completed_ms"] is not None]
    hours = [(r["completed_ms"] - r["requested_ms"]) / HOUR_MS for r in completed]
    assessed = [a["score"] for a in assessments]
    return {
        "requests": len(rows),
        "valid": len(valid),
        "completed": len(completed),
        "completion_rate": _ratio(len(completed), len(valid)),
        "on_time": len(on_time),
        "on_time_rate": _ratio(len(on_time), len(completed)),
        "ratings": len(scores),
        "satisfaction_mean": statistics.fmean(scores) if scores else None,
        "satisfaction_rate": _ratio(sum(1 for s in scores if s >= 4), len(scores)),
        "complaints": len(complaints),
        "complaints_resolved": len(resolved),
        "complaint_resolution_rate": _ratio(len(resolved), len(complaints)),
        "median_hours_to_complete": statistics.median(hours) if hours else None,
        "p90_hours_to_complete": nearest_rank(hours, 0.9) if hours else None,
        "assessments": len(assessed),
        "assessment_mean": statistics.fmean(assessed) if assessed else None,
    }


def evaluate(
    rows: Iterable[Mapping[str, Any]],
    assessments: Iterable[Mapping[str, Any]],
    start_ms: int,
    end_ms: int,
    by: By = "overall",
    period: Period = "all",
) -> list[dict[str, Any]]:
    """One row of figures per (period, key), sorted by period then key."""
    buckets: dict[tuple[int, str], list[Mapping[str, Any]]] = defaultdict(list)
    assessed: dict[tuple[int, str], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        buckets[(period_start(row["requested_ms"], period, start_ms), _key(row, by))].append(row)
    for a in assessments:
        if by in ("overall", "provider") or (by == "service" and a["service_code"] is not None):
            key = "all" if by == "overall" else (a["provider_id"] if by == "provider" else a["service_code"])
            assessed[(period_start(a["ts_ms"], period, start_ms), key)].append(a)
    out = []
    for bucket in sorted(set(buckets) | set(assessed)):
        begin, key = bucket
        out.append(
            {
                "key": key,
                "period_start_ms": begin,
                "period_end_ms": min(end_ms, period_end(begin, period, end_ms)),
                **figures(buckets.get(bucket, []), assessed.get(bucket, [])),
            }
        )
    return out


def period_start(ts_ms: int, period: Period, start_ms: int) -> int:
    """The UTC calendar period holding `ts_ms` ("all": the requested start)."""
    if period == "all":
        return start_ms
    moment = datetime.fromtimestamp(ts_ms / 1000, UTC)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "week":
        day -= timedelta(days=day.weekday())
    elif period == "month":
        day = day.replace(day=1)
    return int(day.timestamp() * 1000)


def period_end(begin_ms: int, period: Period, end_ms: int) -> int:
    if period == "all":
        return end_ms
    begin = datetime.fromtimestamp(begin_ms / 1000, UTC)
    if period == "day":
        after = begin + timedelta(days=1)
    elif period == "week":
        after = begin + timedelta(days=7)
    else:
        after = (begin + timedelta(days=32)).replace(day=1)
    return int(after.timestamp() * 1000)


def _key(row: Mapping[str, Any], by: By) -> str:
    if by == "service":
        return str(row["service_code"])
    if by == "group":
        return str(row["service_group"])
    if by == "provider":
        return str(row["provider_id"] or "unassigned")
    return "all"


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None
