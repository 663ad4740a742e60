"""The pipeline task: takes driver batches from the bounded inbox and pushes them through.

It is the `Ingress` every driver puts into. One task owns processing, so registry, presence
and alarm state need no locks; it also runs the presence sweep and periodic device snapshots.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.instruments import Instruments
from gateway.models import RawMessage
from gateway.pipeline.process import Processor
from gateway.pipeline.route import Router
from gateway.registry import DeviceRegistry

# Last values and last-seen times are saved in bulk this often (and at shutdown): a killed
# gateway comes back with them up to this old; the readings themselves are all in the store.
# Rarely, because every snapshot rewrites a page per few devices (the SD card's wear).
SNAPSHOT_INTERVAL_S = 300.0


class Pipeline:
    """decode → validate → enrich → route, one batch at a time."""

    def __init__(
        self,
        processor: Processor,
        router: Router,
        registry: DeviceRegistry,
        instruments: Instruments,
        queue_size: int,
        sweep_interval_s: float,
    ) -> None:
        self._processor = processor
        self._router = router
        self._registry = registry
        self._instruments = instruments
        self._inbox: asyncio.Queue[tuple[list[RawMessage], Callable[[], None] | None]] = asyncio.Queue(
            maxsize=queue_size
        )
        self._sweep_interval_s = sweep_interval_s
        self._depth = instruments.queue_depth.labels(stage="inbox")

    async def put(self, batch: list[RawMessage], on_durable: Callable[[], None] | None = None) -> None:
        """Queue a driver's batch; `on_durable` is called once all of it is durable (or refused)."""
        await self._inbox.put((batch, on_durable))
        self._depth.set(self._inbox.qsize())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + self._sweep_interval_s
        next_snapshot = loop.time() + SNAPSHOT_INTERVAL_S
        while True:
            timeout = max(0.0, next_sweep - loop.time())
            try:
                item = await asyncio.wait_for(self._inbox.get(), timeout)
            except TimeoutError:
                item = None
            if item is not None:
                messages, on_durable = item
                try:
                    batch = self._processor.process(messages)
                    if on_durable is not None:
                        batch.on_durable.append(on_durable)
                    await self._router.route(batch)
                finally:
                    self._inbox.task_done()
                    self._depth.set(self._inbox.qsize())
            if loop.time() >= next_sweep:
                next_sweep = loop.time() + self._sweep_interval_s
                swept = self._processor.sweep()
                self._registry.newcomers.flush()
                if loop.time() >= next_snapshot:
                    # Last values and last-seen times change with every reading; they are saved
                    # here in bulk rather than per message.
                    next_snapshot = loop.time() + SNAPSHOT_INTERVAL_S
                    swept.devices = self._registry.all()
                if swept:
                    await self._router.route(swept)
                self._update_presence_gauges()

    async def drain(self) -> None:
        """Wait until every batch put so far has been processed and routed."""
        await self._inbox.join()

    def _update_presence_gauges(self) -> None:
        online = sum(1 for d in self._registry.all() if d.online)
        self._instruments.devices.labels(state="online").set(online)
        self._instruments.devices.labels(state="offline").set(len(self._registry) - online)
