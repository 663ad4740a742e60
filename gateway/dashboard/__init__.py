"""The operators' dashboard: static files shipped in the package, served by the gateway's API.

No build step and no CDN: the page, its scripts and the one vendored library (uPlot, for the
charts) are in `static/`, so a box without internet serves the whole dashboard. The page reads
the same `/api/v1` as everyone else, with the operator's token (docs/dashboard.md).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def mount(app: FastAPI) -> None:
    app.mount("/dashboard", StaticFiles(directory=STATIC, html=True), name="dashboard")

    @app.get("/", include_in_schema=False)
    async def _home() -> RedirectResponse:
        return RedirectResponse("/dashboard/")
