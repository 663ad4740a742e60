"""The measurements. Each takes a Context (its folder, a fresh broker, the shared VictoriaMetrics,
the command's options) and returns table rows; nothing here asserts a timing."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import baseline, gateway_runs, load
from tests.services import GatewayProcess, MosquittoProcess, VictoriaMetricsProcess

# A request the API bench makes: (name, method, path, query, form).
Kind = tuple[str, str, str, dict[str, Any], dict[str, str] | None]


@dataclass
class Context:
    folder: Path
    broker: MosquittoProcess
    victoria: VictoriaMetricsProcess
    args: argparse.Namespace

    def start_gateway(self, victoria: VictoriaMetricsProcess) -> GatewayProcess:
        """`cgw run` in this scenario's folder, speaking the MQTT version under test."""
        return gateway_runs.start(
            self.folder / "gw", self.broker, victoria, CGW_MQTT__PROTOCOL=self.args.protocol
        )


@dataclass
class Row:
    measure: str
    value: str
    target: str = ""
    met: bool | None = None


def _poll(probe: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.1) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return time.perf_counter()
        time.sleep(every_s)
    raise RuntimeError(f"timed out waiting for {what}")


def throughput(ctx: Context) -> list[Row]:
    """Baseline and gateway drain the same pre-filled persistent session."""
    n, devices, port = ctx.args.messages, ctx.args.devices, ctx.broker.port
    baseline.register(port)
    fill_s = load.fill(port, n, devices)
    base_rate = baseline.drain(port, n)

    gw = ctx.start_gateway(ctx.victoria)
    gw.stop()  # the session is registered: the broker queues what follows
    load.fill(port, n, devices)
    gw = ctx.start_gateway(ctx.victoria)
    try:
        # Counters at the first look, so the part already done before it is not counted.
        t_a = time.perf_counter()
        first = gateway_runs.metrics(gw)
        rows_key = 'cgw_store_rows_written_total{table="telemetry"}'
        sent_key = 'cgw_sink_points_total{outcome="written",sink="influx"}'
        d0, w0 = first.get(rows_key, 0.0), first.get(sent_key, 0.0)
        figures: dict[str, float] = {}

        def durable() -> bool:
            figures.update(gateway_runs.metrics(gw))
            return bool(figures.get(rows_key, 0) >= 2 * n)

        t_local = _poll(durable, 600, "the local store")
        t_sink = _poll(lambda: gateway_runs.metrics(gw).get(sent_key, 0) >= n, 600, "the time-series store")
        local_rate = (2 * n - d0) / 2 / (t_local - t_a)
        e2e_rate = (n - min(w0, n)) / (t_sink - t_a)
        rows_local = gateway_runs.local_rows(gw)
        points = gateway_runs.stored_points(
            ctx.victoria, f'generic_pm25{{community="{gateway_runs.COMMUNITY}"}}'
        )
    finally:
        gw.stop()
    ratio = e2e_rate / base_rate
    lost = (2 * n - rows_local) // 2 + (n - points)
    return [
        Row(
            "load: publish rate filling the session", f"{n / fill_s:,.0f} msg/s ({n:,} messages, 4 processes)"
        ),
        Row("baseline: bare paho receive + parse", f"{base_rate:,.0f} msg/s"),
        Row("gateway: durable in the local store", f"{local_rate:,.0f} msg/s"),
        Row("gateway: end to end (local + time-series store)", f"{e2e_rate:,.0f} msg/s"),
        Row("gateway / baseline", f"{ratio:.2f}", "≥ 0.80", ratio >= 0.8),
        Row("lost (read back from both stores)", f"{lost}", "0", lost == 0),
    ]


def _percentile(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1]
        if len(values) > 1
        else values[0]
    )


def _alarm(n: int, devices: int) -> tuple[str, bytes]:
    body = {
        "type": "smoke_alarm",
        "severity": "critical",
        "message": "bench",
        "data": {"sent_ns": time.time_ns()},
    }
    return f"cgw/v1/bench-alarm-{n % 10}/event", orjson.dumps(body)


def alarm_latency(ctx: Context) -> list[Row]:
    """Publish to the SSE stream, for alarms sent at 20/s among 5,000 msg/s of telemetry."""
    gw = ctx.start_gateway(ctx.victoria)
    latencies: list[float] = []
    stop = threading.Event()

    def listen() -> None:
        headers = {"Authorization": f"Bearer {gateway_runs.TOKEN}"}
        with httpx.stream(
            "GET",
            f"{gw.url}/api/v1/stream",
            params={"types": "alarm"},
            headers=headers,
            timeout=httpx.Timeout(5, read=None),
        ) as response:
            for line in response.iter_lines():
                if stop.is_set():
                    return
                if line.startswith("data:"):
                    data = orjson.loads(line[5:])
                    sent = data.get("data", {}).get("sent_ns")
                    if sent:
                        latencies.append((time.time_ns() - sent) / 1e6)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        time.sleep(1)
        with load.Steady(ctx.broker.port, 5000, ctx.args.devices, processes=2) as background:
            time.sleep(3)  # the background load is established
            alarms = load.Steady(ctx.broker.port, 20, 10, processes=1, make=_alarm)
            with alarms:
                time.sleep(15)
            sent_alarms = alarms.stop()
            time.sleep(2)
            background_sent = background.stop()
        received = gateway_runs.metrics(gw).get('cgw_messages_received_total{channel="telemetry"}', 0)
    finally:
        stop.set()
        gw.stop()
    p50, p99 = _percentile(latencies, 0.5), _percentile(latencies, 0.99)
    return [
        Row("alarm latency p50 (publish → SSE)", f"{p50:.1f} ms ({len(latencies)} of {sent_alarms} alarms)"),
        Row("alarm latency p99", f"{p99:.1f} ms", "≤ 50 ms", p99 <= 50),
        Row(
            "  background telemetry during it",
            f"{background_sent / 20:,.0f} msg/s sent, {received:,.0f} taken",
        ),
    ]


