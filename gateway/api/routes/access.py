"""The access log of personal-data reads, for installers (docs/privacy.md).

Who (the token's name, else its id), when, through which endpoint, which records: every read of
residents' personal data the API served (gateway/services/access_log.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from gateway.api.auth import Principal, require
from gateway.api.context import Ctx
from gateway.api.datetimes import epoch_ms
from gateway.api.schemas import AUTH, AccessList
from gateway.services import access_log as reads_log

router = APIRouter(prefix="/api/v1", tags=["privacy"])
Installer = Annotated[Principal, Depends(require("installer"))]


@router.get(
    "/access-log",
    response_model=AccessList,
    summary="Every read of residents' personal data: who, when, which records, where (installer)",
    responses=AUTH,
)
async def access_log(
    ctx: Ctx,
    _: Installer,
    since: datetime | None = None,
    until: datetime | None = None,
    who: Annotated[str | None, Query(max_length=200)] = None,
    record: Annotated[str | None, Query(max_length=200, description="A ticket (or household:B/U)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> AccessList:
    items = await ctx.services.call(
        reads_log.listing,
        since_ms=epoch_ms(since),
        until_ms=epoch_ms(until),
        who=who,
        record_id=record,
        limit=limit,
        offset=offset,
    )
    return AccessList.model_validate({"items": items})
