"""The driver interface: how a protocol hands messages to the gateway's pipeline.

Every driver speaks the contract's language to the pipeline: it produces `RawMessage` tuples
`(topic, payload, received_ms)` with topics `cgw/v1/{device_id}/{channel}` and JSON payloads
(docs/contract.md section 1), whatever its wire protocol. So validation, enrichment, dead-lettering
and routing are the same for every source, and a new protocol is one new module.

A driver's life: construct with its typed settings, then `await driver.run(ingress)` as one task
of the application's TaskGroup; it reconnects on its own, and returns or is cancelled on stop.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Protocol

from gateway.models import RawMessage


class Ingress(Protocol):
    """Where drivers put messages. `put` waits while the pipeline is full (back-pressure).

    `on_durable` is called (on the event loop) once every message of the batch is durable in the
    gateway, or refused and dead-lettered: the moment a driver may acknowledge them to its peer.
    """

    async def put(self, batch: list[RawMessage], on_durable: Callable[[], None] | None = None) -> None: ...


class Driver(abc.ABC):
    """One protocol input. Subclasses set `name` and implement `run`."""

    name: str = "driver"

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while the driver is connected to its peer (reported by /readyz)."""

    @abc.abstractmethod
    async def run(self, ingress: Ingress) -> None:
        """Deliver messages to `ingress` until cancelled, reconnecting after failures."""

    async def stop(self) -> None:  # noqa: B027 - optional hook, most drivers need nothing
        """Stop taking new input; called before the pipeline drains."""
