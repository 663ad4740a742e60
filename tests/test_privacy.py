"""Residents' personal data seen only by the roles whose work needs it (docs/privacy.md).

Over a real Mosquitto and the real HTTP API: a resident files at a service terminal over MQTT and
through Open311 with a terminal token; then every role reads every route that can return
personal data, and the redaction is checked field by field.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway import privacy
from gateway.settings import Settings, TokenGrant
from tests.harness import TOKENS, api, eventually, gateway_settings, live_stream, mosquitto_pub, running

PHONE = "13800138000"
SECRET_TEXT = "my neighbour in 2-301 shouts at night"
ROLES = {**TOKENS, "terminal2-token": "terminal", "metrics-token": "metrics"}


def privacy_settings(tmp_path: Path, url: str, **overrides: Any) -> Settings:
    settings = gateway_settings(tmp_path, url, **overrides)
    auth = settings.auth.model_copy(update={"tokens": dict(ROLES)})
    return settings.model_copy(update={"auth": auth})


class Acks:
    """A device's `ack` topic, read with a real MQTT client."""

    def __init__(self, port: int, device_id: str) -> None:
        self.items: list[dict[str, Any]] = []
        self._client = paho.Client(CallbackAPIVersion.VERSION2)
        self._client.on_message = lambda c, u, m: self.items.append(orjson.loads(m.payload))
        self._subscribed = asyncio.Event()
        loop = asyncio.get_running_loop()

        def subscribed(*_: Any) -> None:
            loop.call_soon_threadsafe(self._subscribed.set)

        self._client.on_subscribe = subscribed
        self._client.connect("127.0.0.1", port)
        self._client.subscribe(f"cgw/v1/{device_id}/ack", qos=1)
        self._client.loop_start()

    async def ready(self) -> None:
        await asyncio.wait_for(self._subscribed.wait(), 5)

    async def next(self, key: str, value: str) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((a for a in self.items if a.get(key) == value), None)

        return await eventually(found, 5.0, f"ack with {key}={value}")

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def client_for(gw: Any, token: str) -> httpx.AsyncClient:
    return api(gw, token)


def assert_redacted(item: dict[str, Any]) -> None:
    """Every personal field of a REST request view emptied; building and floor kept."""
    for field, empty in privacy.REQUEST_PERSONAL.items():
        if field in item:
            assert item[field] == empty, (field, item[field])
    assert "filed_by" not in item and "contact" not in item


async def file_two_requests(gw: Any, port: int) -> tuple[str, str]:
    """One request over MQTT from a service terminal, one over Open311 with a terminal token."""
    acks = Acks(port, "kiosk-1")
    try:
        await acks.ready()
        birth = {"state": "online", "kind": "service_terminal", "location": {"building": "3"}}
        mosquitto_pub(port, "cgw/v1/kiosk-1/status", orjson.dumps(birth))
        request = {
            "request_id": "r-1",
            "service_code": "dispute.neighbours",
            "description": SECRET_TEXT,
            "location": {"building": "3", "floor": 2, "unit": "2-301"},
            "contact": PHONE,
        }
        mosquitto_pub(port, "cgw/v1/kiosk-1/request", orjson.dumps(request))
        mqtt_ticket = (await acks.next("request_id", "r-1"))["service_request_id"]
    finally:
        acks.close()
    async with client_for(gw, "terminal-token") as terminal:
        posted = await terminal.post(
            "/open311/v2/requests.json",
            data={
                "service_code": "repair.plumbing",
                "lat": "31.2",
                "long": "121.4",
                "address_string": "Lane 5, No. 3, room 2-301",
                "phone": PHONE,
                "first_name": "Li",
                "description": SECRET_TEXT,
                "media_url": "http://photos.local/leak.jpg",
                "building": "3",
                "floor": "2",
                "unit": "2-301",
            },
        )
        assert posted.status_code == 201, posted.text
        http_ticket = posted.json()[0]["service_request_id"]
    async with client_for(gw, "operator-token") as operator:
        moved = await operator.post(
            f"/api/v1/requests/{http_ticket}/transitions",
            json={"to": "triaged", "note": f"called back on {PHONE}"},
        )
        assert moved.status_code == 200, moved.text
    return mqtt_ticket, http_ticket


