"""deploy/install.sh, run for real into a staging root (`--root`: no apt, users or systemd).

It must leave a gateway that starts with the settings, secrets and MQTT accounts it made: the
gateway logs in to a Mosquitto that uses the generated password file and ACL, a device added to
the inventory can publish after the script runs again, and the operator token opens the API.
Running it again keeps settings, secrets and passwords, and backs up the stores first.
"""

from __future__ import annotations

import csv
import os
import subprocess
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.harness import mosquitto_pub
from tests.services import RUNNING, MosquittoProcess, free_port, start_logged, wait_for

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).parent.parent / "deploy" / "install.sh"


def install(root: Path) -> str:
    result = subprocess.run(
        ["bash", str(SCRIPT), "--root", str(root), "--community", "staged"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value.strip("'")
    return out


def credentials(root: Path) -> dict[str, str]:
    with (root / "etc/mosquitto/cgw-auth/credentials.csv").open() as f:
        return {row["username"]: row["password"] for row in csv.DictReader(f)}


def test_install_run_and_upgrade(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = install(root)
    etc = root / "etc/cgw"
    cgw = root / "opt/cgw/.venv/bin/cgw"
    assert cgw.exists()
    assert (root / "etc/systemd/system/cgw.service").read_text().count("/opt/cgw/.venv/bin/cgw") == 2
    assert (root / "etc/mosquitto/conf.d/cgw.conf").exists()
    assert oct((etc / "cgw.env").stat().st_mode & 0o777) == "0o600"
    secrets = read_env(etc / "cgw.env")
    token = next(iter(orjson.loads(secrets["CGW_AUTH__TOKENS"])))
    assert token in first  # shown once, at the first install
    assert secrets["CGW_MQTT__PASSWORD"] == credentials(root)["cgw-gateway"]

    # A device is added to the inventory; the script runs again (an upgrade, with a store).
    state = root / "var/lib/cgw"
    state.mkdir(parents=True, exist_ok=True)
    (etc / "inventory.yaml").write_text(
        "devices:\n  - device_id: b1-aq\n    kind: air_quality\n    location: {building: '1', floor: 2}\n"
    )
    broker = MosquittoProcess(
        tmp_path / "broker",
        extra=(
            "allow_anonymous false\n"
            f"password_file {root}/etc/mosquitto/cgw-auth/passwd\n"
            f"acl_file {root}/etc/mosquitto/cgw-auth/acl\n"
        ),
    )
    gateway_env = {
        **os.environ,
        **secrets,
        "CGW_DATA_DIR": str(state),
        "CGW_INVENTORY": str(etc / "inventory.yaml"),
        "CGW_API__PORT": str(free_port()),
    }
    run_once(cgw, etc, gateway_env, broker, device=None)  # makes the stores the upgrade backs up

    second = install(root)
    assert "operator token" not in second
    assert read_env(etc / "cgw.env") == secrets
    accounts = credentials(root)
    assert accounts["cgw-gateway"] == secrets["CGW_MQTT__PASSWORD"] and "b1-aq" in accounts
    backups = list((root / "var/backups/cgw").glob("cgw-backup-staged-*/manifest.json"))
    assert len(backups) == 1
    # Stores, backups and secrets are their owner's alone, made so by the code (not the umask).
    private = {
        **{path: 0o600 for path in (root / "etc/mosquitto/cgw-auth").iterdir()},
        **{path: 0o600 for path in backups[0].parent.iterdir()},
        **{path: 0o600 for path in state.glob("*.sqlite3*")},
        root / "etc/mosquitto/cgw-auth": 0o700,
        backups[0].parent: 0o700,
        state: 0o700,
    }
    assert len(private) >= 9
    assert {path: path.stat().st_mode & 0o777 for path in private} == private

    run_once(cgw, etc, gateway_env, broker, device=("b1-aq", accounts["b1-aq"]), token=token)


def run_once(
    cgw: Path,
    etc: Path,
    env: dict[str, str],
    broker: MosquittoProcess,
    device: tuple[str, str] | None,
    token: str | None = None,
) -> None:
    """Start the installed gateway against a broker with the generated accounts; stop it."""
    broker.start()
    env = {**env, "CGW_MQTT__URL": broker.url}
    url = f"http://127.0.0.1:{env['CGW_API__PORT']}"
    command = [str(cgw), "run", "--config", str(etc / "cgw.yaml")]
    process, copy = start_logged(command, broker.folder / "gateway.log", RUNNING, timeout=30, env=env)
    try:
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=2).json()["ready"], 30, "the gateway's login")
        if device is not None and token is not None:
            name, password = device
            reading = {"ts": int(time.time() * 1000), "metrics": {"pm25": 17.0}}
            mosquitto_pub(
                broker.port, f"cgw/v1/{name}/telemetry", orjson.dumps(reading), "-u", name, "-P", password
            )
            headers = {"Authorization": f"Bearer {token}"}

            def stored() -> bool:
                answer = httpx.get(f"{url}/api/v1/devices/{name}", headers=headers, timeout=5).json()
                return bool(answer.get("last_values", {}).get("pm25") == 17.0)

            wait_for(stored, 20, "the device's reading through the generated account")
            page = httpx.get(f"{url}/dashboard/", timeout=5)
            assert page.status_code == 200 and "社区网关" in page.text
    finally:
        process.terminate()
        process.wait(timeout=30)
        copy.join()
        broker.stop()
