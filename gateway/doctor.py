"""`cgw doctor`: checks a deployment and says, one line per problem, how to fix it.

Checks the settings (profiles, inventory, uplink telemetry choice, API tokens), the data
directory (writable, not lost at reboot, room for the outbox), both stores, the API port, the
broker and the district uplink (with the configured credentials), the time-series store
(reachable, token accepted) and the clock. A check changes nothing: a data directory that is not
there yet is reported as created on first start, not made. docs/operations.md lists every finding.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

from gateway.clock import FLOOR_FILE, kernel_synced, now_ms, read_floor
from gateway.mqtt.client import Client, ConnectRefused, MqttError, NotMqtt5, SubscriptionRefused
from gateway.mqtt.diagnosis import why_not_subscribed
from gateway.mqtt.mqtt311 import broker_client, refused_filters
from gateway.profiles import ProfileError, load_profiles
from gateway.registry import InventoryError, load_inventory
from gateway.services.schema import MIGRATIONS as SERVICE_MIGRATIONS
from gateway.settings import MIN_TOKEN_LENGTH, BrokerSettings, Settings, hidden
from gateway.sqlite import connect
from gateway.store.lock import holder as lock_holder
from gateway.store.schema import MIGRATIONS
from gateway.topics import SUBSCRIPTIONS

MIN_FREE_MB = 500
MAX_CLOCK_SKEW_S = 5.0


@dataclass(frozen=True, slots=True)
class Finding:
    ok: bool
    check: str
    detail: str  # when not ok: what is wrong and how to fix it
    # A problem the gateway can run with (it is told, as WARN) does not fail `cgw doctor`, which
    # the systemd unit runs before every start.
    blocking: bool = True


# Filesystems the kernel presents, in which no data folder can be made.
KERNEL_FILESYSTEMS = frozenset(
    {"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "pstore", "bpf", "configfs"}
)
# Filesystems whose content is gone after a reboot.
VOLATILE = frozenset({"tmpfs", "ramfs"})


def run_checks(settings: Settings, timeout_s: float = 5.0, token: str | None = None) -> list[Finding]:
    findings = [
        _profiles_and_inventory(settings),
        _registration(settings),
        _data_dir(settings.data_dir),
        _volatile(settings.data_dir),
        _clock_floor(settings.data_dir),
        _outbox_room(settings),
        _store("local store", settings.db_path, len(MIGRATIONS)),
        _store("service desk", settings.services_db_path, len(SERVICE_MIGRATIONS)),
        _tokens(settings),
        _api_port(settings),
        _broker(
            "broker",
            settings.mqtt,
            "CGW_MQTT",
            timeout_s,
            mqtt5=settings.mqtt.protocol == "5",
            subscribe=SUBSCRIPTIONS,
        ),
    ]
    if settings.uplink.enabled:
        findings.append(_uplink_choice(settings))
        # The outbox keeps what the district has not taken: the gateway may start without it.
        uplink = _broker("uplink", settings.uplink, "CGW_UPLINK", timeout_s)
        findings.append(Finding(uplink.ok, uplink.check, uplink.detail, blocking=False))
    findings.extend(_timeseries(settings, timeout_s))
    findings.extend(_running_gateway(settings, token))
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


def _registration(settings: Settings) -> Finding:
    if settings.registration == "closed":
        return Finding(True, "registration", "closed: only the inventory's devices are heard")
    # Open is how a first day starts; on a network anyone in the building can reach, it lets
    # any client invent devices (up to the cap), so it is said every time.
    return Finding(
        False,
        "registration",
        f"open: any client may register up to {settings.registration_max_devices} devices of its own; "
        "once the inventory lists the real ones, set CGW_REGISTRATION=closed",
        blocking=False,
    )


def _data_dir(path: Path) -> Finding:
    """Writable, or creatable by this user; a check creates nothing (the gateway makes it)."""
    existing = _nearest_existing(path)
    if existing != path and not existing.is_dir():
        return Finding(
            False, "data dir", f"{path} cannot be created: {existing} is not a folder; set CGW_DATA_DIR"
        )
    fstype = _filesystem(existing)
    if fstype in KERNEL_FILESYSTEMS or os.statvfs(existing).f_flag & os.ST_RDONLY:
        # os.access says yes to root here, yet nothing can be made in them.
        on = f"the kernel's {fstype}" if fstype in KERNEL_FILESYSTEMS else "a read-only filesystem"
        what = "is not writable" if existing == path else "cannot be created"
        return Finding(False, "data dir", f"{path} {what}: {existing} is on {on}; set CGW_DATA_DIR")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        return Finding(
            False, "data dir", f"{path} {what} by this user: fix its owner/permissions or set CGW_DATA_DIR"
        )
    free_mb = shutil.disk_usage(existing).free // (1024 * 1024)
    if free_mb < MIN_FREE_MB:
        return Finding(
            False,
            "disk",
            f"only {free_mb} MiB free under {path}: free space or move CGW_DATA_DIR "
            f"(want ≥ {MIN_FREE_MB} MiB)",
        )
    state = "writable" if existing == path else "will be created on first start"
    held = lock_holder(path) if existing == path else None
    in_use = f"; in use by {held}" if held else ""
    return Finding(True, "data dir", f"{path} {state}, {free_mb} MiB free{in_use}")


def _nearest_existing(path: Path) -> Path:
    """`path`, or its closest ancestor that exists."""
    path = path.absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _store(check: str, path: Path, known: int) -> Finding:
    if not path.exists():
        return Finding(True, check, f"{path} will be created on first start")
    try:
        conn = connect(path, synchronous="NORMAL")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            integrity = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return Finding(False, check, f"{path} cannot be opened ({exc}): restore a backup or move it away")
    if integrity != "ok":
        return Finding(False, check, f"{path} is damaged ({integrity}): restore a backup (cgw restore)")
    if version > known:
        return Finding(False, check, f"{path} is from a newer cgw (schema {version}): upgrade cgw")
    note = "" if version == known else f" (will migrate {version} → {known})"
    return Finding(True, check, f"{path} ok, schema {version}{note}")


def _volatile(path: Path) -> Finding:
    fstype = _filesystem(_nearest_existing(path))
    if fstype in VOLATILE:
        return Finding(
            False,
            "data dir",
            f"{path} is on {fstype}: the stores and the outbox are lost at every reboot; "
            "set CGW_DATA_DIR to a disk folder (e.g. /var/lib/cgw)",
            blocking=False,
        )
    return Finding(True, "data dir", f"{path} is on {fstype or 'an unknown filesystem'}")


def _filesystem(path: Path) -> str | None:
    """The type of the filesystem `path` is on, from /proc/mounts (None where there is none)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = path.resolve()
    best, fstype = -1, None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(fields[1].replace("\\040", " "))
        if (target == point or point in target.parents) and len(point.parts) > best:
            best, fstype = len(point.parts), fields[2]
    return fstype


