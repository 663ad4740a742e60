"""Bearer-token authentication and role checks for the API.

docs/contract.md section 4: "Writes need a bearer token (`Authorization: Bearer …`; Open311 POSTs may
pass it as `api_key`) whose role allows them (roles at least: `terminal`, `operator`,
`installer`, `viewer`)... Reads by `viewer` and above; `/healthz` needs none." Open311 keeps its
spec (section 5): discovery and services need no key, a missing or wrong key is 403, and
`api_key` is read only from a POST's form body.
Extended (section 5): a `metrics` role reads `/metrics` and nothing else, and what each
role reads of residents' personal data is gateway/privacy.py's to say.
Tokens are held only as SHA-256 digests and compared in constant time; a grant may expire; each
token's writes are rate-limited (`auth.write_rate_limit`), so a leaked terminal token cannot
flood the service desk.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.api.context import ApiContext, Ctx
from gateway.clock import now_ms
from gateway.limits import KeyedRateLimit
from gateway.settings import Role, TokenGrant

log = logging.getLogger(__name__)

ALL_ROLES: tuple[Role, ...] = ("viewer", "terminal", "operator", "installer", "metrics", "grid_worker")
# Every role but `metrics`, which scrapes /metrics only.
READERS: tuple[Role, ...] = ("viewer", "terminal", "operator", "installer")
_bearer = HTTPBearer(auto_error=False, description="A token set by the installer (CGW_AUTH__TOKENS)")


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    token_id: str  # first 8 hex digits of the digest: enough to tell tokens apart in audit logs
    name: str | None = None  # the grant's holder, as the installer named it (`cgw token --name`)
    expires_ms: int | None = None  # when the grant ends (an open live stream ends with it)

    @property
    def actor(self) -> str:
        """How the audit trail names this token; also who filed a request (its owner)."""
        return f"{self.role}:{self.token_id}"

    @property
    def who(self) -> str:
        """The holder's name for the access log, or the token id when the grant has none."""
        return self.name or self.token_id


def authenticate(token: str, grants: dict[str, TokenGrant]) -> tuple[str, TokenGrant] | None:
    """The token's digest and grant, if it is one of ours (expired or not)."""
    digest = hashlib.sha256(token.encode()).hexdigest()
    found: TokenGrant | None = None
    # Compare against every digest, so the time taken does not depend on which one matched.
    for known, grant in grants.items():
        if hmac.compare_digest(known, digest):
            found = grant
    return None if found is None else (digest, found)


def check_token(
    token: str | None,
    grants: dict[str, TokenGrant],
    allowed: tuple[Role, ...],
    write_limit: KeyedRateLimit | None = None,
) -> Principal:
    """The principal for `token`, or the HTTP error that refuses it (401, 403 or 429).

    `write_limit` is given for writes: each token has its own budget.
    """
    if token is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    found = authenticate(token, grants)
    if found is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "unknown token", headers={"WWW-Authenticate": "Bearer"}
        )
    digest, grant = found
    expires_ms = int(grant.expires.timestamp() * 1000) if grant.expires is not None else None
    principal = Principal(grant.role, digest[:8], grant.name, expires_ms)
    if grant.expires is not None and grant.expires.timestamp() <= time.time():
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            f"token expired at {grant.expires.isoformat()}: ask the installer for a new one",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    if principal.role not in allowed:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"role {principal.role!r} may not do this (needs one of: {', '.join(allowed)})",
        )
    if write_limit is not None and not write_limit.allow(principal.token_id):
        if write_limit.should_log(principal.token_id, now_ms()):
            log.warning("token %s is writing faster than auth.write_rate_limit allows", principal.token_id)
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            "too many writes with this token: slow down (auth.write_rate_limit)",
            headers={"Retry-After": "1"},
        )
    return principal


def optional(*roles: Role) -> Callable[..., Principal | None]:
    """A dependency for what anyone may ask but only a token of `roles` hears in full: the
    principal, or None for no token or one that would be refused (never an error)."""

    def check(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        ctx: Ctx,
    ) -> Principal | None:
        if credentials is None:
            return None
        try:
            return check_token(credentials.credentials, ctx.token_digests, roles)
        except HTTPException:
            return None

    return check


def _write_limit(request: Request, ctx: ApiContext) -> KeyedRateLimit | None:
    return None if request.method in ("GET", "HEAD", "OPTIONS") else ctx.write_limit


def require(*roles: Role) -> Callable[..., Principal]:
    """A dependency admitting tokens whose role is one of `roles`."""
    allowed = roles or READERS

    def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        ctx: Ctx,
    ) -> Principal:
        token = credentials.credentials if credentials is not None else None
        return check_token(token, ctx.token_digests, allowed, _write_limit(request, ctx))

    return check


def require_api_key(*roles: Role) -> Callable[..., Awaitable[Principal]]:
    """Open311 POST: a bearer token, or the spec's `api_key` form field.

    Only where the spec puts it: in the body of a form-encoded POST, never in a query string,
    where it would reach proxy and access logs. A missing or wrong key is 403, as the spec has it.
    """
    allowed = roles or READERS

    async def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        ctx: Ctx,
    ) -> Principal:
        token = credentials.credentials if credentials is not None else None
        if token is None and request.headers.get("content-type", "").startswith(_FORM_TYPES):
            value = (await request.form()).get("api_key")
            token = value if isinstance(value, str) and value else None
        if token is None:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "missing api_key: send it as a form field of the POST (or 'Authorization: Bearer <token>')",
            )
        return _open311(lambda: check_token(token, ctx.token_digests, allowed, _write_limit(request, ctx)))

    return check


def open311_reader(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ctx: Ctx,
) -> Principal | None:
    """Who reads Open311 requests: a bearer token's principal, or None for a keyless reader when
    the installer opened keyless reads (`services.open311_keyless_reads`); otherwise 403."""
    if credentials is not None:
        return _open311(lambda: check_token(credentials.credentials, ctx.token_digests, READERS))
    if ctx.open311_keyless_reads:
        return None
    hint = (
        " (api_key is not accepted in a URL, where proxies log it)"
        if "api_key" in request.query_params
        else ""
    )
    raise HTTPException(
        status.HTTP_403_FORBIDDEN,
        f"reading service requests needs 'Authorization: Bearer <token>'{hint}; the installer may "
        "open keyless reads of the redacted view (services.open311_keyless_reads)",
    )


def _open311(check: Callable[[], Principal]) -> Principal:
    """The spec answers a missing or wrong key with 403, where the rest of the API says 401."""
    try:
        return check()
    except HTTPException as exc:
        if exc.status_code != status.HTTP_401_UNAUTHORIZED:
            raise
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc.detail)) from None


_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


Reader = Annotated[Principal, Depends(require())]
Scraper = Annotated[Principal, Depends(require(*ALL_ROLES))]  # /metrics
Operator = Annotated[Principal, Depends(require("operator", "installer"))]
Terminal = Annotated[Principal, Depends(require("terminal", "operator", "installer"))]
