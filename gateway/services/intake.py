"""Checks what terminals and Open311 clients send, and turns it into plain records.

Pure functions: a payload (or an Open311 form) in, a `NewRequest`, `NewRating` or `NewVote` out,
or an `IntakeError` whose message starts with a reason code (`schema`, `unknown_service`,
`missing_attribute`) the way every refusal in the gateway does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from gateway.services.catalogue import Attribute, Catalogue, Service
from gateway.text import clean

MAX_DESCRIPTION = 4000
MAX_TEXT = 2000
KEY = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
Choice = Literal["yes", "no", "abstain"]
CHOICES: tuple[Choice, ...] = get_args(Choice)
# A photo is a link a browser follows: only to the web, never javascript:, data: or file:.
MEDIA_SCHEMES = ("http", "https")
# Open311 clients name their own device; kept under this prefix, which no MQTT device id can
# carry (`:` is not in [A-Za-z0-9_-]), so a form can never speak for a real device.
OPEN311_DEVICE = "open311:"


class IntakeError(ValueError):
    """What was sent cannot become a request, rating or vote; the text says why."""


@dataclass(slots=True)
class NewRequest:
    service: Service
    description: str
    requested_ms: int
    source: str  # terminal | open311 | sensor
    device_id: str | None = None
    request_key: str | None = None  # (device_id, request_id): a re-send is never a second request
    building: str | None = None
    floor: int | None = None
    unit: str | None = None
    address: str | None = None
    address_id: str | None = None  # Open311's id of a location in the installer's address list
    lat: float | None = None
    long: float | None = None
    media_url: str | None = None
    contact: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class NewRating:
    service_request_id: str
    score: int
    comment: str
    ts_ms: int
    rater: str  # the terminal, or the API token that sent it
    # Who sends it, as the request's `filed_by` names its filer: the filer may rate its own ticket;
    # anyone else needs the request's rating code (docs/privacy.md).
    filer: str = ""
    code: str | None = None


@dataclass(slots=True)
class NewVote:
    proposal_id: str
    household: str
    choice: str
    ts_ms: int
    device_id: str | None
    vote_key: str | None
    secret: str | None = None  # the household's PIN or card number, checked against the register
    by: str = ""  # who sent it: the terminal (as the audit trail names it) or the API token


def request_key(device_id: str, request_id: object) -> str:
    if not isinstance(request_id, str) or KEY.fullmatch(request_id) is None:
        raise IntakeError(f"schema: request_id must match [A-Za-z0-9_.:-]{{1,128}}, got {request_id!r}")
    return f"{device_id}|{request_id}"


def terminal_request(
    catalogue: Catalogue, device_id: str, obj: dict[str, Any], ts_ms: int, terminal_building: str | None
) -> NewRequest:
    """A `request` message from a terminal (docs/contract.md section 1)."""
    key = request_key(device_id, obj.get("request_id"))
    service = _service(catalogue, obj.get("service_code"))
    location = obj.get("location", {})
    if not isinstance(location, dict):
        raise IntakeError("schema: location must be an object with building, floor, unit")
    contact = obj.get("contact")
    if contact is not None and not isinstance(contact, str):
        raise IntakeError("schema: contact must be a string")
    building = _text(location.get("building"), "location.building", 32)
    return NewRequest(
        service=service,
        description=_text(obj.get("description", ""), "description", MAX_DESCRIPTION) or "",
        requested_ms=ts_ms,
        source="terminal",
        device_id=device_id,
        request_key=key,
        building=building,
        floor=_floor(location.get("floor")),
        unit=_text(location.get("unit"), "location.unit", 32),
        address=_address(building, _text(location.get("unit"), "location.unit", 32)),
        contact={"contact": clean(contact[:200])} if contact else {},
        attributes=check_attributes(service, obj.get("attributes", {})),
    )


def open311_request(catalogue: Catalogue, form: dict[str, Any], now_ms: int) -> NewRequest:
    """An Open311 GeoReport v2 POST (form fields, `attribute[code]` entries already collected)."""
    service = _service(catalogue, form.get("service_code"))
    lat, long = form.get("lat"), form.get("long")
    address = _text(form.get("address_string"), "address_string", 500)
    address_id = _text(form.get("address_id"), "address_id", 128)
    building = _text(form.get("building"), "building", 32)
    unit = _text(form.get("unit"), "unit", 32)
    if (lat is None) != (long is None):
        raise IntakeError("schema: lat and long must be given together")
    if lat is None and not address and not address_id and not building:
        raise IntakeError(
            "schema: a location is required: lat and long, address_string, address_id or building"
        )
    client_device = _text(form.get("device_id"), "device_id", 128)
    device_id = OPEN311_DEVICE + client_device if client_device else None
    client_request = form.get("request_id")
    key = None
    if client_request is not None:
        key = request_key(device_id or f"{OPEN311_DEVICE}anonymous", client_request)
    contact = {
        name: value
        for name in ("email", "phone", "first_name", "last_name", "account_id")
        if (value := _text(form.get(name), name, 200))
    }
    return NewRequest(
        service=service,
        description=_text(form.get("description"), "description", MAX_DESCRIPTION) or "",
        requested_ms=now_ms,
        source="open311",
        device_id=device_id,
        request_key=key,
        building=building,
        floor=_floor(form.get("floor")),
        unit=unit,
        address=address or _address(building, unit),
        address_id=address_id,
        lat=_coordinate(lat, "lat", 90),
        long=_coordinate(long, "long", 180),
        media_url=_media_url(form.get("media_url")),
        contact=contact,
        attributes=check_attributes(service, form.get("attributes", {})),
    )


def terminal_actor(device_id: str) -> str:
    """How the audit trail names a terminal; also the `filed_by` of the requests it files."""
    return f"terminal {device_id}"


def terminal_rating(device_id: str, obj: dict[str, Any], ts_ms: int) -> NewRating:
    ticket = obj.get("service_request_id")
    if not isinstance(ticket, str) or not 0 < len(ticket) <= 128:
        raise IntakeError("schema: service_request_id must be the ticket the request's ack gave")
    code = _text(obj.get("rating_code"), "rating_code", 32)
    return NewRating(
        ticket,
        check_score(obj.get("score")),
        _comment(obj.get("comment")),
        ts_ms,
        device_id,
        terminal_actor(device_id),
        code,
    )


def check_score(score: object) -> int:
    if not isinstance(score, int) or isinstance(score, bool) or not 1 <= score <= 5:
        raise IntakeError(f"schema: score must be an integer from 1 to 5, got {score!r}")
    return score


def terminal_vote(device_id: str, obj: dict[str, Any], ts_ms: int) -> NewVote:
    vote_id = obj.get("vote_id")
    key = request_key(device_id, vote_id) if vote_id is not None else None
    proposal = obj.get("proposal_id")
    if not isinstance(proposal, str) or not proposal:
        raise IntakeError("schema: proposal_id must be a proposal's id")
    household = obj.get("household")
    if not isinstance(household, dict):
        raise IntakeError("schema: household must be an object with building, unit and pin or card")
    return NewVote(
        proposal,
        household_key(household.get("building"), household.get("unit")),
        check_choice(obj.get("choice")),
        ts_ms,
        device_id,
        key,
        household_secret(household.get("pin"), household.get("card")),
        terminal_actor(device_id),
    )


def household_secret(pin: object, card: object) -> str | None:
    """The PIN or card number a household proves itself with (checked by the register)."""
    return _text(pin, "household.pin", 64) or _text(card, "household.card", 64)


def check_choice(choice: object) -> str:
    if choice not in CHOICES:
        raise IntakeError(f"schema: choice must be yes, no or abstain, got {choice!r}")
    assert isinstance(choice, str)
    return choice


def household_key(building: object, unit: object) -> str:
    """One household: building and unit (a vote, and the needs list, count households once)."""
    b = _text(building, "household.building", 32)
    u = _text(unit, "household.unit", 32)
    if not b or not u:
        raise IntakeError("schema: a household needs both building and unit")
    return f"{b}/{u}"


def check_attributes(service: Service, raw: object) -> dict[str, Any]:
    """The request's attributes checked against the service definition (Open311 datatypes)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise IntakeError("schema: attributes must be an object of code → value")
    known = {a.code: a for a in service.attributes}
    out: dict[str, Any] = {}
    for code, value in raw.items():
        attribute = known.get(code)
        if attribute is None:
            raise IntakeError(
                f"schema: attribute {str(code)[:64]!r} is not defined for {service.service_code}"
            )
        out[code] = _attribute_value(attribute, value)
    for attribute in service.attributes:
        if attribute.required and attribute.code not in out:
            raise IntakeError(
                f"missing_attribute: {service.service_code} needs attribute {attribute.code!r} "
                f"({attribute.description})"
            )
    return out


