"""The uplink to the district, with real processes: three gateways, four Mosquittos.

Three communities, each with its own Mosquitto and `cgw run`, forward to one district Mosquitto.
The district's own subscriber must see each community's requests, chosen
telemetry, needs list and evaluation under `cgw/v1/up/{community}/...`: all of it, once, and
nothing of one community under another's name, also across an outage of the district broker.
Commands come back down and are answered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway import privacy
from gateway.credentials import hash_password
from tests.devices import Publisher
from tests.services import GatewayProcess, MosquittoProcess, wait_for

pytestmark = pytest.mark.integration

COMMUNITIES = ("north", "south", "east")
OPERATOR = "uplink-operator"
PER_PHASE = 400  # telemetry messages per community in each phase (and one request per 40)


class District:
    """The district platform's subscriber: a persistent QoS 1 session on `cgw/v1/up/#`."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="district", clean_session=False)
        self.client.reconnect_delay_set(0.1, 1)  # type: ignore[arg-type]  # paho types the delays as int; it takes float seconds
        self.client.on_connect = lambda c, *_: c.subscribe("cgw/v1/up/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, orjson.loads(msg.payload), msg.retain))

    def items(self, community: str, stream: str) -> list[dict[str, Any]]:
        topic = f"cgw/v1/up/{community}/{stream}"
        with self._lock:
            return [item for t, body, _ in self.messages if t == topic for item in body.get("items", [])]

    def last(self, community: str, stream: str) -> dict[str, Any] | None:
        topic = f"cgw/v1/up/{community}/{stream}"
        with self._lock:
            bodies = [body for t, body, _ in self.messages if t == topic]
        return bodies[-1] if bodies else None

    def replies(self, community: str) -> dict[str, dict[str, Any]]:
        topic = f"cgw/v1/up/{community}/reply"
        with self._lock:
            return {body["id"]: body for t, body, _ in self.messages if t == topic and body.get("id")}

    def command(self, community: str, command: dict[str, Any]) -> dict[str, Any]:
        command = {"expires_ms": int(time.time() * 1000) + 60_000, **command}
        self.client.publish(f"cgw/v1/down/{community}/cmd", orjson.dumps(command), qos=1)
        ident = command.get("id")
        if ident is None:
            return {}
        reply: dict[str, Any] = wait_for(
            lambda: self.replies(community).get(ident), 20, f"the answer to {ident}"
        )
        return reply

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Community:
    def __init__(self, folder: Path, name: str, district: MosquittoProcess) -> None:
        self.name = name
        self.broker = MosquittoProcess(folder / "broker")
        self.broker.start()
        self.gateway = GatewayProcess(
            folder / "gateway",
            {
                "CGW_COMMUNITY": name,
                "CGW_MQTT__URL": self.broker.url,
                "CGW_UPLINK__URL": district.url,
                "CGW_UPLINK__TELEMETRY": '["generic.v"]',
                "CGW_UPLINK__SUMMARY_INTERVAL_S": "5",
                "CGW_AUTH__TOKENS": orjson.dumps({OPERATOR: "operator"}).decode(),
                "CGW_PIPELINE__DEVICE_RATE_LIMIT": "",
                "CGW_UPLINK__COMMANDS": "true",
                "CGW_UPLINK__COMMANDS_OVER_PLAIN_MQTT": "true",  # the test's brokers are local
            },
        )
        self.gateway.start()
        wait_for(self.ready, 30, f"{name}'s gateway to reach both brokers")
        self.devices = Publisher(self.broker.port)

    def ready(self) -> bool:
        checks = self.gateway.checks()
        return bool(checks and checks["broker"]["ok"] and checks["uplink"]["ok"])

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {OPERATOR}"}
        response = httpx.request(method, f"{self.gateway.url}{path}", headers=headers, timeout=10, **kwargs)
        response.raise_for_status()
        return response.json()

    def close(self) -> None:
        self.devices.close()
        self.gateway.stop()
        self.broker.stop()


@pytest.fixture
def district(district_mosquitto: MosquittoProcess) -> Iterator[District]:
    subscriber = District(district_mosquitto.port)
    try:
        yield subscriber
    finally:
        subscriber.close()


@pytest.fixture
def communities(tmp_path: Path, district_mosquitto: MosquittoProcess) -> Iterator[list[Community]]:
    started: list[Community] = []
    try:
        for name in COMMUNITIES:
            started.append(Community(tmp_path / name, name, district_mosquitto))
        yield started
    finally:
        for community in started:
            community.close()


def numbers(district: District, community: str) -> list[int]:
    return sorted(int(item["metrics"]["v"]) for item in district.items(community, "telemetry"))


def submitted(district: District, community: str) -> list[str]:
    """The tickets the district was told were filed (free text such as descriptions stays home)."""
    steps = district.items(community, "requests")
    return sorted(item["id"] for item in steps if item["step"]["to"] == "submitted")


def everything_arrived(district: District, community: Community) -> bool:
    sent = community.devices.sent
    return len(numbers(district, community.name)) >= sent and len(submitted(district, community.name)) >= len(
        community.devices.requests
    )


def test_three_communities_reach_the_district_once_and_in_full(
    district_mosquitto: MosquittoProcess, district: District, communities: list[Community]
) -> None:
    for community in communities:
        community.devices.publish(PER_PHASE, rate=1000)
    for community in communities:
        wait_for(lambda c=community: everything_arrived(district, c), 60, f"{community.name}'s first phase")

    # The district broker goes away for a while; each community goes on and keeps what it owes.
    district_mosquitto.stop()
    for community in communities:
        community.devices.publish(PER_PHASE, rate=1000)
        community.devices.wait_acknowledged()
    for community in communities:  # each has noticed the outage
        wait_for(lambda c=community: not c.gateway.checks()["uplink"]["ok"], 30, f"{community.name}'s outage")
    district_mosquitto.start()
    for community in communities:
        wait_for(lambda c=community: everything_arrived(district, c), 90, f"{community.name}'s backlog")
        wait_for(lambda c=community: c.ready(), 30, f"{community.name}'s uplink to reconnect")

    for community in communities:
        name = community.name
        # Every number once: nothing lost, nothing doubled, nothing of another community.
        assert numbers(district, name) == list(range(2 * PER_PHASE))
        telemetry = district.items(name, "telemetry")
        assert {item["device_id"] for item in telemetry} == {f"fault-{i}" for i in range(10)}
        assert len({item["key"] for item in telemetry}) == len(telemetry)
        # Every request once, as filed, without the resident's home or words.
        local = community.api("GET", "/api/v1/requests", params={"limit": 1000})["items"]
        assert submitted(district, name) == sorted(r["id"] for r in local)
        assert sorted(r["description"] for r in local) == sorted(community.devices.requests)
        filed = [item for item in district.items(name, "requests") if item["step"]["to"] == "submitted"]
        assert filed and all(set(item) == {"key", "step", *privacy.UPLINK_REQUEST_FIELDS} for item in filed)
        # The snapshots, and the gateway's presence.
        needs = wait_for(lambda n=name: district.last(n, "needs"), 30, f"{name}'s needs list")
        assert needs["community"] == name
        assert needs["items"][0]["needs"], "the needs list is empty although requests were filed"
        # The last evaluation counts every request the community filed (a snapshot every 5 s).
        wait_for(
            lambda n=name, c=community: (
                (e := district.last(n, "evaluation"))
                and e["items"][0]["overall"][0]["requests"] == len(c.devices.requests)
            ),
            30,
            f"{name}'s evaluation of all its requests",
        )
        status = district.last(name, "status")
        assert status is not None and status["state"] == "online"
    status_topics = {
        t for t, body, _ in district.messages if t.endswith("/status") and body["state"] == "online"
    }
    assert status_topics == {f"cgw/v1/up/{name}/status" for name in COMMUNITIES}


def test_district_commands_are_carried_out_and_answered(
    district: District, communities: list[Community]
) -> None:
    north, south = communities[0], communities[1]
    north.devices.publish(41, rate=1000)  # two requests
    wait_for(lambda: everything_arrived(district, north), 60, "north's requests")
    ticket = district.items("north", "requests")[0]["id"]

    pong = district.command("north", {"id": "p1", "action": "ping"})
    assert pong["ok"] and pong["result"]["community"] == "north"

    reply = district.command(
        "north",
        {
            "id": "t1",
            "action": "transition",
            "service_request_id": ticket,
            "to": "triaged",
            "note": "by district",
        },
    )
    assert reply["ok"], reply
    assert north.api("GET", f"/api/v1/requests/{ticket}")["state"] == "triaged"
    # The step is sent up like any other, as done by the district.
    step = wait_for(
        lambda: [i for i in district.items("north", "requests") if i["step"]["to"] == "triaged"],
        30,
        "the triaged step upstream",
    )
    assert step[0]["step"]["actor"] == "district"

    # Refused, with the reason, changing nothing.
    wrong = district.command(
        "north", {"id": "t2", "action": "transition", "service_request_id": ticket, "to": "closed"}
    )
    assert not wrong["ok"] and "cannot become closed" in wrong["error"]
    unknown = district.command("north", {"id": "x1", "action": "reboot"})
    assert not unknown["ok"] and "action" in unknown["error"]
    missing = district.command(
        "south", {"id": "d0", "action": "device_command", "device_id": "nobody", "command": "set_interval"}
    )
    assert not missing["ok"] and "no device nobody" in missing["error"]
    district.client.publish("cgw/v1/down/north/cmd", b"{not json", qos=1)
    # Checked once the gateway has answered it (with no id, as it has none), not before.
    wait_for(lambda: [b for t, b, _ in district.messages if t == "cgw/v1/up/north/reply" and b["id"] is None
                      and "not JSON" in b["error"]], 20, "the refusal of the malformed command")  # fmt: skip
    assert north.api("GET", f"/api/v1/requests/{ticket}")["state"] == "triaged"

    # A device command reaches the device on its own community's broker only, if its profile
    # lists the command.
    south.devices.publish(1, rate=1000)
    wait_for(lambda: numbers(district, "south"), 30, "south's device to be known")
    status = orjson.dumps({"state": "online", "kind": "air_quality"})
    south.devices.client.publish("cgw/v1/fault-0/status", status, qos=1, retain=True).wait_for_publish(5)
    wait_for(lambda: south.api("GET", "/api/v1/devices/fault-0")["kind"] == "air_quality", 10, "the birth")
    received: list[bytes] = []
    device = paho.Client(CallbackAPIVersion.VERSION2, client_id="south-device-0")
    device.on_message = lambda _c, _u, msg: received.append(bytes(msg.payload))
    subscribed = threading.Event()
    device.on_subscribe = lambda *_: subscribed.set()
    device.connect("127.0.0.1", south.broker.port)
    device.subscribe("cgw/v1/fault-0/cmd", qos=1)
    device.loop_start()
    try:
        assert subscribed.wait(10), "no SUBACK"
        sent = district.command(
            "south",
            {
                "id": "d1",
                "action": "device_command",
                "device_id": "fault-0",
                "command": "set_interval",
                "args": {"interval_s": 60},
            },
        )
        assert sent["ok"], sent
        wait_for(lambda: received, 10, "the command at the device")
        assert orjson.loads(received[0])["args"] == {"interval_s": 60}
    finally:
        device.loop_stop()
        device.disconnect()

    # The counters say what happened.
    metrics = north.gateway.metrics(OPERATOR)
    assert metrics['cgw_uplink_commands_total{action="transition",outcome="ok"}'] == 1
    assert metrics['cgw_uplink_commands_total{action="transition",outcome="error"}'] == 1


def test_the_district_acl_keeps_each_community_to_its_own_branch(tmp_path: Path) -> None:
    """deploy/district/acl on a real Mosquitto: north cannot speak for south, nor hear its commands."""
    users = {"north": "pw-north", "south": "pw-south", "district-platform": "pw-district"}
    passwd = tmp_path / "passwd"
    passwd.write_text("".join(f"{user}:{hash_password(pw)}\n" for user, pw in users.items()))
    acl = Path(__file__).parent.parent / "deploy" / "district" / "acl"
    broker = MosquittoProcess(
        tmp_path / "district",
        extra=f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n",
    )
    broker.start()
    received: dict[str, list[str]] = {"district-platform": [], "north": []}

    def client(user: str, subscribe: list[str]) -> paho.Client:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"acl-{user}")
        c.username_pw_set(user, users[user])
        c.on_message = lambda _c, _u, msg: received.setdefault(user, []).append(msg.topic)
        subacks = threading.Semaphore(0)
        c.on_subscribe = lambda *_: subacks.release()
        c.connect("127.0.0.1", broker.port)
        for topic in subscribe:
            c.subscribe(topic, qos=1)
        c.loop_start()
        for _ in subscribe:
            assert subacks.acquire(timeout=10), f"no SUBACK for {user}"
        return c

    district = client("district-platform", ["cgw/v1/up/#"])
    north = client("north", ["cgw/v1/down/+/cmd"])
    try:
        for topic in ("cgw/v1/up/south/alarms", "cgw/v1/down/north/cmd", "cgw/v1/up/north/alarms"):
            north.publish(topic, b"{}", qos=1).wait_for_publish(5)
        for community in ("south", "north"):
            district.publish(f"cgw/v1/down/{community}/cmd", b"{}", qos=1).wait_for_publish(5)
        # Each sender's allowed message goes last: what the broker would have passed on before it
        # has arrived by then (it keeps one sender's order).
        wait_for(lambda: received["north"] and received["district-platform"], 10, "the allowed messages")
        assert received["district-platform"] == ["cgw/v1/up/north/alarms"]
        assert received["north"] == ["cgw/v1/down/north/cmd"]  # its own, from the district only
    finally:
        for c in (district, north):
            c.loop_stop()
            c.disconnect()
        broker.stop()
