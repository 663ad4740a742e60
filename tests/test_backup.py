"""`cgw backup` while the gateway runs, and `cgw restore` into an empty box: the data comes back;
a damaged or too-new backup, or a running gateway, is refused with one line."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness import api, eventually, gateway_settings, mosquitto_pub, running
from tests.services import free_port

pytestmark = pytest.mark.integration

CGW = [sys.executable, "-m", "gateway.cli"]


def cgw(data_dir: Path, *args: str, port: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CGW_DATA_DIR": str(data_dir), "CGW_COMMUNITY": "testville",
           "CGW_API__PORT": str(port or free_port())}  # fmt: skip
    return subprocess.run([*CGW, *args], capture_output=True, text=True, env=env, timeout=60)


async def test_a_backup_made_while_running_restores_everything(tmp_path: Path, mosquitto: Any) -> None:
    data = tmp_path / "data"
    settings = gateway_settings(data, mosquitto.url)
    async with running(settings) as gw, api(gw) as client, api(gw, "terminal-token") as terminal:
        mosquitto_pub(mosquitto.port, "cgw/v1/keep-1/telemetry", '{"metrics":{"v":42}}')
        form = {"service_code": "elderly.home_visit", "description": "kept", "building": "1"}
        filed = (await terminal.post("/open311/v2/requests.json", data=form)).json()[0]["service_request_id"]

        async def stored() -> Any:
            return (await client.get("/api/v1/devices/keep-1")).status_code == 200

        await eventually(stored, 10, "the reading")
        await gw.writer.drain()
        made = await asyncio.to_thread(cgw, data, "backup", "--out", str(tmp_path / "backups"))
        assert made.returncode == 0, made.stderr
        # While the gateway answers, restore refuses to touch its files.
        (folder,) = (tmp_path / "backups").iterdir()
        # (In a thread: this test's event loop serves the API that restore asks.)
        busy = await asyncio.to_thread(cgw, data, "restore", str(folder), "--yes", port=gw.api_port)
        assert busy.returncode == 1 and "stop it first" in busy.stderr
    shutil.rmtree(data)  # the box's disk is replaced
    done = cgw(data, "restore", str(folder), "--yes")
    assert done.returncode == 0, done.stderr
    async with running(settings) as gw, api(gw, "operator-token") as client:
        device = (await client.get("/api/v1/devices/keep-1")).json()
        assert device["last_values"] == {"v": 42.0}
        request = (await client.get(f"/api/v1/requests/{filed}")).json()
        assert request["description"] == "kept"


def test_a_damaged_or_too_new_backup_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    import sqlite3

    for name in ("cgw.sqlite3", "services.sqlite3"):
        with sqlite3.connect(data / name) as conn:
            conn.execute("CREATE TABLE t (x)")
    made = cgw(data, "backup", "--out", str(tmp_path / "b"))
    assert made.returncode == 0, made.stderr
    (folder,) = (tmp_path / "b").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["cgw.sqlite3"]["schema"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    newer = cgw(data, "restore", str(folder), "--yes")
    assert newer.returncode == 1 and "upgrade cgw" in newer.stderr
    with (folder / "services.sqlite3").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff")
    damaged = cgw(data, "restore", str(folder), "--yes")
    assert damaged.returncode == 1 and "damaged" in damaged.stderr
    assert cgw(data, "restore", str(tmp_path)).returncode == 1  # not a backup at all
