"""Date-times in query strings and bodies, turned into epoch milliseconds the same way everywhere.

A date-time without an offset is ambiguous on a box whose clock zone nobody set: it is refused
with a message that says how to write it, rather than guessed.
"""

from __future__ import annotations

from datetime import datetime
from typing import overload

from fastapi import HTTPException


@overload
def epoch_ms(moment: datetime | None, status: int = 422, *, default: int) -> int: ...
@overload
def epoch_ms(moment: datetime | None, status: int = 422, *, default: None = None) -> int | None: ...
def epoch_ms(moment: datetime | None, status: int = 422, *, default: int | None = None) -> int | None:
    """`moment` in epoch ms (`default` when absent); no UTC offset → HTTP `status` naming the fix."""
    if moment is None:
        return default
    if moment.tzinfo is None:
        raise HTTPException(status, f"{moment.isoformat()} has no UTC offset (add Z or ±hh:mm)")
    return int(moment.timestamp() * 1000)