def memory(ctx: Context) -> list[Row]:
    """Resident memory with `devices` devices reporting every 10 s, over the soak."""
    devices, soak = ctx.args.devices, ctx.args.soak_s
    gw = ctx.start_gateway(ctx.victoria)
    samples: list[tuple[float, float]] = []
    try:
        start_rss = gateway_runs.rss_mb(gw.pid)
        started = time.monotonic()
        with load.Steady(ctx.broker.port, devices / 10, devices, processes=2):
            while (elapsed := time.monotonic() - started) < soak:
                time.sleep(5)
                samples.append((elapsed, gateway_runs.rss_mb(gw.pid)))
        known = gateway_runs.metrics(gw)
    finally:
        gw.stop()
    warm = next((rss for t, rss in samples if t >= min(60, soak / 2)), samples[0][1])
    end = samples[-1][1]
    peak = max(rss for _, rss in samples)
    devices_known = sum(v for k, v in known.items() if k.startswith("cgw_devices{"))
    return [
        Row("RSS at start, before any device", f"{start_rss:.0f} MB"),
        Row("  devices known during the soak (each reporting every 10 s)", f"{devices_known:,.0f}"),
        Row(
            "RSS after warm-up / at the end / peak",
            f"{warm:.0f} / {end:.0f} / {peak:.0f} MB",
            "≤ 90 MB",
            peak <= 90,
        ),
        Row(
            f"RSS drift over the {soak / 60:.0f}-minute soak",
            f"{end - warm:+.1f} MB",
            "flat (±10 MB)",
            abs(end - warm) <= 10,
        ),
    ]


def api_latency(ctx: Context) -> list[Row]:
    """200 requests/s for 20 s, open loop: device list, telemetry range, Open311 GET and POST
    (in the proportions of `_api_load`), measured by the client."""
    gw = ctx.start_gateway(ctx.victoria)
    try:
        load.fill(ctx.broker.port, 20_000, 1000)
        _poll(lambda: gateway_runs.metrics(gw).get("cgw_readings_total", 0) >= 20_000, 120, "the data")
        results = asyncio.run(_api_load(gw.url, rate=200, seconds=20))
    finally:
        gw.stop()
    rows = []
    everything = [ms for values in results.values() for ms in values]
    for name, values in results.items():
        rows.append(
            Row(f"  {name}", f"p50 {_percentile(values, 0.5):.1f} ms, p99 {_percentile(values, 0.99):.1f} ms")
        )
    p99 = _percentile(everything, 0.99)
    rows.insert(
        0,
        Row(
            "API p99 at 200 requests/s (all kinds)",
            f"{p99:.1f} ms ({len(everything)} requests)",
            "≤ 25 ms",
            p99 <= 25,
        ),
    )
    return rows


async def _api_load(url: str, rate: float, seconds: float) -> dict[str, list[float]]:
    operator = {"Authorization": f"Bearer {gateway_runs.TOKEN}"}
    # A day's mix at a community station, compressed: dashboards read devices and telemetry,
    # terminals check tickets and file requests, the board lists recent requests.
    post = {"service_code": "elderly.home_visit", "description": "bench", "building": "1"}
    async with httpx.AsyncClient(base_url=url, headers=operator, timeout=10) as setup:
        first = (await setup.post("/open311/v2/requests.json", data=post)).json()[0]["service_request_id"]
    kinds: list[Kind] = [
        *[("GET /api/v1/devices?limit=100", "GET", "/api/v1/devices", {"limit": 100}, None)] * 7,
        *[("GET telemetry range", "GET", f"/api/v1/devices/{load.device_id(7)}/telemetry", {}, None)] * 7,
        *[("GET /open311/v2/requests/{id}.json", "GET", f"/open311/v2/requests/{first}.json", {}, None)] * 2,
        (
            "GET /open311/v2/requests.json (open, newest)",
            "GET",
            "/open311/v2/requests.json",
            {"status": "open"},
            None,
        ),
        *[("POST /open311/v2/requests.json", "POST", "/open311/v2/requests.json", {}, post)] * 2,
        ("GET /api/v1/summary", "GET", "/api/v1/summary", {}, None),
    ]
    results: dict[str, list[float]] = {name: [] for name, *_ in kinds}
    failures: list[str] = []
    # Idle connections are dropped before the server's 5 s keep-alive ends, or a request may race its close.
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=url, headers=operator, timeout=10, limits=limits) as client:

        async def one(kind: Kind) -> None:
            name, method, path, params, form = kind
            started = time.perf_counter()
            try:
                response = await client.request(method, path, params=params, data=form)
            except httpx.HTTPError as exc:
                failures.append(f"{name}: {type(exc).__name__} after {time.perf_counter() - started:.2f} s")
                return
            results[name].append((time.perf_counter() - started) * 1000)
            if response.status_code >= 400:
                failures.append(f"{name}: {response.status_code} {response.text[:100]}")

        tasks = []
        begin = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(kinds[i % len(kinds)])))
        await asyncio.gather(*tasks)
    if failures:
        raise RuntimeError(f"{len(failures)} API requests failed, e.g. {failures[:3]}")
    return results


