"""Authentication and authorisation, each refusal tested: per-device MQTT credentials and the ACL
made by `cgw mqtt-auth` in a real Mosquitto; MQTT over TLS; API tokens (unknown, missing,
expired, wrong role, too many writes); and no secret in the logs.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import getpass
import json
import logging
import os
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as paho
import pytest
import trustme
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from gateway.api.headers import allowed_names, host_of
from gateway.application import Gateway
from gateway.credentials import GATEWAY_USER, hash_password
from gateway.settings import (
    AuthSettings,
    MqttSettings,
    Settings,
    SettingsError,
    TokenGrant,
    UplinkSettings,
    load_settings,
)
from tests.harness import api, eventually, gateway_settings, mosquitto_pub, running
from tests.services import MosquittoProcess, free_port, start_notified, tls_files

pytestmark = pytest.mark.integration

CGW = [sys.executable, "-m", "gateway.cli"]


def pub(port: int, topic: str, message: str, *auth: str) -> subprocess.CompletedProcess[str]:
    """mosquitto_pub as a device would publish (QoS 1); the result says whether it was let in."""
    return subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic, "-m", message, *auth],
        capture_output=True,
        text=True,
        timeout=10,
    )


@pytest.fixture
def logs() -> Any:
    """Everything logged during the test, at every level (to look for secrets in it)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep(logging.DEBUG)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def with_mqtt(settings: Settings, **changes: Any) -> Settings:
    """The settings with MQTT changes, validated as if they came from the environment."""
    mqtt = MqttSettings.model_validate({**settings.mqtt.model_dump(), **changes})
    return settings.model_copy(update={"mqtt": mqtt})


@pytest.fixture
def locked_broker(tmp_path: Path) -> Any:
    """Mosquitto with the passwd and acl files `cgw mqtt-auth` made from an inventory."""
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        "devices:\n  - {device_id: dev-a, kind: generic}\n  - {device_id: dev-b, kind: generic}\n"
    )
    folder = tmp_path / "auth"
    made = subprocess.run(
        [*CGW, "mqtt-auth", "--inventory", str(inventory), "--out", str(folder)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "3 accounts (3 new)" in made.stdout
    with (folder / "credentials.csv").open() as handle:
        passwords = {row["username"]: row["password"] for row in csv.DictReader(handle)}
    assert (folder / "credentials.csv").stat().st_mode & 0o077 == 0  # the secret file is private
    broker = MosquittoProcess(
        tmp_path / "mosquitto",
        extra=f"allow_anonymous false\npassword_file {folder / 'passwd'}\nacl_file {folder / 'acl'}\n",
    )
    broker.start()
    try:
        yield broker, passwords, inventory, folder
    finally:
        broker.kill()


def test_password_hashes_are_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    # Same salt, Mosquitto's own iteration count: byte for byte what its tool writes.
    made = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(made), "alice", "s3cret"], check=True)
    _user, theirs = made.read_text().strip().split(":", 1)
    _, _, iterations, salt, _ = theirs.split("$")
    assert hash_password("s3cret", base64.b64decode(salt), int(iterations)) == theirs


