"""What the API's routes may use of the running gateway, handed to them explicitly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from gateway.care.desk import CareDesk
from gateway.clock import ClockWatch
from gateway.instruments import Instruments
from gateway.limits import KeyedRateLimit
from gateway.profiles import ProfileSet
from gateway.registry import DeviceRegistry
from gateway.services.actions import Actions
from gateway.services.catalogue import Catalogue
from gateway.settings import TokenGrant
from gateway.sqlite import SqliteThread
from gateway.store.queries import StoreReader
from gateway.stream import StreamHub


@dataclass(slots=True)
class ApiContext:
    community: str
    registry: DeviceRegistry
    profiles: ProfileSet
    reader: StoreReader
    hub: StreamHub
    instruments: Instruments
    token_digests: dict[str, TokenGrant]
    write_limit: KeyedRateLimit  # per token
    readiness: Callable[[], dict[str, Any]]
    alarms_active: Callable[[str], list[str]]
    services: SqliteThread  # services.sqlite3: `await ctx.services.call(requests.get, ticket)`
    catalogue: Catalogue
    actions: Actions  # writes that are delivered (the live stream, the relay) before answering
    device_reads: DeviceReads  # built from privacy.device_read_window
    open311_keyless_reads: bool = False  # services.open311_keyless_reads
    # The gateway's time (gateway/clock.py): what routes stamp records and default windows with,
    # so a request filed while the clock is not set is not stamped 1970.
    clock: ClockWatch = field(default_factory=ClockWatch)
    care: CareDesk | None = None  # precision care (docs/care.md)


@dataclass(slots=True)
class DeviceReads:
    """Which devices' units each token was last logged reading, so a poll is logged once a window."""

    window_s: float  # privacy.device_read_window
    _last: dict[tuple[str, str], float] = field(default_factory=dict)

    def fresh(self, token_id: str, device_ids: list[str], now: float) -> list[str]:
        """The ids not logged for `token_id` within the window (now marked as logged); `now` is monotonic."""
        if len(self._last) > 50_000:  # forget what the window no longer covers
            self._last = {k: t for k, t in self._last.items() if now - t < self.window_s}
        out = []
        for device_id in device_ids:
            key = (token_id, device_id)
            last = self._last.get(key)
            if last is None or now - last >= self.window_s:
                self._last[key] = now
                out.append(device_id)
        return out


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


# What a route declares to be handed the gateway: `ctx: Ctx` (one definition, as the FastAPI
# template's `SessionDep`).
Ctx = Annotated[ApiContext, Depends(context)]