def drain(ctx: Context) -> list[Row]:
    """Outbox drain after the time-series store was down while `messages` arrived."""
    n = ctx.args.messages
    private = VictoriaMetricsProcess(ctx.folder / "victoria")
    private.start()
    gw = ctx.start_gateway(private)
    try:
        private.stop()
        load.fill(ctx.broker.port, n, ctx.args.devices)
        pending_key = 'cgw_outbox_pending_points{sink="influx"}'
        _poll(lambda: gateway_runs.metrics(gw).get(pending_key, 0) >= n, 600, "the backlog")
        backlog = gateway_runs.metrics(gw)[pending_key]
        private.start()
        t_first = _poll(
            lambda: gateway_runs.metrics(gw).get(pending_key, 0) < backlog, 60, "the drain to start", 0.02
        )
        left = gateway_runs.metrics(gw)[pending_key]
        t_done = _poll(lambda: gateway_runs.metrics(gw).get(pending_key, 1) == 0, 600, "the drain", 0.02)
        points = gateway_runs.stored_points(private, f'generic_pm25{{community="{gateway_runs.COMMUNITY}"}}')
    finally:
        gw.stop()
        private.kill()
    rate = left / (t_done - t_first)
    return [
        Row(
            "outbox drain after an outage",
            f"{rate:,.0f} points/s ({backlog:,.0f} points)",
            "≥ 50,000",
            rate >= 50_000,
        ),
        Row("  read back after the drain", f"{points:,} of {n:,} readings", "all", points == n),
    ]


ALL: dict[str, Callable[[Context], list[Row]]] = {
    "throughput": throughput,
    "alarm": alarm_latency,
    "api": api_latency,
    "drain": drain,
    "memory": memory,
}


def rates(folder: Path, victoria: VictoriaMetricsProcess, args: argparse.Namespace) -> list[Row]:
    """The gateway's CPU at steady message rates (1,000 devices), while it keeps up."""
    rows = [Row("scaling: steady rate", "gateway CPU (% of one core), taken / sent", "")]
    broker = MosquittoProcess(folder / "mosquitto-rates")
    broker.start()
    ctx = Context(folder / "rates", broker, victoria, args)
    gw = ctx.start_gateway(victoria)
    key = 'cgw_messages_received_total{channel="telemetry"}'
    try:
        for rate in (1_000, 2_500, 5_000, 10_000):
            started = time.monotonic()
            with load.Steady(broker.port, rate, 1_000, processes=2 if rate < 5_000 else 4) as publishers:
                time.sleep(3)  # established
                cpu, taken = gateway_runs.cpu_s(gw.pid), gateway_runs.metrics(gw).get(key, 0.0)
                t = time.monotonic()
                time.sleep(10)
                seconds = time.monotonic() - t
                cpu = gateway_runs.cpu_s(gw.pid) - cpu
                taken = gateway_runs.metrics(gw).get(key, 0.0) - taken
                sent = publishers.stop() / (time.monotonic() - started)
            rows.append(
                Row(
                    f"  {rate:,} msg/s",
                    f"{100 * cpu / seconds:.0f} % ({taken / seconds:,.0f} taken / {sent:,.0f} sent per s)",
                )
            )
    finally:
        gw.stop()
        broker.kill()
    return rows


def scaling(folder: Path, victoria: VictoriaMetricsProcess, args: argparse.Namespace) -> list[Row]:
    """Throughput and memory as the number of devices grows."""
    rows = [Row("scaling: devices", "gateway end to end, 50,000 messages", "")]
    for devices in (100, 1_000, 5_000, 10_000):
        broker = MosquittoProcess(folder / f"mosquitto-scale-{devices}")
        broker.start()
        try:
            sub = argparse.Namespace(
                **{**vars(args), "devices": devices, "messages": min(args.messages, 50_000)}
            )
            got = throughput(Context(folder / f"scale-{devices}", broker, victoria, sub))
        finally:
            broker.kill()
        rows.append(Row(f"  {devices:,}", got[3].value, ""))
    return rows
