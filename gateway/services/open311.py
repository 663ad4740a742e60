"""Open311 GeoReport v2 documents: the spec's field names and shapes, in JSON and XML.

docs/contract.md section 4: "Open311 GeoReport v2 under `/open311/v2/` ... with the spec's field
names, status values (`open`, `closed`) and error format. The gateway's richer lifecycle shows
in `status_notes` and in extension fields." Extension fields are under `extended_attributes`
(as other GeoReport servers do), so strict v2 clients can ignore them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gateway.services.catalogue import Catalogue, Service
from gateway.text import clean

if TYPE_CHECKING:
    from xml.etree.ElementTree import Element

# The spec's discovery example names XML `text/xml`; answers say so, and that they are UTF-8.
XML_TYPE = "text/xml"


def iso(ms: int | None) -> str | None:
    """W3C date-time, as the spec writes it (UTC with an explicit offset)."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def service_entry(service: Service, lang: str) -> dict[str, Any]:
    return {
        "service_code": service.service_code,
        "service_name": service.name(lang),
        "description": service.description,
        "metadata": bool(service.attributes),
        "type": "realtime",
        "keywords": ", ".join(service.keywords),
        "group": service.group,
    }


def service_definition(service: Service) -> dict[str, Any]:
    return {
        "service_code": service.service_code,
        "attributes": [
            {
                "variable": True,
                "code": a.code,
                "datatype": a.datatype,
                "required": a.required,
                "datatype_description": a.datatype_description or None,
                "order": order,
                "description": a.description,
                "values": [{"key": v.key, "name": v.name} for v in a.values],
            }
            for order, a in enumerate(service.attributes, start=1)
        ],
    }


def request_entry(request: dict[str, Any], catalogue: Catalogue, lang: str) -> dict[str, Any]:
    service = catalogue.get(request["service_code"])
    provider = catalogue.providers.get(request["provider_id"] or "")
    return {
        "service_request_id": request["id"],
        "status": request["status"],
        "status_notes": request["status_notes"],
        "service_name": service.name(lang) if service else request["service_code"],
        "service_code": request["service_code"],
        "description": request["description"],
        "agency_responsible": (provider.name_en if lang == "en" else provider.name_zh) if provider else None,
        "service_notice": _notice(service, lang),
        "requested_datetime": iso(request["requested_ms"]),
        "updated_datetime": iso(request["updated_ms"]),
        "expected_datetime": iso(request["expected_ms"]),
        "address": request["address"],
        "address_id": request.get("address_id"),
        "zipcode": None,
        "lat": request["lat"],
        "long": request["long"],
        "media_url": request["media_url"],
        "extended_attributes": {
            "state": request["state"],
            "service_group": request["service_group"],
            "source": request["source"],
            "provider_id": request["provider_id"],
            "building": request["building"],
            "floor": request["floor"],
            "unit": request["unit"],
            "merged_into": request["merged_into"],
            "completed_datetime": iso(request["completed_ms"]),
            "overdue": request["overdue"],
        },
    }


def _notice(service: Service | None, lang: str) -> str | None:
    if service is None:
        return None
    hours = service.deadline.total_seconds() / 3600
    target = f"{hours:g} h" if hours < 48 else f"{hours / 24:g} d"
    return f"目标办结时限 {target}" if lang != "en" else f"Target time to complete: {target}"


# -- XML: the spec's element names; lists are wrapped the way its examples show ----------------

_ITEM = {
    "services": "service",
    "service_requests": "request",
    "errors": "error",
    "attributes": "attribute",
    "values": "value",
    "endpoints": "endpoint",
    "formats": "format",
}


def to_xml(root: str, items: list[dict[str, Any]] | dict[str, Any]) -> bytes:
    # Imported here: only a client asking for .xml needs it, and the idle gateway's memory is
    # counted (issue 15, docs/performance.md "Memory").
    from xml.etree import ElementTree as ET

    element = ET.Element(root)
    if isinstance(items, list):
        for item in items:
            _fill(ET.SubElement(element, _ITEM.get(root, "item")), item)
    else:
        _fill(element, items)
    body: bytes = ET.tostring(element, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="utf-8"?>' + body


def _fill(element: Element, data: dict[str, Any]) -> None:
    from xml.etree.ElementTree import SubElement

    for key, value in data.items():
        child = SubElement(element, key)
        if isinstance(value, dict):
            _fill(child, value)
        elif isinstance(value, list):
            for item in value:
                sub = SubElement(child, _ITEM.get(key, "item"))
                if isinstance(item, dict):
                    _fill(sub, item)
                else:
                    sub.text = clean(str(item))
        elif isinstance(value, bool):
            child.text = "true" if value else "false"
        elif value is not None:
            # Intake already cleaned what people typed; this keeps older records well-formed too.
            child.text = clean(str(value))
