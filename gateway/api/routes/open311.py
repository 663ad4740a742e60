"""Open311 GeoReport v2: service list and definitions, requests (list, one, file), tokens.

Every endpoint of the spec, with its field names, filters (service_request_id, service_code,
start_date, end_date, status), defaults (the last 90 days, at most 1000 requests) and error
format (`[{"code": 400, "description": "..."}]`), as `.json` or `.xml` (`text/xml`, as the
discovery document names it). As the spec's method tables say, discovery, the service list and
the service definitions need no key; a POST needs one (`api_key` in its form body, or a bearer
token), refused with 403 as the spec says. Reading requests needs a bearer token, unless the
installer opens keyless reads (`services.open311_keyless_reads`), which then get the redacted
view (`entry_for`). An optional parameter sent empty is absent, as clients that always send
every parameter expect; a list filter given twice is one list; any other parameter given twice
is refused. `extended_attributes` (the gateway's lifecycle) only with `extensions=true`.
Requests are shown as gateway/privacy.py says for the reader's role: operators and installers
see everything, others (keyless readers too) the redacted entry; a terminal lists only the
tickets it filed, and the others answer 404 to it.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlencode

import orjson
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from gateway import privacy
from gateway.api.access import record_reads
from gateway.api.auth import Principal, open311_reader, require_api_key
from gateway.api.context import ApiContext, Ctx
from gateway.api.datetimes import epoch_ms
from gateway.api.schemas import (
    DefinitionOut,
    DiscoveryOut,
    Open311Error,
    Open311RequestOut,
    PostedOut,
    ServiceOut,
    TokenOut,
)
from gateway.services import open311, requests
from gateway.services.intake import IntakeError, open311_request
from gateway.services.lifecycle import OPEN311_CLOSED, STATES

# Filters the spec lets a client "declare multiple times, comma delimited".
LIST_FILTERS = frozenset({"service_request_id", "service_code", "status"})


def spec_query(raw: bytes) -> bytes:
    """The query string as the spec means it: empty parameters dropped, list filters given
    twice joined into one list; any other parameter given twice is refused (400)."""
    seen: dict[str, list[str]] = {}
    for key, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if value.strip():
            seen.setdefault(key, []).append(value)
    for key, values in seen.items():
        if len(values) > 1 and key not in LIST_FILTERS:
            raise HTTPException(400, f"{key[:64]} is given {len(values)} times: give it once")
    return urlencode([(key, ",".join(values)) for key, values in seen.items()]).encode("latin-1")


class Open311Route(APIRoute):
    """A route that reads its query string as `spec_query` makes it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            scope = {**request.scope, "query_string": spec_query(request.scope.get("query_string", b""))}
            return await handler(Request(scope, request.receive))

        return handle


router = APIRouter(prefix="/open311/v2", tags=["open311"], route_class=Open311Route)
# None: a keyless reader, admitted only when the installer opened keyless reads.
Reader311 = Annotated[Principal | None, Depends(open311_reader)]
Filer311 = Annotated[Principal, Depends(require_api_key("terminal", "operator", "installer"))]
Extensions = Annotated[
    bool, Query(description="true: add the gateway's lifecycle as extended_attributes (extension)")
]
Format = Annotated[Literal["json", "xml"], Path(description="Response format")]
Lang = Annotated[Literal["zh", "en"], Query(description="Language of names (Chinese by default)")]
Jurisdiction = Annotated[str | None, Query(max_length=128, description="Optional: this community's name")]
DAY_MS = 86_400_000
STATUS_FILTER = "^(open|closed)(,(open|closed))?$"
MAX_RESULTS = 1000


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {
        code: {
            "model": list[Open311Error],
            "content": {open311.XML_TYPE: {}},
            "description": "Open311 error list",
        }
        for code in codes
    }


def _ok(model: Any) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "content": {open311.XML_TYPE: {}}}}


