"""Authentication and authorisation, each refusal tested: per-device MQTT credentials and the ACL
made by `cgw mqtt-auth` in a real Mosquitto; MQTT over TLS; API tokens (unknown, missing,
expired, wrong role, too many writes); and no secret in the logs.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import getpass
import logging
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from gateway.application import Gateway
from gateway.credentials import GATEWAY_USER, hash_password
from gateway.settings import AuthSettings, MqttSettings, Settings, TokenGrant
from tests.harness import api, eventually, gateway_settings, running
from tests.services import MosquittoProcess, free_port, wait_port

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


async def test_mqtt_over_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
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
        assert (await call("POST", "/api/v1/events/1/ack", "operator-token")).status_code != 429
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
    process = subprocess.Popen(["mosquitto", "-c", str(path)], stderr=subprocess.PIPE)
    try:
        wait_port(port, process)  # type: ignore[arg-type]
        assert pub(port, "cgw/v1/dev-a/telemetry", "{}").returncode != 0  # anonymous refused
        assert (
            pub(port, "cgw/v1/dev-a/telemetry", "{}", "-u", "dev-a", "-P", passwords["dev-a"]).returncode == 0
        )
    finally:
        process.kill()
        process.wait()
