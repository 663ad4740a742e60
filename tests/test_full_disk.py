"""A full disk, on a small real filesystem: a size-limited tmpfs the test mounts (so only as root).

Before the disk is full, raw telemetry gives way (gateway/store/maintenance.py); at a full disk
the API keeps answering, nothing is acknowledged that could not be kept (the broker holds it),
and the gateway goes on by itself once there is room again (docs/reliability.md, "A full disk").
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.devices import Publisher
from tests.services import GatewayProcess, MosquittoProcess, wait_for

pytestmark = pytest.mark.integration

MIB = 2**20
OPERATOR = "disk-operator"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root; this test fills a real filesystem")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def gateway_on(disk: Path, folder: Path, broker: MosquittoProcess, **env: str) -> GatewayProcess:
    """`cgw run` whose data folder is the small disk (its log stays outside it)."""
    folder.mkdir()
    (folder / "data").symlink_to(disk)
    gateway = GatewayProcess(
        folder,
        {
            "CGW_COMMUNITY": "full-disk",
            "CGW_MQTT__URL": broker.url,
            "CGW_AUTH__TOKENS": orjson.dumps({OPERATOR: "operator"}).decode(),
            "CGW_LOG_LEVEL": "info",
            "CGW_PIPELINE__DEVICE_RATE_LIMIT": "100000/second",
            "CGW_STORE__GROUP_COMMIT_MS": "50",
            **env,
        },
    )
    gateway.start()
    wait_for(lambda: gateway.checks().get("broker", {}).get("ok"), 30, "the broker")
    return gateway


def fill(disk: Path, leave: int) -> Path:
    """A file taking all but `leave` bytes of the disk."""
    filler = disk / "filler"
    size = max(0, shutil.disk_usage(disk).free - leave)
    with filler.open("ab") as out:
        while size > 0:
            chunk = min(size, MIB)
            out.write(b"\0" * chunk)
            size -= chunk
    return filler


def numbers(gateway: GatewayProcess) -> list[int]:
    with sqlite3.connect(f"file:{gateway.db_path}?mode=ro", uri=True, timeout=10) as conn:
        rows = conn.execute("SELECT value FROM telemetry WHERE device_id LIKE 'fault-%' AND metric = 'v'")
        return sorted(int(v) for (v,) in rows)


def requests_filed(gateway: GatewayProcess) -> int:
    """Service requests the desk keeps, one per terminal request id."""
    path = gateway.db_path.with_name("services.sqlite3")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as conn:
        return int(conn.execute("SELECT count(DISTINCT request_key) FROM requests").fetchone()[0])


def answers(gateway: GatewayProcess) -> bool:
    """The API serves reads: the device list and the requests filed."""
    headers = {"Authorization": f"Bearer {OPERATOR}"}
    devices = httpx.get(f"{gateway.url}/api/v1/devices", headers=headers, timeout=5)
    return devices.status_code == 200 and httpx.get(f"{gateway.url}/healthz", timeout=5).status_code == 200


def test_raw_telemetry_gives_way_before_the_disk_is_full(
    small_disk: Path, tmp_path: Path, mosquitto: MosquittoProcess, publisher: Publisher
) -> None:
    gateway = gateway_on(small_disk, tmp_path / "gw", mosquitto, CGW_STORE__MIN_FREE_BYTES=str(8 * MIB))
    try:
        publisher.publish(3000)
        wait_for(lambda: len(numbers(gateway)) == 3000, 60, "the first readings")
        fill(small_disk, 8 * MIB - 64 * 1024)  # below store.min_free_bytes
        wait_for(lambda: "deleted the oldest" in gateway.log_text(), 30, "raw telemetry to give way")
        assert gateway.checks()["local_store"]["ok"] is False  # /readyz says so
        publisher.publish(3000)
        # Still taken and kept: the newest readings land in the room the oldest left.
        wait_for(lambda: set(range(3000, 6000)) <= set(numbers(gateway)), 60, "the newest readings")
        assert numbers(gateway)[0] > 0 and shutil.disk_usage(small_disk).free > 0
        assert requests_filed(gateway) == len(publisher.requests)  # service records are all kept
        assert answers(gateway)
    finally:
        gateway.stop()


def test_at_a_full_disk_nothing_is_acknowledged_and_the_gateway_recovers_by_itself(
    small_disk: Path, tmp_path: Path, mosquitto: MosquittoProcess, publisher: Publisher
) -> None:
    # store.min_free_bytes 0: nothing gives way, the disk fills up for real.
    gateway = gateway_on(small_disk, tmp_path / "gw", mosquitto, CGW_STORE__MIN_FREE_BYTES="0")
    try:
        publisher.publish(1000)
        wait_for(lambda: len(numbers(gateway)) == 1000, 60, "the first readings")
        filler = fill(small_disk, 0)
        publisher.publish(20_000, rate=5000)
        wait_for(lambda: "full" in gateway.log_text(), 60, "the store to find the disk full")
        held = len(numbers(gateway))
        assert held < publisher.sent  # the broker holds what could not be kept...
        assert answers(gateway)  # ...and the API goes on serving
        filler.unlink()  # room again
        wait_for(lambda: numbers(gateway) == list(range(publisher.sent)), 120, "every reading, once")
        assert requests_filed(gateway) == len(publisher.requests)  # every service request, once
        wait_for(lambda: gateway.checks().get("local_store", {}).get("ok"), 30, "the store ready again")
    finally:
        gateway.stop()
