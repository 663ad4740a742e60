"""The InfluxDB sink and its line protocol, written to a real VictoriaMetrics and read back."""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
import time
from collections.abc import Sequence
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.instruments import Instruments
from gateway.models import Batch, DeviceEvent, PresenceChange, Reading
from gateway.settings import InfluxSettings
from gateway.sinks.influx import InfluxSink, retry_after_s
from gateway.sinks.lineprotocol import event_line, presence_line, reading_lines
from gateway.sinks.writeapi import WriteApi
from gateway.store.outbox import Outbox, Policy
from gateway.store.writer import StoreWriter
from tests.harness import eventually

NOW = int(time.time() * 1000)


class Pipe:
    """The real path to InfluxDB: the store writer commits batches and their outbox rows, the sink
    drains the outbox. `submit` returns once the batch is durable."""

    def __init__(self, db: Path, url: str, max_bytes: int = 10**9, policy: Policy = "drop_oldest_telemetry",
                 **overrides: Any) -> None:  # fmt: skip
        self.instruments = Instruments()
        self.outbox = Outbox(max_bytes, policy)
        fields = {"url": url, "token": "t", "org": "o", "bucket": "b", "flush_interval_s": 0.05, **overrides}
        settings = InfluxSettings(**fields)
        self.sink = InfluxSink(settings, "testville", self.instruments, db, self.outbox)
        self.writer = StoreWriter(db, self.instruments, 64, self.outbox, [self.sink.encode])
        self.writer.on_commit(self.sink.wake)
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Pipe:
        await self.writer.open()
        self._tasks = [asyncio.create_task(self.writer.run()), asyncio.create_task(self.sink.run())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.sink.close()
        await self.writer.close()

    async def submit(
        self,
        readings: list[Reading],
        events: Sequence[DeviceEvent] = (),
        presence: Sequence[PresenceChange] = (),
    ) -> None:
        await self.writer.put_durable(
            Batch(readings=list(readings), events=list(events), presence=list(presence))
        )


def outcome(instruments: Instruments, name: str) -> float:
    return float(instruments.sink_points.labels(sink="influx", outcome=name)._value.get())


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
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), min_size=1, max_size=30
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


async def test_points_land_once_with_their_tags_values_and_times(victoria: Any, tmp_path: Path) -> None:
    async with Pipe(tmp_path / "s.db", victoria.url) as pipe:
        sink, metrics = pipe.sink, pipe.instruments
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
        await pipe.submit(readings, [event], [presence])
        await pipe.submit(readings, [event], [presence])  # a replay lands once
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
        # The outbox refers to the telemetry rows a commit inserted: the replayed readings were
        # not inserted again, so they are not sent again; the event and presence change are.
        assert outcome(metrics, "written") == 6 + 2 * 2
        assert sink.healthy and pipe.outbox.bytes == 0


async def test_an_outage_loses_nothing_keeps_order_and_survives_a_restart(
    victoria_private: Any, tmp_path: Path
) -> None:
    db = tmp_path / "s.db"
    async with Pipe(db, victoria_private.url, timeout_s=1) as pipe:
        await pipe.submit([Reading("out-1", "generic", NOW - 3000, {"v": 0.0}, 0)])
        assert await pipe.sink.drain(5)
        victoria_private.stop()
        for i in range(1, 100):
            await pipe.submit([Reading("out-1", "generic", NOW - 3000 + i, {"v": float(i)}, i)])
        await eventually(_probe(lambda: not pipe.sink.healthy), 10, "the sink to notice the outage")
        assert "cannot reach InfluxDB" in (pipe.sink.last_error or "")
        assert pipe.sink.buffered == 99
    # The gateway stops (or dies) with the backlog on disk; the next run sends it.
    async with Pipe(db, victoria_private.url, timeout_s=1) as pipe:
        assert pipe.sink.buffered == 99
        for i in range(100, 200):
            await pipe.submit([Reading("out-1", "generic", NOW - 3000 + i, {"v": float(i)}, i)])
        victoria_private.start()
        assert await pipe.sink.drain(30)
        series = await asyncio.to_thread(victoria_private.export, '{__name__="generic_v",device_id="out-1"}')
        assert series[0]["values"] == [float(i) for i in range(200)]
        assert pipe.sink.healthy and outcome(pipe.instruments, "written") == 199  # the first was sent before


