"""Need identification: hotspots (which needs, where, when) and the ranked needs list.

Hotspots compare each (service group, building) cell's count of need signals in a window with
that same cell's own baseline over the preceding period, under a Poisson model: a cell is a
hotspot when seeing at least that many signals by chance would be very unlikely. The needs list
merges open requests for the same service in the same building into one need and ranks needs by
households affected, sensor evidence, the group's priority and age (docs/services.md).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
# What "recent" means for the needs list and the heat map when nobody says: a week, long enough
# for a weekly rhythm to show, short enough that last month's burst has settled.
RECENT_MS = 7 * DAY_MS


@dataclass(frozen=True, slots=True)
class Signal:
    ts_ms: int
    service_code: str
    service_group: str
    building: str | None
    source: str  # terminal, open311 or sensor


def poisson_tail(k: int, lam: float) -> float:
    """P(X >= k) for X ~ Poisson(lam), summed in log space so large counts do not overflow."""
    if k <= 0:
        return 1.0
    if lam <= 0:
        return 0.0
    # 1 - P(X <= k-1); for small tails sum the upper terms directly for precision.
    log_terms = [-lam + i * math.log(lam) - math.lgamma(i + 1) for i in range(k, k + 200 + int(4 * lam))]
    top = max(log_terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    return min(1.0, tail)


def hotspots(
    signals: Iterable[Signal],
    window_start_ms: int,
    window_end_ms: int,
    baseline_start_ms: int,
    *,
    alpha: float = 0.001,
    min_count: int = 3,
    group_names: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Cells whose count in [window_start, window_end) is improbably high against their baseline.

    Baseline rate λ = (baseline count + 0.5) × window / baseline length: the +0.5 keeps a cell
    that was quiet before from making every first signal look infinitely surprising.
    The significance level is divided by the number of cells tested (Bonferroni).
    """
    window_len = window_end_ms - window_start_ms
    baseline_len = window_start_ms - baseline_start_ms
    if window_len <= 0 or baseline_len <= 0:
        raise ValueError("the window and the baseline must both be longer than zero")
    current: Counter[tuple[str, str]] = Counter()
    before: Counter[tuple[str, str]] = Counter()
    sources: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    services: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    hours: dict[tuple[str, str], Counter[int]] = defaultdict(Counter)
    for s in signals:
        cell = (s.service_group, s.building or "community")
        if window_start_ms <= s.ts_ms < window_end_ms:
            current[cell] += 1
            sources[cell]["sensor" if s.source == "sensor" else "resident"] += 1
            services[cell][s.service_code] += 1
            hours[cell][(s.ts_ms - window_start_ms) // HOUR_MS] += 1
        elif baseline_start_ms <= s.ts_ms < window_start_ms:
            before[cell] += 1
    cells = set(current) | set(before)
    level = alpha / max(1, len(cells))
    found: list[dict[str, Any]] = []
    for cell, count in current.items():
        expected = (before[cell] + 0.5) * window_len / baseline_len
        p = poisson_tail(count, expected)
        if count < min_count or p >= level:
            continue
        group, building = cell
        peak_hour, peak_count = max(hours[cell].items(), key=lambda kv: (kv[1], -kv[0]))
        where = "the community as a whole" if building == "community" else f"building {building}"
        name = (group_names or {}).get(group, group)
        found.append(
            {
                "service_group": group,
                "building": None if building == "community" else building,
                "count": count,
                "expected": round(expected, 3),
                "ratio": round(count / expected, 2),
                "p_value": p,
                "score": round(-math.log10(max(p, 1e-300)), 2),
                "sources": dict(sources[cell]),
                "services": dict(services[cell].most_common()),
                "peak_start_ms": window_start_ms + peak_hour * HOUR_MS,
                "peak_count": peak_count,
                "why": (
                    f"{count} {name} needs in {where} in this window against {expected:.2f} expected from "
                    f"its own baseline of {before[cell]} over the preceding {baseline_len / DAY_MS:g} days "
                    f"(Poisson p = {p:.2g}, threshold {level:.2g}); "
                    f"{sources[cell]['resident']} from residents, {sources[cell]['sensor']} from sensors; "
                    f"busiest hour starts {peak_hour} h into the window ({peak_count})"
                ),
            }
        )
    found.sort(key=lambda h: (-h["score"], -h["count"]))
    return found


def heatmap(signals: Iterable[Signal], start_ms: int, end_ms: int) -> dict[str, dict[str, int]]:
    """Counts of need signals per building and service group in [start, end)."""
    grid: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for s in signals:
        if start_ms <= s.ts_ms < end_ms:
            grid[s.building or "community"][s.service_group] += 1
    return {b: dict(groups) for b, groups in sorted(grid.items())}


def needs_list(
    requests: Sequence[dict[str, Any]],
    sensor_signals: Iterable[Signal],
    priorities: dict[str, int],
    now_ms: int,
) -> list[dict[str, Any]]:
    """Open requests merged into needs (same service, same building), ranked.

    Households: distinct (building, unit) among the merged requests; a request without a unit
    counts as one household. Score = group priority × (households + ½ × recent sensor signals)
    × (1 + age in days / 7): life-and-safety needs affecting many households rise first, and old
    needs do not sink out of sight.
    """
    groups: dict[tuple[str, str | None], list[dict[str, Any]]] = defaultdict(list)
    for request in requests:
        groups[(request["service_code"], request["building"])].append(request)
    sensors: Counter[tuple[str, str | None]] = Counter(
        (s.service_code, s.building) for s in sensor_signals if s.source == "sensor"
    )
    items: list[dict[str, Any]] = []
    for (code, building), members in groups.items():
        households = {m["household"] or m["id"] for m in members}
        oldest = min(m["requested_ms"] for m in members)
        group = members[0]["service_group"]
        priority = priorities.get(group, 1)
        evidence = sensors[(code, building)]
        age_days = max(0.0, (now_ms - oldest) / DAY_MS)
        score = priority * (len(households) + 0.5 * evidence) * (1 + age_days / 7)
        items.append(
            {
                "need_id": need_id(code, building),
                "service_code": code,
                "service_group": group,
                "building": building,
                "requests": sorted(m["id"] for m in members),
                "households": len(households),
                "sensor_signals": evidence,
                "oldest_ms": oldest,
                "overdue": sum(1 for m in members if m["overdue"]),
                "priority": priority,
                "score": round(score, 3),
                "why": (
                    f"{len(households)} households, {evidence} sensor signals, priority {priority}, "
                    f"open {age_days:.1f} days"
                ),
            }
        )
    items.sort(key=lambda n: (-n["score"], n["oldest_ms"]))
    for rank, item in enumerate(items, start=1):
        item["rank"] = rank
    return items


def need_id(service_code: str, building: str | None) -> str:
    return f"{service_code}@{building or 'community'}"
