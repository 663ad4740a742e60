"""The interactive API documentation at `/docs`, served whole by the gateway itself.

A box without internet shows the page, and it names no host but the gateway: Swagger UI's
script and style come from the `fastapi-offline` package (which ships them for exactly this),
the page and its start-up script from `docs_static/` beside this module. The start-up script is
a file rather than FastAPI's inline one, so the page keeps the dashboard's content security
policy (gateway/api/headers.py: no inline script). Swagger's online validator badge, which would
send the OpenAPI address to an outside site, is off. ReDoc is not served: its bundle needs
inline styles and fetches fonts from elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

PAGE = Path(__file__).parent / "docs_static"
# The package's own folder of Swagger UI files (swagger-ui-bundle.js, swagger-ui.css).
SWAGGER_UI = Path(fastapi_offline.__file__).parent / "static"
SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css")


def mount(app: FastAPI) -> None:
    """`/docs/` (the page and its start-up script), `/docs/swagger/` (Swagger UI's files)."""
    for name in SWAGGER_FILES:
        if not (SWAGGER_UI / name).is_file():  # a changed package layout fails at start, not in a browser
            raise RuntimeError(f"fastapi-offline no longer ships {name} in {SWAGGER_UI}")
    app.mount("/docs/swagger", StaticFiles(directory=SWAGGER_UI), name="docs-swagger")
    app.mount("/docs", StaticFiles(directory=PAGE, html=True), name="docs")
