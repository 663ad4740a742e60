"""Every request body bounded and, when it is JSON, well-formed and shallow, before any route.

An ASGI middleware in front of the whole API: a body longer than `api.max_body_bytes` (by its
Content-Length, or as it arrives when chunked) is refused with 413 without reading the rest; a
JSON body that is not valid JSON (orjson: lone surrogates included) or is nested deeper than
`MAX_JSON_DEPTH` is refused with 400. The routes then parse a body that cannot exhaust memory
or the interpreter's recursion limit (a deeply nested document made the Open311 POST fail with
500). The accepted body is handed on as one message; later receives (a client that leaves an
open stream) go to the server as before.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# No body the API takes nests deeper than 4 (Open311 attributes); 32 leaves room and stays far
# below Python's recursion limit, which the standard json parser of the routes would hit.
MAX_JSON_DEPTH = 32

TOO_DEEP = f"the body nests deeper than {MAX_JSON_DEPTH} levels"

Refusal = Callable[[str, int, str], Response]  # (path, status, message)


class BodyGuard:
    def __init__(self, app: ASGIApp, *, max_bytes: int, refuse: Refusal) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        too_large = f"the body is larger than {self.max_bytes} bytes (api.max_body_bytes)"
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status, why = (413, too_large) if declared.isdigit() else (400, "Content-Length is not a number")
            await self.refuse(path, status, why)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was complete
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self.refuse(path, 413, too_large)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if body and (content_type == "application/json" or content_type.endswith("+json")):
            problem = json_problem(body)
            if problem is not None:
                await self.refuse(path, 400, problem)(scope, receive, send)
                return
        handed: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Message:
            return handed.pop() if handed else await receive()

        await self.app(scope, replay, send)


def json_problem(body: bytes) -> str | None:
    """Why `body` is not a JSON document the API can take, or None."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):  # orjson stops at 1024 levels
            return TOO_DEEP
        return f"the body is not valid JSON: {exc}"
    return TOO_DEEP if nesting(document) > MAX_JSON_DEPTH else None


def nesting(document: object) -> int:
    """How deep objects and arrays nest in `document` (walked without recursion)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(document, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: list[object] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_JSON_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest
