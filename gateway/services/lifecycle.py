"""The service request's lifecycle: stages, the transitions allowed between them, Open311 status.

submitted → triaged → planned → assigned → in_service → completed → evaluated → closed, with
rejected, merged (as a duplicate of another request) and reopened. Anything else is refused with
a message that lists what is allowed from where the request is.
"""

from __future__ import annotations

from typing import Literal, get_args

State = Literal[
    "submitted",
    "triaged",
    "planned",
    "assigned",
    "in_service",
    "completed",
    "evaluated",
    "closed",
    "rejected",
    "merged",
    "reopened",
]
STATES: tuple[State, ...] = get_args(State)

# Assigning again from assigned or in_service hands the work to another provider.
ALLOWED: dict[State, tuple[State, ...]] = {
    "submitted": ("triaged", "rejected", "merged"),
    "triaged": ("planned", "assigned", "rejected", "merged"),
    "planned": ("assigned", "rejected", "merged"),
    "assigned": ("assigned", "in_service", "rejected"),
    "in_service": ("assigned", "completed"),
    "completed": ("evaluated", "closed", "reopened"),
    "evaluated": ("closed", "reopened"),
    "closed": ("reopened",),
    "rejected": ("reopened",),
    "merged": (),
    "reopened": ("triaged", "assigned", "in_service", "rejected"),
}

# Stages in which work is still owed: they count for deadlines, stalls, workloads, the needs list.
ACTIVE: frozenset[State] = frozenset(
    {"submitted", "triaged", "planned", "assigned", "in_service", "reopened"}
)
# Open311 knows only "open" and "closed": a request is closed once the work is done or refused.
OPEN311_CLOSED: frozenset[State] = frozenset({"completed", "evaluated", "closed", "rejected", "merged"})


class TransitionError(ValueError):
    """A transition the lifecycle does not allow; the message says what is allowed."""


def check(current: State, target: State) -> None:
    allowed = ALLOWED[current]
    if target not in allowed:
        options = ", ".join(allowed) if allowed else "nothing (it is final)"
        raise TransitionError(f"a request that is {current} cannot become {target}; allowed: {options}")


Open311Status = Literal["open", "closed"]


def open311_status(state: State) -> Open311Status:
    return "closed" if state in OPEN311_CLOSED else "open"
