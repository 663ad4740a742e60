"""The care register: a household's care needs, only as it consented to record them, and its
consents, per purpose, with their history.

A household is named as the household register names it ("building/unit",
gateway/services/households.py `Household.key`). Purposes (docs/care.md, "Consent"):

- `register`: its care needs are recorded (elderly, living alone, mobility, chronic illness,
  disability, infants). Withdrawn: the needs are deleted at once.
- `welfare`: its flat's meters, door and check-ins are analysed by the welfare rules.
  Withdrawn: the rules forget it at once and its learnt days are deleted.
- `visits`: grid workers' visits and questionnaires are recorded, and turn into needs.

Functions over the care file's connection, run on the care desk's thread.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from gateway.sqlite import transaction

Purpose = Literal["register", "welfare", "visits"]
PURPOSES: tuple[Purpose, ...] = get_args(Purpose)
Group = Literal["elderly_alone", "disabled", "infants", "other"]
GROUPS: tuple[Group, ...] = get_args(Group)
FLAGS = ("elderly", "living_alone", "mobility", "chronic_illness", "disability", "infants")


@dataclass(frozen=True, slots=True)
class CareNeeds:
    elderly: bool = False  # 60 or older (China's definition of an older person)
    living_alone: bool = False
    mobility: bool = False
    chronic_illness: bool = False
    disability: bool = False
    infants: bool = False  # a child under 3


def group_of(needs: CareNeeds | None) -> Group:
    """The household's group for the equity figures (first that applies)."""
    if needs is None:
        return "other"
    if needs.elderly and needs.living_alone:
        return "elderly_alone"
    if needs.disability or needs.mobility:
        return "disabled"
    return "infants" if needs.infants else "other"


def consents(conn: sqlite3.Connection, household: str) -> dict[str, bool]:
    """The household's current consent per purpose (absent: never given)."""
    rows = conn.execute(
        "SELECT purpose, granted FROM consents WHERE id IN "
        "(SELECT MAX(id) FROM consents WHERE household = ? GROUP BY purpose)",
        (household,),
    ).fetchall()
    return {purpose: bool(granted) for purpose, granted in rows}


def consenting(conn: sqlite3.Connection, purpose: Purpose) -> list[str]:
    rows = conn.execute(
        "SELECT household FROM consents c WHERE purpose = ? AND granted = 1 AND id = "
        "(SELECT MAX(id) FROM consents WHERE household = c.household AND purpose = ?)",
        (purpose, purpose),
    ).fetchall()
    return [r[0] for r in rows]


def set_consent(
    conn: sqlite3.Connection, household: str, purpose: Purpose, granted: bool, ts_ms: int, by: str
) -> bool:
    """Record a consent or its withdrawal; True when it changed. A withdrawal deletes at once
    what the purpose kept (the welfare rules' in-memory state is the caller's to drop)."""
    with transaction(conn, immediate=True):
        current = consents(conn, household).get(purpose, False)
        if current == granted:
            return False
        conn.execute(
            "INSERT INTO consents (household, purpose, granted, ts_ms, by) VALUES (?, ?, ?, ?, ?)",
            (household, purpose, int(granted), ts_ms, by),
        )
        if not granted and purpose == "register":
            conn.execute("DELETE FROM households WHERE household = ?", (household,))
        if not granted and purpose == "welfare":
            conn.execute("DELETE FROM days WHERE household = ?", (household,))
        return True


def put_needs(
    conn: sqlite3.Connection, household: str, building: str, unit: str, needs: CareNeeds, ts_ms: int, by: str
) -> None:
    """Record the household's care needs (the caller checked its `register` consent)."""
    with transaction(conn, immediate=True):
        conn.execute(
            "INSERT OR REPLACE INTO households (household, building, unit, elderly, living_alone, mobility,"
            " chronic_illness, disability, infants, updated_ms, updated_by)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (household, building, unit, *(int(v) for v in asdict(needs).values()), ts_ms, by),
        )


def needs_of(conn: sqlite3.Connection, household: str) -> CareNeeds | None:
    row = conn.execute("SELECT * FROM households WHERE household = ?", (household,)).fetchone()
    return None if row is None else CareNeeds(**{f: bool(row[f]) for f in FLAGS})


def listing(conn: sqlite3.Connection, buildings: frozenset[str] | None = None) -> list[dict[str, Any]]:
    """Every household with care needs or a consent; `buildings` keeps those in them."""
    keys = {
        r[0] for r in conn.execute("SELECT household FROM households UNION SELECT household FROM consents")
    }
    out = []
    for key in sorted(keys):
        building, _, unit = key.partition("/")
        if buildings is not None and building not in buildings:
            continue
        needs = needs_of(conn, key)
        out.append(
            {
                "household": key,
                "building": building,
                "unit": unit,
                "needs": None if needs is None else asdict(needs),
                "group": group_of(needs),
                "consents": consents(conn, key),
            }
        )
    return out
