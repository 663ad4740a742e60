"""What every part of the service loop works with, built once by the application.

The desk (the pipeline's terminal messages and device events), the actions (writes over the API
and from the district) and the deadline task all write `services.sqlite3` through its one
`SqliteThread`, check against the same catalogue, count in the same instruments and tell their
refusals under one summary, and stamp with the gateway's one clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.clock import ClockWatch
from gateway.instruments import Instruments
from gateway.services.catalogue import Catalogue
from gateway.services.households import HouseholdRegister
from gateway.services.refusals import Refusals
from gateway.sqlite import SqliteThread


@dataclass(frozen=True, slots=True)
class ServiceContext:
    db: SqliteThread  # services.sqlite3
    catalogue: Catalogue
    community: str  # the tickets' prefix
    instruments: Instruments
    refusals: Refusals
    households: HouseholdRegister = field(default_factory=lambda: HouseholdRegister([]))
    clock: ClockWatch = field(default_factory=ClockWatch)  # the gateway's time (gateway/clock.py)
