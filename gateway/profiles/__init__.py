"""Device profiles: what each kind of device reports, its valid ranges, heartbeat and alarm rules.

Profiles are YAML data files (`gateway/profiles/data/*.yaml`, plus an installer's `profiles_dir`
that may add kinds or override built-ins), validated at load; an error names the file and line.
`DeviceProfile.validate_metrics` is on the hot path and uses no pydantic per call.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.datafiles import DataFileError, load_model
from gateway.durations import Duration
from gateway.models import SEVERITIES, Severity

BUILTIN_DIR = Path(__file__).parent / "data"
METRIC_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
COMMAND_NAME = re.compile(r"[a-z0-9_]{1,64}")
_RANK = {severity: rank for rank, severity in enumerate(SEVERITIES)}


class ProfileError(Exception):
    """A profile file is wrong; the message names the file and, where known, the line."""


class MetricSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    unit: str = ""
    type: Literal["gauge", "counter"] = "gauge"
    min: float | None = None
    max: float | None = None
    description: str = ""

    @model_validator(mode="after")
    def _range(self) -> MetricSpec:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class AlarmRule(BaseModel):
    """Raise when `metric` is above (or below) a threshold for `for`; clear past `clear`.

    `clear` gives hysteresis: an `above` rule clears only when the value falls below `clear`
    (which must not exceed `above`), a `below` rule when it rises above it. Without `clear`
    the threshold itself is used.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    metric: str
    above: float | None = None
    below: float | None = None
    for_: Duration = Field(timedelta(0), alias="for")
    clear: float | None = None
    severity: Severity = "warning"
    message: str = ""
    # A device event of this type reports the same happening (an emergency press is both an
    # event and `pressed` = 1): one alarm to acknowledge, not two (gateway/rules.py).
    event: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")

    @model_validator(mode="after")
    def _shape(self) -> AlarmRule:
        if (self.above is None) == (self.below is None):
            raise ValueError("a rule needs exactly one of 'above' or 'below'")
        if self.for_ < timedelta(0):
            raise ValueError("'for' cannot be negative")
        if self.above is not None and self.clear is not None and self.clear > self.above:
            raise ValueError(f"clear {self.clear} must not be above the threshold {self.above}")
        if self.below is not None and self.clear is not None and self.clear < self.below:
            raise ValueError(f"clear {self.clear} must not be below the threshold {self.below}")
        return self

    @property
    def threshold(self) -> float:
        value = self.above if self.above is not None else self.below
        assert value is not None
        return value

    @property
    def for_ms(self) -> int:
        return int(self.for_.total_seconds() * 1000)

    def breached(self, value: float) -> bool:
        return value > self.threshold if self.above is not None else value < self.threshold

    def cleared(self, value: float) -> bool:
        level = self.clear if self.clear is not None else self.threshold
        return value < level if self.above is not None else value > level


class DeviceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    kind: str = Field(pattern=r"^[a-z0-9_]{1,64}$")
    description: str = ""
    heartbeat_timeout: Duration = Field(timedelta(minutes=10), alias="heartbeat_timeout")
    strict: bool = True
    metrics: dict[str, MetricSpec] = Field(default_factory=dict)
    rules: tuple[AlarmRule, ...] = ()
    events: dict[str, Severity] = Field(default_factory=dict)
    # The commands the district may send to devices of this kind (name: what it does); none
    # listed: none is forwarded (gateway/uplink/commands.py).
    commands: dict[str, str] = Field(default_factory=dict)
    # A service terminal speaks for residents: only its devices may publish `request`, `rating`
    # and `vote` (the pipeline refuses the others, and `cgw mqtt-auth` grants only them those
    # topics; docs/privacy.md).
    terminal: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        for name in self.metrics:
            if METRIC_NAME.fullmatch(name) is None:
                raise ValueError(f"metric name {name!r} must match [A-Za-z0-9_]{{1,64}}")
        for name in self.commands:
            if COMMAND_NAME.fullmatch(name) is None:
                raise ValueError(f"command name {name!r} must match [a-z0-9_]{{1,64}}")
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if self.strict and rule.metric not in self.metrics:
                raise ValueError(f"rules[{i}].metric {rule.metric!r} is not a metric of this profile")
            if rule.id in seen:
                raise ValueError(f"rules[{i}].id {rule.id!r} is used twice")
            seen.add(rule.id)
        if self.heartbeat_timeout <= timedelta(0):
            raise ValueError("heartbeat_timeout must be positive")
        return self

    @property
    def heartbeat_timeout_s(self) -> float:
        return self.heartbeat_timeout.total_seconds()

    def validate_metrics(self, raw: object) -> dict[str, float]:
        """The metrics of one reading as floats, or ValueError("<reason code>: <detail>")."""
        if not isinstance(raw, dict) or not raw:
            raise ValueError("schema: metrics must be a non-empty object of name → number")
        out: dict[str, float] = {}
        specs = self.metrics
        for name, value in raw.items():
            spec = specs.get(name)
            if spec is None:
                if self.strict:
                    raise ValueError(f"unknown_metric: {name[:64]!r} is not a metric of profile {self.kind}")
                if METRIC_NAME.fullmatch(name) is None:
                    raise ValueError(f"schema: metric name {name[:64]!r} must match [A-Za-z0-9_]{{1,64}}")
            if value.__class__ is bool:
                number = 1.0 if value else 0.0
            elif isinstance(value, int | float):
                number = float(value)
                if not math.isfinite(number):
                    raise ValueError(f"schema: metric {name!r} is not a finite number")
            else:
                raise ValueError(f"schema: metric {name!r} must be a number, got {type(value).__name__}")
            if spec is not None and (
                (spec.min is not None and number < spec.min) or (spec.max is not None and number > spec.max)
            ):
                low = "-∞" if spec.min is None else f"{spec.min:g}"
                high = "∞" if spec.max is None else f"{spec.max:g}"
                raise ValueError(
                    f"out_of_range: {name}={number:g} outside [{low}, {high}] {spec.unit}".rstrip()
                )
            out[name] = number
        return out

    def event_severity(self, event_type: str, reported: Severity | None) -> Severity:
        """The stronger of what the device said and what the profile sets for this event type."""
        configured = self.events.get(event_type, self.events.get("*"))
        candidates = [s for s in (reported, configured) if s is not None]
        if not candidates:
            return "info"
        return max(candidates, key=_RANK.__getitem__)

    def describe(self) -> dict[str, Any]:
        """The profile as the API shows it."""
        return {
            "kind": self.kind,
            "description": self.description,
            "heartbeat_timeout_s": self.heartbeat_timeout_s,
            "strict": self.strict,
            "metrics": {name: spec.model_dump() for name, spec in self.metrics.items()},
            "rules": [
                {**rule.model_dump(exclude={"for_"}), "for_s": rule.for_.total_seconds()}
                for rule in self.rules
            ],
            "events": dict(self.events),
            "commands": dict(self.commands),
        }


class ProfileSet:
    """All loaded profiles by kind."""

    def __init__(self, profiles: dict[str, DeviceProfile]) -> None:
        if "generic" not in profiles:
            raise ProfileError("no 'generic' profile: it is needed for unknown devices")
        self._profiles = profiles
        self.generic = profiles["generic"]

    def get(self, kind: str) -> DeviceProfile | None:
        return self._profiles.get(kind)

    def __contains__(self, kind: object) -> bool:
        return kind in self._profiles

    def __iter__(self) -> Iterator[DeviceProfile]:
        return iter(self._profiles.values())

    @property
    def kinds(self) -> list[str]:
        return sorted(self._profiles)


def load_profiles(extra_dir: Path | None = None) -> ProfileSet:
    """Built-in profiles, then every `*.yaml` in `extra_dir` (adding kinds or replacing them)."""
    profiles: dict[str, DeviceProfile] = {}
    for folder in (BUILTIN_DIR, extra_dir):
        if folder is None:
            continue
        if not folder.is_dir():
            raise ProfileError(f"profiles_dir {folder} is not a directory")
        for path in sorted(folder.glob("*.yaml")):
            profile = load_profile(path)
            profiles[profile.kind] = profile
    return ProfileSet(profiles)


def load_profile(path: Path) -> DeviceProfile:
    try:
        return load_model(path, DeviceProfile, "a profile")
    except DataFileError as exc:
        raise ProfileError(str(exc)) from exc
