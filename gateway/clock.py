"""The gateway's clock: the wall clock, watched against the monotonic one and kept above a floor.

A box without a real-time clock boots with a wrong time (1970, or the time it last saved) and
corrects it minutes later when NTP syncs: the wall clock jumps forward or back, by hours or
years. The policy (docs/reliability.md, "A clock that jumps"):

- **A floor.** The gateway's time cannot be earlier than the newest time it has recorded (the
  `clock-floor` file in its data folder, saved every hour and at stop) nor than `BUILD_FLOOR_MS`.
  While the wall clock is below the floor (and the kernel does not say NTP synchronised it) the
  clock is *not set*: the gateway stamps with its estimate, the floor plus the monotonic time
  since start, which is never earlier than what it already recorded; devices' own times are
  accepted however far ahead of that estimate they are (they are likely right and the gateway
  wrong). Once the wall clock reaches the floor the clock is set for the rest of the run.
- **Jumps.** `ClockWatch.check()` compares how far the gateway's time and the monotonic clock
  moved since its last look; a difference beyond `JUMP_S` is a jump (the sync ending a run
  without a set clock is one too): logged, kept, shown by `/readyz` and `cgw doctor`, and told
  to the stages that keep times of their own (`on_jump`): the alarm engine shifts the durations
  it is timing, the service desk shifts the deadlines of open requests, by the jump's size.
- **Retention** asks `retention_ms()`: after a forward jump it lags the wall clock by the jump
  and catches up at the monotonic clock's pace (running at twice real time), so a jump deletes
  nothing at once; after a back jump it follows the wall clock back.
- Time-outs measured inside one run (presence, gateway/presence.py) use the monotonic clock.

Imports nothing of the gateway: the stages get a `ClockWatch` passed down.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def now_ms() -> int:
    """The wall clock in epoch milliseconds, for stamps made outside a running gateway (the CLI)
    and for log throttles; the stages and the API's routes (`ctx.clock`) ask their
    `ClockWatch.now_ms()`, which stays right while the clock is not set."""
    return time.time_ns() // 1_000_000


# More than scheduling noise or an NTP slew (which changes the rate by at most 0.05 %), less
# than any step a real correction makes.
JUMP_S = 2.0
# This code did not exist before this day, so a clock earlier than it is not set (1970, or a
# real-time clock whose battery died). Any date before the release is correct here.
BUILD_FLOOR_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
FLOOR_FILE = "clock-floor"
FLOOR_SAVE_S = 3600.0  # how often the running gateway saves its time as the next run's floor

_TIME_ERROR = 5  # adjtimex(2): the kernel's clock is not synchronised


def kernel_synced() -> bool:
    """Whether the kernel says NTP (chrony, systemd-timesyncd, ntpd) synchronised the clock.
    False when it says not, or cannot be asked (another OS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        timex = ctypes.create_string_buffer(1024)  # struct timex, modes 0: read only
        state: int = libc.adjtimex(timex)
    except (OSError, AttributeError):
        return False
    return 0 <= state < _TIME_ERROR


def read_floor(data_dir: Path) -> int:
    """The time the gateway last saved in this data folder, or `BUILD_FLOOR_MS`."""
    try:
        saved = int((data_dir / FLOOR_FILE).read_text().strip())
    except (OSError, ValueError):
        saved = 0
    return max(BUILD_FLOOR_MS, saved)


def save_floor(data_dir: Path, ms: int) -> None:
    """Save `ms` as the next run's floor (13 bytes, written whole: a crash leaves the old one)."""
    path = data_dir / FLOOR_FILE
    part = path.with_name(FLOOR_FILE + ".part")
    try:
        part.unlink(missing_ok=True)  # made anew, so 0600 like everything in the data folder
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{ms}\n")
        os.replace(part, path)
    except OSError as exc:
        log.warning("could not save the clock's floor in %s: %s", path, exc)


@dataclass(frozen=True, slots=True)
class ClockJump:
    at_ms: int  # the gateway's time just after the jump (as seen by the check that found it)
    by_ms: int  # positive: forward
    # The gateway's time when the clock it jumped from began (this run's start, or the jump
    # before): its stamps in [from_ms, at_ms - by_ms] were made by the clock that was off.
    from_ms: int = 0

    @property
    def before_ms(self) -> int:
        """The last time the clock showed before it jumped."""
        return self.at_ms - self.by_ms


def _span(ms: int) -> str:
    s = abs(ms) / 1000
    for unit, size in (("days", 86_400), ("h", 3_600), ("min", 60)):
        if s >= size:
            return f"{s / size:,.1f} {unit}"
    return f"{s:.1f} s"


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


class ClockWatch:
    """The gateway's time (`now_ms`), its jumps (`check`, `jumps`, `last`, `on_jump`) and the
    time retention goes by (`retention_ms`). The clocks are callables so a test moves them."""

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        threshold_s: float = JUMP_S,
        *,
        floor_ms: int = 0,
        synced: Callable[[], bool] = kernel_synced,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._threshold_s = threshold_s
        self._start_mono = monotonic()
        self.floor_ms = floor_ms
        self.was_unset = False  # this run started with a clock below the floor
        self._set = self._wall_ms() >= floor_ms or synced()
        if not self._set:
            self.was_unset = True
            log.warning(
                "the wall clock (%s) is earlier than the newest time this gateway recorded (%s): "
                "it is not set (no real-time clock, NTP not synchronised yet); stamping with an "
                "estimate until it is, and accepting devices' own times",
                _utc(self._wall_ms()),
                _utc(floor_ms),
            )
        self._then = (self.now_ms(), monotonic())
        self._frame_from = self._then[0]
        self._listeners: list[Callable[[ClockJump], None]] = []
        self._lag_ms = 0  # retention's lag behind the gateway's time after a forward jump
        self._lag_mono = self._start_mono
        self.jumps = 0
        self.last: ClockJump | None = None

    def _wall_ms(self) -> int:
        return int(self._wall() * 1000)

    @property
    def is_set(self) -> bool:
        """False while the wall clock is below the floor (it has not been set since boot)."""
        if not self._set and self._wall_ms() >= self.floor_ms:
            self._set = True
        return self._set

    def now_ms(self) -> int:
        """The gateway's time in epoch ms: the wall clock once set; until then the floor plus
        the monotonic time since start."""
        if self.is_set:
            return self._wall_ms()
        return self.floor_ms + int((self._monotonic() - self._start_mono) * 1000)

    def correction_ms(self) -> int:
        """What to add to a wall-clock stamp (a driver's receive time) to make it the gateway's
        time: 0 once the clock is set."""
        return 0 if self.is_set else self.now_ms() - self._wall_ms()

    def on_jump(self, listener: Callable[[ClockJump], None]) -> None:
        """Call `listener` (on the event loop, synchronously) with every jump found."""
        self._listeners.append(listener)

    def check(self) -> ClockJump | None:
        """Compare both clocks since the last look; the jump if the gateway's time stepped.
        Cheap (two clock reads): the pipeline looks before every batch."""
        now, mono = self.now_ms(), self._monotonic()
        drift_ms = (now - self._then[0]) - int((mono - self._then[1]) * 1000)
        self._then = (now, mono)
        if abs(drift_ms) <= self._threshold_s * 1000:
            return None
        jump = ClockJump(at_ms=now, by_ms=drift_ms, from_ms=self._frame_from)
        self._frame_from = now
        self.jumps += 1
        self.last = jump
        self._lag_ms = max(0, self._lag(mono) + drift_ms)
        self._lag_mono = mono
        log.warning(
            "the clock jumped %s by %s (NTP sync after a boot without a real-time clock?); "
            "time-outs run on the monotonic clock, alarm durations and service deadlines are "
            "shifted by the jump, retention catches up at twice real time",
            "forward" if jump.by_ms > 0 else "back",
            _span(jump.by_ms),
        )
        for listener in self._listeners:
            listener(jump)
        return jump

    def _lag(self, mono: float) -> int:
        """The lag left: it shrinks by the monotonic time passed since the jump."""
        return max(0, self._lag_ms - int((mono - self._lag_mono) * 1000))

    def retention_ms(self) -> int:
        """The time retention deletes by: the gateway's time, less what is left of the lag a
        forward jump made (it is looked for first, so a jump a moment ago deletes nothing)."""
        self.check()
        return self.now_ms() - self._lag(self._monotonic())

    def summary(self) -> str:
        if not self.is_set:
            return (
                f"NOT SET: the wall clock ({_utc(self._wall_ms())}) is earlier than the newest time "
                f"this gateway recorded ({_utc(self.floor_ms)}); stamping with an estimate "
                f"({_utc(self.now_ms())}) until NTP sets it (enable NTP, or fit a real-time clock)"
            )
        if self.last is None:
            return "set; no jump of the wall clock seen since start"
        return (
            f"set; the clock jumped {'forward' if self.last.by_ms > 0 else 'back'} by "
            f"{_span(self.last.by_ms)} (landing at {_utc(self.last.at_ms)}); {self.jumps} jump(s) "
            "since start. Times stamped by the gateway before it were off by that much"
        )