def _probe(fn: Any) -> Any:
    async def probe() -> Any:
        return fn()

    return probe


async def test_a_full_outbox_drops_the_oldest_telemetry_and_never_an_event(tmp_path: Path) -> None:
    # Nothing listens at this address: everything stays in the outbox, bounded at 20 kB.
    async with Pipe(tmp_path / "s.db", "http://127.0.0.1:9", max_bytes=20_000) as pipe:
        event = DeviceEvent("full-1", "generic", NOW, "fault", "critical", "kept", {}, "device")
        await pipe.submit([], [event])
        for i in range(1500):
            await pipe.submit([Reading("full-1", "generic", NOW + i, {"v": float(i)})])
        assert pipe.outbox.bytes <= 20_000
        dropped = pipe.outbox.dropped_points
        assert dropped > 500 and pipe.instruments.outbox_dropped._value.get() == dropped
        shipment = await pipe.sink._db.call(pipe.sink._take)
        assert shipment is not None
        lines = shipment.body.split("\n")
        assert lines[0].startswith("device_event")  # the event was kept, and goes first
        assert lines[1].endswith(f" {NOW + dropped}")  # the oldest telemetry went first
        assert lines[-1].endswith(f" {NOW + 1499}")  # the newest telemetry is there
        assert len(lines) == 1 + 1500 - dropped


async def test_a_full_outbox_under_block_slows_intake_until_the_sink_drains(
    victoria_private: Any, tmp_path: Path
) -> None:
    victoria_private.stop()
    async with Pipe(
        tmp_path / "s.db", victoria_private.url, max_bytes=5_000, policy="block", timeout_s=1
    ) as pipe:
        sent = 0
        with pytest.raises(TimeoutError):
            for sent in range(1000):
                await asyncio.wait_for(pipe.submit([Reading("blk-1", "generic", NOW + sent, {"v": 1.0})]), 3)
        assert "outbox is full" in (pipe.writer.last_error or "") and pipe.outbox.dropped_points == 0
        victoria_private.start()
        assert await pipe.sink.drain(30)
        await pipe.writer.drain()  # the waiting batch went in once there was room
        assert await pipe.sink.drain(30)
        series = await asyncio.to_thread(victoria_private.export, '{__name__="generic_v",device_id="blk-1"}')
        assert len(series[0]["values"]) == sent + 1


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


class _Gate(BaseHTTPRequestHandler):
    """A real HTTP server in front of VictoriaMetrics, answering as a loaded or limited InfluxDB
    does: 413 for a body over `max_body` bytes, then the scripted answers in turn (status,
    Retry-After), then passing the write through. Every request's arrival is recorded."""

    def do_POST(self) -> None:
        gate: Gate = self.server.gate  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with gate.lock:
            gate.arrivals.append((time.monotonic(), body.count(b"\n") + 1))
            if len(body) > gate.max_body:
                answer: tuple[int, str | None] | None = (413, None)
            else:
                answer = gate.script.pop(0) if gate.script else None
        if answer is None:
            forwarded = gate.client.post(f"{gate.upstream}{self.path}", content=body)
            answer = (forwarded.status_code, None)
        status, retry_after = answer
        reply = b"" if status == 204 else orjson.dumps({"code": "x", "message": f"answered {status}"})
        self.send_response(status)
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


class Gate:
    def __init__(
        self, upstream: str, max_body: int = 10**9, script: Sequence[tuple[int, str | None]] = ()
    ) -> None:
        self.upstream, self.max_body, self.script = upstream, max_body, list(script)
        self.lock = threading.Lock()
        self.arrivals: list[tuple[float, int]] = []
        # One client for every forward: a new one per request (httpx.post) builds an SSL context
        # each time, about 150 ms a request on a loaded machine, and a split batch is hundreds.
        self.client = httpx.Client(timeout=10)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Gate)
        self.server.gate = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Gate:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()


