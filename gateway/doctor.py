"""`cgw doctor`: checks a deployment and says, one line per problem, how to fix it.

Checks the settings, the data directory and disk space, the local store, the broker (with the
configured credentials), the time-series store (reachable, token accepted) and the clock.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway.profiles import ProfileError, load_profiles
from gateway.registry import InventoryError, load_inventory
from gateway.settings import Settings
from gateway.store.schema import MIGRATIONS, connect

MIN_FREE_MB = 500
MAX_CLOCK_SKEW_S = 5.0


@dataclass(frozen=True, slots=True)
class Finding:
    ok: bool
    check: str
    detail: str  # when not ok: what is wrong and how to fix it


def run_checks(settings: Settings, timeout_s: float = 5.0) -> list[Finding]:
    findings = [
        _profiles_and_inventory(settings),
        _data_dir(settings.data_dir),
        _local_store(settings),
        _broker(settings, timeout_s),
    ]
    findings.extend(_timeseries(settings, timeout_s))
    return findings


def _profiles_and_inventory(settings: Settings) -> Finding:
    try:
        profiles = load_profiles(settings.profiles_dir)
        devices = load_inventory(settings.inventory, profiles) if settings.inventory else []
    except (ProfileError, InventoryError) as exc:
        return Finding(False, "profiles/inventory", str(exc))
    where = (
        f"inventory {settings.inventory}: {len(devices)} devices" if settings.inventory else "no inventory"
    )
    if settings.registration == "closed" and not devices:
        return Finding(
            False,
            "profiles/inventory",
            "registration is closed but the inventory lists no device: every message will be "
            "refused; set CGW_INVENTORY to the inventory file or CGW_REGISTRATION=open",
        )
    return Finding(True, "profiles/inventory", f"{len(profiles.kinds)} profiles, {where}")


def _data_dir(path: Path) -> Finding:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".cgw-doctor"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return Finding(
            False,
            "data dir",
            f"{path} is not writable ({exc.strerror}): fix its owner/permissions or set CGW_DATA_DIR",
        )
    free_mb = shutil.disk_usage(path).free // (1024 * 1024)
    if free_mb < MIN_FREE_MB:
        return Finding(
            False,
            "disk",
            f"only {free_mb} MiB free under {path}: free space or move CGW_DATA_DIR "
            f"(want ≥ {MIN_FREE_MB} MiB)",
        )
    return Finding(True, "data dir", f"{path} writable, {free_mb} MiB free")


def _local_store(settings: Settings) -> Finding:
    path = settings.db_path
    if not path.exists():
        return Finding(True, "local store", f"{path} will be created on first start")
    try:
        conn = connect(path, synchronous="NORMAL")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            integrity = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return Finding(
            False, "local store", f"{path} cannot be opened ({exc}): restore a backup or move it away"
        )
    if integrity != "ok":
        return Finding(False, "local store", f"{path} is damaged ({integrity}): restore a backup")
    if version > len(MIGRATIONS):
        return Finding(False, "local store", f"{path} is from a newer cgw (schema {version}): upgrade cgw")
    note = "" if version == len(MIGRATIONS) else f" (will migrate {version} → {len(MIGRATIONS)})"
    return Finding(True, "local store", f"{path} ok, schema {version}{note}")


def _broker(settings: Settings, timeout_s: float) -> Finding:
    s = settings.mqtt
    done = threading.Event()
    outcome: list[str] = []

    def on_connect(
        client: paho.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        outcome.append(str(reason))
        done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"cgw-doctor-{int(time.time())}")
    if s.username:
        client.username_pw_set(s.username, s.password.get_secret_value() if s.password else None)
    if s.tls:
        try:
            client.tls_set(ca_certs=str(s.tls_ca) if s.tls_ca else None)
        except (OSError, ValueError) as exc:
            return Finding(False, "broker", f"TLS set-up failed ({exc}): check CGW_MQTT__TLS_CA")
        client.tls_insecure_set(s.tls_insecure)
    client.on_connect = on_connect
    try:
        client.connect(s.host, s.port, keepalive=10)
    except OSError as exc:
        return Finding(
            False,
            "broker",
            f"cannot reach {s.url} ({exc}): start Mosquitto (systemctl start mosquitto) or fix CGW_MQTT__URL",
        )
    client.loop_start()
    try:
        if not done.wait(timeout_s):
            return Finding(
                False, "broker", f"{s.url} accepted TCP but did not answer MQTT within {timeout_s:.0f} s"
            )
    finally:
        client.disconnect()
        client.loop_stop()
    if outcome[0] != "Success":
        return Finding(
            False,
            "broker",
            f"{s.url} refused the connection ({outcome[0]}): check CGW_MQTT__USERNAME / CGW_MQTT__PASSWORD",
        )
    return Finding(True, "broker", f"connected to {s.url}")


def _timeseries(settings: Settings, timeout_s: float) -> list[Finding]:
    s = settings.influx
    if not s.enabled:
        return [
            Finding(True, "time-series store", "not configured (CGW_INFLUX__URL empty): local store only")
        ]
    headers = {"Authorization": f"Token {s.token.get_secret_value()}"}
    try:
        with httpx.Client(timeout=timeout_s) as http:
            health = http.get(f"{s.url}/health")
            write = http.post(
                f"{s.url}/api/v2/write",
                params={"org": s.org, "bucket": s.bucket, "precision": "ms"},
                content=f"cgw_doctor,community={settings.community} ok=1 {int(time.time() * 1000)}",
                headers=headers,
            )
    except httpx.HTTPError as exc:
        return [
            Finding(
                False,
                "time-series store",
                f"cannot reach {s.url} ({exc}): start InfluxDB or fix CGW_INFLUX__URL",
            )
        ]
    findings: list[Finding] = []
    if write.status_code in (401, 403):
        findings.append(
            Finding(
                False,
                "time-series store",
                f"{s.url} refused the token ({write.status_code}): check CGW_INFLUX__TOKEN",
            )
        )
    elif write.status_code == 404:
        findings.append(
            Finding(
                False,
                "time-series store",
                f"{s.url}: org {s.org!r} or bucket {s.bucket!r} not found "
                f"({write.text.strip()[:120]}): check CGW_INFLUX__ORG / CGW_INFLUX__BUCKET",
            )
        )
    elif write.status_code >= 300:
        findings.append(
            Finding(
                False,
                "time-series store",
                f"{s.url} answered {write.status_code} to a test write: {write.text.strip()[:160]}",
            )
        )
    else:
        findings.append(Finding(True, "time-series store", f"{s.url} accepts writes to {s.org}/{s.bucket}"))
    findings.append(_clock(health.headers.get("date"), s.url))
    return findings


def _clock(date_header: str | None, source: str) -> Finding:
    if not date_header:
        return Finding(True, "clock", "no reference clock to compare with")
    try:
        server_time = parsedate_to_datetime(date_header).timestamp()
    except (TypeError, ValueError):
        return Finding(True, "clock", "the server's Date header could not be read")
    skew = time.time() - server_time
    if abs(skew) > MAX_CLOCK_SKEW_S:
        return Finding(
            False,
            "clock",
            f"this box's clock is {skew:+.0f} s off {source}: enable NTP (timedatectl set-ntp true)",
        )
    return Finding(True, "clock", f"within {abs(skew):.0f} s of {source}")
