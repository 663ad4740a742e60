"""The uplink against a district broker set up as docs/uplink.md says: TLS, one account per
community, the shipped ACL (deploy/district/acl); and the district's commands in the cases the
three-community test does not reach: `snapshot`, commands turned off, a full command queue, and
commands sent while the gateway was away.

Gateways run in the test's event loop (tests/harness.py) over a real community Mosquitto; the
district is a second, real Mosquitto with TLS and passwords; the platform is a paho client.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
import trustme
from paho.mqtt.enums import CallbackAPIVersion

from gateway.application import Gateway
from gateway.credentials import hash_password
from gateway.settings import Settings, UplinkSettings
from gateway.uplink.sink import COMMAND_QUEUE
from tests.harness import api, eventually, gateway_settings, mosquitto_pub, running
from tests.services import MosquittoProcess, tls_files

pytestmark = pytest.mark.integration

ACL = Path(__file__).parent.parent / "deploy" / "district" / "acl"
PASSWORDS = {"north": "pw-north", "south": "pw-south", "district-platform": "pw-platform"}


@dataclass
class SecureDistrict:
    broker: MosquittoProcess
    ca_file: Path

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.broker.port}"


@pytest.fixture
def secure_district(tmp_path: Path) -> Iterator[SecureDistrict]:
    ca_file, cert_file, key_file = tls_files(tmp_path)
    passwd = tmp_path / "passwd"
    passwd.write_text("".join(f"{user}:{hash_password(pw)}\n" for user, pw in PASSWORDS.items()))
    broker = MosquittoProcess(
        tmp_path / "district",
        listener_extra=f"certfile {cert_file}\nkeyfile {key_file}\n",
        extra=f"allow_anonymous false\npassword_file {passwd}\nacl_file {ACL}\n",
    )
    broker.start()
    try:
        yield SecureDistrict(broker, ca_file)
    finally:
        broker.kill()


class Platform:
    """The district platform: logs in over TLS, subscribes to every community's branch (and
    waits for the SUBACK), sends commands and keeps every message it receives."""

    def __init__(self, district: SecureDistrict) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="platform")
        self.client.username_pw_set("district-platform", PASSWORDS["district-platform"])
        self.client.tls_set(ca_certs=str(district.ca_file))
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", district.broker.port)
        self.client.loop_start()
        self.client.subscribe("cgw/v1/up/#", qos=1)
        assert subscribed.wait(10), "no SUBACK from the district broker"

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, orjson.loads(msg.payload)))

    def bodies(self, community: str, stream: str) -> list[dict[str, Any]]:
        topic = f"cgw/v1/up/{community}/{stream}"
        with self._lock:
            return [body for t, body in self.messages if t == topic]

    def replies(self, community: str) -> list[dict[str, Any]]:
        return self.bodies(community, "reply")

    def command(self, community: str, ident: str, action: str, expires_in_s: float = 60, **kw: Any) -> None:
        """Publish a command and wait for the broker's PUBACK."""
        body = {"id": ident, "action": action, "expires_ms": int((time.time() + expires_in_s) * 1000), **kw}
        info = self.client.publish(f"cgw/v1/down/{community}/cmd", orjson.dumps(body), qos=1)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def platform(secure_district: SecureDistrict) -> Iterator[Platform]:
    subscriber = Platform(secure_district)
    try:
        yield subscriber
    finally:
        subscriber.close()


def community_settings(
    folder: Path, mosquitto: MosquittoProcess, district: SecureDistrict, name: str = "north", **uplink: Any
) -> Settings:
    link = UplinkSettings(
        url=district.url,
        username=name,
        password=PASSWORDS.get(name, "wrong"),
        tls_ca=district.ca_file,
        commands=True,
        summary_interval_s=86_400,  # snapshots at the start, then only when asked
        **uplink,
    )
    return gateway_settings(folder, mosquitto.url, community=name, uplink=link)


def file_request(mosquitto: MosquittoProcess, request_id: str) -> None:
    """A request from a service terminal (only terminals file requests: its birth first)."""
    birth = {"state": "online", "kind": "service_terminal", "location": {"building": "1"}}
    mosquitto_pub(mosquitto.port, "cgw/v1/term-1/status", orjson.dumps(birth), "-r")
    body = {"request_id": request_id, "service_code": "elderly.home_visit", "description": request_id,
            "location": {"building": "1", "unit": "1-101"}}  # fmt: skip
    mosquitto_pub(mosquitto.port, "cgw/v1/term-1/request", orjson.dumps(body))


