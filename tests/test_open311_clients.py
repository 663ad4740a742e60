"""Open311 GeoReport v2 as clients written to the spec use it, over real HTTP.

The published `georeport` client (0.3.1, as shipped on PyPI: it sends no key on GETs, always
its jurisdiction, and parses XML with xmltodict) reads discovery-free what the spec says needs
no key; the spec's form-encoded POST is made by hand, field by field, in JSON and XML. Each point
of the spec the endpoint once missed has its check here: keys (none for services, 403 when
wrong), the discovery document's XML, empty parameters treated as absent, 404 for an unknown
service_code, the POST's answer, address_id as filed, an inclusive end_date, extensions only
when asked, repeated filters, and `charset=utf-8`.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import xmltodict
from georeport import GeoReport

from tests.harness import gateway_settings, running
from tests.open311_spec import ATTRIBUTE_FIELDS, REQUEST_FIELDS, SERVICE_FIELDS

JSON = "application/json; charset=utf-8"
XML = "text/xml; charset=utf-8"
# Every field of the spec's POST, as a client fills its form.
FORM = {
    "api_key": "terminal-token",
    "jurisdiction_id": "testville",
    "service_code": "elderly.meal_delivery",
    "lat": "31.2304",
    "long": "121.4737",
    "address_string": "Building 3, unit 2-301",
    "address_id": "addr-3-2-301",
    "email": "wang@example.cn",
    "device_id": "kiosk-1",
    "account_id": "acct-7",
    "first_name": "Li",
    "last_name": "Wang",
    "phone": "13800000000",
    "description": "Lunch for Mrs Wang",
    "media_url": "http://example.cn/p.jpg",
    "attribute[meal]": "lunch",
    "attribute[diet]": "low salt",
}


async def _gateway(tmp_path: Path, mosquitto: Any, keyless: bool) -> AsyncIterator[str]:
    settings = gateway_settings(tmp_path, mosquitto.url)
    services = settings.services.model_copy(update={"open311_keyless_reads": keyless})
    async with running(settings.model_copy(update={"services": services})) as gateway:
        yield f"http://127.0.0.1:{gateway.api_port}"


@pytest.fixture
async def open_reads(tmp_path: Path, mosquitto: Any) -> AsyncIterator[str]:
    """A gateway whose installer opened keyless request reads."""
    async for url in _gateway(tmp_path, mosquitto, keyless=True):
        yield url


@pytest.fixture
async def closed_reads(tmp_path: Path, mosquitto: Any) -> AsyncIterator[str]:
    """A gateway as shipped: request reads need a key."""
    async for url in _gateway(tmp_path, mosquitto, keyless=False):
        yield url


def stock(url: str, fmt: str) -> GeoReport:
    return GeoReport(f"{url}/open311/v2", jurisdiction="testville", output_format=fmt)


async def file(url: str, fmt: str = "json", **fields: str) -> httpx.Response:
    """The spec's POST by hand: form-encoded, with the key in the body."""
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(f"{url}/open311/v2/requests.{fmt}", data=fields)


