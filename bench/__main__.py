"""`python -m bench`: the gateway against the machine's own limit, in one run (docs/performance.md).

Starts its own Mosquitto and VictoriaMetrics in a temporary folder, then measures and prints:
the bare paho baseline and the gateway end to end on the same pre-filled session, alarm latency
under background load, resident memory with many devices over a soak, API latency under load,
and the outbox drain rate after a time-series store outage. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import endurance, scenarios
from tests.services import MosquittoProcess, VictoriaMetricsProcess

console = Console(width=150)
ALL = {**scenarios.ALL, **endurance.ALL}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000, help="telemetry messages for throughput")
    parser.add_argument("--devices", type=int, default=5_000)
    parser.add_argument("--soak-s", type=float, default=600, help="memory soak length (10 minutes)")
    parser.add_argument(
        "--quick", action="store_true", help="smaller runs: a minute of soak, 50,000 messages"
    )
    parser.add_argument("--only", nargs="*", default=list(ALL), choices=list(ALL))
    parser.add_argument(
        "--scaling", action="store_true", help="also the cost from 100 to 10,000 devices and at steady rates"
    )
    parser.add_argument(
        "--protocol", default="5", choices=["5", "3.1.1"], help="the gateway's MQTT driver (mqtt.protocol)"
    )
    parser.add_argument("--writes-s", type=float, default=120, help="seconds per write-budget point")
    parser.add_argument("--write-rates", type=int, nargs="*", default=list(endurance.RATES))
    parser.add_argument("--card-gb", type=float, default=32, help="SD card size for the life projection")
    parser.add_argument(
        "--card-cycles", type=float, default=3_000, help="program/erase cycles the card's cells endure"
    )
    args = parser.parse_args()
    if args.quick:
        args.messages, args.soak_s = min(args.messages, 50_000), min(args.soak_s, 60)
        args.writes_s = min(args.writes_s, 30)
    console.print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; broker, load and gateway on this one machine"
    )
    rows: list[scenarios.Row] = []
    with tempfile.TemporaryDirectory(prefix="cgw-bench-") as tmp:
        folder = Path(tmp)
        victoria = VictoriaMetricsProcess(folder / "victoria")
        victoria.start()
        try:
            for name in args.only:
                run = ALL[name]
                broker = MosquittoProcess(folder / f"mosquitto-{name}")
                broker.start()
                started = time.monotonic()
                try:
                    rows.extend(run(scenarios.Context(folder / name, broker, victoria, args)))
                finally:
                    broker.kill()
                console.print(f"[dim]{name}: {time.monotonic() - started:.0f} s[/dim]")
            if args.scaling:
                rows.extend(scenarios.scaling(folder, victoria, args))
                rows.extend(scenarios.rates(folder, victoria, args))
        finally:
            victoria.kill()
    table = Table(title="cgw benchmark")
    for column in ("measure", "value", "target", "met"):
        table.add_column(column)
    for row in rows:
        met = "" if row.met is None else ("[green]yes[/green]" if row.met else "[red]no[/red]")
        table.add_row(row.measure, row.value, row.target, met)
    console.print(table)


if __name__ == "__main__":
    main()