async def test_each_device_may_publish_only_under_its_own_id(locked_broker: Any, logs: list[str]) -> None:
    broker, passwords, inventory, folder = locked_broker
    settings = gateway_settings(folder / "gw", broker.url, inventory=inventory)
    settings = with_mqtt(settings, username=GATEWAY_USER, password=passwords[GATEWAY_USER])
    port = broker.port
    # Refused at the door: anonymous, wrong password, unknown user.
    for auth in ((), ("-u", "dev-a", "-P", "wrong"), ("-u", "nobody", "-P", passwords["dev-a"])):
        refused = pub(port, "cgw/v1/dev-a/telemetry", '{"metrics":{"v":1}}', *auth)
        assert refused.returncode != 0 and "not authori" in (refused.stderr + refused.stdout).lower()
    async with running(settings) as gw, api(gw) as client:
        dev_a = ("-u", "dev-a", "-P", passwords["dev-a"])
        dev_b = ("-u", "dev-b", "-P", passwords["dev-b"])
        # dev-a forging dev-b's telemetry: Mosquitto accepts the publish but delivers nothing.
        assert pub(port, "cgw/v1/dev-b/telemetry", '{"metrics":{"v":666}}', *dev_a).returncode == 0
        assert pub(port, "cgw/v1/dev-a/telemetry", '{"metrics":{"v":1}}', *dev_a).returncode == 0
        assert pub(port, "cgw/v1/dev-b/telemetry", '{"metrics":{"v":2}}', *dev_b).returncode == 0

        async def both() -> Any:
            a = (await client.get("/api/v1/devices/dev-a")).json()
            b = (await client.get("/api/v1/devices/dev-b")).json()
            return a.get("last_values") == {"v": 1.0} and b.get("last_values") == {"v": 2.0}

        await eventually(both, 10, "both devices' own readings")
        await gw.writer.drain()
        with sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True) as conn:
            values = conn.execute("SELECT value FROM telemetry WHERE device_id = 'dev-b'").fetchall()
        assert values == [(2.0,)]  # the forged 666 never arrived
    # A gateway with a wrong password is refused, says so, and does not log the password.
    wrong = with_mqtt(settings, password="not-the-password")
    gateway = Gateway(wrong)
    task = asyncio.create_task(gateway.run())
    try:
        refused_detail = await eventually(
            lambda: _async(gateway.readiness()["broker"]["detail"] if gateway.mqtt.last_error else None),
            10,
            "the refusal",
        )
        assert "refused" in refused_detail
    finally:
        gateway.stop()
        await asyncio.wait_for(task, 30)
    text = "\n".join(logs)
    assert "refused the connection" in text
    for secret in [*passwords.values(), "not-the-password", "viewer-token", "operator-token"]:
        assert secret not in text


async def _async(value: Any) -> Any:
    return value


# The one socket left to the garbage collector here is the MQTT 5 client's to the broker after the
# refused TLS handshake (allocated inside asyncio's create_connection). Not yet traced to its
# cause (asyncio's SSL transport on a failed handshake, or our client): issue 17's note says so.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_mqtt_over_tls(tmp_path: Path) -> None:
    ca_file, cert_file, key_file = tls_files(tmp_path)
    broker = MosquittoProcess(
        tmp_path / "mosquitto", listener_extra=f"certfile {cert_file}\nkeyfile {key_file}\n"
    )
    broker.start()
    try:
        url = f"mqtts://127.0.0.1:{broker.port}"
        settings = with_mqtt(gateway_settings(tmp_path / "gw", url), url=url, tls_ca=ca_file)
        async with running(settings) as gw, api(gw) as client:
            sent = await asyncio.to_thread(
                subprocess.run,
                ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "--cafile", str(ca_file),
                 "-q", "1", "-t", "cgw/v1/tls-1/telemetry", "-m", '{"metrics":{"v":5}}'],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            assert sent.returncode == 0, sent.stderr

            async def arrived() -> Any:
                response = await client.get("/api/v1/devices/tls-1")
                return response.status_code == 200 and response.json()["last_values"] == {"v": 5.0}

            await eventually(arrived, 10, "the reading over TLS")
        # A gateway that does not trust the broker's certificate does not connect, and says why.
        other = trustme.CA()
        other_file = tmp_path / "other-ca.pem"
        other.cert_pem.write_to_path(str(other_file))
        untrusting = with_mqtt(settings, tls_ca=other_file)
        gateway = Gateway(untrusting)
        task = asyncio.create_task(gateway.run())
        try:
            error = await eventually(lambda: _async(gateway.mqtt.last_error), 10, "the TLS refusal")
            assert "certificate" in error.lower()
            assert not gateway.mqtt.connected
        finally:
            gateway.stop()
            await asyncio.wait_for(task, 30)
    finally:
        broker.kill()