async def test_a_batch_too_large_is_split_and_every_good_point_lands(victoria: Any, tmp_path: Path) -> None:
    # 300 readings (about 60 bytes a line) in one request are 18 kB: over the 4 kB the server takes.
    readings = [Reading("big-1", "generic", NOW - 1000 + i, {"v": float(i)}, i) for i in range(300)]
    huge = DeviceEvent("big-1", "generic", NOW, "fault", "critical", "x" * 5000, {}, "device")
    with Gate(victoria.url, max_body=4096) as gate:
        async with Pipe(tmp_path / "s.db", gate.url) as pipe:
            await pipe.submit(readings, [huge])
            assert await pipe.sink.drain(20)
            # The event alone is over the limit: no retry can send it, so it alone is dropped.
            assert outcome(pipe.instruments, "rejected") == 1
            assert outcome(pipe.instruments, "written") == 300
            # Later batches go in pieces of what went through: no more refusals.
            refused = sum(1 for _ in gate.arrivals)
            await pipe.submit([Reading("big-1", "generic", NOW + i, {"v": float(1000 + i)}, 1000 + i)
                               for i in range(300)])  # fmt: skip
            assert await pipe.sink.drain(20)
            later = gate.arrivals[refused:]
            assert later and all(lines <= pipe.sink._max_lines for _, lines in later)  # type: ignore[operator]
            assert outcome(pipe.instruments, "written") == 600 and outcome(pipe.instruments, "rejected") == 1
            # A far side that now takes less: pieces of the size learnt are refused, and the size
            # is learnt again from what goes through.
            learnt = pipe.sink._max_lines
            gate.max_body = 2048
            await pipe.submit([Reading("big-1", "generic", NOW + 1000 + i, {"v": float(2000 + i)}, 2000 + i)
                               for i in range(300)])  # fmt: skip
            assert await pipe.sink.drain(20)
            assert learnt is not None and pipe.sink._max_lines is not None and pipe.sink._max_lines < learnt
            assert outcome(pipe.instruments, "written") == 900 and outcome(pipe.instruments, "rejected") == 1
    series = await asyncio.to_thread(victoria.export, '{__name__="generic_v",device_id="big-1"}')
    assert series[0]["values"] == [float(n) for n in (*range(300), *range(1000, 1300), *range(2000, 2300))]


@pytest.mark.parametrize(
    ("script", "waits"),
    [
        # Retry-After (in seconds; the date form is read by the unit test below) is honoured.
        ([(429, "2")], [2.0]),
        ([(503, "2")], [2.0]),
        # Without it, backoff: 0.5 s, then 1 s, then 2 s.
        ([(500, None), (502, None), (504, None)], [0.5, 1.0, 2.0]),
    ],
    ids=["429-retry-after", "503-retry-after", "5xx-backoff"],
)
async def test_a_busy_or_failing_server_is_retried_with_backoff_and_nothing_is_dropped(
    victoria: Any, tmp_path: Path, script: list[tuple[int, str | None]], waits: list[float]
) -> None:
    device = f"busy-{script[0][0]}-{len(script)}"
    with Gate(victoria.url, script=script) as gate:
        async with Pipe(tmp_path / "s.db", gate.url) as pipe:
            await pipe.submit([Reading(device, "generic", NOW + i, {"v": float(i)}, i) for i in range(50)])
            await eventually(_probe(lambda: not pipe.sink.healthy), 5, "the refusal")
            assert f"InfluxDB answered {script[0][0]}" in (pipe.sink.last_error or "")
            assert pipe.sink.buffered == 50
            assert await pipe.sink.drain(20)
            assert pipe.sink.healthy and outcome(pipe.instruments, "rejected") == 0
    times = [t for t, _ in gate.arrivals]
    assert len(times) == len(script) + 1
    for (before, after), wait in zip(itertools.pairwise(times), waits, strict=True):
        assert after - before >= wait, (after - before, wait)
    series = await asyncio.to_thread(victoria.export, f'{{__name__="generic_v",device_id="{device}"}}')
    assert series[0]["values"] == [float(i) for i in range(50)]


