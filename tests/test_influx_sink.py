"""The InfluxDB sink and its line protocol, written to a real VictoriaMetrics and read back."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.models import DeviceEvent, PresenceChange, Reading
from gateway.settings import InfluxSettings
from gateway.sinks.influx import InfluxSink
from gateway.sinks.lineprotocol import event_line, presence_line, reading_lines
from gateway.stats import GatewayMetrics
from tests.harness import eventually

NOW = int(time.time() * 1000)


def sink_for(url: str, **overrides: Any) -> tuple[InfluxSink, GatewayMetrics]:
    metrics = GatewayMetrics()
    settings = InfluxSettings(url=url, token="t", org="o", bucket="b", flush_interval_s=0.05, **overrides)
    return InfluxSink(settings, "testville", metrics), metrics


def outcome(metrics: GatewayMetrics, name: str) -> float:
    return float(metrics.sink_points.labels(sink="influx", outcome=name)._value.get())


# -- line protocol ------------------------------------------------------------------------------

_LINE = re.compile(
    r"^(?P<measurement>(?:[^,\\ ]|\\.)+)(?P<tags>(?:,(?:[^,=\\ ]|\\.)+=(?:[^,=\\ ]|\\.)+)*) "
    r'(?P<fields>(?:[^,=\\ ]|\\.)+=(?:"(?:[^"\\]|\\.)*"|[^, ]+)'
    r'(?:,(?:[^,=\\ ]|\\.)+=(?:"(?:[^"\\]|\\.)*"|[^, ]+))*)'
    r" (?P<ts>-?\d+)$"
)


def test_reading_line_matches_the_contract() -> None:
    out: list[str] = []
    reading_lines(
        Reading("b03-f02-aq", "air_quality", 1_700_000_000_123, {"pm25": 12.5, "temp_c": 21}, 7, "3"),
        "sunrise",
        out,
    )
    assert out == [
        "air_quality,building=3,community=sunrise,device_id=b03-f02-aq pm25=12.5,temp_c=21.0 1700000000123"
    ]


def test_missing_building_tag_is_left_out() -> None:
    out: list[str] = []
    reading_lines(Reading("x", "generic", 1, {"v": 1}), "c", out)
    assert out == ["generic,community=c,device_id=x v=1.0 1"]


names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=30
)


@given(
    device_id=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    building=st.none() | names,
    message=st.text(max_size=80),
    data=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    value=st.floats(allow_nan=False, allow_infinity=False),
)
def test_every_line_parses_as_one_point(
    device_id: str, building: str | None, message: str, data: dict[str, str], value: float
) -> None:
    out: list[str] = []
    reading_lines(Reading(device_id, "air_quality", NOW, {"pm25": value}, None, building), "c-1", out)
    event = DeviceEvent(
        device_id, "air_quality", NOW, "x.y", "warning", message, dict(data), "device", building
    )
    change = PresenceChange(device_id, "air_quality", NOW, False, "will", building)
    for line in [*out, event_line(event, "c-1"), presence_line(change, "c-1")]:
        assert "\n" not in line
        match = _LINE.match(line)
        assert match is not None, line
        assert match["ts"] == str(NOW)


# -- against VictoriaMetrics --------------------------------------------------------------------


async def test_points_land_once_with_their_tags_values_and_times(victoria: Any) -> None:
    sink, metrics = sink_for(victoria.url)
    runner = asyncio.create_task(sink.run())
    try:
        readings = [
            Reading("lp-aq-1", "air_quality", NOW - 2000 + i, {"pm25": 10.0 + i, "co2_ppm": 400 + i}, i, "3")
            for i in range(5)
        ] + [Reading("lp-em-1", "energy_meter", NOW - 1000, {"energy_kwh": 123.456}, 1, None)]
        event = DeviceEvent(
            "lp-aq-1",
            "air_quality",
            NOW - 500,
            "pm25_high",
            "warning",
            'PM2.5 "high"',
            {"rule": "pm25_high"},
            "rule",
            "3",
        )
        presence = PresenceChange("lp-aq-1", "air_quality", NOW - 400, True, "birth", "3")
        await sink.submit(readings, [event], [presence])
        await sink.submit(readings, [event], [presence])  # a replay lands once
        assert await sink.drain(5)
        series = await asyncio.to_thread(victoria.export, '{__name__=~"air_quality_.*",device_id="lp-aq-1"}')
        by_name = {s["metric"]["__name__"]: s for s in series}
        pm25 = by_name["air_quality_pm25"]
        assert pm25["metric"] == {
            "__name__": "air_quality_pm25",
            "community": "testville",
            "device_id": "lp-aq-1",
            "building": "3",
        }
        assert pm25["values"] == [10.0, 11.0, 12.0, 13.0, 14.0]
        assert pm25["timestamps"] == [NOW - 2000 + i for i in range(5)]
        meter = await asyncio.to_thread(
            victoria.export, '{__name__="energy_meter_energy_kwh",device_id="lp-em-1"}'
        )
        assert meter[0]["values"] == [123.456] and "building" not in meter[0]["metric"]
        events = await asyncio.to_thread(victoria.export, '{__name__=~"device_event_.*",device_id="lp-aq-1"}')
        alarm = next(s for s in events if s["metric"]["__name__"] == "device_event_alarm")
        assert alarm["values"] == [1] and alarm["timestamps"] == [NOW - 500]
        assert alarm["metric"]["severity"] == "warning" and alarm["metric"]["type"] == "pm25_high"
        online = await asyncio.to_thread(
            victoria.export, '{__name__="device_presence_online",device_id="lp-aq-1"}'
        )
        assert online[0]["values"] == [1] and online[0]["metric"]["reason"] == "birth"
        assert outcome(metrics, "written") == 2 * (6 + 2)
        assert sink.healthy
    finally:
        runner.cancel()
        await sink.close()


async def test_an_outage_loses_nothing_and_keeps_order(victoria_private: Any) -> None:
    sink, metrics = sink_for(victoria_private.url, timeout_s=1)
    runner = asyncio.create_task(sink.run())
    try:
        await sink.submit([Reading("out-1", "generic", NOW - 3000, {"v": 0.0}, 0)], [], [])
        assert await sink.drain(5)
        victoria_private.stop()
        for i in range(1, 200):
            await sink.submit([Reading("out-1", "generic", NOW - 3000 + i, {"v": float(i)}, i)], [], [])
        await eventually(_probe(lambda: not sink.healthy), 10, "the sink to notice the outage")
        assert "cannot reach InfluxDB" in (sink.last_error or "")
        assert sink.buffered > 0
        victoria_private.start()
        assert await sink.drain(30)
        series = await asyncio.to_thread(victoria_private.export, '{__name__="generic_v",device_id="out-1"}')
        assert series[0]["values"] == [float(i) for i in range(200)]
        assert sink.healthy and outcome(metrics, "failed") > 0 and outcome(metrics, "dropped") == 0
    finally:
        runner.cancel()
        await sink.close()


def _probe(fn: Any) -> Any:
    async def probe() -> Any:
        return fn()

    return probe


async def test_a_full_buffer_drops_the_oldest_telemetry_before_any_event() -> None:
    # Nothing listens at this address: everything stays buffered.
    sink, metrics = sink_for("http://127.0.0.1:9", buffer_points=1000)
    event = DeviceEvent("full-1", "generic", NOW, "fault", "critical", "kept", {}, "device")
    await sink.submit([], [event], [])
    for i in range(1500):
        await sink.submit([Reading("full-1", "generic", NOW + i, {"v": float(i)})], [], [])
    assert sink.buffered == 1000
    assert outcome(metrics, "dropped") == 501 and outcome(metrics, "dropped_event") == 0
    batch = sink._take(2000)
    assert batch[0].startswith("device_event")  # events go first and were kept
    assert batch[1].endswith(f" {NOW + 501}") and batch[-1].endswith(f" {NOW + 1499}")  # the newest telemetry
    await sink.close()


class _Refusing(BaseHTTPRequestHandler):
    """An HTTP endpoint that answers every write with the status in the path's server."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status = self.server.status  # type: ignore[attr-defined]
        body = orjson.dumps({"code": "x", "message": f"refused with {status}"})
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("status", "kept", "text"),
    [(401, True, "CGW_INFLUX__TOKEN"), (404, True, "CGW_INFLUX__BUCKET"), (400, False, "")],
)
async def test_refusals_are_reported_and_only_bad_data_is_dropped(status: int, kept: bool, text: str) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    server.status = status  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sink, metrics = sink_for(f"http://127.0.0.1:{server.server_address[1]}")
    runner = asyncio.create_task(sink.run())
    try:
        await sink.submit([Reading("ref-1", "generic", NOW, {"v": 1.0})], [], [])
        if kept:
            await eventually(_probe(lambda: not sink.healthy), 5, "the refusal")
            assert text in (sink.last_error or "") and sink.buffered == 1
        else:
            await eventually(_probe(lambda: outcome(metrics, "rejected") == 1), 5, "the rejected batch")
            assert sink.buffered == 0
    finally:
        runner.cancel()
        await sink.close()
        server.shutdown()