def _attribute_value(attribute: Attribute, value: object) -> Any:
    code, kind = attribute.code, attribute.datatype
    if kind in ("string", "text"):
        text = _text(value, f"attribute {code}", MAX_TEXT)
        if text is None:
            raise IntakeError(f"schema: attribute {code!r} must be a string")
        return text
    if kind == "number":
        try:
            number = (
                float(value) if isinstance(value, int | float | str) and not isinstance(value, bool) else None
            )
        except ValueError:
            number = None
        if number is None or not math.isfinite(number):
            # The value is not echoed: an answer may hold personal data, and refusals are logged.
            raise IntakeError(f"schema: attribute {code!r} must be a number")
        return number
    if kind == "datetime":
        if not isinstance(value, str):
            raise IntakeError(f"schema: attribute {code!r} must be an RFC 3339 date-time")
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise IntakeError(f"schema: attribute {code!r} must be an RFC 3339 date-time") from None
        return value
    keys = {v.key for v in attribute.values}
    chosen = value.split(",") if isinstance(value, str) else value
    if kind == "singlevaluelist":
        chosen = chosen[0] if isinstance(chosen, list) and len(chosen) == 1 else value
        if chosen not in keys:
            raise IntakeError(f"schema: attribute {code!r} must be one of {', '.join(sorted(keys))}")
        return chosen
    if not isinstance(chosen, list) or not chosen or any(c not in keys for c in chosen):
        raise IntakeError(f"schema: attribute {code!r} must be a list of {', '.join(sorted(keys))}")
    return chosen


