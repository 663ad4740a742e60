"""Open311 GeoReport v2, field by field against the spec (http://wiki.open311.org/GeoReport_v2).

Every endpoint, in JSON and XML: service list, service definition, POST request (form fields
with `attribute[code]`, api_key), GET requests with each filter, GET one request, tokens; the
error format; and the lifecycle as Open311 shows it (status, status_notes, agency_responsible,
expected_datetime). Runs the real API in-process against a real service desk (SQLite).
"""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.application import Gateway
from tests.harness import gateway_settings, served
from tests.open311_spec import ATTRIBUTE_FIELDS, REQUEST_FIELDS, SERVICE_FIELDS

OPERATOR = {"Authorization": "Bearer operator-token"}
VIEWER = {"Authorization": "Bearer viewer-token"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    gateway = Gateway(gateway_settings(tmp_path_factory.mktemp("open311"), "mqtt://127.0.0.1:1"))

    async def prepare() -> None:
        await gateway.writer.open()

    asyncio.run(prepare())
    with served(gateway) as test_client:
        yield test_client


def post(client: TestClient, fmt: str = "json", **fields: Any) -> Any:
    form = {"api_key": "terminal-token", **fields}
    return client.post(f"/open311/v2/requests.{fmt}", data=form)


def parse_w3c(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    assert moment.tzinfo is not None, f"{value} has no offset"
    return moment


def test_service_list_has_the_spec_fields(client: TestClient) -> None:
    services = client.get("/open311/v2/services.json").json()  # the spec: no key needed
    assert len(services) >= 20
    for service in services:
        assert set(service) == SERVICE_FIELDS
        assert service["type"] in ("realtime", "batch", "blackbox")
        assert isinstance(service["metadata"], bool) and isinstance(service["keywords"], str)
    codes = {s["service_code"]: s for s in services}
    assert codes["elderly.meal_delivery"]["metadata"] is True
    assert codes["elderly.meal_delivery"]["service_name"] == "老年助餐送餐"
    groups = {s["group"] for s in services}
    assert {
        "elderly",
        "repair",
        "facility",
        "sanitation",
        "security",
        "health",
        "culture",
        "dispute",
    } <= groups
    english = client.get("/open311/v2/services.json", params={"lang": "en"}).json()
    assert {s["service_code"]: s for s in english}["elderly.meal_delivery"][
        "service_name"
    ] == "Meal delivery for seniors"


def test_service_definition_lists_attributes(client: TestClient) -> None:
    definition = client.get("/open311/v2/services/elderly.meal_delivery.json", headers=OPERATOR).json()
    assert definition["service_code"] == "elderly.meal_delivery"
    meal = definition["attributes"][0]
    assert set(meal) == ATTRIBUTE_FIELDS
    assert meal["code"] == "meal" and meal["required"] is True and meal["datatype"] == "singlevaluelist"
    assert meal["variable"] is True and meal["order"] == 1
    assert {v["key"] for v in meal["values"]} == {"lunch", "dinner"}
    missing = client.get("/open311/v2/services/no.such.json", headers=OPERATOR)
    assert missing.status_code == 404
    assert missing.json() == [{"code": 404, "description": "service_code 'no.such' is not in the catalogue"}]


def test_post_files_a_request_and_get_returns_it_field_by_field(client: TestClient) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    response = post(
        client,
        service_code="elderly.meal_delivery",
        description="Lunch for Mrs Wang",
        address_string="Building 3, unit 2-301",
        building="3",
        unit="2-301",
        lat="31.2304",
        long="121.4737",
        email="wang@example.cn",
        first_name="Li",
        last_name="Wang",
        phone="13800000000",
        media_url="http://example.cn/p.jpg",
        **{"attribute[meal]": "lunch", "attribute[diet]": "low salt"},
    )
    assert response.status_code == 201, response.text
    [posted] = response.json()
    assert set(posted) == {"service_request_id", "service_notice", "account_id"}
    ticket = posted["service_request_id"]
    [request] = client.get(
        f"/open311/v2/requests/{ticket}.json", headers=OPERATOR, params={"extensions": "true"}
    ).json()
    assert set(request) >= REQUEST_FIELDS
    assert request["service_request_id"] == ticket
    assert request["status"] == "open"
    assert request["service_code"] == "elderly.meal_delivery"
    assert request["service_name"] == "老年助餐送餐"
    assert request["description"] == "Lunch for Mrs Wang"
    assert request["address"] == "Building 3, unit 2-301"
    assert request["lat"] == pytest.approx(31.2304) and request["long"] == pytest.approx(121.4737)
    assert request["media_url"] == "http://example.cn/p.jpg"
    assert request["agency_responsible"] is None and request["status_notes"] == "received"
    requested = parse_w3c(request["requested_datetime"])
    assert before <= requested <= datetime.now(UTC)
    assert (parse_w3c(request["expected_datetime"]) - requested).total_seconds() == 86400  # the 1d target
    assert "email" not in request and "phone" not in request  # personal data stays out of GETs
    assert request["extended_attributes"]["state"] == "submitted"
    # The token endpoint maps the token to the ticket.
    assert client.get(f"/open311/v2/tokens/{ticket}.json", headers=OPERATOR).json() == [
        {"service_request_id": ticket, "token": ticket}
    ]


def test_the_lifecycle_shows_through_open311(client: TestClient) -> None:
    [posted] = post(client, service_code="facility.elevator", building="3", description="stuck").json()
    ticket = posted["service_request_id"]
    steps = [
        {"to": "triaged", "note": "checked by phone"},
        {"to": "assigned", "provider_id": "elev-maint"},
        {"to": "in_service"},
    ]
    for step in steps:
        done = client.post(f"/api/v1/requests/{ticket}/transitions", json=step, headers=OPERATOR)
        assert done.status_code == 200, done.text
    [request] = client.get(f"/open311/v2/requests/{ticket}.json", headers=OPERATOR).json()
    assert request["status"] == "open" and request["status_notes"] == "in service"
    assert request["agency_responsible"] == "迅达电梯维保站"
    english = client.get(
        f"/open311/v2/requests/{ticket}.json", headers=OPERATOR, params={"lang": "en"}
    ).json()
    assert english[0]["agency_responsible"] == "Lift Maintenance Co."
    illegal = client.post(f"/api/v1/requests/{ticket}/transitions", json={"to": "closed"}, headers=OPERATOR)
    assert illegal.status_code == 409
    assert (
        illegal.json()["detail"]
        == "a request that is in_service cannot become closed; allowed: assigned, completed"
    )
    before = time.time()
    client.post(
        f"/api/v1/requests/{ticket}/transitions", json={"to": "completed", "note": "fixed"}, headers=OPERATOR
    )
    after = time.time()
    [request] = client.get(
        f"/open311/v2/requests/{ticket}.json", headers=OPERATOR, params={"extensions": "true"}
    ).json()
    assert request["status"] == "closed" and request["status_notes"] == "fixed"
    history = client.get(f"/api/v1/requests/{ticket}", headers=OPERATOR).json()["history"]
    assert [h["to_state"] for h in history] == ["submitted", "triaged", "assigned", "in_service", "completed"]
    assert all(h["actor"] for h in history) and history[1]["note"] == "checked by phone"
    # Completed when the transition was made (whole seconds in Open311), as the history says.
    completed = datetime.fromisoformat(request["extended_attributes"]["completed_datetime"]).timestamp()
    assert int(before) <= completed <= after and completed == history[-1]["ts_ms"] // 1000


def test_get_requests_filters(client: TestClient) -> None:
    tickets = []
    for code in ("sanitation.garbage", "sanitation.garbage", "repair.plumbing"):
        [posted] = post(client, service_code=code, address_string="Building 1").json()
        tickets.append(posted["service_request_id"])
    client.post(f"/api/v1/requests/{tickets[1]}/transitions", json={"to": "rejected"}, headers=OPERATOR)

    def ids(**params: str) -> set[str]:
        found = client.get("/open311/v2/requests.json", headers=VIEWER, params=params)
        assert found.status_code == 200, found.text
        return {r["service_request_id"] for r in found.json()}

    assert set(tickets) <= ids()
    assert ids(service_request_id=",".join(tickets[:2]), service_code="repair.plumbing") == set(tickets[:2])
    garbage = ids(service_code="sanitation.garbage")
    assert tickets[0] in garbage and tickets[1] in garbage and tickets[2] not in garbage
    assert tickets[1] in ids(status="closed") and tickets[0] not in ids(status="closed")
    assert tickets[0] in ids(status="open") and tickets[1] not in ids(status="open")
    assert set(tickets) <= ids(status="open,closed", service_code="sanitation.garbage,repair.plumbing")
    future = datetime.fromtimestamp(time.time() + 3600, UTC).isoformat()
    assert ids(start_date=future) == set()
    assert set(tickets) <= ids(end_date=future)
    bad = client.get(
        "/open311/v2/requests.json", headers=VIEWER, params={"start_date": "2026-01-01T00:00:00"}
    )
    assert (
        bad.status_code == 400 and bad.json()[0]["code"] == 400 and "offset" in bad.json()[0]["description"]
    )


def test_post_refusals_use_the_spec_error_format(client: TestClient) -> None:
    cases = [
        ({"service_code": "elderly.meal_delivery", "building": "3"}, "missing_attribute"),
        ({"service_code": "repair.plumbing"}, "a location is required"),
        ({"service_code": "repair.plumbing", "lat": "91", "long": "0"}, "lat must be"),
        (
            {"service_code": "elderly.meal_delivery", "building": "3", "attribute[meal]": "brunch"},
            "must be one of",
        ),
    ]
    for fields, fragment in cases:
        refused = post(client, **fields)
        assert refused.status_code == 400, fields
        [error] = refused.json()
        assert error["code"] == 400 and fragment in error["description"], (fields, error)
    unknown = post(client, service_code="no.such", building="3")  # the spec: 404 for a service_code
    assert unknown.status_code == 404 and "unknown_service" in unknown.json()[0]["description"]
    anonymous = client.post(
        "/open311/v2/requests.json", data={"service_code": "repair.plumbing", "building": "1"}
    )
    assert anonymous.status_code == 403 and anonymous.json()[0]["code"] == 403  # the spec: 403
    viewer = client.post("/open311/v2/requests.json", data={"api_key": "viewer-token", "service_code": "x"})
    assert viewer.status_code == 403 and "may not" in viewer.json()[0]["description"]


def test_a_resent_post_with_the_same_request_id_is_not_a_second_request(client: TestClient) -> None:
    fields = {
        "service_code": "repair.electrical",
        "building": "2",
        "device_id": "kiosk-9",
        "request_id": "abc-1",
    }
    first = post(client, **fields)
    again = post(client, **fields)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()[0]["service_request_id"] == first.json()[0]["service_request_id"]
    assert again.json()[0]["service_notice"].startswith("duplicate")


def test_json_bodies_and_xml_responses(client: TestClient) -> None:
    response = client.post(
        "/open311/v2/requests.xml",
        json={"service_code": "elderly.meal_delivery", "building": "4", "attributes": {"meal": "dinner"}},
        headers={"Authorization": "Bearer terminal-token"},
    )
    assert response.status_code == 201 and response.headers["content-type"] == "text/xml; charset=utf-8"
    root = ET.fromstring(response.content)
    assert root.tag == "service_requests"
    ticket = root.find("request/service_request_id").text  # type: ignore[union-attr]
    listed = ET.fromstring(client.get(f"/open311/v2/requests/{ticket}.xml", headers=OPERATOR).content)
    request = listed.find("request")
    assert request is not None and {child.tag for child in request} >= REQUEST_FIELDS
    assert request.findtext("status") == "open"
    services = ET.fromstring(client.get("/open311/v2/services.xml", headers=OPERATOR).content)
    assert services.tag == "services" and len(services.findall("service")) >= 20
    definition = ET.fromstring(
        client.get("/open311/v2/services/elderly.meal_delivery.xml", headers=OPERATOR).content
    )
    assert definition.find("attributes/attribute/values/value/key") is not None
    error = client.get("/open311/v2/requests/none.xml", headers=OPERATOR)
    assert error.status_code == 404
    assert ET.fromstring(error.content).findtext("error/code") == "404"


def test_jurisdiction_is_checked(client: TestClient) -> None:
    assert (
        client.get(
            "/open311/v2/services.json", headers=OPERATOR, params={"jurisdiction_id": "testville"}
        ).status_code
        == 200
    )
    other = client.get("/open311/v2/services.json", headers=OPERATOR, params={"jurisdiction_id": "elsewhere"})
    assert other.status_code == 404 and other.json()[0]["code"] == 404


def test_discovery(client: TestClient) -> None:
    found = client.get("/open311/v2/discovery.json", headers=OPERATOR).json()
    assert found["endpoints"][0]["specification"] == "http://wiki.open311.org/GeoReport_v2"
