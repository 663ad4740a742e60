"""Faults on demand: what real devices do wrong, injected at configurable rates.

Each fault has a probability per telemetry publish of one device (`--faults name=p,...`):
`disconnect` (drop the TCP connection without DISCONNECT, so the broker fires the Last Will;
the device reconnects a few seconds later), `malformed` (invalid JSON, wrong types, out-of-range
values or unknown metric names), `duplicate` (the same reading again, same ts and seq),
`clock_skew` (ts hours off), `burst` (many readings at once). `Simulation.trigger` fires one now.
"""

from __future__ import annotations

import random

FAULTS = ("disconnect", "malformed", "duplicate", "clock_skew", "burst")
BURST_SIZE = 50
SKEW_MS = 3 * 3600 * 1000


def parse_faults(text: str) -> dict[str, float]:
    """`"disconnect=0.01,malformed=0.02"` → {"disconnect": 0.01, "malformed": 0.02}."""
    rates: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r} (known: {', '.join(FAULTS)})")
        if not sep:
            raise ValueError(f"fault {name!r} needs a rate, e.g. {name}=0.01")
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(f"fault {name!r}: rate {value!r} is not a number") from None
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault {name!r}: rate {rate} must be between 0 and 1")
        rates[name] = rate
    return rates


def malformed_payload(rng: random.Random, metric: str) -> bytes:
    """One of the ways a payload goes wrong; each must be refused by the gateway."""
    choices = [
        b'{"ts": 1, "metrics": {',  # truncated JSON
        b"\xff\xfe not utf-8",  # invalid UTF-8
        b'{"metrics": {"' + metric.encode() + b'": "high"}}',  # wrong type
        b'{"metrics": {"' + metric.encode() + b'": 1e9}}',  # out of range
        b'{"metrics": {"no_such_metric": 1}}',  # unknown metric
        b"[1, 2, 3]",  # not an object
        b'{"metrics": {}}',  # empty
    ]
    return rng.choice(choices)


class FaultPlan:
    """Decides, per publish, which faults happen; one-shot triggers win over rates."""

    def __init__(self, rates: dict[str, float], rng: random.Random) -> None:
        self._rates = {name: rate for name, rate in rates.items() if rate > 0}
        self._rng = rng
        self._pending: set[str] = set()

    def trigger(self, fault: str) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        self._pending.add(fault)

    def draw(self) -> set[str]:
        chosen = {name for name, rate in self._rates.items() if self._rng.random() < rate}
        chosen |= self._pending
        self._pending.clear()
        return chosen