def _outbox_room(settings: Settings) -> Finding:
    try:
        free = shutil.disk_usage(_nearest_existing(settings.data_dir)).free
    except OSError:
        return Finding(True, "outbox", "the data dir is not there yet")
    bound = settings.outbox.max_bytes
    if bound > free:
        return Finding(
            False,
            "outbox",
            f"outbox.max_bytes is {bound // 2**20} MiB but only {free // 2**20} MiB are free: a long "
            "outage would fill the disk before the outbox bound applies; lower CGW_OUTBOX__MAX_BYTES",
            blocking=False,
        )
    return Finding(True, "outbox", f"bound {bound // 2**20} MiB, {free // 2**20} MiB free")


def _tokens(settings: Settings) -> Finding:
    grants = settings.auth.digests()
    if not grants:
        return Finding(
            False,
            "api tokens",
            "no API token is set: nobody can use the API or the dashboard; make one with "
            "`cgw token --role operator` and put it in CGW_AUTH__TOKEN_HASHES (or CGW_AUTH__TOKENS)",
            blocking=False,
        )
    now = time.time()
    expired = [g.name or "unnamed" for g in grants.values() if g.expires and g.expires.timestamp() <= now]
    live = len(grants) - len(expired)
    if not live:
        return Finding(
            False,
            "api tokens",
            "every API token has expired: make a new one with `cgw token`",
            blocking=False,
        )
    short = sorted(hidden(token) for token in settings.auth.tokens if len(token) < MIN_TOKEN_LENGTH)
    if short:
        return Finding(
            False,
            "api tokens",
            f"{len(short)} of {len(grants)} shorter than {MIN_TOKEN_LENGTH} characters, easy to guess "
            f"({', '.join(short)}): replace them with `cgw token`",
            blocking=False,
        )
    if expired:
        return Finding(
            True, "api tokens", f"{live} valid; expired (remove them): {', '.join(sorted(expired))}"
        )
    return Finding(True, "api tokens", f"{live} valid")


def _api_port(settings: Settings) -> Finding:
    host, port = settings.api.host, settings.api.port
    if port == 0:
        return Finding(True, "api", "a free port is chosen at start")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return Finding(True, "api", f"{host}:{port} is free")
        except OSError as exc:
            bind_error = exc
    # Taken: by this gateway (fine, it is running) or by something else?
    try:
        answer = httpx.get(f"{_api_url(settings)}/healthz", timeout=2).json()
        if isinstance(answer, dict) and answer.get("status") == "ok":
            return Finding(True, "api", f"{host}:{port} is served by a running gateway")
    except (httpx.HTTPError, ValueError):
        pass
    return Finding(
        False,
        "api",
        f"cannot listen on {host}:{port} ({bind_error.strerror}): another program holds it; "
        "stop it or set CGW_API__PORT",
    )


