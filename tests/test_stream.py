"""The live stream's fan-out (gateway/stream.py) on its own: a subscriber that does not keep up
loses its oldest items, counted, and neither slows the publisher nor the other subscribers.

(The stream over real HTTP: tests/test_gateway_e2e.py and test_service_loop.py. Filling the
kernel's socket buffers to make a real SSE client slow would take megabytes of events; the drop
happens in the hub's queue, which this drives directly.)
"""

from __future__ import annotations

from gateway.instruments import Instruments
from gateway.stream import StreamHub


async def test_a_slow_subscriber_loses_its_oldest_items_counted_and_the_others_lose_nothing() -> None:
    metrics = Instruments()
    hub = StreamHub(metrics, queue_size=3)
    got: list[int] = []
    async with hub.subscribe() as slow, hub.subscribe() as fast:
        assert hub.subscribers == 2
        for n in range(10):
            hub.publish("alarm", {"n": n})  # never waits, whoever is behind
            got.append((await fast.get())[1]["n"])
        kept = [slow.get_nowait()[1]["n"] for _ in range(slow.qsize())]
    assert got == list(range(10))
    assert kept == [7, 8, 9]  # the newest, in order
    assert metrics.stream_dropped._value.get() == 7
    assert hub.subscribers == 0  # a subscriber that left holds nothing