async def test_each_role_reads_what_its_work_needs(tmp_path: Path, mosquitto: Any) -> None:
    async with running(privacy_settings(tmp_path, mosquitto.url)) as gw:
        mqtt_ticket, http_ticket = await file_two_requests(gw, mosquitto.port)
        tickets = {mqtt_ticket, http_ticket}

        # Operators and installers: everything.
        for token in ("operator-token", "installer-token"):
            async with client_for(gw, token) as client:
                items = {r["id"]: r for r in (await client.get("/api/v1/requests")).json()["items"]}
                assert set(items) == tickets
                assert (
                    items[mqtt_ticket]["unit"] == "2-301" and items[mqtt_ticket]["description"] == SECRET_TEXT
                )
                assert items[http_ticket]["lat"] == 31.2 and items[http_ticket]["media_url"]
                one = (await client.get(f"/api/v1/requests/{http_ticket}")).json()
                assert one["status_notes"] == f"called back on {PHONE}"
                assert one["history"][-1]["note"] == f"called back on {PHONE}"
                entry = (
                    await client.get(
                        f"/open311/v2/requests/{http_ticket}.json", params={"extensions": "true"}
                    )
                ).json()[0]
                assert entry["address"] == "Lane 5, No. 3, room 2-301" and entry["lat"] == 31.2
                assert entry["extended_attributes"]["unit"] == "2-301"

        # A viewer: the redacted view, field by field, on every route.
        async with client_for(gw, "viewer-token") as viewer:
            items = (await viewer.get("/api/v1/requests")).json()["items"]
            assert {r["id"] for r in items} == tickets
            for item in items:
                assert_redacted(item)
                assert item["building"] == "3" and item["floor"] == 2
            one = (await viewer.get(f"/api/v1/requests/{http_ticket}")).json()
            assert_redacted(one)
            assert all(step["note"] == "" for step in one["history"])
            for path in (f"/open311/v2/requests/{http_ticket}.json", "/open311/v2/requests.json"):
                for entry in (await viewer.get(path, params={"extensions": "true"})).json():
                    for field, empty in privacy.OPEN311_PERSONAL.items():
                        assert entry[field] == empty, (path, field)
                    assert entry["extended_attributes"]["unit"] is None
                    assert entry["extended_attributes"]["building"] == "3"
            xml = (await viewer.get("/open311/v2/requests.xml")).text
            assert PHONE not in xml and SECRET_TEXT not in xml and "2-301" not in xml
            root = ET.fromstring(xml)
            assert {e.findtext("service_request_id") for e in root} == tickets
            device = (await viewer.get("/api/v1/devices/kiosk-1")).json()
            assert device["unit"] is None and device["building"] == "3"
            assert (await viewer.get("/api/v1/dead-letters")).status_code == 403

        # A terminal: only the status of the tickets it filed; others do not exist for it.
        async with client_for(gw, "terminal-token") as terminal:
            items = (await terminal.get("/api/v1/requests")).json()["items"]
            assert [r["id"] for r in items] == [http_ticket]
            status = items[0]
            assert status["state"] == "triaged" and status["status"] == "open"
            assert_redacted(status)
            assert status["provider_id"] is None
            assert (await terminal.get(f"/api/v1/requests/{mqtt_ticket}")).status_code == 404
            assert (await terminal.get(f"/open311/v2/requests/{mqtt_ticket}.json")).status_code == 404
            assert (await terminal.get(f"/open311/v2/tokens/{mqtt_ticket}.json")).status_code == 404
            listed = (await terminal.get("/open311/v2/requests.json")).json()
            assert [e["service_request_id"] for e in listed] == [http_ticket]
            assert listed[0]["address"] is None and listed[0]["description"] == ""
            everything = (await terminal.get("/open311/v2/requests.xml")).text
            assert PHONE not in everything and mqtt_ticket not in everything
            assert (await terminal.get("/api/v1/dead-letters")).status_code == 403
        async with client_for(gw, "terminal2-token") as other:
            assert (await other.get("/api/v1/requests")).json()["items"] == []
            assert (await other.get(f"/api/v1/requests/{http_ticket}")).status_code == 404

        # The metrics role: /metrics and nothing else.
        async with client_for(gw, "metrics-token") as scraper:
            assert (await scraper.get("/metrics")).status_code == 200
            for path in (
                "/api/v1/requests",
                f"/api/v1/requests/{http_ticket}",
                "/open311/v2/requests.json",
                "/api/v1/devices",
                "/api/v1/events",
                "/api/v1/dead-letters",
                "/api/v1/stream",
                "/api/v1/needs",
            ):
                assert (await scraper.get(path)).status_code == 403, path