async def get(url: str, path: str, params: Any = None, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(f"{url}{path}", params=params, headers=headers)


async def test_the_published_client_reads_services_and_definitions_without_a_key(closed_reads: str) -> None:
    for fmt in ("json", "xml"):
        services = await asyncio.to_thread(stock(closed_reads, fmt).get_service_list)
        assert len(services) >= 20
        for service in services:
            assert set(service) == SERVICE_FIELDS, service
            assert service["type"] == "realtime"
        meal = {s["service_code"]: s for s in services}["elderly.meal_delivery"]
        assert meal["service_name"] == "老年助餐送餐" and meal["group"] == "elderly"
        assert meal["metadata"] == (True if fmt == "json" else "true")

        definition = await asyncio.to_thread(
            stock(closed_reads, fmt).get_service_definition, "elderly.meal_delivery"
        )
        assert definition["service_code"] == "elderly.meal_delivery"
        attributes = definition["attributes"] if fmt == "json" else definition["attributes"]["attribute"]
        first = attributes[0]
        assert set(first) == ATTRIBUTE_FIELDS
        assert first["code"] == "meal" and first["datatype"] == "singlevaluelist"
        assert first["required"] == (True if fmt == "json" else "true")
        assert str(first["order"]) == "1" and str(first["variable"]).lower() == "true"
        values = first["values"] if fmt == "json" else first["values"]["value"]
        assert {v["key"] for v in values} == {"lunch", "dinner"}

    for path, kind in [("services.json", JSON), ("services.xml", XML), ("discovery.json", JSON)]:
        answer = await get(closed_reads, f"/open311/v2/{path}")
        assert answer.status_code == 200 and answer.headers["content-type"] == kind


async def test_discovery_names_its_xml_items_as_the_spec_does(closed_reads: str) -> None:
    answer = await get(closed_reads, "/open311/v2/discovery.xml")
    assert answer.status_code == 200 and answer.headers["content-type"] == XML
    root = ET.fromstring(answer.content)
    assert root.tag == "discovery"
    assert {child.tag for child in root} == {"changeset", "contact", "key_service", "endpoints"}
    [endpoint] = root.findall("endpoints/endpoint")
    assert endpoint.findtext("specification") == "http://wiki.open311.org/GeoReport_v2"
    assert endpoint.findtext("url") == f"{closed_reads}/open311/v2/"
    assert endpoint.findtext("type") == "production"
    formats = [f.text for f in endpoint.findall("formats/format")]
    assert formats == ["application/json", "text/xml"]
    # What it advertises is what it serves.
    for fmt, advertised in zip(("json", "xml"), formats, strict=True):
        served = await get(closed_reads, f"/open311/v2/services.{fmt}")
        assert served.headers["content-type"].split(";")[0] == advertised
    parsed = xmltodict.parse(answer.content)["discovery"]
    assert parsed["endpoints"]["endpoint"]["formats"]["format"] == formats


async def test_request_reads_need_a_key_unless_the_installer_opens_them(closed_reads: str) -> None:
    posted = await file(closed_reads, **{**FORM, "device_id": "kiosk-2"})
    assert posted.status_code == 201, posted.text
    ticket = posted.json()[0]["service_request_id"]
    for fmt in ("json", "xml"):
        with pytest.raises(requests.HTTPError) as refused:
            await asyncio.to_thread(stock(closed_reads, fmt).get_service_requests)
        assert refused.value.response is not None and refused.value.response.status_code == 403
        with pytest.raises(requests.HTTPError) as one:
            await asyncio.to_thread(stock(closed_reads, fmt).get_service_request, ticket)
        assert one.value.response is not None and one.value.response.status_code == 403
    # The spec's error format, naming the way in.
    answer = await get(closed_reads, "/open311/v2/requests.json")
    assert answer.status_code == 403 and answer.headers["content-type"] == JSON
    [error] = answer.json()
    assert error["code"] == 403 and "Authorization: Bearer" in error["description"]
    assert "services.open311_keyless_reads" in error["description"]
    xml_error = await get(closed_reads, "/open311/v2/requests.xml")
    assert xml_error.headers["content-type"] == XML
    assert ET.fromstring(xml_error.content).findtext("error/code") == "403"
    # A key in the URL is not one: it would reach proxy logs. The refusal says so.
    in_url = await get(closed_reads, "/open311/v2/requests.json", {"api_key": "viewer-token"})
    assert in_url.status_code == 403 and "not accepted in a URL" in in_url.json()[0]["description"]
    # Nor anywhere else in the API: there a key is a bearer token.
    summary = await get(closed_reads, "/api/v1/summary", {"api_key": "viewer-token"})
    assert summary.status_code == 401
    # A bearer token reads them; a wrong one is 403, as the spec answers a wrong key.
    assert (
        await get(closed_reads, f"/open311/v2/requests/{ticket}.json", token="viewer-token")
    ).status_code == 200
    wrong = await get(closed_reads, f"/open311/v2/requests/{ticket}.json", token="nobody")
    assert wrong.status_code == 403 and wrong.json()[0]["code"] == 403


async def test_the_spec_post_by_hand_field_by_field(open_reads: str) -> None:
    before = datetime.now().astimezone().replace(microsecond=0)
    for fmt in ("json", "xml"):
        posted = await file(open_reads, fmt, **{**FORM, "device_id": f"kiosk-{fmt}"})
        assert posted.status_code == 201, posted.text
        if fmt == "json":
            assert posted.headers["content-type"] == JSON
            [answer] = posted.json()
        else:
            assert posted.headers["content-type"] == XML
            answer = xmltodict.parse(posted.content)["service_requests"]["request"]
        # One of service_request_id or token, as the spec says: the ticket is issued at once.
        assert set(answer) == {"service_request_id", "service_notice", "account_id"}
        assert answer["service_request_id"].startswith("testville-")
        assert answer["service_notice"] == "目标办结时限 24 h"
        ticket = answer["service_request_id"]

        # A keyless reader (the published client) gets the redacted entry (docs/privacy.md) ...
        keyless = await asyncio.to_thread(stock(open_reads, fmt).get_service_request, ticket)
        assert set(keyless) == REQUEST_FIELDS  # no extension unless asked for
        assert not keyless["description"] and keyless["address"] is None and keyless["lat"] is None
        assert keyless["address_id"] is None and keyless["media_url"] is None
        assert keyless["status_notes"] is None and keyless["status"] == "open"
        # ... an operator the whole request, as filed.
        read = await get(open_reads, f"/open311/v2/requests/{ticket}.{fmt}", token="operator-token")
        request = (
            read.json()[0]
            if fmt == "json"
            else dict(xmltodict.parse(read.content)["service_requests"]["request"])
        )
        assert set(request) == REQUEST_FIELDS
        text = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in request.items()}
        assert text["service_request_id"] == ticket
        assert text["status"] == "open" and text["status_notes"] == "received"
        assert text["service_code"] == "elderly.meal_delivery" and text["service_name"] == "老年助餐送餐"
        assert text["description"] == "Lunch for Mrs Wang"
        assert text["address"] == "Building 3, unit 2-301"
        assert text["address_id"] == "addr-3-2-301"  # as filed
        assert float(text["lat"]) == pytest.approx(31.2304) and float(text["long"]) == pytest.approx(121.4737)
        assert text["media_url"] == "http://example.cn/p.jpg"
        assert text["zipcode"] is None and text["agency_responsible"] is None
        requested = datetime.fromisoformat(text["requested_datetime"])
        assert before <= requested <= datetime.now().astimezone()
        assert datetime.fromisoformat(text["expected_datetime"]) - requested == timedelta(days=1)
        assert text["updated_datetime"] == text["requested_datetime"]
        for personal in ("email", "phone", "first_name", "last_name", "account_id", "device_id"):
            assert personal not in request  # what identifies the resident stays out of reads
        listed = await asyncio.to_thread(stock(open_reads, fmt).get_service_requests, ticket)
        assert (listed[0] if isinstance(listed, list) else listed)["service_request_id"] == ticket

    # The gateway's lifecycle, only when asked for.
    extended = await get(open_reads, f"/open311/v2/requests/{ticket}.json", {"extensions": "true"})
    assert extended.json()[0]["extended_attributes"]["state"] == "submitted"
    extended_xml = await get(open_reads, f"/open311/v2/requests/{ticket}.xml", {"extensions": "true"})
    assert ET.fromstring(extended_xml.content).findtext("request/extended_attributes/state") == "submitted"
    plain_xml = await get(open_reads, f"/open311/v2/requests/{ticket}.xml")
    assert ET.fromstring(plain_xml.content).find("request/extended_attributes") is None