def _service(catalogue: Catalogue, code: object) -> Service:
    if not isinstance(code, str):
        raise IntakeError("schema: service_code is required")
    service = catalogue.get(code)
    if service is None:
        raise IntakeError(f"unknown_service: {code[:64]!r} is not in the service catalogue")
    return service


def _text(value: object, name: str, limit: int) -> str | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise IntakeError(f"schema: {name} must be a string")
    if len(value) > limit:
        raise IntakeError(f"schema: {name} is longer than {limit} characters")
    return clean(value).strip() or None


def _media_url(value: object) -> str | None:
    url = _text(value, "media_url", 1000)
    if url is None:
        return None
    refusal = IntakeError(f"schema: media_url must be an http:// or https:// link, got {url[:64]!r}")
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed [ where an IPv6 address would be
        raise refusal from None
    if parts.scheme.lower() not in MEDIA_SCHEMES or not parts.netloc:
        raise refusal
    return url


def _comment(value: object) -> str:
    return _text(value, "comment", MAX_TEXT) or ""


def _floor(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not -10 <= value <= 200:
        raise IntakeError(f"schema: floor must be an integer, got {value!r}")
    return value


def _coordinate(value: object, name: str, bound: float) -> float | None:
    if value is None:
        return None
    try:
        number = (
            float(value) if isinstance(value, int | float | str) and not isinstance(value, bool) else None
        )
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or abs(number) > bound:
        raise IntakeError(f"schema: {name} must be a number within ±{bound:g}")
    return number


def _address(building: str | None, unit: str | None) -> str | None:
    if building and unit:
        return f"Building {building}, unit {unit}"
    return f"Building {building}" if building else None
