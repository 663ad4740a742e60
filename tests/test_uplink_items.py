"""Unit tests of what the uplink sends: item shapes, keys, privacy, chosen telemetry, message sizes."""

from __future__ import annotations

from pathlib import Path

import orjson

from gateway import privacy
from gateway.instruments import Instruments
from gateway.models import Batch, DeviceEvent, Reading
from gateway.settings import UplinkSettings
from gateway.store.outbox import Outbox
from gateway.uplink import items
from gateway.uplink.items import TelemetryChoice
from gateway.uplink.sink import UplinkSink

REQUEST = {
    "id": "R-1",
    "service_code": "elderly.meal_delivery",
    "service_group": "elderly",
    "state": "submitted",
    "building": "3",
    "floor": 2,
    "unit": "2-301",
    "household": "3-2-301",
    "address": "Lane 5, No. 3",
    "lat": 31.2,
    "long": 121.4,
    "media_url": "http://x/photo.jpg",
    "attributes": {"phone": "138..."},
    "description": "meals for two",
    "provider_id": "meals-co",
}


def test_a_step_goes_up_without_the_residents_home() -> None:
    record = {"kind": "step", "request": REQUEST, "from": None, "to": "submitted", "ts_ms": 5, "actor": "t"}
    stream, item = items.record_item(record) or ("", {})
    assert stream == "requests"
    assert item["key"] == "R-1:submitted:5"
    assert item["building"] == "3" and item["floor"] == 2
    # An allow-list: nothing but the documented fields goes up, never free text (docs/uplink.md).
    assert set(item) == {"key", "step", *privacy.UPLINK_REQUEST_FIELDS}
    assert "description" not in item and "status_notes" not in item and "unit" not in item
    assert item["step"] == {"from": None, "to": "submitted", "ts_ms": 5, "actor": "t"}


def test_a_rating_is_keyed_by_its_request() -> None:
    stream, item = items.record_item({"kind": "rating", "request": REQUEST, "score": 4, "ts_ms": 9}) or (
        "",
        {},
    )
    assert stream == "ratings"
    assert item["key"] == "R-1:rating" and item["score"] == 4 and item["provider_id"] == "meals-co"
    assert items.record_item({"kind": "line", "line": "x y=1 2"}) is None


def test_only_chosen_telemetry_goes_up_and_alarms_always_do() -> None:
    choice = TelemetryChoice(["energy_meter", "air_quality.pm25"])
    batch = Batch(
        readings=[
            Reading("m1", "energy_meter", 1, {"kwh": 3.0, "v": 230.0}),
            Reading("a1", "air_quality", 2, {"pm25": 12.0, "temp_c": 21.0}),
            Reading("w1", "water_meter", 3, {"m3": 1.0}),
        ],
        events=[
            DeviceEvent("s1", "smoke_detector", 4, "smoke_alarm", "critical"),
            DeviceEvent("s1", "smoke_detector", 5, "battery_ok", "info"),
        ],
    )
    rows = items.encode([batch], choice, "uplink")
    assert [(r.important, r.points) for r in rows] == [(True, 1), (False, 2)]
    telemetry = [orjson.loads(item) for _, item in items.parse(rows[1].body)]
    assert [t["metrics"] for t in telemetry] == [{"kwh": 3.0, "v": 230.0}, {"pm25": 12.0}]
    [(stream, alarm)] = list(items.parse(rows[0].body))
    assert stream == "alarms" and orjson.loads(alarm)["type"] == "smoke_alarm"
    assert items.encode([batch], TelemetryChoice([]), "uplink")[-1].important


def test_an_alarm_goes_up_as_an_allow_list_without_free_text() -> None:
    typed = DeviceEvent(
        "kiosk-1",
        "service_terminal",
        4,
        "panic",
        "critical",
        message="Mrs Wang in 2-301 fell, call 13800138000",
        data={"contact": "13800138000", "note": {"unit": "2-301"}, "alarm": "panic", "value": 1.0},
    )
    ruled = DeviceEvent(
        "a1", "air_quality", 5, "pm25_high", "warning", message="PM2.5 above 75", source="rule"
    )
    rows = items.encode([Batch(events=[typed, ruled])], TelemetryChoice([]), "uplink")
    sent = [orjson.loads(item) for _, item in items.parse(rows[0].body)]
    assert "13800138000" not in rows[0].body and "2-301" not in rows[0].body
    assert set(sent[0]) == {*items.ALARM_FIELDS, "data"}  # a device's own text stays home
    assert sent[0]["data"] == {"alarm": "panic", "value": 1.0}
    assert sent[1]["message"] == "PM2.5 above 75"  # the gateway's own template


def test_messages_stay_under_the_size_limit_and_snapshots_are_one_each(tmp_path: Path) -> None:
    settings = UplinkSettings(url="mqtt://district:1883", max_message_bytes=4096)
    sink = UplinkSink(settings, "up", "north", Instruments(), tmp_path / "db", Outbox(1 << 20, "block"))
    readings = [Reading(f"d{i}", "generic", i, {"v": float(i)}) for i in range(200)]
    body = items.encode([Batch(readings=readings)], TelemetryChoice(["generic"]), "uplink")[0].body
    snapshots = "\n".join(
        items.snapshot_row(stream, {"key": stream}, "uplink").body
        for stream in ("needs", "evaluation", "needs")
    )
    messages = sink._messages(body + "\n" + snapshots)
    telemetry = [m for m in messages if m[0] == "cgw/v1/up/north/telemetry"]
    assert len(telemetry) > 1 and all(len(payload) <= 4096 and not retain for _, payload, retain in telemetry)
    sent = [i["metrics"]["v"] for _, payload, _ in telemetry for i in orjson.loads(payload)["items"]]
    assert sent == [float(i) for i in range(200)]
    needs = [m for m in messages if m[0] == "cgw/v1/up/north/needs"]
    assert len(needs) == 2 and all(retain for _, _, retain in needs)
    assert orjson.loads(needs[0][1]) == {"community": "north", "items": [{"key": "needs"}]}