async def test_api_tokens_are_refused_for_each_reason(
    tmp_path: Path, mosquitto: Any, logs: list[str]
) -> None:
    expired = "expired-operator-token"
    auth = AuthSettings(
        tokens={
            "viewer-token": "viewer",
            "operator-token": "operator",
            "terminal-token": "terminal",
            expired: TokenGrant(role="operator", expires=datetime.now(UTC) - timedelta(minutes=1)),
            "future-token": TokenGrant(role="operator", expires=datetime.now(UTC) + timedelta(days=1)),
        },
        write_rate_limit="5/minute",
    )
    settings = gateway_settings(tmp_path, mosquitto.url).model_copy(update={"auth": auth})
    async with running(settings) as gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.api_port}") as http:

        async def call(method: str, path: str, token: str | None, **kw: Any) -> httpx.Response:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return await http.request(method, path, headers=headers, **kw)

        body = {"service_code": "elderly.home_visit", "description": "x", "building": "1"}
        assert (await call("GET", "/api/v1/devices", None)).status_code == 401  # anonymous
        assert (await call("GET", "/api/v1/devices", "made-up")).json()["detail"] == "unknown token"
        stale = await call("GET", "/api/v1/devices", expired)
        assert stale.status_code == 401 and "expired" in stale.json()["detail"]
        assert (await call("GET", "/api/v1/devices", "future-token")).status_code == 200
        assert (await call("POST", "/api/v1/events/1/ack", "viewer-token")).status_code == 403  # wrong role
        # Open311 with api_key: the terminal may file; a viewer may not.
        form = {**body, "api_key": "viewer-token"}
        assert (await http.post("/open311/v2/requests.json", data=form)).status_code == 403
        # Writes per token are limited (5 a minute here); another token still has its own budget.
        form = {**body, "api_key": "terminal-token"}
        codes = [(await http.post("/open311/v2/requests.json", data=form)).status_code for _ in range(7)]
        assert codes[:5] == [201] * 5 and codes[5:] == [429, 429], codes
        # Another token's budget is its own: the operator's write goes through (to a missing event).
        other = await call("POST", "/api/v1/events/1/ack", "operator-token")
        assert other.status_code == 404, other.status_code
    text = "\n".join(logs)
    assert "writing faster than auth.write_rate_limit" in text
    for secret in ("viewer-token", "operator-token", "terminal-token", expired, "future-token", "made-up"):
        assert secret not in text


def test_the_token_command_makes_a_hashed_grant_that_the_settings_accept(tmp_path: Path) -> None:
    made = subprocess.run(
        [*CGW, "token", "--role", "operator", "--expires", "30d", "--name", "street office"],
        capture_output=True,
        text=True,
        check=True,
    )
    token = made.stdout.split("give it to its holder): ", 1)[1].split()[0]
    yaml_part = made.stdout.split("settings file:\n", 1)[1]
    config = tmp_path / "cgw.yaml"
    config.write_text(yaml_part)
    from gateway.settings import load_settings

    grants = load_settings(config, env={}).auth.digests()
    assert token not in config.read_text()  # only its digest is kept
    (grant,) = grants.values()
    assert grant.role == "operator" and grant.name == "street office"
    assert grant.expires is not None and grant.expires > datetime.now(UTC) + timedelta(days=29)
    bad = subprocess.run([*CGW, "token", "--role", "boss"], capture_output=True, text=True)
    assert bad.returncode == 2 and "role" in bad.stderr


def test_a_bad_token_digest_in_the_settings_is_one_clear_line() -> None:
    with pytest.raises(ValueError, match="not a SHA-256 hex digest"):
        AuthSettings(token_hashes={"abc": "viewer"})
    assert MqttSettings().password is None


def test_the_deploy_mosquitto_configuration_works_with_the_generated_files(locked_broker: Any) -> None:
    _, passwords, _, folder = locked_broker
    conf = (Path(__file__).parents[1] / "deploy/mosquitto/cgw.conf").read_text()
    port = free_port()
    data = folder / "var"
    data.mkdir()
    conf = (
        conf.replace("/var/lib/mosquitto/", f"{data}/")
        .replace("/etc/mosquitto/cgw-auth", str(folder))
        .replace("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1\nuser {getpass.getuser()}")
    )
    path = folder / "deploy.conf"
    path.write_text(conf)
    process = start_notified(["mosquitto", "-c", str(path)], folder / "deploy.log")
    try:
        assert pub(port, "cgw/v1/dev-a/telemetry", "{}").returncode != 0  # anonymous refused
        assert (
            pub(port, "cgw/v1/dev-a/telemetry", "{}", "-u", "dev-a", "-P", passwords["dev-a"]).returncode == 0
        )
    finally:
        process.kill()
        process.wait()


# -- the district's commands ---------------------------------------------------------------------


