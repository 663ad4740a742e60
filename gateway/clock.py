"""The wall clock, watched against the monotonic one.

A box without a real-time clock boots with a wrong time (1970, or the time it last saved) and
corrects it minutes later when NTP syncs: the wall clock jumps forward or back, by hours or
years. The monotonic clock never jumps. `ClockWatch` compares how far each moved between two
looks; a difference beyond `JUMP_S` is a jump: logged, kept, and shown by `/readyz` and
`cgw doctor`. Time-outs measured inside one run (presence, gateway/presence.py) use the
monotonic clock, so a jump neither holds a device online nor drops every device at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


def now_ms() -> int:
    """The wall clock in epoch milliseconds: the one way the gateway stamps what it records."""
    return time.time_ns() // 1_000_000


# More than scheduling noise or an NTP slew (which changes the rate by at most 0.05 %), less
# than any step a real correction makes.
JUMP_S = 2.0


@dataclass(frozen=True, slots=True)
class ClockJump:
    at_ms: int  # the wall clock's time just after the jump
    by_ms: int  # positive: forward


def _span(ms: int) -> str:
    s = abs(ms) / 1000
    for unit, size in (("days", 86_400), ("h", 3_600), ("min", 60)):
        if s >= size:
            return f"{s / size:,.1f} {unit}"
    return f"{s:.1f} s"


class ClockWatch:
    """`check()` periodically (the application's clock task); `jumps` counts, `last` is the latest."""

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        threshold_s: float = JUMP_S,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._threshold_s = threshold_s
        self._then = (wall(), monotonic())
        self.jumps = 0
        self.last: ClockJump | None = None

    def check(self) -> ClockJump | None:
        """Compare both clocks since the last look; the jump if the wall clock stepped."""
        wall, mono = self._wall(), self._monotonic()
        drift = (wall - self._then[0]) - (mono - self._then[1])
        self._then = (wall, mono)
        if abs(drift) <= self._threshold_s:
            return None
        jump = ClockJump(at_ms=int(wall * 1000), by_ms=int(drift * 1000))
        self.jumps += 1
        self.last = jump
        log.warning(
            "the wall clock jumped %s by %s (NTP sync after a boot without a real-time clock?); "
            "time-outs run on the monotonic clock and are not affected",
            "forward" if jump.by_ms > 0 else "back",
            _span(jump.by_ms),
        )
        return jump

    def summary(self) -> str:
        if self.last is None:
            return "no jump of the wall clock seen since start"
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.last.at_ms / 1000))
        return (
            f"the wall clock jumped {'forward' if self.last.by_ms > 0 else 'back'} by "
            f"{_span(self.last.by_ms)} (landing at {when}); {self.jumps} jump(s) since start. "
            "Times stamped by the gateway before it were off by that much"
        )
