"""What the API's routes may use of the running gateway, handed to them explicitly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from gateway.limits import KeyedRateLimit
from gateway.profiles import ProfileSet
from gateway.registry import DeviceRegistry
from gateway.services.desk import ServiceDesk
from gateway.settings import TokenGrant
from gateway.stats import GatewayMetrics
from gateway.store.queries import StoreReader
from gateway.stream import StreamHub


@dataclass(slots=True)
class ApiContext:
    community: str
    registry: DeviceRegistry
    profiles: ProfileSet
    reader: StoreReader
    hub: StreamHub
    metrics: GatewayMetrics
    token_digests: dict[str, TokenGrant]
    write_limit: KeyedRateLimit  # per token
    readiness: Callable[[], dict[str, Any]]
    alarms_active: Callable[[str], list[str]]
    desk: ServiceDesk
    open311_keyless_reads: bool = False  # services.open311_keyless_reads


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx
