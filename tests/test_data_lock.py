"""One gateway per data folder (gateway/store/lock.py): a second is refused, naming the first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.doctor import run_checks
from gateway.settings import load_settings
from gateway.store.lock import DataDirInUse, DataDirLock, holder
from tests.services import GatewayProcess, MosquittoProcess, free_port


def test_a_held_folder_is_refused_with_its_holder(tmp_path: Path) -> None:
    first, second = DataDirLock(tmp_path / "data"), DataDirLock(tmp_path / "data")
    first.acquire()
    try:
        assert holder(tmp_path / "data") is not None
        with pytest.raises(
            DataDirInUse, match=rf"data dir {tmp_path}/data is in use by pid {os.getpid()} \("
        ):
            second.acquire()
    finally:
        first.release()
    assert holder(tmp_path / "data") is None
    second.acquire()  # free again once released
    second.release()


@pytest.mark.integration
def test_a_second_gateway_on_the_same_folder_stops_and_names_the_first(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    gateway = GatewayProcess(tmp_path / "gw", {"CGW_MQTT__URL": mosquitto.url, "CGW_COMMUNITY": "lockville"})
    gateway.start()
    try:
        env = {**gateway.env, "CGW_API__PORT": str(free_port()), "COLUMNS": "40"}
        second = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "run"], env=env, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 1
        data = tmp_path / "gw" / "data"
        assert second.stderr.strip() == (
            f"error: data dir {data} is in use by pid {gateway.pid} (cgw run): stop it first, or give "
            "this one its own folder (CGW_DATA_DIR; cgw demo --data-dir)"
        )
        # cgw doctor says who holds it, and finds nothing wrong in that.
        found = [f for f in run_checks(load_settings(env=env)) if f.check == "data dir"]
        assert any(f.ok and f"in use by pid {gateway.pid} (cgw run)" in f.detail for f in found), found
    finally:
        gateway.stop()
    # A stop ends with a line that says so, after the drain.
    last = gateway.log_text().splitlines()[-1]
    assert last.endswith("INFO    gateway.application: gateway for community lockville stopped"), last
    assert holder(tmp_path / "gw" / "data") is None  # and the folder is free again
