"""The live stream's fan-out: alarms, events and presence changes to every SSE subscriber.

Each subscriber has its own bounded queue. A subscriber that cannot keep up loses its oldest
items (counted), never slows the pipeline, and never holds memory without bound. Subscribers are
bounded too: at most `max_subscribers` at once, and `max_per_key` for one token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from gateway.instruments import Instruments

StreamItem = tuple[str, dict[str, Any]]  # (SSE event name, JSON-able data)


class StreamFull(Exception):
    """No room for one more subscriber; the message says which bound was reached."""


class StreamHub:
    """Publish once, deliver to all current subscribers."""

    def __init__(
        self,
        instruments: Instruments,
        queue_size: int = 1000,
        max_subscribers: int = 64,
        max_per_key: int = 4,
    ) -> None:
        self._instruments = instruments
        self._queue_size = queue_size
        self._max = max_subscribers
        self._max_per_key = max_per_key
        self._subscribers: set[asyncio.Queue[StreamItem]] = set()
        self._per_key: dict[str, int] = {}

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, name: str, data: dict[str, Any]) -> None:
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
                self._instruments.stream_dropped.inc()
            queue.put_nowait((name, data))

    def room_for(self, key: str) -> None:
        """Raise StreamFull if `key` may not open one more stream now."""
        if len(self._subscribers) >= self._max:
            raise StreamFull(f"{self._max} live streams are open (api.stream_max_subscribers)")
        if self._per_key.get(key, 0) >= self._max_per_key:
            raise StreamFull(
                f"this token has {self._max_per_key} live streams open already (api.stream_max_per_token)"
            )

    @asynccontextmanager
    async def subscribe(self, key: str = "") -> AsyncIterator[asyncio.Queue[StreamItem]]:
        self.room_for(key)
        queue: asyncio.Queue[StreamItem] = asyncio.Queue(maxsize=self._queue_size)
        self._subscribers.add(queue)
        self._per_key[key] = self._per_key.get(key, 0) + 1
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)
            left = self._per_key.pop(key, 1) - 1
            if left:
                self._per_key[key] = left
