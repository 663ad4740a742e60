"""Recording each read of residents' personal data in the access log (docs/privacy.md).

A route that hands personal data to a role allowed to read it (gateway/privacy.py) calls
`record_reads` with the records it returned; reads of the redacted view are not personal and are
not recorded.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from fastapi import Request

from gateway import privacy
from gateway.api.auth import Principal
from gateway.api.context import ApiContext
from gateway.services import access_log
from gateway.services.access_log import Access


def endpoint(request: Request) -> str:
    """The route as declared ("GET /api/v1/requests/{ticket}"), not the path with its values."""
    route = request.scope.get("route")
    return f"{request.method} {getattr(route, 'path', request.url.path)}"


async def record_reads(
    ctx: ApiContext, who: Principal | None, where: Request | str, records: Iterable[str]
) -> None:
    """Log that `who` read the personal data of `records` through `where` (when it did)."""
    if who is None or not privacy.reads_personal(who.role):
        return
    ids = tuple(records)
    if not ids:
        return
    name = where if isinstance(where, str) else endpoint(where)
    await ctx.services.call(
        access_log.record, Access(ctx.clock.now_ms(), who.who, who.role, who.token_id, name, ids)
    )


async def record_device_reads(
    ctx: ApiContext, who: Principal, request: Request, shown: Sequence[dict[str, object]]
) -> None:
    """Log the devices whose unit (a home) `who` was shown, once per token and device a window."""
    if not privacy.reads_personal(who.role):
        return
    with_unit = [str(d["device_id"]) for d in shown if d.get("unit")]
    fresh = ctx.device_reads.fresh(who.token_id, with_unit, time.monotonic())
    await record_reads(ctx, who, request, (f"device:{device_id}" for device_id in fresh))
