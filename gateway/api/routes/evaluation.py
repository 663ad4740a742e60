"""Effect evaluation: satisfaction, completion, on-time and complaint figures by period, service,
group or provider. The definitions are in `gateway/services/evaluation.py` and docs/services.md.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException

from gateway.api.auth import Reader
from gateway.api.context import Ctx
from gateway.api.datetimes import epoch_ms
from gateway.api.schemas import ErrorBody, Evaluation, Figures
from gateway.services import evaluation, ratings
from gateway.services.evaluation import By, Period

router = APIRouter(prefix="/api/v1", tags=["evaluation"])
BAD: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody},
    403: {"model": ErrorBody},
    422: {"model": ErrorBody},
}


@router.get(
    "/evaluation",
    response_model=Evaluation,
    summary="Evaluation figures for requests filed in [start, end)",
    responses=BAD,
)
async def evaluate(
    ctx: Ctx,
    _: Reader,
    start: datetime | None = None,
    end: datetime | None = None,
    by: By = "overall",
    period: Period = "all",
) -> Evaluation:
    end_ms = epoch_ms(end, default=ctx.clock.now_ms() + 1)
    start_ms = epoch_ms(start, default=end_ms - evaluation.SPAN_MS)
    if start_ms >= end_ms:
        raise HTTPException(422, "start must be before end")
    if end_ms - start_ms > 3660 * 86_400_000:
        raise HTTPException(422, "the range may span at most ten years")
    rows = (await ctx.services.call(ratings.evaluations, start_ms, end_ms, (by,), period))[by]
    return Evaluation(
        start_ms=start_ms, end_ms=end_ms, by=by, period=period, rows=[Figures.model_validate(r) for r in rows]
    )
