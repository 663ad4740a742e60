"""Rate limits per key: per device for MQTT messages, per token for API writes.

A limit is the installer's text (e.g. "100/second" or "100/second;3000/minute"), parsed by the
`limits` library. One key over its limit is refused; the other keys go on. A flood is logged once
a minute per key, not once per message, so it cannot flood the log as well.
"""

from __future__ import annotations

from limits import parse_many, storage, strategies

LOG_EVERY_MS = 60_000


class KeyedRateLimit:
    def __init__(self, spec: str) -> None:
        """`spec`: one or more limits separated by ';'; empty: no limit."""
        self._items = parse_many(spec) if spec else []
        self._limiter = strategies.FixedWindowRateLimiter(storage.MemoryStorage())
        self._logged: dict[str, int] = {}  # key -> when its flood was last logged

    def allow(self, key: str) -> bool:
        # `all` stops at the first limit exceeded: the others are not charged for a refusal.
        return all(self._limiter.hit(item, key) for item in self._items)

    def should_log(self, key: str, now_ms: int) -> bool:
        last = self._logged.get(key)
        if last is not None and now_ms - last < LOG_EVERY_MS:
            return False
        if len(self._logged) > 10_000:  # many flooding ids: forget old notes rather than grow
            self._logged.clear()
        self._logged[key] = now_ms
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
