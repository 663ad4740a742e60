"""Rate limits per key: per token for API writes, per device for MQTT messages.

A limit is the installer's text (e.g. "100/second" or "100/second;3000/minute"), parsed by the
`limits` library. One key over its limit is refused; the other keys go on. A flood is logged once
a minute per key, not once per message, so it cannot flood the log as well.

API writes are counted by wall clock (`KeyedRateLimit`, the library's own limiter). Device
messages are counted by *message time* (`MessageTimeRateLimit`): after an outage the broker
delivers a device's backlog in one burst, and that burst is not a flood; what a device claims to
have sent within one second of its own time is.
"""

from __future__ import annotations

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


class MessageTimeRateLimit(FloodNotes):
    """Fixed windows of message time per device: at most `amount` messages whose time falls in
    one window. Only each device's current window is kept (a device's messages come in order)."""

    def __init__(self, spec: str) -> None:
        super().__init__()
        self._windows = [(item.amount, item.get_expiry() * 1000) for item in parse_many(spec)] if spec else []
        self._current: dict[str, list[int]] = {}  # device -> [window start, count] per limit, flat

    def allow(self, key: str, ts_ms: int) -> bool:
        # On the hot path (every message): plain loops over a flat list, no per-call objects.
        windows = self._windows
        if not windows:
            return True
        state = self._current.get(key)
        if state is None:
            if len(self._current) > 100_000:  # many ids (open registration): start afresh
                self._current.clear()
            state = self._current[key] = [-1, 0] * len(windows)
        for i, (amount, length) in enumerate(windows):
            if state[2 * i] == ts_ms - ts_ms % length and state[2 * i + 1] >= amount:
                return False
        for i, (_, length) in enumerate(windows):
            start = ts_ms - ts_ms % length
            if state[2 * i] == start:
                state[2 * i + 1] += 1
            else:
                state[2 * i] = start
                state[2 * i + 1] = 1
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