async def test_post_refusals_use_the_spec_codes(open_reads: str) -> None:
    unknown = await file(open_reads, **{**FORM, "service_code": "no.such"})
    assert unknown.status_code == 404 and unknown.headers["content-type"] == JSON
    assert unknown.json()[0]["code"] == 404 and "no.such" in unknown.json()[0]["description"]
    no_key = await file(open_reads, **{k: v for k, v in FORM.items() if k != "api_key"})
    assert no_key.status_code == 403 and no_key.json()[0]["code"] == 403
    wrong_key = await file(open_reads, "xml", **{**FORM, "api_key": "guessed"})
    assert wrong_key.status_code == 403 and wrong_key.headers["content-type"] == XML
    assert ET.fromstring(wrong_key.content).findtext("error/code") == "403"
    # A key in the URL of a POST is no key either.
    async with httpx.AsyncClient(timeout=10) as client:
        in_url = await client.post(
            f"{open_reads}/open311/v2/requests.json",
            params={"api_key": "terminal-token"},
            data={k: v for k, v in FORM.items() if k != "api_key"},
        )
    assert in_url.status_code == 403
    missing = await file(open_reads, **{k: v for k, v in FORM.items() if k != "attribute[meal]"})
    assert missing.status_code == 400 and "missing_attribute" in missing.json()[0]["description"]