def filed(platform: Platform, community: str) -> list[str]:
    """The tickets filed, as the district sees them (never the resident's words: docs/privacy.md)."""
    return [
        item["id"]
        for body in platform.bodies(community, "requests")
        for item in body["items"]
        if item["step"]["to"] == "submitted"
    ]


@asynccontextmanager
async def linked(settings: Settings, platform: Platform) -> AsyncIterator[Gateway]:
    """A running gateway whose uplink is connected and subscribed: its first snapshots reached
    the platform, and they leave after the SUBSCRIBE (sent on connect), which the broker handles
    in order."""
    snapshots = len(platform.bodies(settings.community, "evaluation"))
    async with running(settings) as gw:
        await eventually(
            lambda: len(platform.bodies(settings.community, "evaluation")) > snapshots, 15, "the uplink"
        )
        yield gw


async def reply(platform: Platform, community: str, ident: str, timeout: float = 15) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        return next((r for r in platform.replies(community) if r.get("id") == ident), None)

    answer: dict[str, Any] = await eventually(found, timeout, f"the answer to {ident}")
    return answer


async def test_the_uplink_logs_in_with_its_own_account_over_tls(
    tmp_path: Path, mosquitto: MosquittoProcess, secure_district: SecureDistrict, platform: Platform
) -> None:
    settings = community_settings(tmp_path / "north", mosquitto, secure_district)
    async with linked(settings, platform):
        file_request(mosquitto, "over-tls")
        await eventually(lambda: len(filed(platform, "north")) == 1, 15, "the request at the district")
        assert platform.bodies("north", "status")[-1]["state"] == "online"
        # Commands come down over the same login (allowed over TLS without the plain-MQTT switch).
        await asyncio.to_thread(platform.command, "north", "p0", "ping")
        assert (await reply(platform, "north", "p0"))["result"]["community"] == "north"

    # The wrong password: refused, and /readyz says which setting to check.
    wrong = community_settings(tmp_path / "wrong", mosquitto, secure_district)
    wrong = wrong.model_copy(update={"uplink": wrong.uplink.model_copy(update={"password": None})})
    async with running(wrong) as gw:
        refused = gw.uplink
        assert refused is not None
        error = await eventually(lambda: refused.last_error, 15, "the refusal")
        assert "refused the connection" in error and not refused.reachable
        async with api(gw, "operator-token") as client:  # details only for those who fix things
            detail = (await client.get("/readyz")).json()["checks"]["uplink"]["detail"]
        assert "refused the connection" in detail

    # A district certificate the gateway does not trust: no connection, and why.
    other = trustme.CA()
    other_file = tmp_path / "other-ca.pem"
    other.cert_pem.write_to_path(str(other_file))
    untrusting = community_settings(tmp_path / "untrusting", mosquitto, secure_district)
    untrusting = untrusting.model_copy(
        update={"uplink": untrusting.uplink.model_copy(update={"tls_ca": other_file})}
    )
    async with running(untrusting) as gw:
        uplink = gw.uplink
        assert uplink is not None
        error = await eventually(
            lambda: uplink.last_error if "certificate" in (uplink.last_error or "") else None,
            15,
            "the TLS refusal",
        )
        assert not uplink.reachable


async def test_a_snapshot_command_sends_the_needs_list_and_the_evaluation_now(
    tmp_path: Path, mosquitto: MosquittoProcess, secure_district: SecureDistrict, platform: Platform
) -> None:
    # The snapshots of the start; the next would be a day later.
    async with linked(community_settings(tmp_path / "north", mosquitto, secure_district), platform) as gw:
        file_request(mosquitto, "needs-1")
        await eventually(lambda: len(filed(platform, "north")) == 1, 15, "the request at the district")
        assert [b["items"][0]["needs"] for b in platform.bodies("north", "needs")] == [[]]
        await asyncio.to_thread(platform.command, "north", "s1", "snapshot")
        answer = await reply(platform, "north", "s1")
        assert answer["ok"] and answer["result"] == {"snapshots": 2}
        await eventually(lambda: len(platform.bodies("north", "needs")) == 2, 15, "the second needs list")
        await eventually(
            lambda: len(platform.bodies("north", "evaluation")) == 2, 15, "the second evaluation"
        )
        # Made now: the request filed since is in it, as the community's own API ranks it.
        needs = platform.bodies("north", "needs")[1]["items"][0]["needs"]
        async with api(gw) as client:
            local = (await client.get("/api/v1/needs")).json()["items"]
        assert [n["need_id"] for n in needs] == [n["need_id"] for n in local] == ["elderly.home_visit@1"]
        assert platform.bodies("north", "evaluation")[1]["items"][0]["overall"][0]["requests"] == 1


