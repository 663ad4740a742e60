"""Rate limits per key: per token for API writes, per device for MQTT messages.

A limit is the installer's text (e.g. "100/second" or "100/second;3000/minute"), parsed by the
`limits` library. One key over its limit is refused; the other keys go on. A flood is logged once
a minute per key, not once per message, so it cannot flood the log as well.

API writes are counted by wall clock (`KeyedRateLimit`, the library's own limiter). Device
messages are counted by the time the gateway *received* them (`DeviceRateLimit`), before their
payload is decoded, so a flood costs no parsing and what a device claims cannot move it out of
the count. After an outage, though, the broker delivers a device's backlog in one burst, and
that burst is not a flood: beyond the limit a device may draw on a bounded allowance
(`pipeline.backlog_allowance` messages, refilled over an hour) for messages whose own times go
forward and stay within the limit by those times, as a held backlog's do.
"""

from __future__ import annotations

from enum import Enum

from limits import parse_many, storage, strategies

LOG_EVERY_MS = 60_000


class FloodNotes:
    """When each flooding key was last logged: `should_log` says yes once a minute per key."""

    def __init__(self) -> None:
        self._logged: dict[str, int] = {}  # key -> when its flood was last logged

    def should_log(self, key: str, now_ms: int) -> bool:
        last = self._logged.get(key)
        if last is not None and now_ms - last < LOG_EVERY_MS:
            return False
        if len(self._logged) > 10_000:  # many flooding ids: forget old notes rather than grow
            self._logged.clear()
        self._logged[key] = now_ms
        return True


class KeyedRateLimit(FloodNotes):
    def __init__(self, spec: str) -> None:
        """`spec`: one or more limits separated by ';'; empty: no limit."""
        super().__init__()
        self._items = parse_many(spec) if spec else []
        self._limiter = strategies.FixedWindowRateLimiter(storage.MemoryStorage())

    def allow(self, key: str) -> bool:
        # `all` stops at the first limit exceeded: the others are not charged for a refusal.
        return all(self._limiter.hit(item, key) for item in self._items)


class Admission(Enum):
    TAKEN = "taken"  # within the limit by receive time
    BACKLOG = "backlog"  # over it: taken only if its own time says it was held (`backlog()`)
    REFUSED = "refused"  # over it with no allowance left: refused before it is decoded


MAX_KEYS = 100_000  # many ids (open registration, junk): start afresh rather than grow
ALLOWANCE_REFILL_MS = 3_600_000  # the whole allowance comes back over an hour


class _Windows:
    """Fixed windows per key: at most `amount` hits whose time falls in one window of each
    limit. Only each key's current windows are kept, so times must not go backwards."""

    def __init__(self, spec: str) -> None:
        self.limits = [(item.amount, item.get_expiry() * 1000) for item in parse_many(spec)] if spec else []
        self._current: dict[str, list[int]] = {}  # key -> [window start, count] per limit, flat

    def hit(self, key: str, ts_ms: int) -> bool:
        # On the hot path (every message): plain loops over a flat list, no per-call objects.
        limits = self.limits
        state = self._current.get(key)
        if state is None:
            if len(self._current) > MAX_KEYS:
                self._current.clear()
            state = self._current[key] = [-1, 0] * len(limits)
        for i, (amount, length) in enumerate(limits):
            if state[2 * i] == ts_ms - ts_ms % length and state[2 * i + 1] >= amount:
                return False
        for i, (_, length) in enumerate(limits):
            start = ts_ms - ts_ms % length
            if state[2 * i] == start:
                state[2 * i + 1] += 1
            else:
                state[2 * i] = start
                state[2 * i + 1] = 1
        return True


class DeviceRateLimit(FloodNotes):
    """Per device: `admit()` by receive time before decoding; `backlog()` judges a message over
    the limit by its own time once it is decoded."""

    def __init__(self, spec: str, backlog_allowance: int = 0) -> None:
        super().__init__()
        self._received = _Windows(spec)
        self._claimed = _Windows(spec)
        self._capacity = backlog_allowance
        self._allowance: dict[str, list[float]] = {}  # key -> [messages left, when refilled]
        self._cursor: dict[str, int] = {}  # key -> newest own time taken from its backlog

    def admit(self, key: str, received_ms: int) -> Admission:
        if not self._received.limits or self._received.hit(key, received_ms):
            return Admission.TAKEN
        left = self._allowance.get(key)
        if left is None:
            if len(self._allowance) > MAX_KEYS:
                self._allowance.clear()
            left = self._allowance[key] = [float(self._capacity), float(received_ms)]
        else:
            elapsed = max(0.0, received_ms - left[1])
            left[0] = min(float(self._capacity), left[0] + elapsed * self._capacity / ALLOWANCE_REFILL_MS)
            left[1] = float(received_ms)
        if left[0] < 1:
            return Admission.REFUSED
        left[0] -= 1
        return Admission.BACKLOG

    def backlog(self, key: str, claimed_ms: int) -> bool:
        """A message over the limit whose own time is `claimed_ms`: taken when its time goes
        forward from the backlog's last one and is within the limit by those times. (A device
        that claimed times in alternating windows would otherwise start each window afresh.)"""
        cursor = self._cursor.get(key)
        if cursor is not None and claimed_ms < cursor:
            return False
        if not self._claimed.hit(key, claimed_ms):
            return False
        if cursor is None and len(self._cursor) > MAX_KEYS:
            self._cursor.clear()
        self._cursor[key] = claimed_ms
        return True


def check_spec(value: str) -> str:
    """A settings validator: the text is a rate limit `limits` understands, or empty."""
    value = value.strip()
    if value:
        try:
            parse_many(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a rate limit; write e.g. '100/second' or '100/second;3000/minute'"
            ) from None
    return value