def _api_url(settings: Settings) -> str:
    """Where a gateway running with these settings answers on this machine."""
    host, port = settings.api.host, settings.api.port
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    return f"http://[{probe}]:{port}" if ":" in probe else f"http://{probe}:{port}"


def _running_gateway(settings: Settings, token: str | None) -> list[Finding]:
    """What a gateway running with these settings says of itself (its /readyz, whose details
    need a token): how fast it writes to its storage and the medium's projected life
    (gateway/wear.py), and whether its wall clock jumped (gateway/clock.py)."""
    if settings.api.port == 0:
        return []
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        checks = httpx.get(f"{_api_url(settings)}/readyz", headers=headers, timeout=2).json()["checks"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return []  # none running: nothing to say
    if not isinstance(checks, dict):
        return []
    found = []
    for key, name in (("disk_writes", "disk writes"), ("clock", "clock jumps")):
        check = checks.get(key)
        if isinstance(check, dict) and "detail" in check:
            detail = str(check["detail"])
            found.append(Finding(not detail.startswith("NOT SET"), name, detail, blocking=False))
    if found or "disk_writes" not in checks:
        return found
    return [
        Finding(
            True,
            "disk writes",
            "a gateway is running; give cgw doctor --token (an operator, installer or metrics token, "
            "or CGW_DOCTOR_TOKEN) to see its write rate and its clock",
            blocking=False,
        )
    ]


def _uplink_choice(settings: Settings) -> Finding:
    profiles = load_profiles(settings.profiles_dir)
    for selector in settings.uplink.telemetry:
        kind, _, metric = selector.partition(".")
        profile = profiles.get(kind)
        if profile is None:
            return Finding(
                False,
                "uplink",
                f"uplink.telemetry names {kind!r}, which is no device kind (known: "
                f"{', '.join(profiles.kinds)}): fix CGW_UPLINK__TELEMETRY",
            )
        if metric and profile.strict and metric not in profile.metrics:
            return Finding(
                False,
                "uplink",
                f"uplink.telemetry names {selector!r}, but {kind} has no metric {metric!r} (it has "
                f"{', '.join(sorted(profile.metrics))}): fix CGW_UPLINK__TELEMETRY",
            )
    chosen = ", ".join(settings.uplink.telemetry) or "no telemetry"
    return Finding(True, "uplink", f"sends requests, ratings, alarms, snapshots and {chosen}")


def _broker(
    check: str,
    s: BrokerSettings,
    env: str,
    timeout_s: float,
    mqtt5: bool = False,
    subscribe: Sequence[str] = (),
) -> Finding:
    """Connect and log in as the gateway would (`mqtt5`: in MQTT 5 on the gateway's own client, as
    its default driver does; else paho's MQTT 3.1.1), and ask for its `subscribe` topic filters;
    `env` names the settings in the advice."""
    if mqtt5:
        return asyncio.run(_broker5(check, s, env, timeout_s, subscribe))
    done = threading.Event()
    outcome: list[str] = []
    refusals: list[tuple[str, str]] = []

    def on_connect(
        client: paho.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        outcome.append(str(reason))
        if reason.is_failure or not subscribe:
            done.set()
        else:
            client.subscribe([(topic, 1) for topic in subscribe])

    def on_subscribe(
        client: paho.Client, userdata: object, mid: int, reason_codes: list[ReasonCode], props: object
    ) -> None:
        refusals.extend(refused_filters(subscribe, reason_codes))
        done.set()

    try:
        # The same client set-up as the gateway's own (login, TLS), so what passes here works there.
        client = broker_client(
            s,
            f"cgw-doctor-{int(time.time())}",
            clean_session=True,
            manual_ack=False,
            on_connect=on_connect,
            on_subscribe=on_subscribe,
        )
    except (OSError, ValueError) as exc:
        return _tls_setup_failed(check, env, exc)
    try:
        client.connect(s.host, s.port, keepalive=10)
    except OSError as exc:
        return _unreachable(check, s, env, exc)
    client.loop_start()
    try:
        if not done.wait(timeout_s):
            return _silent(check, s, env, timeout_s, "MQTT")
    finally:
        client.disconnect()
        client.loop_stop()
    if outcome[0] != "Success":
        return _refused(check, s, env, outcome[0])
    if refusals:
        return Finding(False, check, why_not_subscribed(s.url, refusals, env))
    return Finding(True, check, f"connected to {s.url}")


async def _broker5(
    check: str, s: BrokerSettings, env: str, timeout_s: float, subscribe: Sequence[str]
) -> Finding:
    try:
        client = Client(s, f"cgw-doctor-{int(time.time())}")
        await asyncio.wait_for(client.connect(), timeout_s)
    except NotMqtt5 as exc:
        return Finding(
            False,
            check,
            f"{s.url} did not answer MQTT 5's CONNECT ({exc}): a broker without MQTT 5? "
            f"Then set {env}__PROTOCOL=3.1.1; or is it a TLS port (use mqtts://)? check {env}__URL",
        )
    except ConnectRefused as exc:
        return _refused(check, s, env, exc.reason)
    except TimeoutError:
        return _silent(check, s, env, timeout_s, "MQTT 5")
    except (ssl.SSLError, ValueError) as exc:
        return _tls_setup_failed(check, env, exc)
    except OSError as exc:
        return _unreachable(check, s, env, exc)
    try:
        if subscribe:
            await asyncio.wait_for(client.subscribe(subscribe), timeout_s)
    except SubscriptionRefused as exc:
        return Finding(False, check, why_not_subscribed(s.url, exc.refusals, env))
    except (MqttError, TimeoutError) as exc:
        return Finding(
            False, check, f"{s.url} did not answer SUBSCRIBE ({exc or 'no answer'}): check {env}__URL"
        )
    finally:
        await client.disconnect()
    return Finding(True, check, f"connected to {s.url} (MQTT 5)")


def _tls_setup_failed(check: str, env: str, exc: Exception) -> Finding:
    return Finding(False, check, f"TLS set-up failed ({exc}): check {env}__TLS_CA")


def _unreachable(check: str, s: BrokerSettings, env: str, exc: OSError) -> Finding:
    hint = "start Mosquitto (systemctl start mosquitto) or " if env == "CGW_MQTT" else ""
    return Finding(False, check, f"cannot reach {s.url} ({exc}): {hint}fix {env}__URL")


def _silent(check: str, s: BrokerSettings, env: str, timeout_s: float, protocol: str) -> Finding:
    return Finding(
        False,
        check,
        f"{s.url} accepted TCP but did not answer {protocol} within {timeout_s:.0f} s: is it a TLS port "
        f"(use mqtts://)? check {env}__URL",
    )


def _refused(check: str, s: BrokerSettings, env: str, reason: str) -> Finding:
    return Finding(
        False, check, f"{s.url} refused the connection ({reason}): check {env}__USERNAME / {env}__PASSWORD"
    )


def _timeseries(settings: Settings, timeout_s: float) -> list[Finding]:
    s = settings.influx
    if not s.enabled:
        return [
            Finding(True, "time-series store", "not configured (CGW_INFLUX__URL empty): local store only")
        ]
    if not s.token.get_secret_value().strip():
        return [
            Finding(
                False,
                "time-series store",
                f"influx.url is {s.url} but the token is empty: InfluxDB v2 needs one that may write "
                f"to {s.org}/{s.bucket}; set CGW_INFLUX__TOKEN (or empty CGW_INFLUX__URL: no "
                "time-series sink)",
            )
        ]
    headers = {"Authorization": f"Token {s.token.get_secret_value()}"}
    try:
        with httpx.Client(timeout=timeout_s) as http:
            health = http.get(f"{s.url}/health")
            write = http.post(
                f"{s.url}/api/v2/write",
                params={"org": s.org, "bucket": s.bucket, "precision": "ms"},
                content=f"cgw_doctor,community={settings.community} ok=1 {now_ms()}",
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


def _clock_floor(
    data_dir: Path, now: Callable[[], int] = now_ms, synced: Callable[[], bool] = kernel_synced
) -> Finding:
    """Whether this box's clock is set: not earlier than the newest time the gateway saved in
    its data folder (gateway/clock.py). A box without a real-time clock is not, until NTP syncs;
    the gateway runs on its estimate meanwhile, so this does not block a start."""
    floor = read_floor(data_dir)
    if now() >= floor or synced():
        return Finding(True, "clock set", "not earlier than the newest time the gateway recorded")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(floor / 1000))
    return Finding(
        False,
        "clock set",
        f"this box's clock is earlier than the newest time the gateway recorded ({when}): it is not "
        "set (no real-time clock, NTP not synchronised yet); the gateway stamps with an estimate "
        "until it is. Enable NTP (timedatectl set-ntp true) or fit a real-time clock; if the clock "
        f"is right and that time was wrong, delete {data_dir / FLOOR_FILE}",
        blocking=False,
    )


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
