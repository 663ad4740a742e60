"""`cgw demo` as a user runs it: a real process, its printed URL and tokens, a live community.

The full demo (213 devices) runs with a private Mosquitto; a smaller one proves the embedded
broker used when Mosquitto is not installed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.demo import DEMO_PLACE, DemoPlace, chosen
from gateway.settings import load_settings
from tests.services import wait_for

pytestmark = pytest.mark.integration

CGW = [sys.executable, "-m", "gateway.cli"]


def start_demo(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str, dict[str, str]]:
    process = subprocess.Popen(
        [*CGW, "demo", "--data-dir", str(tmp_path / "demo"), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "300", **(env or {})},
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    url = ""
    tokens: dict[str, str] = {}
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if match := re.search(r"API and docs\s+(http://\S+)/docs", line):
            url = match[1]
        if "Tokens" in line:
            tokens = {**tokens, **dict(re.findall(r"(\w+)=(\S+)", line))}
        if match := re.search(r"Dashboard\s+(http://\S+)", line):
            tokens["dashboard link"] = match[1]
        if match := re.search(r"community (\S+), \d+ simulated devices", line):
            tokens["community"] = match[1]
        if "Stop with Ctrl-C" in line:
            return process, url, tokens
    process.kill()
    process.communicate()  # and its output pipe closed
    raise AssertionError("the demo did not start:\n" + "".join(lines))


def stop_demo(process: subprocess.Popen[str]) -> str:
    """Stop it as Ctrl-C does: a healthy demo logs no WARNING, and its last line says it stopped."""
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert " WARNING " not in output and " ERROR " not in output, output
    assert output.splitlines()[-1].startswith("cgw demo stopped; its data stays in "), output
    return output


def wait_online(url: str, token: str, want: int, timeout: float = 60) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}

    def online() -> dict[str, Any] | None:
        summary: dict[str, Any] = httpx.get(f"{url}/api/v1/summary", headers=headers, timeout=5).json()
        return summary if summary["online"] >= want else None

    summary: dict[str, Any] = wait_for(online, timeout, f"{want} devices online")
    return summary


def test_demo_brings_up_a_live_community_of_at_least_200_devices(tmp_path: Path) -> None:
    process, url, tokens = start_demo(tmp_path, "--interval-scale", "0.5")
    try:
        summary = wait_online(url, tokens["viewer"], 200)
        assert summary["devices"] == 213
        assert set(summary["by_kind"]) >= {
            "air_quality",
            "smoke_detector",
            "water_leak",
            "elevator",
            "door_access",
            "energy_meter",
            "water_meter",
            "emergency_button",
            "footfall_counter",
            "service_terminal",
        }
        # The printed link opens the dashboard; the token is printed apart, never inside a link.
        link = tokens["dashboard link"]
        assert link == f"{url}/dashboard/" and tokens["operator"] not in link
        page = httpx.get(link, timeout=5)
        assert page.status_code == 200 and "社区网关" in page.text
        headers = {"Authorization": f"Bearer {tokens['viewer']}"}

        def live_values() -> int:
            devices = httpx.get(f"{url}/api/v1/devices", headers=headers, timeout=5).json()["items"]
            return sum(1 for d in devices if d["online"] and d["last_values"])

        wait_for(lambda: live_values() >= 200, 60, "200 devices with live values")

        # Live: readings keep arriving.
        def last_seq() -> int:
            elevator = httpx.get(f"{url}/api/v1/devices/b01-elev-1", headers=headers, timeout=5).json()
            seq: int = elevator["last_seq"]
            return seq

        first_seq = last_seq()
        wait_for(lambda: last_seq() != first_seq, 30, "a newer reading from b01-elev-1")
        assert httpx.get(f"{url}/readyz", timeout=5).json()["ready"] is True
        # The service loop has a week of history: requests over Open311, building 3's hotspot.
        hotspots: list[dict[str, object]] = wait_for(
            lambda: httpx.get(f"{url}/api/v1/needs/hotspots", headers=headers, timeout=5).json()["items"],
            90,
            "a hotspot",
        )
        assert (hotspots[0]["service_group"], hotspots[0]["building"]) == ("facility", "3")
        requests = httpx.get(f"{url}/open311/v2/requests.json", headers=headers, timeout=5).json()
        assert len(requests) > 100
        evaluation = httpx.get(f"{url}/api/v1/evaluation", headers=headers, timeout=5).json()["rows"][0]
        assert evaluation["completed"] > 0 and evaluation["ratings"] > 0
    finally:
        stop_demo(process)


def test_demo_runs_on_the_embedded_broker_without_mosquitto(tmp_path: Path) -> None:
    process, url, tokens = start_demo(
        tmp_path,
        *("--embedded-broker", "--buildings", "1", "--floors", "2", "--interval-scale", "0.3"),
        env={"CGW_COMMUNITY": "envville"},  # the environment wins over the demo's default
    )
    try:
        assert tokens["community"] == "envville"
        summary = wait_online(url, tokens["viewer"], 10 + 5 + 3)
        assert summary["devices"] == 2 * 5 + 5 + 3
        # A second demo on the same folder is refused, naming the first.
        second = subprocess.run(
            [*CGW, "demo", "--data-dir", str(tmp_path / "demo"), "--port", "0", "--embedded-broker"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert f"is in use by pid {process.pid} (cgw demo --data-dir" in second.stderr, second.stderr
    finally:
        stop_demo(process)


def test_demo_flags_win_over_the_environment_over_the_file_over_its_defaults(tmp_path: Path) -> None:
    assert chosen(load_settings(env={})) == DEMO_PLACE
    conf = tmp_path / "cgw.yaml"
    conf.write_text("community: fromfile\ndata_dir: /srv/file\napi:\n  port: 9001\n")
    assert chosen(load_settings(conf, env={})) == DemoPlace(Path("/srv/file"), "fromfile", "127.0.0.1", 9001)
    env = {"CGW_COMMUNITY": "fromenv", "CGW_API__PORT": "9002", "CGW_DATA_DIR": "/srv/env"}
    base = load_settings(conf, env=env)
    assert chosen(base) == DemoPlace(Path("/srv/env"), "fromenv", "127.0.0.1", 9002)
    flags: dict[str, Any] = {
        "data_dir": Path("/srv/flag"),
        "community": "flag",
        "api_host": "0.0.0.0",
        "api_port": 9003,
    }
    assert chosen(base, **flags) == DemoPlace(Path("/srv/flag"), "flag", "0.0.0.0", 9003)


def test_a_closed_stdout_never_stops_the_shutdown(tmp_path: Path) -> None:
    """`cgw demo | head`: once the reader has gone, Ctrl-C still stops the demo and its Mosquitto.

    rich answers a broken pipe with SystemExit from inside whatever printed; the demo's output
    goes quiet instead (gateway/cli.py `out`).
    """
    process, _, _ = start_demo(tmp_path, "--service-days", "0")
    assert process.stdout is not None
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True)
    brokers = [
        pid for pid in children.stdout.split() if Path(f"/proc/{pid}/comm").read_text().strip() == "mosquitto"
    ]
    assert len(brokers) == 1, children.stdout
    process.stdout.close()  # the reader goes away, as `head` does; the demo's next line hits it
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0
    status = Path(f"/proc/{brokers[0]}/status")
    assert not status.exists() or "zombie" in status.read_text()
