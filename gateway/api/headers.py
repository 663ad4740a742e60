"""What every HTTP exchange checks and carries in its headers, before and after any route.

`HostGuard`: a request whose `Host` is not one of `api.allowed_hosts` (plus the address the API
is bound to, when it is not a wildcard) is refused with 400, so nothing the API writes from the
request's address (the Open311 discovery document's URL) can name another site, and a DNS
rebinding page cannot reach the API through a name it controls. `"*"` allows any name.

`SecurityHeaders`: every answer says `nosniff`, sends no referrer and may not be framed; the
dashboard's and the API docs' pages carry a content security policy that lets them load only the gateway's
own scripts, styles and API (no inline script, no style attribute, nothing from elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

Refusal = Callable[[str, int, str], Response]  # (path, status, message)

COMMON = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}
# The API answers data, never pages: nothing in it may run or be framed.
API_POLICY = "default-src 'none'; frame-ancestors 'none'"
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# Pages the gateway serves (the dashboard, the API docs at /docs): its own files only.
PAGES = ("/dashboard", "/docs")
WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


def allowed_names(configured: Iterable[str], bound_host: str) -> frozenset[str]:
    names = {_bare(name) for name in configured}
    if bound_host not in WILDCARDS:
        names.add(_bare(bound_host))
    return frozenset(names)


def _bare(host: str) -> str:
    return host.strip().lower().removeprefix("[").removesuffix("]")


def host_of(header: str) -> str:
    """The name in a Host header, without its port (`[::1]:8080` → `::1`)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostGuard:
    def __init__(self, app: ASGIApp, *, allowed: frozenset[str], refuse: Refusal) -> None:
        self.app = app
        self.any = "*" in allowed
        self.exact = {name for name in allowed if not name.startswith("*.")}
        self.suffixes = tuple(name[1:] for name in allowed if name.startswith("*."))
        self.refuse = refuse

    def allows(self, host: str) -> bool:
        return self.any or host in self.exact or (bool(self.suffixes) and host.endswith(self.suffixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = host_of(Headers(scope=scope).get("host", ""))
        if not self.allows(host):
            message = f"host {host[:64]!r} is not one this gateway answers to (api.allowed_hosts)"
            await self.refuse(scope["path"], 400, message)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        policy = API_POLICY
        if any(path == page or path.startswith(page + "/") for page in PAGES):
            policy = PAGE_POLICY

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in COMMON.items():
                    headers.setdefault(name, value)
                if policy is not None:
                    headers.setdefault("Content-Security-Policy", policy)
            await send(message)

        await self.app(scope, receive, send_with_headers)
