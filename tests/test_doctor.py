"""`cgw doctor` against real services: each common misconfiguration is one line that says the fix."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gateway.broker import LocalBroker
from gateway.doctor import Finding, run_checks
from gateway.settings import load_settings
from tests.services import GatewayProcess, MosquittoProcess, VictoriaMetricsProcess, free_port, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(tmp_path: Path, mosquitto: MosquittoProcess, victoria: VictoriaMetricsProcess) -> dict[str, str]:
    """A healthy deployment: every check passes (registration closed, an inventory lists the devices)."""
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("devices:\n  - {device_id: meter-1, kind: energy_meter}\n")
    return {
        "CGW_REGISTRATION": "closed",
        "CGW_INVENTORY": str(inventory),
        "CGW_DATA_DIR": str(tmp_path / "data"),
        "CGW_MQTT__URL": mosquitto.url,
        "CGW_INFLUX__URL": victoria.url,
        "CGW_INFLUX__TOKEN": "t",
        "CGW_API__PORT": str(free_port()),
        "CGW_AUTH__TOKENS": '{"doctor-token-0123456789": "operator"}',
        "CGW_OUTBOX__MAX_BYTES": str(16 * 2**20),
    }


def checks(env: dict[str, str], token: str | None = None) -> dict[str, list[Finding]]:
    out: dict[str, list[Finding]] = {}
    for finding in run_checks(load_settings(env=env), timeout_s=3, token=token):
        out.setdefault(finding.check, []).append(finding)
    return out


def problem(env: dict[str, str], check: str) -> Finding:
    found = [f for f in checks(env).get(check, []) if not f.ok]
    assert len(found) == 1, f"expected one problem with {check}, got {checks(env).get(check)}"
    assert "\n" not in found[0].detail
    return found[0]


def doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "doctor"], env=env, capture_output=True, text=True, timeout=60
    )


def test_open_registration_is_a_warning_that_names_the_setting(env: dict[str, str]) -> None:
    found = problem({**env, "CGW_REGISTRATION": "open"}, "registration")
    assert not found.blocking
    assert "CGW_REGISTRATION=closed" in found.detail and "1000 devices" in found.detail
    result = doctor({**env, "CGW_REGISTRATION": "open"})
    assert result.returncode == 0 and "WARN" in result.stdout and "registration" in result.stdout


def test_a_healthy_deployment_passes(env: dict[str, str]) -> None:
    found = [f for findings in checks(env).values() for f in findings]
    assert found and all(f.ok for f in found), found
    result = doctor(env)
    assert result.returncode == 0, result.stdout
    assert "FAIL" not in result.stdout and "WARN" not in result.stdout


def test_an_unreachable_broker_fails_and_names_the_setting(env: dict[str, str]) -> None:
    env["CGW_MQTT__URL"] = f"mqtt://127.0.0.1:{free_port()}"
    finding = problem(env, "broker")
    assert finding.blocking and "CGW_MQTT__URL" in finding.detail
    result = doctor(env)
    assert result.returncode == 1 and "FAIL broker" in result.stdout


def test_a_broker_without_mqtt5_fails_and_names_the_protocol_setting(
    env: dict[str, str], tmp_path: Path
) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    amqtt = LocalBroker(tmp_path / "amqtt", prefer_mosquitto=False)  # MQTT 3.1.1 only
    try:
        env["CGW_MQTT__URL"] = asyncio.run_coroutine_threadsafe(amqtt.start(), loop).result(30)
        finding = problem(env, "broker")
        assert finding.blocking and "CGW_MQTT__PROTOCOL=3.1.1" in finding.detail
        env["CGW_MQTT__PROTOCOL"] = "3.1.1"
        assert checks(env)["broker"] and all(f.ok for f in checks(env)["broker"])
    finally:
        asyncio.run_coroutine_threadsafe(amqtt.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_port_held_by_another_program_fails(env: dict[str, str]) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        env["CGW_API__PORT"] = str(other.getsockname()[1])
        assert "CGW_API__PORT" in problem(env, "api").detail


def test_a_store_from_a_newer_version_fails(env: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("cgw.sqlite3", "services.sqlite3"):
        with sqlite3.connect(data / name) as conn:
            conn.execute("PRAGMA user_version=999")
    assert "upgrade cgw" in problem(env, "local store").detail
    assert "upgrade cgw" in problem(env, "service desk").detail


def test_missing_or_expired_tokens_warn_without_failing(env: dict[str, str]) -> None:
    del env["CGW_AUTH__TOKENS"]
    finding = problem(env, "api tokens")
    assert not finding.blocking and "cgw token" in finding.detail
    env["CGW_AUTH__TOKENS"] = '{"old": {"role": "operator", "expires": "2020-01-01T00:00:00Z"}}'
    assert "expired" in problem(env, "api tokens").detail
    result = doctor(env)
    assert result.returncode == 0 and "WARN api tokens" in result.stdout


def test_a_short_token_warns_without_showing_it(env: dict[str, str]) -> None:
    env["CGW_AUTH__TOKENS"] = '{"short-token": "operator", "a-long-enough-token-0123": "viewer"}'
    finding = problem(env, "api tokens")
    assert not finding.blocking
    assert finding.detail == (
        "1 of 2 shorter than 16 characters, easy to guess ('sh…'): replace them with `cgw token`"
    )


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="this machine has no /dev/shm")
def test_a_data_dir_lost_at_reboot_warns(env: dict[str, str], tmp_path: Path) -> None:
    shm = Path("/dev/shm") / f"cgw-doctor-{tmp_path.name}"
    env["CGW_DATA_DIR"] = str(shm)
    try:
        found = [f for f in checks(env)["data dir"] if not f.ok]
        assert len(found) == 1 and "tmpfs" in found[0].detail and "CGW_DATA_DIR" in found[0].detail
    finally:
        subprocess.run(["rm", "-rf", str(shm)], check=True)


def test_an_outbox_larger_than_the_disk_warns(env: dict[str, str]) -> None:
    env["CGW_OUTBOX__MAX_BYTES"] = str(2**60)
    assert "CGW_OUTBOX__MAX_BYTES" in problem(env, "outbox").detail


def test_the_uplink_is_checked(env: dict[str, str], district_mosquitto: MosquittoProcess) -> None:
    env["CGW_UPLINK__URL"] = district_mosquitto.url
    env["CGW_UPLINK__TELEMETRY"] = '["energy_meter", "air_quality.pm25"]'
    assert checks(env)["uplink"] and all(f.ok for f in checks(env)["uplink"])
    env["CGW_UPLINK__TELEMETRY"] = '["air_qualty"]'
    assert "no device kind" in problem(env, "uplink").detail
    env["CGW_UPLINK__TELEMETRY"] = '["air_quality.pm3"]'
    assert "no metric 'pm3'" in problem(env, "uplink").detail
    # Unreachable: said, but the gateway may start (the outbox keeps what the district is owed).
    env["CGW_UPLINK__TELEMETRY"] = "[]"
    env["CGW_UPLINK__URL"] = f"mqtt://127.0.0.1:{free_port()}"
    finding = problem(env, "uplink")
    assert not finding.blocking and "CGW_UPLINK__URL" in finding.detail


def test_the_local_example_passes_and_doctor_creates_nothing(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    """README's by-hand path: `cgw doctor -c deploy/cgw.local.yaml` on a user's machine (its home
    here is a fresh folder; the broker and the API port are this machine's)."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "CGW_MQTT__URL": mosquitto.url,
        "CGW_API__PORT": str(free_port()),
        "CGW_AUTH__TOKENS": '{"doctor-token-0123456789": "operator"}',
    }
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "doctor", "-c", str(ROOT / "deploy" / "cgw.local.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=work,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    data = home / ".local" / "share" / "cgw"
    assert f"ok   data dir: {data} will be created on first start" in result.stdout
    assert "time-series store: not configured" in result.stdout
    # A check changes nothing: no data folder, nothing in the home or the working folder.
    assert list(home.iterdir()) == [] and not data.exists()
    assert list(work.iterdir()) == []


def test_a_data_dir_that_cannot_be_created_fails(env: dict[str, str], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env["CGW_DATA_DIR"] = str(blocker / "data")
    assert "is not a folder" in problem(env, "data dir").detail
    assert not (blocker / "data").exists()
    # os.access says yes to root in /proc, yet nothing can be made there.
    env["CGW_DATA_DIR"] = "/proc/nope"
    finding = problem(env, "data dir")
    assert finding.detail == "/proc/nope cannot be created: /proc is on the kernel's proc; set CGW_DATA_DIR"


def test_run_names_the_setting_of_a_data_dir_it_cannot_make(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {
        "PATH": os.environ["PATH"],
        "CGW_DATA_DIR": str(blocker / "sub"),
        "CGW_API__PORT": str(free_port()),
    }
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (
        f"error: setting CGW_DATA_DIR (data_dir): {blocker / 'sub'} cannot be used as the data folder "
        f"(Not a directory: {blocker / 'sub'}); choose a folder this user can create and write"
    )


def test_an_empty_influx_token_is_named_as_such(env: dict[str, str]) -> None:
    env["CGW_INFLUX__TOKEN"] = ""
    finding = problem(env, "time-series store")
    assert (
        finding.blocking and "the token is empty" in finding.detail and "CGW_INFLUX__TOKEN" in finding.detail
    )
    assert "cannot reach" not in finding.detail


def test_a_running_gateway_tells_its_write_rate_the_media_life_and_clock_jumps(
    env: dict[str, str], tmp_path: Path
) -> None:
    gateway = GatewayProcess(tmp_path / "gw", {k: v for k, v in env.items() if k != "CGW_API__PORT"})
    gateway.start()
    try:
        running = {**env, "CGW_DATA_DIR": gateway.env["CGW_DATA_DIR"], "CGW_API__PORT": str(gateway.port)}
        (anonymous,) = checks(running)["disk writes"]  # details need a token
        assert anonymous.ok and "--token" in anonymous.detail
        found = wait_for(
            lambda: [
                f
                for f in checks(running, token="doctor-token-0123456789").get("disk writes", [])
                if "written since start" in f.detail
            ],
            30,
            "the running gateway's write rate",
        )
        assert found[0].ok and not found[0].blocking
        assert "GB/day" in found[0].detail and "P/E cycles lasts about" in found[0].detail
        # and whether its wall clock jumped (none here)
        (clock,) = checks(running, token="doctor-token-0123456789")["clock jumps"]
        assert clock.ok and not clock.blocking and "no jump" in clock.detail
        scraped = gateway.metrics("doctor-token-0123456789")
        assert "cgw_process_written_bytes_total" in scraped  # /metrics exports the counter it reads
    finally:
        gateway.stop()
