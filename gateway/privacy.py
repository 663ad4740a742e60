"""Residents' personal data: which fields hold it, which roles read it, and the view others get.

China's PIPL asks that personal information be read only by those whose work needs it
(docs/privacy.md). This module is the one place that says what is personal and who may see it;
every way data leaves the store (REST, Open311 JSON and XML, the live stream, exports, the
dashboard, the uplink, dead letters, logs) goes through it.

Personal: a home (unit, household, address, coordinates), a person (contact, names), photo
links, and free text written by residents or staff (descriptions, status notes, comments,
attribute answers), which may hold any of those. Building and floor are not: they name no one.

Roles: `operator` and `installer` read personal data (their reads are recorded, item 2 of
docs/privacy.md); `viewer` gets the redacted view; `terminal` sees only the status of the tickets
it filed itself; `metrics` reads `/metrics` and nothing else; `grid_worker` reads the care
routes only, for the households of its own grids (docs/care.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from gateway.topics import TERMINAL_CHANNELS

# The roles whose work needs residents' personal data. A grid worker is admitted only by the
# care routes (gateway/api/routes/care.py), and there only to the households of its grids.
PERSONAL_READERS = frozenset({"operator", "installer", "grid_worker"})

# A request's personal fields and what the redacted view shows instead (the same type, emptied,
# so a client's schema still holds).
REQUEST_PERSONAL: Mapping[str, Any] = {
    "description": "",
    "unit": None,
    "household": None,
    "address": None,
    "address_id": None,
    "lat": None,
    "long": None,
    "media_url": None,
    "contact": None,
    "attributes": {},
    "status_notes": None,
    # An Open311 client's device id names the resident's phone (a kiosk's name is no loss).
    "device_id": None,
}
# Where a request stands, without naming anyone: what a terminal sees of the tickets it filed.
WHERE_IT_STANDS = (
    "id",
    "service_code",
    "service_group",
    "state",
    "status",
    "source",
    "building",
    "floor",
    "requested_ms",
    "updated_ms",
    "expected_ms",
    "state_since_ms",
    "completed_ms",
    "merged_into",
    "overdue",
)
STATUS_FIELDS = frozenset(WHERE_IT_STANDS)
# The same in an Open311 entry (gateway/services/open311.py), and in its extended_attributes.
OPEN311_PERSONAL: Mapping[str, Any] = {
    "description": "",
    "status_notes": None,
    "address": None,
    "address_id": None,
    "zipcode": None,
    "lat": None,
    "long": None,
    "media_url": None,
}
OPEN311_EXTENDED_PERSONAL = frozenset({"unit", "household"})
# Free text in a lifecycle step, a rating and a device's location.
STEP_PERSONAL: Mapping[str, Any] = {"note": ""}
RATING_PERSONAL: Mapping[str, Any] = {"comment": ""}
DEVICE_PERSONAL: Mapping[str, Any] = {"unit": None}
# Internal bookkeeping that no reader needs: who filed (a token id or terminal), kept for scoping.
INTERNAL = frozenset({"filed_by"})

# A dead letter keeps at most this much of what was refused, whatever the reason: enough to see
# what a device got wrong, too little to hold a copy of anything (docs/privacy.md).
DEAD_LETTER_KEEP_BYTES = 256
# Of a refused terminal message (topics.TERMINAL_CHANNELS: request, rating, vote), only the keys
# that name no one: the message's own ids, the service, the building and floor, the score, the
# proposal.
DEAD_LETTER_KEYS = frozenset(
    {
        "request_id",
        "rating_id",
        "vote_id",
        "service_request_id",
        "proposal_id",
        "service_code",
        "score",
        "ts",
        "state",
        "kind",
        "type",
        "severity",
        "seq",
        "fw",
    }
)
LOCATION_KEYS = frozenset({"building", "floor"})

# Request fields the district may receive (each documented in docs/uplink.md): where it stands
# and who delivers it; everything else stays in the community.
UPLINK_REQUEST_FIELDS = (*WHERE_IT_STANDS, "provider_id")


def reads_personal(role: str | None) -> bool:
    """Whether `role` sees residents' personal data (None: an anonymous reader)."""
    return role in PERSONAL_READERS


def _emptied(item: Mapping[str, Any], personal: Mapping[str, Any]) -> dict[str, Any]:
    return {key: personal.get(key, value) for key, value in item.items() if key not in INTERNAL}


def redact_request(view: Mapping[str, Any]) -> dict[str, Any]:
    """A request with its personal fields emptied (building and floor stay)."""
    return _emptied(view, REQUEST_PERSONAL)


