"""Bearer-token authentication and role checks for the API.

CONTRACT.md section 4: "Writes need a bearer token (`Authorization: Bearer …`; Open311 POSTs may
pass it as `api_key`) whose role allows them (roles at least: `terminal`, `operator`,
`installer`, `viewer`)... Reads by `viewer` and above; `/healthz` needs none."
Tokens are held only as SHA-256 digests and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.api.context import ApiContext, context
from gateway.settings import Role

ALL_ROLES: tuple[Role, ...] = ("viewer", "terminal", "operator", "installer")
_bearer = HTTPBearer(auto_error=False, description="A token set by the installer (CGW_AUTH__TOKENS)")


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    token_id: str  # first 8 hex digits of the digest: enough to tell tokens apart in audit logs


def authenticate(token: str, digests: dict[str, Role]) -> Principal | None:
    digest = hashlib.sha256(token.encode()).hexdigest()
    found: Role | None = None
    # Compare against every digest, so the time taken does not depend on which one matched.
    for known, role in digests.items():
        if hmac.compare_digest(known, digest):
            found = role
    return None if found is None else Principal(found, digest[:8])


def check_token(token: str | None, digests: dict[str, Role], allowed: tuple[Role, ...]) -> Principal:
    """The principal for `token`, or the HTTP error that refuses it (401 or 403)."""
    if token is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = authenticate(token, digests)
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "unknown token", headers={"WWW-Authenticate": "Bearer"}
        )
    if principal.role not in allowed:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"role {principal.role!r} may not do this (needs one of: {', '.join(allowed)})",
        )
    return principal


def require(*roles: Role) -> Callable[..., Principal]:
    """A dependency admitting tokens whose role is one of `roles`."""
    allowed = roles or ALL_ROLES

    def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        ctx: Annotated[ApiContext, Depends(context)],
    ) -> Principal:
        token = credentials.credentials if credentials is not None else None
        return check_token(token, ctx.token_digests, allowed)

    return check


def require_api_key(*roles: Role) -> Callable[..., Awaitable[Principal]]:
    """Open311 style: a bearer token, or the spec's `api_key` (query string or POST form field)."""
    allowed = roles or ALL_ROLES

    async def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        ctx: Annotated[ApiContext, Depends(context)],
    ) -> Principal:
        token = credentials.credentials if credentials is not None else request.query_params.get("api_key")
        form_post = request.method == "POST" and request.headers.get("content-type", "").startswith(
            _FORM_TYPES
        )
        if token is None and form_post:
            value = (await request.form()).get("api_key")
            token = value if isinstance(value, str) else None
        return check_token(token, ctx.token_digests, allowed)

    return check


_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


Reader = Annotated[Principal, Depends(require())]
Operator = Annotated[Principal, Depends(require("operator", "installer"))]
Terminal = Annotated[Principal, Depends(require("terminal", "operator", "installer"))]
