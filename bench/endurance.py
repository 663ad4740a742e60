"""Endurance of the box: bytes the gateway writes per message (the wear of an SD card) and its memory.

Write budget: `cgw run` takes a steady stream from 200 devices sending two metrics each, with and
without the InfluxDB sink (to VictoriaMetrics), at 10, 100 and 1,000 messages/s. The bytes are
the process's own `write_bytes` from `/proc/<pid>/io` (what it sent towards the disk, counted by
the kernel when a page of the page cache is first dirtied), taken over a window after a warm-up,
divided by the messages the gateway took in that window. Nothing here asserts; targets are shown.

The life of a card is projected from the rate: a card of `--card-gb` gigabytes whose cells
endure `--card-cycles` program/erase cycles takes `gb × cycles` of writes, if its controller
spreads wear evenly and adds no write amplification of its own. Real cards amplify small
writes, so the projection is a ceiling; it compares set-ups, it does not promise a date.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from bench import gateway_runs, load
from bench.scenarios import Context, Row
from tests.services import MosquittoProcess

DEVICES = 200  # a community's steady set: 200 devices, two metrics each (the figures)
RATES = (10, 100, 1_000)
TARGETS = {10: 1_000, 1_000: 300}  # bytes per message with the sink (issue 15)
# First sight of every device (each is registered and goes online: events, committed at once),
# and the sink's first batches: at least twice the time every device takes to report once.
WARM_UP_S = 15.0


def warm_up_s(rate: float) -> float:
    return max(WARM_UP_S, 2 * DEVICES / rate)


def written_bytes(pid: int) -> int:
    """Bytes the process caused to be written to storage so far (`/proc/<pid>/io`)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/io has no write_bytes (a kernel without I/O accounting?)")


def telemetry_now(n: int, devices: int) -> tuple[str, bytes]:
    """Like `load.telemetry`, stamped now: a steady community, not a replayed backlog."""
    body = {"ts": int(time.time() * 1000), "seq": n, "metrics": {"pm25": 10.0 + n % 50, "temp_c": 21.5}}
    return f"cgw/v1/{load.device_id(n % devices)}/telemetry", orjson.dumps(body)


def card_life_years(bytes_per_day: float, card_gb: float, cycles: float) -> float:
    return card_gb * 1e9 * cycles / bytes_per_day / 365 if bytes_per_day else float("inf")


def write_budget(ctx: Context) -> list[Row]:
    """Bytes written per message and per day, with and without the sink, at steady rates."""
    args = ctx.args
    rows = [
        Row(
            "write budget: bytes written per message",
            f"{DEVICES} devices × 2 metrics; {args.writes_s:.0f} s per point after a warm-up of "
            f"{WARM_UP_S:.0f} s or 2 × {DEVICES} / rate; card: {args.card_gb:.0f} GB × "
            f"{args.card_cycles:,.0f} P/E cycles",
            "",
        )
    ]
    key = 'cgw_messages_received_total{channel="telemetry"}'
    for with_sink in (False, True):
        for rate in args.write_rates:
            broker = MosquittoProcess(ctx.folder / f"mosquitto-{rate}-{with_sink}")
            broker.start()
            victoria = ctx.victoria if with_sink else None
            gw = gateway_runs.start(ctx.folder / f"gw-{rate}-{with_sink}", broker, victoria)
            try:
                with load.Steady(broker.port, rate, DEVICES, processes=1 if rate < 500 else 2,
                                 make=telemetry_now):  # fmt: skip
                    time.sleep(warm_up_s(rate))
                    w0, m0, t0 = (
                        written_bytes(gw.pid),
                        gateway_runs.metrics(gw).get(key, 0.0),
                        time.monotonic(),
                    )
                    time.sleep(args.writes_s)
                    w1, m1, t1 = (
                        written_bytes(gw.pid),
                        gateway_runs.metrics(gw).get(key, 0.0),
                        time.monotonic(),
                    )
            finally:
                gw.stop()
                broker.kill()
            messages = m1 - m0
            per_message = (w1 - w0) / messages if messages else float("inf")
            per_day = (w1 - w0) / (t1 - t0) * 86_400
            life = card_life_years(per_day, args.card_gb, args.card_cycles)
            target = TARGETS.get(rate) if with_sink else None
            rows.append(
                Row(
                    f"  {'with' if with_sink else 'without'} the sink, {rate:,} msg/s",
                    f"{per_message:,.0f} B/msg, {per_day / 1e9:,.2f} GB/day, card ≈ {life:,.1f} years "
                    f"({messages / (t1 - t0):,.0f} msg/s taken)",
                    f"≤ {target:,} B/msg" if target else "",
                    per_message <= target if target else None,
                )
            )
    return rows


def idle_memory(ctx: Context) -> list[Row]:
    """Resident memory of `cgw run` with the sink configured and nothing arriving."""
    gw = ctx.start_gateway(ctx.victoria)
    try:
        time.sleep(10)  # settled: the sink's first look at an empty outbox, the first sweeps
        rss = gateway_runs.rss_mb(gw.pid)
    finally:
        gw.stop()
    return [Row("RSS idle, InfluxDB sink configured, no device", f"{rss:.1f} MB", "≤ 63 MB", rss <= 63)]


ALL = {"writes": write_budget, "idle": idle_memory}
