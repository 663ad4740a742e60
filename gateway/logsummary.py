"""Routine happenings told in the log as a few lines an hour, not one line each.

A healthy community still has routine events worth knowing about: a device seen for the first
time, a resident's vote refused as a repeat. One line each is thousands of lines on the day a
building's devices arrive, and a log on an SD card is wear too (issue 15). `LogSummary` tells
the first of each kind at once, counts the rest, and tells the count (with a few examples) once
per `interval_s` when the next one comes or when `flush()` is called (the owner's periodic tick
and shutdown). docs/observability.md gives the resulting figure of log lines per hour.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

INTERVAL_S = 600.0  # ten minutes: at most six summary lines an hour per kind
EXAMPLES = 3


@dataclass(slots=True)
class _Kind:
    started: float
    count: int = 0
    examples: list[str] = field(default_factory=list)


class LogSummary:
    """`note(what, example)` for each occurrence; `what` reads as a count's noun phrase."""

    def __init__(
        self,
        logger: logging.Logger,
        level: int = logging.INFO,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._level = level
        self._interval_s = interval_s
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}

    def note(self, what: str, example: str) -> None:
        now = self._clock()
        kind = self._kinds.get(what)
        if kind is None:
            # The first of its kind is told at once: an installer watching the log sees it.
            self._kinds[what] = _Kind(started=now)
            self._log.log(self._level, "%s: %s (more are counted, told every %.0f min)",
                          what, example, self._interval_s / 60)  # fmt: skip
            return
        kind.count += 1
        if len(kind.examples) < EXAMPLES:
            kind.examples.append(example)
        if now - kind.started >= self._interval_s:
            self._tell(what, kind, now)

    def flush(self) -> None:
        """Tell the counts whose interval has passed (all of them at shutdown: `force`)."""
        now = self._clock()
        for what, kind in self._kinds.items():
            if kind.count and now - kind.started >= self._interval_s:
                self._tell(what, kind, now)

    def flush_all(self) -> None:
        now = self._clock()
        for what, kind in self._kinds.items():
            if kind.count:
                self._tell(what, kind, now)

    def _tell(self, what: str, kind: _Kind, now: float) -> None:
        minutes = (now - kind.started) / 60
        self._log.log(self._level, "%s: %d more in the last %.0f min (e.g. %s)",
                      what, kind.count, minutes, ", ".join(kind.examples))  # fmt: skip
        kind.started, kind.count, kind.examples = now, 0, []