def test_district_commands_are_off_by_default_and_refused_over_plain_mqtt() -> None:
    assert UplinkSettings().commands is False
    with pytest.raises(SettingsError) as refused:
        load_settings(env={"CGW_UPLINK__URL": "mqtt://district:1883", "CGW_UPLINK__COMMANDS": "true"})
    assert "CGW_UPLINK__COMMANDS" in str(refused.value) and "mqtts://" in str(refused.value)
    assert "\n" not in str(refused.value)
    allowed = {"CGW_UPLINK__COMMANDS": "true", "CGW_UPLINK__COMMANDS_OVER_PLAIN_MQTT": "true"}
    assert load_settings(env={"CGW_UPLINK__URL": "mqtt://district:1883", **allowed}).uplink.commands
    assert load_settings(env={"CGW_UPLINK__URL": "mqtts://district:8883", "CGW_UPLINK__COMMANDS": "true"})


class DistrictListener:
    """The district platform's side: sends commands down, collects what comes up."""

    def __init__(self, port: int, community: str) -> None:
        self.community = community
        self.up: list[tuple[str, dict[str, Any]]] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="district-platform")
        self.client.on_message = lambda _c, _u, msg: self.up.append((msg.topic, orjson.loads(msg.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("cgw/v1/up/#", qos=1)
        self.client.loop_start()

    def send(self, command: dict[str, Any]) -> None:
        self.client.publish(
            f"cgw/v1/down/{self.community}/cmd", orjson.dumps(command), qos=1
        ).wait_for_publish(5)

    def replies(self, ident: str) -> list[dict[str, Any]]:
        return [body for topic, body in self.up if topic.endswith("/reply") and body.get("id") == ident]

    async def ask(self, command: dict[str, Any], nth: int = 1) -> dict[str, Any]:
        self.send(command)
        got = await eventually(
            lambda: self.replies(command["id"])[nth - 1 :], 10, f"reply {nth} to {command['id']}"
        )
        return got[0]

    def items(self, stream: str) -> list[dict[str, Any]]:
        topic = f"cgw/v1/up/{self.community}/{stream}"
        return [item for t, body in self.up if t == topic for item in body["items"]]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def in_ms(seconds: float) -> int:
    return int((time.time() + seconds) * 1000)


def uplink_settings(tmp_path: Path, mqtt_url: str, district_url: str, **changes: Any) -> Settings:
    uplink = UplinkSettings.model_validate({"url": district_url, "summary_interval_s": 3600, **changes})
    return gateway_settings(tmp_path, mqtt_url, uplink=uplink)


async def test_commands_stay_unheard_unless_turned_on(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    # The district's broker logs each subscription; the uplink subscribes before it says "online".
    district = MosquittoProcess(tmp_path / "district", extra="log_type subscribe\n")
    district.start()
    listener = DistrictListener(district.port, "testville")
    try:
        async with running(uplink_settings(tmp_path / "off", mosquitto.url, district.url)):
            await eventually(lambda: _online(listener), 10, "the uplink")
        assert "cgw/v1/down/" not in (district.folder / "server.log").read_text()
        on = uplink_settings(
            tmp_path / "on", mosquitto.url, district.url, commands=True, commands_over_plain_mqtt=True
        )
        async with running(on):
            await eventually(
                lambda: "cgw/v1/down/testville/cmd" in (district.folder / "server.log").read_text(),
                10,
                "the subscription",
            )
    finally:
        listener.close()
        district.kill()


def _online(listener: DistrictListener, times: int = 1) -> bool:
    said = [body for t, body in listener.up if t.endswith("/status") and body.get("state") == "online"]
    return len(said) >= times


async def test_district_commands_are_checked_carried_out_once_and_recorded(
    tmp_path: Path, mosquitto: MosquittoProcess, district_mosquitto: MosquittoProcess
) -> None:
    settings = uplink_settings(
        tmp_path, mosquitto.url, district_mosquitto.url, commands=True, commands_over_plain_mqtt=True
    )
    listener = DistrictListener(district_mosquitto.port, "testville")
    received: list[dict[str, Any]] = []
    subscribed = threading.Event()
    device = paho.Client(CallbackAPIVersion.VERSION2, client_id="aq-1")
    device.on_message = lambda _c, _u, msg: received.append(orjson.loads(msg.payload))
    device.on_subscribe = lambda *_: subscribed.set()
    device.connect("127.0.0.1", mosquitto.port)
    device.subscribe("cgw/v1/+/cmd", qos=1)
    device.loop_start()
    try:
        assert await asyncio.to_thread(subscribed.wait, 5)
        async with running(settings) as gw, api(gw) as client:
            await eventually(lambda: _online(listener), 10, "the uplink")
            mosquitto_pub(mosquitto.port, "cgw/v1/aq-1/status", '{"state":"online","kind":"air_quality"}')
            mosquitto_pub(mosquitto.port, "cgw/v1/junk-1/telemetry", '{"metrics":{"v":1}}')
            await eventually(lambda: gw.registry.get("aq-1") and gw.registry.get("junk-1"), 10, "the devices")

            ping = await listener.ask({"id": "p1", "action": "ping", "expires_ms": in_ms(60)})
            assert ping["ok"] and ping["result"]["community"] == "testville"
            # Each refusal says why.
            refusals: dict[str, dict[str, Any]] = {
                "no-expiry": {"action": "ping"},
                "expired": {"action": "ping", "expires_ms": in_ms(-1)},
                "too-far": {"action": "ping", "expires_ms": in_ms(2 * 3600)},
                "generic": {"action": "device_command", "device_id": "junk-1", "command": "set_interval"},
                "not-listed": {"action": "device_command", "device_id": "aq-1", "command": "open_door"},
                "too-big": {"action": "device_command", "device_id": "aq-1", "command": "set_interval",
                            "args": {"x": "y" * 5000}},
            }  # fmt: skip
            expected = {
                "no-expiry": "expires_ms",
                "expired": "expired",
                "too-far": "uplink.command_lifetime",
                "generic": "profile generic allows (allowed: none)",
                "not-listed": "allowed: set_interval",
                "too-big": "args longer than",
            }
            for ident, body in refusals.items():
                expiry = {} if ident == "no-expiry" else {"expires_ms": in_ms(60)}
                reply = await listener.ask({"id": ident, **expiry, **body})
                assert not reply["ok"] and expected[ident] in reply["error"], (ident, reply)
            # An allowed command reaches the device once, however often it is sent.
            command = {"id": "c1", "action": "device_command", "device_id": "aq-1", "command": "set_interval",
                       "args": {"interval_s": 60}, "expires_ms": in_ms(60)}  # fmt: skip
            first = await listener.ask(command)
            assert first["ok"], first
            again = await listener.ask(command, nth=2)
            assert again["duplicate"] and again["ok"] and again["result"] == first["result"]
            await eventually(lambda: received, 10, "the command at the device")
            assert received == [
                {
                    "id": "c1",
                    "command": "set_interval",
                    "args": {"interval_s": 60},
                    "expires_ms": command["expires_ms"],
                }
            ]
            # Each one is an event of the district's, in the API and sent up.
            response = await client.get("/api/v1/events", params={"source": "district", "limit": 100})
            events = response.json()["items"]
            assert len(events) == 2 + len(refusals) + 1
            on_device = [e for e in events if e["device_id"] == "aq-1"]
            assert {e["data"]["id"] for e in on_device} == {"c1", "not-listed", "too-big"}
            keys = {str(e["id"]) for e in events}
            await eventually(
                lambda: {i["key"] for i in listener.items("commands")} == keys, 10, "the commands stream"
            )
        # The ids are remembered across a restart: nothing is carried out twice.
        async with running(settings):
            await eventually(lambda: _online(listener, 2), 10, "the uplink again")
            third = await listener.ask(command, nth=3)
            assert third["duplicate"] and third["ok"]
        assert len(received) == 1
    finally:
        device.loop_stop()
        device.disconnect()
        listener.close()


# -- files and the service -----------------------------------------------------------------------


async def test_stores_backups_and_secrets_are_private_whatever_the_umask(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    # An older install's store, readable by all: tightened when the gateway opens it.
    (data / "services.sqlite3").touch(mode=0o644)
    (data / "services.sqlite3").chmod(0o644)
    env = {**os.environ, "CGW_DATA_DIR": str(data)}

    def cgw(*args: str) -> None:
        subprocess.run([*CGW, *args], env=env, capture_output=True, check=True, timeout=60)

    def modes(*folders: Path) -> dict[str, str]:
        return {str(p): oct(p.stat().st_mode & 0o777) for f in folders for p in (f, *f.iterdir())}

    def private(paths: dict[str, str]) -> dict[str, str]:
        return {p: "0o700" if Path(p).is_dir() else "0o600" for p in paths}

    old = os.umask(0)
    try:
        async with running(gateway_settings(data, mosquitto.url)) as gw:
            mosquitto_pub(mosquitto.port, "cgw/v1/f-1/telemetry", '{"metrics":{"v":1}}')
            await eventually(lambda: gw.registry.get("f-1"), 10, "a reading")
            live = modes(data)  # with the WAL files of both stores
            assert {Path(p).name for p in live} >= {"cgw.sqlite3-wal", "cgw.sqlite3-shm", "services.sqlite3"}
            assert live == private(live)
        await asyncio.to_thread(cgw, "backup", "--out", str(tmp_path / "backups"))
        await asyncio.to_thread(
            cgw, "mqtt-auth", "--out", str(tmp_path / "auth"), "--inventory", str(_inventory(tmp_path))
        )
    finally:
        os.umask(old)
    (backup,) = (tmp_path / "backups").iterdir()
    made = modes(data, backup, tmp_path / "auth")
    names = {Path(p).name for p in made}
    assert names >= {"cgw.sqlite3", "manifest.json", "passwd", "acl", "credentials.csv"}
    assert made == private(made)


def _inventory(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text("devices:\n  - {device_id: dev-a, kind: generic}\n")
    return path


async def test_the_api_speaks_tls_with_uvicorns_own_settings(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    ca_file, cert_file, key_file = tls_files(tmp_path, "127.0.0.1")
    settings = gateway_settings(tmp_path / "gw", mosquitto.url)
    api_settings = settings.api.model_copy(update={"tls_certfile": cert_file, "tls_keyfile": key_file})
    async with running(settings.model_copy(update={"api": api_settings})) as gw:
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca_file))) as tls:
            assert (await tls.get(f"https://127.0.0.1:{gw.api_port}/healthz")).json() == {"status": "ok"}
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://127.0.0.1:{gw.api_port}/healthz")


# -- HTTP: hosts, headers, readiness, live streams -------------------------------------------------


def http_settings(tmp_path: Path, mqtt_url: str, **api: Any) -> Settings:
    settings = gateway_settings(tmp_path, mqtt_url)
    return settings.model_copy(update={"api": settings.api.model_copy(update=api)})


async def test_only_allowed_host_names_are_answered(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    settings = http_settings(
        tmp_path, mosquitto.url, allowed_hosts=["localhost", "127.0.0.1", "*.example.org"]
    )
    async with running(settings) as gw, api(gw) as client:
        for host in ("evil.example", "example.org.evil.net", "127.0.0.2", ""):
            refused = await client.get("/api/v1/summary", headers={"Host": host})
            assert refused.status_code == 400, host
            assert "api.allowed_hosts" in refused.json()["detail"]
            assert refused.headers["x-content-type-options"] == "nosniff"
        # Open311's discovery names the address it was asked by: only ever an allowed one.
        refused = await client.get("/open311/v2/discovery.json", headers={"Host": "evil.example:8080"})
        assert refused.status_code == 400 and "evil.example" not in str(refused.json()[0].get("url", ""))
        for host in ("gw.example.org", f"localhost:{gw.api_port}", "127.0.0.1"):
            answered = await client.get("/open311/v2/discovery.json", headers={"Host": host})
            assert answered.status_code == 200, host
            assert answered.json()["endpoints"][0]["url"].startswith(f"http://{host}/")


def test_the_bound_address_is_an_allowed_name_unless_it_is_a_wildcard() -> None:
    assert "192.168.1.10" in allowed_names(["localhost"], "192.168.1.10")
    assert allowed_names(["localhost"], "0.0.0.0") == {"localhost"}
    assert host_of("[::1]:8080") == "::1" and host_of("Example.ORG:80") == "example.org"
    # `cgw demo --host 0.0.0.0` is shown to others by any name; on one machine it keeps the list.
    from gateway.demo import DemoOptions, _demo_hosts

    base = load_settings(env={})
    assert _demo_hosts(base, DemoOptions(api_host="0.0.0.0")) == ["*"]
    assert _demo_hosts(base, DemoOptions()) == base.api.allowed_hosts


async def test_security_headers_and_the_dashboards_content_policy(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    async with running(http_settings(tmp_path, mosquitto.url)) as gw, api(gw) as client:
        for path in ("/api/v1/summary", "/healthz", "/open311/v2/services.json", "/api/v1/nothing-here"):
            response = await client.get(path)
            assert response.headers["x-content-type-options"] == "nosniff", path
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["referrer-policy"] == "no-referrer"
            assert response.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
        anonymous = await client.get("/api/v1/summary", headers={"Authorization": ""})
        assert anonymous.status_code == 401 and anonymous.headers["x-frame-options"] == "DENY"
        page = await client.get("/dashboard/")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "style-src 'self'" in policy and "unsafe" not in policy
        assert "frame-ancestors 'none'" in policy


async def test_readiness_details_need_a_token(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    async with running(http_settings(tmp_path, mosquitto.url)) as gw:
        base = f"http://127.0.0.1:{gw.api_port}/readyz"
        async with httpx.AsyncClient() as http:
            anonymous = (await http.get(base)).json()
            assert anonymous["ready"] is True
            assert all(set(check) == {"ok"} for check in anonymous["checks"].values()), anonymous
            for token in ("viewer-token", "made-up"):
                shown = (await http.get(base, headers={"Authorization": f"Bearer {token}"})).json()
                assert all("detail" not in check for check in shown["checks"].values()), token
            full = (await http.get(base, headers={"Authorization": "Bearer installer-token"})).json()
            assert mosquitto.url in full["checks"]["broker"]["detail"]


async def _open_stream(gw: Gateway, token: str) -> tuple[httpx.AsyncClient, httpx.Response]:
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.api_port}", timeout=10)
    request = client.build_request("GET", "/api/v1/stream", headers={"Authorization": f"Bearer {token}"})
    response = await client.send(request, stream=True)
    return client, response


async def test_live_streams_are_bounded_overall_and_per_token(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    settings = http_settings(tmp_path, mosquitto.url, stream_max_subscribers=3, stream_max_per_token=2)
    async with running(settings) as gw:
        opened: list[tuple[httpx.AsyncClient, httpx.Response]] = []
        try:
            for token in ("viewer-token", "viewer-token", "operator-token"):
                opened.append(await _open_stream(gw, token))
                assert opened[-1][1].status_code == 200
            await eventually(lambda: gw.hub.subscribers == 3, 5, "three subscribers")
            for token, why in (("installer-token", "api.stream_max_subscribers"), ("viewer-token", "")):
                client, refused = await _open_stream(gw, token)
                await refused.aread()
                assert refused.status_code == 429 and why in refused.text
                assert refused.headers["retry-after"] == "5"
                await client.aclose()
            # One closes: its place is free again, but a token keeps to its own bound.
            client, response = opened.pop()
            await response.aclose()
            await client.aclose()
            await eventually(lambda: gw.hub.subscribers == 2, 5, "the place to be freed")
            client, third = await _open_stream(gw, "viewer-token")
            await third.aread()
            assert third.status_code == 429 and "api.stream_max_per_token" in third.text
            await client.aclose()
            opened.append(await _open_stream(gw, "installer-token"))
            assert opened[-1][1].status_code == 200
        finally:
            for client, response in opened:
                await response.aclose()
                await client.aclose()


async def test_an_open_stream_ends_when_its_token_expires(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    settings = gateway_settings(tmp_path, mosquitto.url)
    soon = TokenGrant(role="viewer", expires=datetime.now(UTC) + timedelta(seconds=3))
    auth = settings.auth.model_copy(update={"tokens": {**settings.auth.tokens, "brief-token": soon}})
    async with running(settings.model_copy(update={"auth": auth})) as gw:
        client, response = await _open_stream(gw, "brief-token")
        try:
            assert response.status_code == 200
            lines: list[str] = []

            async def read_to_the_end() -> None:
                async for line in response.aiter_lines():
                    lines.append(line)

            await asyncio.wait_for(read_to_the_end(), 15)  # the server ends it, not the client
            assert "event: expired" in lines
            assert gw.hub.subscribers == 0
        finally:
            await response.aclose()
            await client.aclose()
        # ...and the token opens nothing more.
        client, again = await _open_stream(gw, "brief-token")
        await again.aread()
        assert again.status_code == 401 and "expired" in again.text
        await client.aclose()


# Anything the district could publish: any JSON, shaped like a command or not.
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=10), inner, max_size=3), max_leaves=10)  # fmt: skip
_commands = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=12) | st.sampled_from(["c1", "c2"]),
        "expires_ms": st.integers() | st.just(int(time.time() * 1000) + 60_000),
        "action": st.sampled_from(["ping", "transition", "device_command", "snapshot", "reboot"]) | _json,
        "device_id": st.sampled_from(["aq-1", "junk-1", "nobody"]) | _json,
        "command": st.sampled_from(["set_interval", "open_door"]) | _json,
        "args": _json,
        "service_request_id": _json,
        "to": st.sampled_from(["triaged", "closed"]) | _json,
        "extra": _json,
    },
)


VALID = {"id": "v1", "expires_ms": int(time.time() * 1000) + 3_000_000, "action": "device_command",
         "device_id": "aq-1", "command": "set_interval", "args": {"interval_s": 60}}  # fmt: skip


def test_any_district_message_gets_one_answer_and_only_a_valid_one_acts(tmp_path: Path) -> None:
    """DistrictCommands over a real local store and service desk (no broker: `publish` is kept)."""
    from gateway.instruments import Instruments
    from gateway.profiles import load_profiles
    from gateway.registry import DeviceRegistry
    from gateway.services import schema
    from gateway.services.actions import Actions
    from gateway.services.catalogue import load_catalogue
    from gateway.services.context import ServiceContext
    from gateway.services.refusals import Refusals
    from gateway.services.relay import RecordRelay
    from gateway.sqlite import SqliteThread
    from gateway.store.writer import StoreWriter
    from gateway.uplink.commands import DistrictCommands

    metrics = Instruments()
    profiles = load_profiles()
    registry = DeviceRegistry(profiles, "open")
    registry.on_birth("aq-1", {"kind": "air_quality"}, 0)
    registry.resolve("junk-1", 0)
    writer = StoreWriter(tmp_path / "cgw.sqlite3", metrics)
    services = SqliteThread("services", lambda: schema.connect(tmp_path / "services.sqlite3"))
    sent: list[tuple[str, bytes]] = []
    recorded: list[Any] = []

    async def no_delivery(_: Any) -> None:
        return None

    context = ServiceContext(services, load_catalogue(), "c", metrics, Refusals(metrics))
    actions = Actions(context, RecordRelay(services), no_delivery)

    async def snapshot() -> int:
        return 0

    async def record(event: Any) -> None:
        recorded.append(event)

    commands = DistrictCommands(
        "c",
        actions,
        registry,
        profiles,
        lambda t, p: sent.append((t, p)),
        snapshot,
        writer,
        record,
        3_600_000,
    )
    with asyncio.Runner() as runner:
        runner.run(writer.open())

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(message=_commands | _json | st.binary(max_size=40))
        @example(message=VALID)
        @example(message=VALID)  # again: answered, not carried out twice
        def check(message: Any) -> None:
            # Written by the standard library: integers of any size, as a sender might.
            payload = message if isinstance(message, bytes) else json.dumps(message).encode()
            before, events = len(sent), len(recorded)
            reply = runner.run(commands.handle(payload))
            assert set(reply) >= {"id", "action", "ok"} and isinstance(reply["ok"], bool)
            assert len(recorded) == events + 1 and recorded[-1].source == "district"
            if len(sent) > before:  # only an allowed command, once, to a device whose profile lists it
                assert reply["ok"] and not reply.get("duplicate")
                assert (
                    sent[-1][0] == "cgw/v1/aq-1/cmd"
                    and orjson.loads(sent[-1][1])["command"] == "set_interval"
                )
            if not reply["ok"]:
                assert reply.get("error"), reply

        check()
        assert [orjson.loads(p)["id"] for _, p in sent].count("v1") == 1
        runner.run(services.close())
        runner.run(writer.close())