def status_view(view: Mapping[str, Any]) -> dict[str, Any]:
    """A request as the terminal that filed it sees it: its status, every other field empty."""
    return {
        key: value if key in STATUS_FIELDS else REQUEST_PERSONAL.get(key)
        for key, value in view.items()
        if key not in INTERNAL
    }


def request_for(role: str | None, view: Mapping[str, Any]) -> dict[str, Any]:
    """A request as `role` may read it (the terminal's own-ticket scoping is the caller's)."""
    if reads_personal(role):
        return {k: v for k, v in view.items() if k not in INTERNAL}
    if role == "terminal":
        return status_view(view)
    return redact_request(view)


def redact_open311(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An Open311 GeoReport v2 request entry with its personal fields emptied."""
    out = _emptied(entry, OPEN311_PERSONAL)
    extended = entry.get("extended_attributes")
    if isinstance(extended, Mapping):
        out["extended_attributes"] = {
            k: (None if k in OPEN311_EXTENDED_PERSONAL else v) for k, v in extended.items()
        }
    return out


def open311_for(role: str | None, entry: Mapping[str, Any]) -> dict[str, Any]:
    """An Open311 entry as `role` (None: a keyless reader) may read it."""
    return dict(entry) if reads_personal(role) else redact_open311(entry)


def redact_steps(steps: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [_emptied(step, STEP_PERSONAL) for step in steps]


def redact_rating(rating: Mapping[str, Any]) -> dict[str, Any]:
    return _emptied(rating, RATING_PERSONAL)


def redact_device(device: Mapping[str, Any]) -> dict[str, Any]:
    """A device's record without the unit it sits in (a sensor in a home names that home)."""
    return _emptied(device, DEVICE_PERSONAL)


def device_for(role: str | None, device: Mapping[str, Any]) -> dict[str, Any]:
    return dict(device) if reads_personal(role) else redact_device(device)


def uplink_request(view: Mapping[str, Any]) -> dict[str, Any]:
    """The allow-listed fields of a request that the district receives (never free text)."""
    return {key: view.get(key) for key in UPLINK_REQUEST_FIELDS}


def stream_item(
    name: str, data: Mapping[str, Any], role: str | None, filer: str | None
) -> Mapping[str, Any] | None:
    """A live-stream item as `role` may receive it; None: not for this subscriber.

    `filer` is the subscriber's own filing identity (gateway/api/auth.py `Principal.filer`): a
    terminal receives only the requests and ratings of the tickets it filed.
    """
    if name not in ("request", "rating"):
        return data
    if reads_personal(role):
        return {k: v for k, v in data.items() if k not in INTERNAL}
    if role == "terminal":
        if filer is None or data.get("filed_by") != filer:
            return None
        if name == "rating":
            return {k: v for k, v in data.items() if k not in INTERNAL}
        out = status_view(data)
        step = data.get("step")
        if isinstance(step, Mapping):
            out["step"] = {k: v for k, v in step.items() if k in ("from", "to", "ts_ms")}
        return out
    if name == "rating":
        return {k: v for k, v in data.items() if k not in INTERNAL}
    return redact_request(data)


def dead_letter_payload(channel: str | None, payload: bytes) -> bytes:
    """What a dead letter keeps of a refused payload: redacted, then cut to DEAD_LETTER_KEEP_BYTES.

    A JSON object keeps only the keys that name no one (a device's location keeps its building
    and floor). A terminal's message that is not a JSON object is withheld whole: it was typed
    by a resident and may be anything. Other channels' payloads (devices') keep their first bytes.
    """
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        kept = {k: v for k, v in value.items() if k in DEAD_LETTER_KEYS and _scalar(v)}
        location = value.get("location")
        if isinstance(location, dict):
            kept["location"] = {k: v for k, v in location.items() if k in LOCATION_KEYS and _scalar(v)}
        if channel not in TERMINAL_CHANNELS:
            # A device's readings and events say nothing about a resident: kept as sent.
            kept = {**value, **({"location": kept["location"]} if "location" in kept else {})}
        withheld = sorted(set(value) - set(kept))
        if withheld:
            kept["_withheld"] = withheld[:16]
        return orjson.dumps(kept, default=str)[:DEAD_LETTER_KEEP_BYTES]
    if channel in TERMINAL_CHANNELS:
        return f"(withheld: {len(payload)} bytes that are not a JSON object)".encode()
    return payload[:DEAD_LETTER_KEEP_BYTES]


def _scalar(value: object) -> bool:
    return (
        value is None
        or isinstance(value, bool | int | float)
        or (isinstance(value, str) and len(value) <= 128)
    )
