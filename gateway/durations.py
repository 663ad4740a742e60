"""Durations as installers write them: "90s", "5m", "48h", "90d" (and pydantic's own forms).

Used by the settings and by the data files (profiles), so both read durations the same way.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import BeforeValidator

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> object:
    """Accept installer-friendly durations ("90s", "5m", "48h", "90d"; a bare number is seconds)
    besides pydantic's own forms (ISO 8601 such as "PT5M")."""
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match:
            return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2] or "s"])
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
