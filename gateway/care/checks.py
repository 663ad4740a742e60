"""Welfare checks: what a rule raised, where it stands, and how it ends.

A check goes to the workers of the household's grid first (`raised`); one of them acknowledges
it (`acknowledged`), or, past `care.ack_within` without an acknowledgement, it escalates to the
care centre (`escalated`, still waiting for someone to acknowledge); it closes with the visit's
outcome (`closed`). The record and its steps are shared by the care desk and the simulation;
`save`, `load` and `listing` keep it in the care file.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from gateway.sqlite import Where, transaction

CheckState = Literal["raised", "escalated", "acknowledged", "closed"]
Outcome = Literal["fine", "needed_help", "hospital", "not_home", "no_answer"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)


class CheckError(ValueError):
    """An action a check's state does not allow; the text starts with a reason code."""


@dataclass(slots=True)
class WelfareCheck:
    id: str
    household: str
    building: str
    grid: str | None
    rule: str
    raised_ms: int
    quiet_since_ms: int
    why: str
    ticket: str | None = None  # the service request filed for it (gateway/services/actions.py: Actions.file)
    acked_ms: int | None = None
    acked_by: str | None = None
    escalated_ms: int | None = None
    escalated_to: str | None = None
    closed_ms: int | None = None
    closed_by: str | None = None
    outcome: Outcome | None = None
    note: str = ""

    @property
    def state(self) -> CheckState:
        if self.closed_ms is not None:
            return "closed"
        if self.acked_ms is not None:
            return "acknowledged"
        return "escalated" if self.escalated_ms is not None else "raised"

    def due_escalation(self, now_ms: int, ack_within_ms: int) -> bool:
        return self.state == "raised" and now_ms - self.raised_ms >= ack_within_ms

    def escalate(self, now_ms: int, to: str) -> None:
        self.escalated_ms, self.escalated_to = now_ms, to

    def acknowledge(self, by: str, ts_ms: int) -> bool:
        """True when this acknowledged it; False when it was already (a re-sent acknowledgement)."""
        if self.state == "closed":
            raise CheckError(f"closed: check {self.id} is closed already")
        if self.acked_ms is not None:
            return False
        self.acked_ms, self.acked_by = ts_ms, by
        return True

    def close(self, outcome: Outcome, by: str, ts_ms: int, note: str = "") -> bool:
        """True when this closed it; False for a re-sent close with the same outcome."""
        if self.closed_ms is not None:
            if self.outcome == outcome:
                return False
            raise CheckError(f"closed: check {self.id} is closed already, as {self.outcome}")
        if self.acked_ms is None:
            self.acked_ms, self.acked_by = ts_ms, by
        self.closed_ms, self.closed_by, self.outcome, self.note = ts_ms, by, outcome, note
        return True


# -- kept in the care file (gateway/care/schema.py), on the care desk's thread ----------------

_COLUMNS = (
    "id, household, building, grid, rule, raised_ms, quiet_since_ms, why, ticket, acked_ms, acked_by,"
    " escalated_ms, escalated_to, closed_ms, closed_by, outcome, note"
)


def save(conn: sqlite3.Connection, check: WelfareCheck) -> None:
    with transaction(conn, immediate=True):
        conn.execute(
            f"INSERT OR REPLACE INTO checks ({_COLUMNS}) VALUES ({', '.join('?' * 17)})",
            tuple(getattr(check, name.strip()) for name in _COLUMNS.split(",")),
        )


def load(conn: sqlite3.Connection, check_id: str) -> WelfareCheck | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM checks WHERE id = ?", (check_id,)).fetchone()
    return None if row is None else WelfareCheck(**dict(row))


def listing(
    conn: sqlite3.Connection,
    *,
    open_only: bool = False,
    household: str | None = None,
    since_ms: int | None = None,
    limit: int = 500,
) -> list[WelfareCheck]:
    where = Where()
    if open_only:
        where.add("closed_ms IS NULL")
    where.equal(household=household)
    where.given("raised_ms >= ?", since_ms)
    sql = f"SELECT {_COLUMNS} FROM checks{where} ORDER BY raised_ms DESC LIMIT ?"
    rows = conn.execute(sql, (*where.args, limit)).fetchall()
    return [WelfareCheck(**dict(r)) for r in rows]


def view(check: WelfareCheck) -> dict[str, Any]:
    return {**asdict(check), "state": check.state}