@pytest.mark.parametrize(
    ("token", "sees"),
    [
        ("operator-token", "all"),
        ("viewer-token", "redacted"),
        ("terminal-token", "own"),
        ("terminal2-token", "none"),
    ],
)
async def test_the_live_stream_shows_each_role_its_view(
    tmp_path: Path, mosquitto: Any, token: str, sees: str
) -> None:
    async with running(privacy_settings(tmp_path, mosquitto.url)) as gw, client_for(gw, token) as client:
        async with live_stream(client, "request") as received:
            _, http_ticket = await file_two_requests(gw, mosquitto.port)
            # The last item every subscriber that may see anything receives: the operator's step.
            async with client_for(gw, "operator-token") as operator:
                await operator.post(
                    f"/api/v1/requests/{http_ticket}/transitions",
                    json={"to": "assigned", "provider_id": "handy-coop"},
                )
            if sees != "none":

                def done() -> bool:
                    return any(d["id"] == http_ticket and d["state"] == "assigned" for _, d in received)

                await eventually(done, 5.0, "the assignment on the stream")
            else:
                # Another subscriber (an operator) seeing the last step proves the hub has sent it.
                async with (
                    client_for(gw, "operator-token") as operator,
                    live_stream(operator, "request") as seen,
                ):
                    await operator.post(
                        f"/api/v1/requests/{http_ticket}/transitions", json={"to": "in_service"}
                    )
                    await eventually(lambda: any(d["state"] == "in_service" for _, d in seen), 5.0, "step")
        text = orjson.dumps(received).decode()
        if sees == "all":
            assert PHONE in text and SECRET_TEXT in text
            assert len({d["id"] for _, d in received}) == 2
        elif sees == "redacted":
            assert PHONE not in text and SECRET_TEXT not in text and "2-301" not in text
            assert len({d["id"] for _, d in received}) == 2
            for _, item in received:
                assert_redacted(item)
        elif sees == "own":
            assert {d["id"] for _, d in received} == {http_ticket}
            assert PHONE not in text and SECRET_TEXT not in text and "2-301" not in text
            for _, item in received:
                assert_redacted(item)
                assert set(item["step"]) == {"from", "to", "ts_ms"}
        else:
            assert received == []


