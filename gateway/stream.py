"""The live stream's fan-out: alarms, events and presence changes to every SSE subscriber.

Each subscriber has its own bounded queue. A subscriber that cannot keep up loses its oldest
items (counted), never slows the pipeline, and never holds memory without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from gateway.stats import GatewayMetrics

StreamItem = tuple[str, dict[str, Any]]  # (SSE event name, JSON-able data)


class StreamHub:
    """Publish once, deliver to all current subscribers."""

    def __init__(self, metrics: GatewayMetrics, queue_size: int = 1000) -> None:
        self._metrics = metrics
        self._queue_size = queue_size
        self._subscribers: set[asyncio.Queue[StreamItem]] = set()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, name: str, data: dict[str, Any]) -> None:
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
                self._metrics.stream_dropped.inc()
            queue.put_nowait((name, data))

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[StreamItem]]:
        queue: asyncio.Queue[StreamItem] = asyncio.Queue(maxsize=self._queue_size)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)