def respond(
    fmt: str,
    root: str,
    data: list[dict[str, Any]] | dict[str, Any],
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """An answer (or error list) in the format asked for, with its type and charset."""
    if fmt == "xml":
        body, media = open311.to_xml(root, data), open311.XML_TYPE
    else:
        body, media = orjson.dumps(data), "application/json"
    return Response(body, status_code=status, media_type=f"{media}; charset=utf-8", headers=headers)


def entry_for(ctx: ApiContext, who: Principal | None, view: dict[str, Any], lang: str) -> dict[str, Any]:
    """A request as an Open311 entry, as `who` (None: a keyless reader) may read it: a keyless
    reader gets what the lowest reading role gets, the redacted entry (gateway/privacy.py)."""
    entry = open311.request_entry(view, ctx.catalogue, lang)
    return privacy.open311_for(who.role if who is not None else None, entry)


def own(who: Principal | None) -> str | None:
    """The filer whose tickets alone `who` may list: a terminal's own; None for everyone else."""
    return who.actor if who is not None and who.role == "terminal" else None


async def readable(ctx: ApiContext, who: Principal | None, ticket: str) -> dict[str, Any] | None:
    """The request, if `who` may know it exists (a terminal: only the tickets it filed)."""
    found = await ctx.services.call(requests.get, ticket)
    if found is None or (own(who) is not None and found.get("filed_by") != own(who)):
        return None
    return found


def shown(entry: dict[str, Any], extensions: bool) -> dict[str, Any]:
    """The entry as the spec has it; the gateway's `extended_attributes` only when asked for."""
    return entry if extensions else {k: v for k, v in entry.items() if k != "extended_attributes"}


def check_jurisdiction(ctx: ApiContext, jurisdiction_id: str | None) -> None:
    if jurisdiction_id is not None and jurisdiction_id != ctx.community:
        raise HTTPException(
            404, f"jurisdiction_id {jurisdiction_id[:64]!r} is not served here ({ctx.community})"
        )


@router.get(
    "/discovery.{fmt}",
    summary="GeoReport discovery: where this endpoint is and what it speaks",
    responses={**_ok(DiscoveryOut), **_errors(400)},
)
async def discovery(ctx: Ctx, request: Request, fmt: Format) -> Response:
    base = str(request.base_url).rstrip("/") + "/open311/v2/"
    return respond(
        fmt,
        "discovery",
        {
            "changeset": "2026-11-25T00:00:00+00:00",
            "contact": f"Community {ctx.community} service station",
            "key_service": "Ask the community's installer for a terminal or operator token",
            "endpoints": [
                {
                    "specification": "http://wiki.open311.org/GeoReport_v2",
                    "url": base,
                    "changeset": "2026-11-25T00:00:00+00:00",
                    "type": "production",
                    "formats": ["application/json", open311.XML_TYPE],
                }
            ],
        },
    )


@router.get(
    "/services.{fmt}",
    summary="Service list: every service residents can request",
    responses={**_ok(list[ServiceOut]), **_errors(400, 404)},
)
async def services(
    ctx: Ctx, fmt: Format, jurisdiction_id: Jurisdiction = None, lang: Lang = "zh"
) -> Response:
    check_jurisdiction(ctx, jurisdiction_id)
    items = [open311.service_entry(s, lang) for s in ctx.catalogue.services.values()]
    return respond(fmt, "services", items)


@router.get(
    "/services/{service_code}.{fmt}",
    summary="Service definition: the attributes a request for this service carries",
    responses={**_ok(DefinitionOut), **_errors(400, 404)},
)
async def service_definition(
    ctx: Ctx,
    service_code: Annotated[str, Path(max_length=128)],
    fmt: Format,
    jurisdiction_id: Jurisdiction = None,
) -> Response:
    check_jurisdiction(ctx, jurisdiction_id)
    service = ctx.catalogue.get(service_code)
    if service is None:
        raise HTTPException(404, f"service_code {service_code!r} is not in the catalogue")
    return respond(fmt, "service_definition", open311.service_definition(service))


@router.get(
    "/requests.{fmt}",
    summary="Service requests, filtered as the spec says (newest first, at most 1000)",
    responses={**_ok(list[Open311RequestOut]), **_errors(400, 403, 404)},
)
async def list_requests(
    ctx: Ctx,
    who: Reader311,
    request: Request,
    fmt: Format,
    service_request_id: Annotated[
        str | None, Query(max_length=20_000, description="Comma-separated ids")
    ] = None,
    service_code: Annotated[str | None, Query(max_length=5000, description="Comma-separated codes")] = None,
    start_date: datetime | None = None,
    end_date: datetime | None = None,
    status: Annotated[
        str | None, Query(pattern=STATUS_FILTER, description="open, closed or open,closed")
    ] = None,
    jurisdiction_id: Jurisdiction = None,
    lang: Lang = "zh",
    extensions: Extensions = False,
) -> Response:
    check_jurisdiction(ctx, jurisdiction_id)
    if service_request_id is not None:
        # The spec: when ids are given, the other filters are ignored.
        ids = [i.strip() for i in service_request_id.split(",") if i.strip()][:MAX_RESULTS]
        found = (
            await ctx.services.call(requests.listing, ids=ids, filed_by=own(who), limit=MAX_RESULTS)
            if ids
            else []
        )
    else:
        start = epoch_ms(start_date, 400)
        end = epoch_ms(end_date, 400)
        if end is not None and end_date is not None:
            # The spec's end_date is the latest moment included; datetimes are shown to the
            # second, so an end_date without a fraction includes its whole second.
            end += 1 if end_date.microsecond else 1000
        if start is None and end is None:
            end = ctx.clock.now_ms() + 1
            start = end - 90 * DAY_MS
        elif start is None:
            assert end is not None
            start = end - 90 * DAY_MS
        if end is not None and start >= end:
            raise HTTPException(400, "start_date must be before end_date")
        states = None
        if status is not None:
            wanted = {s.strip() for s in status.split(",") if s.strip()}
            if not wanted or not wanted <= {"open", "closed"}:
                raise HTTPException(400, "status must be open, closed or open,closed")
            if len(wanted) == 1:
                closed = wanted == {"closed"}
                states = [s for s in STATES if (s in OPEN311_CLOSED) == closed]
        codes = [c.strip() for c in service_code.split(",") if c.strip()] if service_code else None
        found = await ctx.services.call(
            requests.listing,
            codes=codes,
            states=states,
            filed_by=own(who),
            start_ms=start,
            end_ms=end,
            limit=MAX_RESULTS,
        )
    entries = [shown(entry_for(ctx, who, r, lang), extensions) for r in found]
    await record_reads(ctx, who, request, (r["id"] for r in found))
    return respond(fmt, "service_requests", entries)


@router.get(
    "/requests/{service_request_id}.{fmt}",
    summary="One service request (a list of one, as the spec has it)",
    responses={**_ok(list[Open311RequestOut]), **_errors(400, 403, 404)},
)
async def get_request(
    ctx: Ctx,
    who: Reader311,
    request: Request,
    service_request_id: Annotated[str, Path(max_length=128)],
    fmt: Format,
    jurisdiction_id: Jurisdiction = None,
    lang: Lang = "zh",
    extensions: Extensions = False,
) -> Response:
    check_jurisdiction(ctx, jurisdiction_id)
    found = await readable(ctx, who, service_request_id)
    if found is None:
        raise HTTPException(404, f"no service request {service_request_id!r}")
    await record_reads(ctx, who, request, [service_request_id])
    return respond(fmt, "service_requests", [shown(entry_for(ctx, who, found, lang), extensions)])


@router.get(
    "/tokens/{token}.{fmt}",
    summary="The service request a POST's token stands for (tickets are issued at once)",
    responses={**_ok(list[TokenOut]), **_errors(400, 403, 404)},
)
async def get_token(
    ctx: Ctx,
    who: Reader311,
    token: Annotated[str, Path(max_length=128)],
    fmt: Format,
    jurisdiction_id: Jurisdiction = None,
) -> Response:
    check_jurisdiction(ctx, jurisdiction_id)
    if await readable(ctx, who, token) is None:
        raise HTTPException(404, f"no token {token!r}")
    return respond(fmt, "service_requests", [{"service_request_id": token, "token": token}])


_FIELD = {"type": "string", "maxLength": 4000}
_POST_SCHEMA = {
    "type": "object",
    "required": ["service_code"],
    "properties": {
        "api_key": _FIELD,
        "service_code": _FIELD,
        "jurisdiction_id": _FIELD,
        "lat": {"type": "number"},
        "long": {"type": "number"},
        "address_string": _FIELD,
        "address_id": _FIELD,
        "email": _FIELD,
        "device_id": _FIELD,
        "account_id": _FIELD,
        "first_name": _FIELD,
        "last_name": _FIELD,
        "phone": _FIELD,
        "description": _FIELD,
        "media_url": _FIELD,
        "building": _FIELD,
        "floor": {"type": "integer"},
        "unit": _FIELD,
        "request_id": {**_FIELD, "description": "Extension: a client's own id; a re-send files nothing new"},
    },
    "additionalProperties": {"type": "string", "description": "attribute[code]=value"},
}


@router.post(
    "/requests.{fmt}",
    summary="File a service request (form fields as in the spec, or JSON)",
    responses={**_ok(list[PostedOut]), **_errors(400, 403, 404, 429)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": {"schema": _POST_SCHEMA},
                # JSON (an extension) authenticates with a bearer token: api_key is a form field.
                "application/json": {
                    "schema": {
                        **_POST_SCHEMA,
                        "properties": {
                            **{k: v for k, v in _POST_SCHEMA["properties"].items() if k != "api_key"},  # type: ignore[attr-defined]
                            "attributes": {"type": "object"},
                        },
                        "additionalProperties": False,
                    }
                },
            },
        }
    },
)
async def post_request(
    ctx: Ctx, principal: Filer311, request: Request, fmt: Format, lang: Lang = "zh"
) -> Response:
    form = await _post_fields(request)
    check_jurisdiction(ctx, form.get("jurisdiction_id"))
    try:
        new = open311_request(ctx.catalogue, form, ctx.clock.now_ms())
    except IntakeError as exc:
        # The spec: 404 for a service_code it does not know, 400 for any other bad field.
        raise HTTPException(404 if str(exc).startswith("unknown_service") else 400, str(exc)) from None
    view, created = await ctx.actions.file(new, f"{principal.role}:{principal.token_id}")
    notice = open311.request_entry(view, ctx.catalogue, lang)["service_notice"]
    if not created:
        notice = f"duplicate: already filed as {view['id']}"
    # The ticket is issued at once, so the answer is a service_request_id, not a token (the spec
    # gives one or the other).
    body = [{"service_request_id": view["id"], "service_notice": notice, "account_id": None}]
    return respond(fmt, "service_requests", body, 201 if created else 200)


async def _post_fields(request: Request) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "the body must be a JSON object")
        return {k: v for k, v in body.items() if not _blank(v)}
    if not content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        raise HTTPException(400, "send the fields as application/x-www-form-urlencoded (or JSON)")
    form = await request.form()
    fields: dict[str, Any] = {}
    attributes: dict[str, Any] = {}
    for key, value in form.multi_items():
        if not isinstance(value, str):
            raise HTTPException(400, f"{key[:64]} must be a text field, not a file (use media_url)")
        if _blank(value):
            continue  # the spec: an optional field sent empty is absent (lat=&long= beside an address)
        if key.startswith("attribute[") and "]" in key:
            code = key[len("attribute[") : key.index("]")]
            if key.endswith("[]"):  # multivaluelist: attribute[code][]=a&attribute[code][]=b
                attributes.setdefault(code, []).append(value)
            else:
                attributes[code] = value
        else:
            fields[key] = value
    if attributes:
        fields["attributes"] = attributes
    return fields


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())