async def test_empty_optional_parameters_are_absent(open_reads: str) -> None:
    # Some clients send every parameter, empty when unset: lat=&long= beside an address is a POST
    # with an address, and jurisdiction_id= is no jurisdiction.
    blank = {**FORM, "lat": "", "long": "", "jurisdiction_id": "", "media_url": "", "device_id": "kiosk-b"}
    posted = await file(open_reads, **blank)
    assert posted.status_code == 201, posted.text
    ticket = posted.json()[0]["service_request_id"]
    [request] = (
        await get(
            open_reads, f"/open311/v2/requests/{ticket}.json", {"jurisdiction_id": ""}, "operator-token"
        )
    ).json()
    assert request["lat"] is None and request["long"] is None and request["media_url"] is None
    assert request["address"] == "Building 3, unit 2-301"

    plain = await get(open_reads, "/open311/v2/requests.json")
    empties = {
        "jurisdiction_id": "",
        "status": "",
        "start_date": "",
        "end_date": "",
        "service_request_id": "",
        "service_code": "",
    }
    with_empties = await get(open_reads, "/open311/v2/requests.json", empties)
    assert with_empties.status_code == 200, with_empties.text
    assert with_empties.json() == plain.json() and ticket in {r["service_request_id"] for r in plain.json()}
    for path in ("/open311/v2/services.json", "/open311/v2/services/elderly.meal_delivery.json"):
        assert (await get(open_reads, path, {"jurisdiction_id": ""})).status_code == 200


async def test_dates_and_repeated_filters(open_reads: str) -> None:
    tickets = []
    for code in ("sanitation.garbage", "repair.plumbing"):
        fields = {k: v for k, v in FORM.items() if not k.startswith("attribute[")}
        posted = await file(open_reads, **{**fields, "service_code": code, "device_id": f"k-{code}"})
        assert posted.status_code == 201, posted.text
        tickets.append(posted.json()[0]["service_request_id"])
    [first] = (await get(open_reads, f"/open311/v2/requests/{tickets[0]}.json")).json()

    async def ids(params: Any) -> set[str]:
        answer = await get(open_reads, "/open311/v2/requests.json", params)
        assert answer.status_code == 200, answer.text
        return {r["service_request_id"] for r in answer.json()}

    # end_date is the latest moment included: a request shown at that second is in the answer.
    moment = first["requested_datetime"]
    assert tickets[0] in await ids({"end_date": moment, "service_code": "sanitation.garbage"})
    assert tickets[0] in await ids({"start_date": moment, "end_date": moment})
    # A list filter given twice is one list, as "declared multiple times" means.
    repeated = [("service_code", "sanitation.garbage"), ("service_code", "repair.plumbing")]
    assert set(tickets) <= await ids(repeated)
    assert await ids(repeated) == await ids({"service_code": "sanitation.garbage,repair.plumbing"})
    # Any other parameter given twice is refused rather than half-read.
    twice = await get(
        open_reads, "/open311/v2/requests.json", [("start_date", moment), ("start_date", moment)]
    )
    assert (
        twice.status_code == 400
        and twice.json()[0]["description"] == "start_date is given 2 times: give it once"
    )