async def test_dead_letters_keep_no_personal_data_and_a_few_hundred_bytes(
    tmp_path: Path, mosquitto: Any
) -> None:
    async with (
        running(privacy_settings(tmp_path, mosquitto.url)) as gw,
        client_for(gw, "operator-token") as operator,
    ):
        acks = Acks(mosquitto.port, "kiosk-9")
        try:
            await acks.ready()
            birth = {
                "state": "online",
                "kind": "service_terminal",
                "location": {"building": "3", "unit": "2-301"},
            }
            mosquitto_pub(mosquitto.port, "cgw/v1/kiosk-9/status", orjson.dumps(birth))
            refused = {
                "request_id": "r-bad",
                "service_code": "no.such.service",
                "description": SECRET_TEXT,
                "location": {"building": "3", "floor": 2, "unit": "2-301"},
                "contact": PHONE,
            }
            mosquitto_pub(mosquitto.port, "cgw/v1/kiosk-9/request", orjson.dumps(refused))
            assert (await acks.next("request_id", "r-bad"))["status"] == "rejected"
        finally:
            acks.close()
        # Not JSON, typed at a terminal: withheld whole.
        mosquitto_pub(mosquitto.port, "cgw/v1/kiosk-9/rating", f"call me {PHONE}")
        # A device's oversize status with its unit: redacted, and cut whatever the reason.
        big = {
            "state": "sideways",
            "location": {"building": "3", "unit": "2-301"},
            "fw": "x",
            "pad": "y" * 5000,
        }
        mosquitto_pub(mosquitto.port, "cgw/v1/sensor-9/status", orjson.dumps(big))

        async def letters() -> list[dict[str, Any]] | None:
            items = (await operator.get("/api/v1/dead-letters", params={"limit": 100})).json()["items"]
            return items if len(items) >= 3 else None

        items = await eventually(letters, 10.0, "three dead letters")
        by_channel = {(d["device_id"], d["channel"]): d for d in items}
        for letter in items:
            assert letter["payload_bytes"] <= privacy.DEAD_LETTER_KEEP_BYTES
            assert PHONE not in letter["payload"] and SECRET_TEXT not in letter["payload"]
            assert "2-301" not in letter["payload"]
        request = orjson.loads(by_channel[("kiosk-9", "request")]["payload"])
        assert request["request_id"] == "r-bad" and request["service_code"] == "no.such.service"
        assert request["location"] == {"building": "3", "floor": 2}
        assert set(request["_withheld"]) == {"contact", "description"}
        assert by_channel[("kiosk-9", "rating")]["payload"].startswith("(withheld:")
        status = by_channel[("sensor-9", "status")]["payload"]
        assert status.startswith('{"state":"sideways"') and '"unit"' not in status
        # Only operators and installers read them.
        for token in ("viewer-token", "terminal-token", "metrics-token"):
            async with client_for(gw, token) as other:
                assert (await other.get("/api/v1/dead-letters")).status_code == 403, token
        async with client_for(gw, "installer-token") as installer:
            assert (await installer.get("/api/v1/dead-letters")).status_code == 200


