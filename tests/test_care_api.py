"""Precision care over the real application (docs/care.md, docs/api.md "Precision care").

A real gateway's API in-process (no broker, as tests/test_api.py): grids from the settings,
consents and care needs, a grid worker's offline batch of visits sent twice, the weighted needs
list, a household's view with the services it is eligible for and does not use, a welfare check
raised, filed as a service request, escalated when unacknowledged and closed with its outcome,
a withdrawal that stops the analysis at once, every personal read in the access log, and the
equity figures with no household in them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.application import Gateway
from gateway.care.welfare import Alert
from gateway.clock import now_ms
from gateway.models import Batch, Reading
from gateway.settings import CareGrid, TokenGrant
from tests.harness import TOKENS, gateway_settings, served

HOME = "/api/v1/care/households/1/1-101"
OPERATOR = {"Authorization": "Bearer operator-token"}
WANG = {"Authorization": "Bearer grid-wang-token"}  # grid G1: buildings 1 and 2
LI = {"Authorization": "Bearer grid-li-token"}  # grid G2: buildings 3 and 4
VIEWER = {"Authorization": "Bearer viewer-token"}
INSTALLER = {"Authorization": "Bearer installer-token"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    settings = gateway_settings(tmp_path_factory.mktemp("care"), "mqtt://127.0.0.1:1")
    care = settings.care.model_copy(
        update={
            "grids": [
                CareGrid(id="G1", name="East", buildings=["1", "2"], workers=["wang"]),
                CareGrid(id="G2", name="West", buildings=["3", "4"], workers=["li"]),
            ]
        }
    )
    tokens = {
        **TOKENS,
        "grid-wang-token": TokenGrant(role="grid_worker", name="wang"),
        "grid-li-token": TokenGrant(role="grid_worker", name="li"),
    }
    auth = settings.auth.model_copy(update={"tokens": tokens})
    gw = Gateway(settings.model_copy(update={"care": care, "auth": auth}))

    async def prepare() -> None:
        gw.registry.restore(await gw.writer.open())
        await gw.care.open()

    asyncio.run(prepare())
    yield gw
    asyncio.run(gw.reader.close())


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[TestClient]:
    with served(gateway) as test_client:
        yield test_client


def test_grids_are_listed_with_their_workers(client: TestClient) -> None:
    grids = client.get("/api/v1/care/grids", headers=WANG).json()["items"]
    assert [(g["id"], g["buildings"], g["workers"]) for g in grids] == [
        ("G1", ["1", "2"], ["wang"]),
        ("G2", ["3", "4"], ["li"]),
    ]
    assert client.get("/api/v1/care/grids").status_code == 401
    # A grid worker reads the care routes only.
    assert client.get("/api/v1/requests", headers=WANG).status_code == 403


def test_needs_are_recorded_only_with_consent(client: TestClient) -> None:
    needs = {"elderly": True, "living_alone": True, "chronic_illness": True}
    assert client.put(f"{HOME}/needs", headers=OPERATOR, json=needs).status_code == 409
    for purpose in ("register", "welfare", "visits"):
        answer = client.post(f"{HOME}/consent", headers=WANG, json={"purpose": purpose, "granted": True})
        assert answer.status_code == 200, answer.text
    assert client.put(f"{HOME}/needs", headers=WANG, json=needs).status_code == 200
    listed = client.get("/api/v1/care/households", headers=WANG).json()["items"]
    assert [(h["household"], h["group"]) for h in listed] == [("1/1-101", "elderly_alone")]
    assert listed[0]["consents"] == {"register": True, "welfare": True, "visits": True}


def test_a_grid_worker_sees_only_its_grids(client: TestClient) -> None:
    assert client.get("/api/v1/care/households", headers=LI).json()["items"] == []
    assert client.get(HOME, headers=LI).status_code == 403
    assert client.put(f"{HOME}/needs", headers=LI, json={}).status_code == 403
    assert client.get(HOME, headers=VIEWER).status_code == 403


def test_a_batch_of_visits_sent_again_is_recorded_once(client: TestClient) -> None:
    batch = {
        "visits": [
            {
                "id": "wang-phone:0001",
                "building": "1",
                "unit": "1-101",
                "at": "2026-12-01T09:30:00+08:00",
                "note": "Knees worse; cooking is hard",
                "answers": {"meals_per_day": "2"},
                "needs": ["elderly.meal_delivery"],
            },
            {"id": "wang-phone:0002", "building": "3", "unit": "3-201", "at": "2026-12-01T10:00:00+08:00"},
            {"id": "wang-phone:0003", "building": "1", "unit": "1-102", "at": "2026-12-01T10:30:00+08:00"},
        ]
    }
    first = client.post("/api/v1/care/visits", headers=WANG, json=batch).json()["items"]
    assert [(v["id"], v["status"], v["error"]) for v in first] == [
        ("wang-phone:0001", "accepted", None),
        ("wang-phone:0002", "refused", "not_your_grid"),
        ("wang-phone:0003", "refused", "no_consent: visits"),
    ]
    again = client.post("/api/v1/care/visits", headers=WANG, json=batch).json()["items"]
    assert again[0]["status"] == "duplicate"
    needs = client.get("/api/v1/care/needs", headers=WANG).json()["items"]
    assert [(n["household"], n["service_code"], n["weight"]) for n in needs] == [
        ("1/1-101", "elderly.meal_delivery", 4.0)  # elderly living alone (3) with a chronic illness (+1)
    ]


def test_the_household_view_ranks_services_it_does_not_use(client: TestClient) -> None:
    view = client.get(HOME, headers=WANG).json()
    assert view["grid"] == "G1" and view["group"] == "elderly_alone"
    assert [v["id"] for v in view["visits"]] == ["wang-phone:0001"]
    codes = [s["service_code"] for s in view["eligible_unused"]]
    assert "elderly.meal_delivery" in codes and "elderly.home_visit" in codes and "health.checkup" in codes
    assert view["welfare"] == "learning"


def test_a_welfare_check_reaches_the_grid_escalates_and_closes_with_its_outcome(
    client: TestClient, gateway: Gateway
) -> None:
    raised = now_ms()
    alert = Alert("1/1-101", "quiet_too_long", raised, raised - 110 * 60_000, 5.2, "no activity for 110 min")
    portal = client.portal
    assert portal is not None
    check = portal.call(gateway.care.raise_check, alert)
    assert check.grid == "G1" and check.ticket is not None
    listed = client.get("/api/v1/care/checks?open_only=true", headers=WANG).json()["items"]
    assert [c["id"] for c in listed] == [check.id] and listed[0]["state"] == "raised"
    assert client.get("/api/v1/care/checks", headers=LI).json()["items"] == []
    # Not acknowledged within care.ack_within: escalated to the care centre.
    portal.call(gateway.care.tick, raised + 21 * 60_000)
    escalated = client.get("/api/v1/care/checks", headers=OPERATOR).json()["items"][0]
    assert escalated["state"] == "escalated" and escalated["escalated_to"] == "care-centre"
    request = client.get(f"/api/v1/requests/{check.ticket}", headers=OPERATOR).json()
    assert request["state"] == "assigned" and request["provider_id"] == "care-centre"
    ack = client.post(f"/api/v1/care/checks/{check.id}/ack", headers=WANG, json={})
    assert ack.json()["status"] == "accepted" and ack.json()["acked_by"] == "wang"
    assert (
        client.post(f"/api/v1/care/checks/{check.id}/ack", headers=WANG, json={}).json()["status"]
        == "duplicate"
    )
    closed = client.post(
        f"/api/v1/care/checks/{check.id}/close",
        headers=WANG,
        json={"outcome": "needed_help", "note": "fell; clinic"},
    ).json()
    assert closed["state"] == "closed" and closed["outcome"] == "needed_help"
    assert client.get(f"/api/v1/requests/{check.ticket}", headers=OPERATOR).json()["state"] == "completed"
    refused = client.post(f"/api/v1/care/checks/{check.id}/close", headers=WANG, json={"outcome": "fine"})
    assert refused.status_code == 409


def test_withdrawing_consent_stops_the_analysis_at_once(client: TestClient, gateway: Gateway) -> None:
    body = {"building": "1", "unit": "1-101"}
    assert client.post("/api/v1/care/checkins", headers=WANG, json=body).json()["status"] == "accepted"
    before = gateway.care.engine.analysed["1/1-101"]
    answer = client.post(f"{HOME}/consent", headers=OPERATOR, json={"purpose": "welfare", "granted": False})
    assert answer.json()["consents"]["welfare"] is False
    assert client.post("/api/v1/care/checkins", headers=WANG, json=body).json()["status"] == "not_analysed"
    assert gateway.care.engine.analysed["1/1-101"] == before
    assert not gateway.care.engine.watching("1/1-101")


def test_every_personal_read_is_in_the_access_log(client: TestClient) -> None:
    entries = client.get("/api/v1/access-log?record=household:1/1-101", headers=INSTALLER).json()["items"]
    endpoints = {(e["who"], e["endpoint"]) for e in entries}
    assert ("wang", "GET /api/v1/care/households/{building}/{unit}") in endpoints
    assert ("wang", "GET /api/v1/care/households") in endpoints
    assert ("wang", "GET /api/v1/care/needs") in endpoints
    assert ("wang", "GET /api/v1/care/checks") in endpoints


def test_equity_figures_are_aggregates(client: TestClient) -> None:
    answer = client.get("/api/v1/care/equity", headers=VIEWER).json()
    groups = {g["group"]: g for g in answer["groups"]}
    assert set(groups) == {"elderly_alone", "disabled", "infants", "other"}
    # One elderly household living alone: its count only, no figure that could name it.
    assert groups["elderly_alone"]["households"] == 1
    assert groups["elderly_alone"]["welfare_checks"] is None
    assert "1-101" not in str(answer)


def test_care_settings_reach_the_gateway(tmp_path: Path) -> None:
    settings = gateway_settings(tmp_path, "mqtt://127.0.0.1:1")
    assert settings.care_db_path == tmp_path / "care.sqlite3"


def test_live_readings_of_a_home_device_reach_the_rules_only_with_consent(
    client: TestClient, gateway: Gateway
) -> None:
    """The pipeline's batches (Router.observers) feed the same rules the simulated month does."""
    client.post(
        "/api/v1/care/households/2/2-301/consent", headers=WANG, json={"purpose": "welfare", "granted": True}
    )
    gateway.registry.on_birth(
        "w-2-301", {"kind": "water_meter", "location": {"building": "2", "unit": "2-301"}}, 1
    )
    gateway.registry.on_birth(
        "w-2-302", {"kind": "water_meter", "location": {"building": "2", "unit": "2-302"}}, 1
    )
    start = now_ms()
    readings = [
        Reading(device, "water_meter", start + n * 600_000, {"volume_m3": 10.0 + n * 0.01}, n, "2")
        for device in ("w-2-301", "w-2-302")
        for n in range(3)
    ]
    gateway.router.observers[0](Batch(readings=readings))
    assert gateway.care.engine.analysed["2/2-301"] == 2  # the first reading has nothing to compare with
    assert "2/2-302" not in gateway.care.engine.analysed  # no consent: dropped on arrival
