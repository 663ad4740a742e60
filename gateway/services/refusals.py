"""Refused service operations: the error that carries the reason, and what becomes of it.

A request, rating or vote the desk refuses (a second vote, an unknown ticket, a rating by someone
other than the filer) is answered (to the terminal, or with the HTTP status the error names),
counted under its reason code, told in the log a few lines an hour (a resident's outcome, not an
operator's problem), and dead-lettered with the next batch the local store commits.
"""

from __future__ import annotations

import logging

from gateway.instruments import Instruments
from gateway.logsummary import LogSummary
from gateway.models import DeadLetter

log = logging.getLogger(__name__)


class DeskError(ValueError):
    """A refused operation on the service desk; `status` is the HTTP status that fits it."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Refusals:
    """Counts and tells every refusal, from a terminal or over the API, under one summary."""

    def __init__(self, instruments: Instruments) -> None:
        self._instruments = instruments
        # A repeated vote or rating is routine: told a few lines an hour (gateway/logsummary.py).
        self._summary = LogSummary(log)

    def letter(
        self, ts_ms: int, topic: str, who: str, exc: Exception, payload: bytes, channel: str, via: str = ""
    ) -> DeadLetter:
        """The refusal's dead letter, counted under its reason code and noted for the log."""
        letter = DeadLetter(ts_ms, topic, who, reason(exc), payload, channel)
        self._instruments.messages_rejected.labels(reason=letter.reason_code).inc()
        self._summary.note(f"refused {channel}s{via}", f"{who}: {letter.reason}")
        return letter

    def flush(self) -> None:
        """Tell the counts whose interval has passed (the deadline loop's tick)."""
        self._summary.flush()

    def flush_all(self) -> None:
        self._summary.flush_all()


def reason(exc: Exception) -> str:
    """The refusal's reason as dead letters and acks carry it: `code: words`."""
    text = str(exc)
    if ":" not in text or not text.split(":", 1)[0].isidentifier():
        return f"refused: {text}"
    return text