async def test_every_read_of_personal_data_is_in_the_access_log(tmp_path: Path, mosquitto: Any) -> None:
    settings = privacy_settings(tmp_path, mosquitto.url)
    grants = {**settings.auth.tokens, "zhang-token": TokenGrant(role="operator", name="Officer Zhang")}
    settings = settings.model_copy(update={"auth": settings.auth.model_copy(update={"tokens": grants})})
    async with running(settings) as gw:
        async with client_for(gw, "zhang-token") as zhang, live_stream(zhang, "request") as seen:
            mqtt_ticket, http_ticket = await file_two_requests(gw, mosquitto.port)
            await eventually(lambda: len(seen) >= 3, 5.0, "the stream's three request items")
            assert (await zhang.get("/api/v1/requests")).status_code == 200
            assert (await zhang.get(f"/api/v1/requests/{mqtt_ticket}")).status_code == 200
            assert (await zhang.get(f"/open311/v2/requests/{http_ticket}.xml")).status_code == 200
            # The access log is the installer's to read.
            assert (await zhang.get("/api/v1/access-log")).status_code == 403
        async with client_for(gw, "viewer-token") as viewer:
            assert (await viewer.get("/api/v1/requests")).status_code == 200  # redacted: not logged
            assert (await viewer.get("/api/v1/access-log")).status_code == 403
        async with client_for(gw, "installer-token") as installer:
            log = (await installer.get("/api/v1/access-log", params={"who": "Officer Zhang"})).json()["items"]
            reads = {(entry["endpoint"], tuple(sorted(entry["records"]))) for entry in log}
            assert ("GET /api/v1/requests", tuple(sorted((mqtt_ticket, http_ticket)))) in reads
            assert ("GET /api/v1/requests/{ticket}", (mqtt_ticket,)) in reads
            assert ("GET /open311/v2/requests/{service_request_id}.{fmt}", (http_ticket,)) in reads
            streamed = [e for e in log if e["endpoint"] == "GET /api/v1/stream"]
            assert {r for e in streamed for r in e["records"]} == {mqtt_ticket, http_ticket}
            assert all(e["role"] == "operator" and e["ts_ms"] > 0 for e in log)
            # Which reads touched one resident's request.
            about = (await installer.get("/api/v1/access-log", params={"record": mqtt_ticket})).json()[
                "items"
            ]
            assert about and all(mqtt_ticket in e["records"] for e in about)
            assert {e["who"] for e in about} >= {"Officer Zhang"}
            everyone = (await installer.get("/api/v1/access-log", params={"limit": 1000})).json()["items"]
            assert all(e["role"] in ("operator", "installer") for e in everyone)  # never the viewer
            # Kept for privacy.access_log_retention, then deleted by the desk's periodic task.
            keep_ms = int(settings.privacy.access_log_retention.total_seconds() * 1000)
            await gw.deadlines.keep_to_retention(max(e["ts_ms"] for e in everyone) + keep_ms + 1)
            assert (await installer.get("/api/v1/access-log")).json()["items"] == []


async def test_a_devices_unit_read_is_logged_once_per_token_and_window(
    tmp_path: Path, mosquitto: Any
) -> None:
    """A sensor in a home names that home: an operator's read of its unit is in the access log.

    The dashboard polls the device list, so a token's reads of one device are logged once per
    `privacy.device_read_window` (an entry per poll would be a commit every few seconds).
    """
    settings = privacy_settings(tmp_path, mosquitto.url)
    grants = {**settings.auth.tokens, "zhang-token": TokenGrant(role="operator", name="Officer Zhang")}
    settings = settings.model_copy(update={"auth": settings.auth.model_copy(update={"tokens": grants})})
    async with running(settings) as gw:
        birth = {"state": "online", "kind": "air_quality", "location": {"building": "3", "unit": "2-301"}}
        mosquitto_pub(mosquitto.port, "cgw/v1/home-aq-1/status", orjson.dumps(birth))
        hall = {"state": "online", "kind": "air_quality", "location": {"building": "3"}}
        mosquitto_pub(mosquitto.port, "cgw/v1/hall-aq-1/status", orjson.dumps(hall))
        async with client_for(gw, "zhang-token") as zhang, client_for(gw, "viewer-token") as viewer:

            async def both_known() -> bool:
                listed = (await zhang.get("/api/v1/devices")).json()["items"]
                return {"home-aq-1", "hall-aq-1"} <= {d["device_id"] for d in listed}

            await eventually(both_known, 5.0, "both devices registered")
            assert (await zhang.get("/api/v1/devices")).status_code == 200  # within the window
            assert (await zhang.get("/api/v1/devices/home-aq-1")).json()["unit"] == "2-301"
            assert (await viewer.get("/api/v1/devices/home-aq-1")).json()["unit"] is None
        async with client_for(gw, "installer-token") as installer:
            log = (await installer.get("/api/v1/access-log", params={"limit": 1000})).json()["items"]
            devices = [e for e in log if any(r.startswith("device:") for r in e["records"])]
            # One entry: the first list that showed the unit; the hall's sensor names no home.
            assert [(e["who"], e["endpoint"], e["records"]) for e in devices] == [
                ("Officer Zhang", "GET /api/v1/devices", ["device:home-aq-1"])
            ]
