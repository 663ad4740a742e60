"""Refused service operations: the error that carries the reason, and what becomes of it.

A request, rating or vote the desk refuses (a second vote, an unknown ticket, a rating by someone
other than the filer) is answered (to the terminal, or with the HTTP status the error names),
counted under its reason code, told in the log a few lines an hour (a resident's outcome, not an
operator's problem), and dead-lettered with the next batch the local store commits.
"""

from __future__ import annotations


class DeskError(ValueError):
    """A refused operation on the service desk; `status` is the HTTP status that fits it."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
