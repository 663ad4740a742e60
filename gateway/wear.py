"""How fast the gateway wears the storage it writes to: an SD card or eMMC lasts a number of
program/erase cycles of its whole size, so its life is its size times those cycles over the
bytes written per day.

The bytes are the process's own `write_bytes` from `/proc/self/io` (what it sent towards the
storage, counted by the kernel when a page is first dirtied), so they include the local store,
its WAL, the outbox and the log if it goes to a file. `/metrics` exports the counter, `/readyz`
the rate since start and the projection, and `cgw doctor` shows them for a running gateway.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

# A consumer SD card's cells endure about this many program/erase cycles (TLC flash); the
# projection assumes the card spreads wear evenly and adds no write amplification of its own, so
# it is a ceiling: it compares set-ups and rates, it does not promise a date.
ASSUMED_CYCLES = 3_000
DAY_S = 86_400


def written_bytes(io: Path = Path("/proc/self/io")) -> int | None:
    """Bytes this process caused to be written to storage so far; None without I/O accounting."""
    try:
        for line in io.read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def life_years(bytes_per_day: float, medium_bytes: int, cycles: int = ASSUMED_CYCLES) -> float:
    return medium_bytes * cycles / bytes_per_day / 365 if bytes_per_day > 0 else float("inf")


class WearMeter:
    """The write rate since the gateway started, and what it means for the medium's life."""

    def __init__(
        self,
        data_dir: Path,
        read: Callable[[], int | None] = written_bytes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._data_dir = data_dir
        self._read = read
        self._clock = clock
        self._started = (clock(), read())

    def rate(self) -> float | None:
        """Bytes per second since start (None without I/O accounting or before a second)."""
        t0, b0 = self._started
        now, written = self._clock(), self._read()
        if written is None or b0 is None or now - t0 < 1:
            return None
        return (written - b0) / (now - t0)

    def summary(self) -> str:
        rate = self.rate()
        if rate is None:
            return "no write figures yet (or no /proc/self/io on this system)"
        per_day = rate * DAY_S
        size = shutil.disk_usage(self._data_dir).total
        years = life_years(per_day, size)
        return (
            f"{rate / 1000:,.1f} kB/s written since start ({per_day / 1e9:,.2f} GB/day); at this rate "
            f"a medium of {size / 1e9:,.0f} GB and {ASSUMED_CYCLES:,} P/E cycles lasts about "
            f"{years:,.0f} years (a ceiling: cards amplify small writes)"
        )


class WrittenBytesCollector(Collector):
    """`cgw_process_written_bytes_total` at /metrics, read when scraped."""

    def __init__(self, read: Callable[[], int | None] = written_bytes) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        value = self._read()
        if value is not None:
            yield CounterMetricFamily(
                "cgw_process_written_bytes",
                "Bytes the gateway process caused to be written to storage (/proc/self/io write_bytes)",
                value=value,
            )
