"""Personal service matching: the services a household is eligible for and does not use.

Eligibility follows its recorded care needs (`ELIGIBLE`, docs/care.md); "does not use" means no
request for the service from its unit in `UNUSED_DAYS`. What is left is ranked for the grid
worker's next visit: the household's weight first (gateway/care/visits.py `WEIGHTS`), then the
service group's planning priority from the catalogue. Pure functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gateway.care.households import CareNeeds
from gateway.services.catalogue import Catalogue

UNUSED_DAYS = 90
# Which needs make a household eligible for which services of the shipped catalogue.
ELIGIBLE: dict[str, tuple[str, ...]] = {
    "elderly": ("elderly.day_care", "health.checkup"),
    "living_alone": ("elderly.meal_delivery", "elderly.home_visit"),
    "mobility": ("health.home_doctor", "elderly.meal_delivery"),
    "chronic_illness": ("health.checkup", "health.home_doctor"),
    "disability": ("health.home_doctor",),
    "infants": ("health.checkup",),
}


def eligible_unused(
    needs: CareNeeds | None, used: Iterable[str], catalogue: Catalogue
) -> list[dict[str, Any]]:
    """Services the household may have and has not asked for lately, most pressing first."""
    if needs is None:
        return []
    why: dict[str, list[str]] = {}
    for flag, codes in ELIGIBLE.items():
        if getattr(needs, flag):
            for code in codes:
                why.setdefault(code, []).append(flag)
    used_codes = set(used)
    out: list[dict[str, Any]] = []
    for code, reasons in why.items():
        service = catalogue.services.get(code)
        if service is None or code in used_codes:
            continue
        group = catalogue.groups.get(service.group)
        out.append(
            {
                "service_code": code,
                "name_en": service.name_en,
                "name_zh": service.name_zh,
                "because": reasons,
                "priority": group.priority if group is not None else 1,
            }
        )
    out.sort(key=lambda s: (-int(s["priority"]), -len(s["because"]), str(s["service_code"])))
    return out


def of_unit(requests: Iterable[Mapping[str, Any]], unit: str) -> list[dict[str, Any]]:
    """The requests of one unit (the desk's listing is by building)."""
    return [dict(r) for r in requests if r.get("unit") == unit]
