"""Running `cgw run` for a benchmark, and reading its figures back from /metrics and the stores."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import httpx

from tests.services import GatewayProcess, MosquittoProcess, VictoriaMetricsProcess

TOKEN = "bench-operator"
COMMUNITY = "bench"


def start(folder: Path, broker: MosquittoProcess, victoria: VictoriaMetricsProcess | None,
          **env: str) -> GatewayProcess:  # fmt: skip
    settings = {
        "CGW_COMMUNITY": COMMUNITY,
        "CGW_MQTT__URL": broker.url,
        "CGW_INFLUX__URL": victoria.url if victoria else "",
        "CGW_INFLUX__TOKEN": "t",
        "CGW_AUTH__TOKENS": f'{{"{TOKEN}": "operator"}}',
        "CGW_AUTH__WRITE_RATE_LIMIT": "",
        # info: the harness (tests/services.py) waits for the "running" line the gateway logs at info.
        "CGW_LOG_LEVEL": "info",
        # Thousands of simulated devices register themselves; the cap is for junk, not for load.
        "CGW_REGISTRATION_MAX_DEVICES": "1000000",
        **env,
    }
    gateway = GatewayProcess(folder, settings)
    gateway.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{gateway.url}/readyz", timeout=2).json()["checks"]["broker"]["ok"]:
                return gateway
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise RuntimeError("the gateway did not connect to the broker:\n" + gateway.log_text()[-2000:])


def metrics(gateway: GatewayProcess) -> dict[str, float]:
    """The gateway's Prometheus figures, keyed by name and labels as printed."""
    return gateway.metrics(TOKEN)


def local_rows(gateway: GatewayProcess, like: str = "bench-%") -> int:
    with sqlite3.connect(f"file:{gateway.db_path}?mode=ro", uri=True, timeout=30) as conn:
        (count,) = conn.execute("SELECT count(*) FROM telemetry WHERE device_id LIKE ?", (like,)).fetchone()
        return int(count)


def stored_points(victoria: VictoriaMetricsProcess, series: str) -> int:
    victoria.flush()
    response = httpx.get(
        f"{victoria.url}/api/v1/query",
        params={"query": f"sum(count_over_time({series}[2d]))"},
        timeout=60,
    )
    result = response.json()["data"]["result"]
    return int(float(result[0]["value"][1])) if result else 0


def cpu_s(pid: int) -> float:
    """CPU time (user + system) the process has used so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