def test_retry_after_is_read_as_seconds_or_as_a_date() -> None:
    now = 1_700_000_000.0
    assert retry_after_s("120", now) == 120.0
    assert retry_after_s(formatdate(now + 30, usegmt=True), now) == 30.0
    assert retry_after_s(formatdate(now - 30, usegmt=True), now) == 0.0
    assert retry_after_s(None, now) is None and retry_after_s("soon", now) is None


@pytest.mark.parametrize(
    ("status", "kept", "text", "token"),
    [
        (401, True, "refused the token (401): check CGW_INFLUX__TOKEN", "t"),
        (401, True, "the token is empty; set CGW_INFLUX__TOKEN", ""),
        (404, True, "CGW_INFLUX__BUCKET", "t"),
        (400, False, "", "t"),
    ],
)
async def test_refusals_are_reported_and_only_bad_data_is_dropped(
    status: int, kept: bool, text: str, token: str, tmp_path: Path
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    server.status = status  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        async with Pipe(tmp_path / "s.db", url, token=token) as pipe:
            sink, metrics = pipe.sink, pipe.instruments
            await pipe.submit([Reading("ref-1", "generic", NOW, {"v": 1.0})])
            if kept:
                await eventually(_probe(lambda: not sink.healthy), 5, "the refusal")
                assert text in (sink.last_error or "") and sink.buffered == 1
            else:
                await eventually(_probe(lambda: outcome(metrics, "rejected") == 1), 5, "the rejected batch")
                assert sink.buffered == 0
    finally:
        server.shutdown()
        server.server_close()  # its listening socket, or it is left open


class _Recording(BaseHTTPRequestHandler):
    """Records each write (path, headers, body) and answers 204 over HTTP/1.1 keep-alive, as
    InfluxDB does; with `server.hang_up` set, closes the connection after answering without
    saying so, as a server whose idle time-out ends a kept connection between two writes."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append((self.path, dict(self.headers), body))  # type: ignore[attr-defined]
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.close_connection = self.server.hang_up  # type: ignore[attr-defined]

    def log_message(self, *args: Any) -> None:
        pass


def _recording_server(hang_up: bool = False) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recording)
    server.requests = []  # type: ignore[attr-defined]
    server.hang_up = hang_up  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("token", ["s3cret", ""])
def test_a_write_is_the_request_influxdb_v2_takes(token: str) -> None:
    server = _recording_server()
    url = f"http://127.0.0.1:{server.server_address[1]}/under/a/proxy"
    api = WriteApi(InfluxSettings(url=url, token=token, org="my org", bucket="b/1"))
    try:
        answer = api.post(b"m,t=1 v=1.0 1700000000000")
    finally:
        api.close()
        server.shutdown()
        server.server_close()  # its listening socket, or it is left open
    assert answer.ok and answer.status == 204
    [(path, headers, body)] = server.requests  # type: ignore[attr-defined]
    assert path == "/under/a/proxy/api/v2/write?org=my+org&bucket=b%2F1&precision=ms"
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    # No token, no Authorization header at all (the sink's 401 message says so).
    assert headers.get("Authorization") == (f"Token {token}" if token else None)
    assert body == b"m,t=1 v=1.0 1700000000000"


def test_a_kept_connection_the_server_closed_is_opened_again() -> None:
    server = _recording_server(hang_up=True)
    api = WriteApi(InfluxSettings(url=f"http://127.0.0.1:{server.server_address[1]}", token="t"))
    try:
        answers = [api.post(f"m v={i}.0 1".encode()) for i in range(3)]
    finally:
        api.close()
        server.shutdown()
        server.server_close()  # its listening socket, or it is left open
    assert [a.status for a in answers] == [204, 204, 204]
    assert [body for _, _, body in server.requests] == [b"m v=0.0 1", b"m v=1.0 1", b"m v=2.0 1"]  # type: ignore[attr-defined]
