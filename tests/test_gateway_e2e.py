"""The gateway end to end over real Mosquitto and VictoriaMetrics processes.

These are the paths an installer relies on: a device announced and reporting with mosquitto_pub
shows up in the API and the time-series store; bad messages are dead-lettered while the gateway
goes on; presence follows birth, Last Will and heartbeat time-outs; alarms reach the live stream;
what devices publish while the gateway is down arrives when it is back.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.settings import InfluxSettings
from tests.harness import AS_OPERATOR, api, eventually, gateway_settings, live_stream, mosquitto_pub, running

pytestmark = pytest.mark.integration


async def device(client: Any, device_id: str) -> dict[str, Any] | None:
    response = await client.get(f"/api/v1/devices/{device_id}")
    return response.json() if response.status_code == 200 else None


async def test_device_from_mosquitto_pub_reaches_api_and_timeseries(
    tmp_path: Path, mosquitto: Any, victoria: Any
) -> None:
    influx = InfluxSettings(url=victoria.url, token="t", org="o", bucket="b", flush_interval_s=0.1)
    settings = gateway_settings(tmp_path, mosquitto.url, influx=influx)
    async with running(settings) as gw, api(gw) as client:
        started = time.monotonic()
        mosquitto_pub(
            mosquitto.port,
            "cgw/v1/e2e-aq-1/status",
            '{"state":"online","kind":"air_quality","location":{"building":"3","floor":2},'
            '"fw":"1.4.2","battery":87,"rssi":-61}',
        )
        ts = int(time.time() * 1000)
        mosquitto_pub(
            mosquitto.port,
            "cgw/v1/e2e-aq-1/telemetry",
            orjson.dumps({"ts": ts, "seq": 1, "metrics": {"pm25": 12.5, "temp_c": 21.3}}),
        )

        async def in_api() -> dict[str, Any] | None:
            found = await device(client, "e2e-aq-1")
            return found if found and found["last_values"].get("pm25") == 12.5 else None

        # Latency is measured and printed here, never asserted (bench/ reports figures).
        shown = await eventually(in_api, 10.0, "the device in the API")
        api_latency = time.monotonic() - started
        assert shown["online"] and shown["kind"] == "air_quality" and shown["building"] == "3"
        assert shown["fw"] == "1.4.2" and shown["last_seq"] == 1

        async def in_store() -> list[dict[str, Any]]:
            return await asyncio.to_thread(
                victoria.export, '{__name__=~"air_quality_.*",device_id="e2e-aq-1"}'
            )

        series = await eventually(in_store, 10.0, "the points in VictoriaMetrics")
        store_latency = time.monotonic() - started
        by_name = {s["metric"]["__name__"]: s for s in series}
        assert by_name["air_quality_pm25"]["values"] == [12.5]
        assert by_name["air_quality_pm25"]["timestamps"] == [ts]
        assert by_name["air_quality_pm25"]["metric"]["community"] == "testville"
        assert by_name["air_quality_pm25"]["metric"]["building"] == "3"
        assert by_name["air_quality_temp_c"]["values"] == [21.3]
        print(f"API visible after {api_latency:.3f} s, time-series store after {store_latency:.3f} s")

        # The telemetry range of the API reads the local store.
        response = await client.get("/api/v1/devices/e2e-aq-1/telemetry", params={"metric": "pm25"})
        assert response.status_code == 200
        assert response.json()["series"]["pm25"] == [{"ts_ms": ts, "value": 12.5, "seq": 1}]

        # Presence changes are written too.
        presence = await eventually(
            lambda: asyncio.to_thread(
                victoria.export, '{__name__=~"device_presence_.*",device_id="e2e-aq-1"}'
            ),
            2.0,
            "the presence point",
        )
        assert any(s["metric"]["__name__"] == "device_presence_online" for s in presence)


async def test_malformed_messages_are_dead_lettered_and_the_gateway_goes_on(
    tmp_path: Path, mosquitto: Any
) -> None:
    async with running(gateway_settings(tmp_path, mosquitto.url)) as gw, api(gw) as client:
        mosquitto_pub(mosquitto.port, "cgw/v1/bad-1/status", '{"state":"online","kind":"air_quality"}')
        bad = {
            "not json": b"{pm25: 1",
            "range": b'{"metrics":{"pm25":-5}}',
            "unknown metric": b'{"metrics":{"pm99":1}}',
            "wrong type": b'{"metrics":{"pm25":"high"}}',
            "array": b"[1,2,3]",
            "utf8": b'{"metrics":{"pm25":1}, "x":"\xff"}',
            "skew": orjson.dumps({"ts": int(time.time() * 1000) + 86_400_000, "metrics": {"pm25": 1}}),
        }
        for payload in bad.values():
            mosquitto_pub(mosquitto.port, "cgw/v1/bad-1/telemetry", payload)
        mosquitto_pub(mosquitto.port, "cgw/v1/bad-1/telemetry", '{"metrics":{"pm25":33}}')

        async def recovered() -> dict[str, Any] | None:
            found = await device(client, "bad-1")
            return found if found and found["last_values"].get("pm25") == 33 else None

        await eventually(recovered, 5.0, "the valid message after the bad ones")

        async def letters() -> list[dict[str, Any]]:
            items = (
                await client.get(
                    "/api/v1/dead-letters",
                    params={"device_id": "bad-1"},
                    headers=AS_OPERATOR,
                )
            ).json()["items"]
            return items if len(items) >= len(bad) else []

        items = await eventually(letters, 5.0, "dead letters")
        codes = sorted(item["reason_code"] for item in items)
        assert codes == sorted(
            ["bad_json", "out_of_range", "unknown_metric", "schema", "schema", "bad_json", "bad_timestamp"]
        )
        assert all(item["reason"] and item["topic"] == "cgw/v1/bad-1/telemetry" for item in items)
        metrics = (await client.get("/metrics")).text
        assert 'cgw_messages_rejected_total{reason="out_of_range"} 1.0' in metrics
        assert (await client.get("/readyz")).json()["ready"] is True


async def test_presence_birth_will_and_heartbeat_timeout_are_events(tmp_path: Path, mosquitto: Any) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "quick_probe.yaml").write_text(
        "kind: quick_probe\ndescription: a probe with a one-second heartbeat, for tests\n"
        "heartbeat_timeout: 1s\nmetrics:\n  level: {unit: '%', type: gauge, min: 0, max: 100}\n"
    )
    settings = gateway_settings(tmp_path / "data", mosquitto.url, profiles_dir=profiles)
    async with running(settings) as gw, api(gw) as client:
        # Last Will: a client that drops its connection without DISCONNECT.
        will_client = paho.Client(CallbackAPIVersion.VERSION2, client_id="will-dev")
        will_client.will_set("cgw/v1/will-dev/status", b'{"state":"offline"}', qos=1, retain=True)
        will_client.connect("127.0.0.1", mosquitto.port)
        will_client.loop_start()
        will_client.publish(
            "cgw/v1/will-dev/status", b'{"state":"online","kind":"smoke_detector"}', qos=1, retain=True
        ).wait_for_publish(5)
        await eventually(lambda: _online(client, "will-dev", True), 3.0, "will-dev online")
        will_client.loop_stop()
        sock = will_client.socket()
        assert sock is not None
        sock.close()  # no DISCONNECT: the broker sends the Will
        await eventually(lambda: _online(client, "will-dev", False), 5.0, "will-dev offline by Will")

        mosquitto_pub(mosquitto.port, "cgw/v1/probe-1/status", '{"state":"online","kind":"quick_probe"}')
        await eventually(lambda: _online(client, "probe-1", True), 3.0, "probe online")
        await eventually(lambda: _online(client, "probe-1", False), 5.0, "probe offline by timeout")

        expected = {
            ("will-dev", "online", "birth"),
            ("will-dev", "offline", "will"),
            ("probe-1", "online", "birth"),
            ("probe-1", "offline", "timeout"),
        }

        async def stored() -> list[dict[str, Any]] | None:
            # The registry flips at once; the event is in the store after the next (group) commit.
            items = (await client.get("/api/v1/events", params={"source": "gateway"})).json()["items"]
            seen = {(e["device_id"], e["type"], e["data"]["reason"]) for e in items}
            return items if expected <= seen else None

        events = await eventually(stored, 3.0, "the presence events in the store")
        timeout_event = next(e for e in events if e["data"]["reason"] == "timeout")
        assert timeout_event["severity"] == "warning" and timeout_event["alarm"]


async def _online(client: Any, device_id: str, state: bool) -> bool:
    found = await device(client, device_id)
    return bool(found) and found["online"] is state  # type: ignore[index]


async def test_alarms_reach_the_live_stream_and_can_be_acknowledged(tmp_path: Path, mosquitto: Any) -> None:
    async with running(gateway_settings(tmp_path, mosquitto.url)) as gw, api(gw) as client:
        async with live_stream(client, "alarm,presence") as received:
            mosquitto_pub(
                mosquitto.port, "cgw/v1/btn-7/status", '{"state":"online","kind":"emergency_button"}'
            )
            mosquitto_pub(
                mosquitto.port,
                "cgw/v1/btn-7/event",
                '{"type":"emergency_press","message":"pressed at 2-301","severity":"info"}',
            )

            async def alarmed() -> bool:
                return any(name == "alarm" for name, _ in received)

            await eventually(alarmed, 5.0, "the alarm on the stream")
        names = [name for name, _ in received]
        assert names[0] == "presence" and names[-1] == "alarm"
        alarm = received[-1][1]
        # The profile makes any emergency-button event critical, whatever the device said.
        assert alarm["severity"] == "critical" and alarm["type"] == "emergency_press"

        async def stored() -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = (await client.get("/api/v1/alarms")).json()["items"]
            return items

        alarms = await eventually(stored, 3.0, "the stored alarm")
        assert alarms[0]["id"] == alarm["id"]
        # A viewer may not acknowledge; an operator may, once.
        assert (await client.post(f"/api/v1/events/{alarm['id']}/ack")).status_code == 403
        async with api(gw, "operator-token") as operator:
            acked = await operator.post(f"/api/v1/events/{alarm['id']}/ack", json={"note": "visited"})
            assert (
                acked.status_code == 200 and acked.json()["acked"] and acked.json()["ack_note"] == "visited"
            )
            again = await operator.post(f"/api/v1/events/{alarm['id']}/ack", json={"note": "again"})
            assert again.json()["ack_note"] == "visited"
        assert (await client.get("/api/v1/alarms")).json()["items"] == []


async def test_messages_published_while_the_gateway_is_down_arrive_after_restart(
    tmp_path: Path, mosquitto: Any
) -> None:
    settings = gateway_settings(tmp_path, mosquitto.url)
    async with running(settings) as gw, api(gw) as client:
        mosquitto_pub(mosquitto.port, "cgw/v1/meter-9/status", '{"state":"online","kind":"energy_meter"}')
        await eventually(lambda: device(client, "meter-9"), 3.0, "meter-9")
    # Gateway stopped: the broker keeps QoS 1 messages for its persistent session.
    base = int(time.time() * 1000)
    for i in range(50):
        mosquitto_pub(
            mosquitto.port,
            "cgw/v1/meter-9/telemetry",
            orjson.dumps({"ts": base + i, "seq": i, "metrics": {"energy_kwh": 100 + i}}),
        )
    async with running(settings) as gw, api(gw) as client:
        start = datetime.fromtimestamp((base - 1000) / 1000, UTC).isoformat()

        # The device view is live (in memory); the telemetry range reads the store, which the
        # writer commits in batches a moment later: wait for the store.
        async def all_stored() -> list[dict[str, Any]] | None:
            response = await client.get(
                "/api/v1/devices/meter-9/telemetry", params={"metric": "energy_kwh", "start": start}
            )
            series = response.json()["series"].get("energy_kwh", [])
            return series if len(series) >= 50 else None

        points = await eventually(all_stored, 5.0, "the 50 queued readings")
        meter = await device(client, "meter-9")
        assert meter is not None and meter["last_seq"] == 49
        assert [p["seq"] for p in points] == list(range(50))
        assert [p["value"] for p in points] == [100.0 + i for i in range(50)]
        # A long range is downsampled: every reading is counted once.
        response = await client.get(
            "/api/v1/devices/meter-9/telemetry",
            params={"metric": "energy_kwh", "start": "2020-01-01T00:00:00Z"},
        )
        body = response.json()
        assert body["step_ms"] >= 60_000 and body["source"] == "rollup_1m+raw"
        buckets = body["series"]["energy_kwh"]
        assert sum(b["count"] for b in buckets) == 50
        assert min(b["min"] for b in buckets) == 100.0 and max(b["max"] for b in buckets) == 149.0


async def test_gateway_reconnects_after_a_broker_restart(tmp_path: Path, mosquitto: Any) -> None:
    async with running(gateway_settings(tmp_path, mosquitto.url)) as gw, api(gw) as client:
        mosquitto.restart()
        await eventually(lambda: _ready(client), 15.0, "readiness after the broker restart")
        mosquitto_pub(mosquitto.port, "cgw/v1/after-restart/telemetry", '{"metrics":{"x":1}}')
        found = await eventually(lambda: device(client, "after-restart"), 5.0, "a message after restart")
        assert found["kind"] == "generic"  # registration is open by default


async def _ready(client: Any) -> bool:
    return bool((await client.get("/readyz")).json()["ready"])


async def test_closed_registration_refuses_unknown_devices(tmp_path: Path, mosquitto: Any) -> None:
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        "devices:\n  - device_id: known-1\n    kind: water_leak\n    location: {building: '5', floor: 1}\n"
    )
    settings = gateway_settings(tmp_path / "data", mosquitto.url, registration="closed", inventory=inventory)
    async with running(settings) as gw, api(gw) as client:
        # The inventory wins over what the birth says.
        mosquitto_pub(
            mosquitto.port,
            "cgw/v1/known-1/status",
            '{"state":"online","kind":"air_quality","location":{"building":"9"}}',
        )
        mosquitto_pub(mosquitto.port, "cgw/v1/stranger/status", '{"state":"online","kind":"air_quality"}')
        mosquitto_pub(mosquitto.port, "cgw/v1/stranger/telemetry", '{"metrics":{"pm25":1}}')
        known = await eventually(lambda: _online_device(client, "known-1"), 3.0, "known-1 online")
        assert known["kind"] == "water_leak" and known["building"] == "5"

        async def refused() -> list[dict[str, Any]]:
            items = (
                await client.get(
                    "/api/v1/dead-letters",
                    params={"reason": "unknown_device"},
                    headers=AS_OPERATOR,
                )
            ).json()["items"]
            return items if len(items) == 2 else []

        await eventually(refused, 3.0, "two unknown_device dead letters")
        assert await device(client, "stranger") is None


async def _online_device(client: Any, device_id: str) -> dict[str, Any] | None:
    found = await device(client, device_id)
    return found if found and found["online"] else None