async def test_with_commands_off_the_gateway_does_not_listen(
    tmp_path: Path, mosquitto: MosquittoProcess, secure_district: SecureDistrict, platform: Platform
) -> None:
    settings = community_settings(tmp_path / "north", mosquitto, secure_district, name="north")
    settings = settings.model_copy(update={"uplink": settings.uplink.model_copy(update={"commands": False})})
    async with linked(settings, platform) as gw:
        await asyncio.to_thread(platform.command, "north", "p-off", "ping")
        # A marker that goes round the gateway after the command: a request filed and sent up.
        file_request(mosquitto, "after-the-command")
        await eventually(lambda: len(filed(platform, "north")) == 1, 15, "the marker")
        async with api(gw) as client:
            events = (await client.get("/api/v1/events", params={"source": "district"})).json()["items"]
        assert platform.replies("north") == [] and events == []
    # Nor was it kept for later: the gateway has no subscription in its district session.
    async with linked(community_settings(tmp_path / "north", mosquitto, secure_district), platform):
        await asyncio.to_thread(platform.command, "north", "p-on", "ping")
        await reply(platform, "north", "p-on")
        assert [r["id"] for r in platform.replies("north")] == ["p-on"]


async def test_commands_sent_while_the_gateway_was_away_are_carried_out_once_unless_expired(
    tmp_path: Path, mosquitto: MosquittoProcess, secure_district: SecureDistrict, platform: Platform
) -> None:
    settings = community_settings(tmp_path / "north", mosquitto, secure_district)
    async with linked(settings, platform):
        pass
    # Away: the district broker keeps what comes for the gateway's persistent session.
    await asyncio.to_thread(platform.command, "north", "live", "ping", expires_in_s=300)
    await asyncio.to_thread(platform.command, "north", "stale", "ping", expires_in_s=0.5)
    await asyncio.to_thread(platform.command, "north", "live", "ping", expires_in_s=300)  # sent twice
    stale_until = time.time() + 0.5
    await eventually(lambda: time.time() > stale_until, 5, "the stale command to expire")
    async with running(settings) as gw:
        live = await reply(platform, "north", "live")
        stale = await reply(platform, "north", "stale")
        await eventually(lambda: len(platform.replies("north")) == 3, 15, "three answers")
        assert live["ok"] and live["result"]["community"] == "north"
        assert not stale["ok"] and stale["error"].startswith("expired")
        again = [r for r in platform.replies("north") if r["id"] == "live"][1]
        assert again["duplicate"] and again["result"] == live["result"]  # carried out once
        async with api(gw) as client:
            events = (await client.get("/api/v1/events", params={"source": "district"})).json()["items"]
        assert len(events) == 3


async def test_a_full_command_queue_drops_and_counts_what_does_not_fit(
    tmp_path: Path, mosquitto: MosquittoProcess, secure_district: SecureDistrict, platform: Platform
) -> None:
    async with linked(community_settings(tmp_path / "north", mosquitto, secure_district), platform) as gw:
        # The local store is busy (its thread held): the command being carried out waits for it,
        # and the district's commands pile up in the bounded queue.
        release = threading.Event()
        held = asyncio.create_task(gw.writer.call(lambda _conn: release.wait(30)))
        sent = COMMAND_QUEUE + 50
        try:
            for n in range(sent):
                await asyncio.to_thread(platform.command, "north", f"q{n}", "ping")

            def dropped() -> float:
                return float(
                    gw.instruments.uplink_commands.labels(action="unknown", outcome="dropped")._value.get()
                )

            # Every command has either a place in the queue (or is being carried out) or is dropped.
            await eventually(lambda: dropped() >= sent - COMMAND_QUEUE - 1, 15, "the overflow")
        finally:
            release.set()
            await held
        await eventually(
            lambda: len(platform.replies("north")) + dropped() == sent, 30, "the queue's answers"
        )
        answered = platform.replies("north")
        assert COMMAND_QUEUE <= len(answered) <= COMMAND_QUEUE + 1 and all(r["ok"] for r in answered)
        assert len({r["id"] for r in answered}) == len(answered)
        assert dropped() == sent - len(answered)
