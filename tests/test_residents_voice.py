"""Residents' voice cannot be forged: requests, ratings and votes (docs/privacy.md).

Over a real Mosquitto and the real HTTP API: a sensor, a foreign terminal and a terminal token
each try to file, vote or rate as a resident, and each is refused with the reason, dead-lettered
and counted; the resident's own terminal, its rating code and its household PIN are accepted.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from gateway.credentials import GATEWAY_USER
from gateway.services.households import add_household
from gateway.services.requests import TICKET_ALPHABET, TICKET_CHARS
from gateway.services.schema import MIGRATIONS
from gateway.settings import ServicesSettings
from tests.harness import (
    AS_OPERATOR,
    api,
    eventually,
    gateway_settings,
    mosquitto_pub,
    running,
    terminal_birth,
)
from tests.services import MosquittoProcess
from tests.test_privacy import Acks

PIN = "246810"


def voice_settings(tmp_path: Path, url: str, **overrides: Any) -> Any:
    register = tmp_path / "households.yaml"
    add_household(register, "3", "2-301", PIN)
    add_household(register, "3", "2-302", "135790")
    return gateway_settings(tmp_path, url, services=ServicesSettings(households=register), **overrides)


async def completed(gw: Any, ticket: str) -> None:
    async with api(gw, "operator-token") as operator:
        for step in (
            {"to": "triaged"},
            {"to": "assigned", "provider_id": "handy-coop"},
            {"to": "in_service"},
            {"to": "completed"},
        ):
            moved = await operator.post(f"/api/v1/requests/{ticket}/transitions", json=step)
            assert moved.status_code == 200, moved.text


def rejected_count(text: str, reason: str) -> float:
    wanted = f'cgw_messages_rejected_total{{reason="{reason}"}}'
    line = next((row for row in text.splitlines() if row.startswith(wanted)), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


async def test_a_sensor_files_votes_and_rates_nothing(tmp_path: Path, mosquitto: Any) -> None:
    async with running(voice_settings(tmp_path, mosquitto.url)) as gw, api(gw, "operator-token") as operator:
        port = mosquitto.port
        acks = Acks(port, "aq-1")
        try:
            await acks.ready()
            birth = {"state": "online", "kind": "air_quality", "location": {"building": "3"}}
            mosquitto_pub(port, "cgw/v1/aq-1/status", orjson.dumps(birth))
            request = {"request_id": "s-1", "service_code": "repair.plumbing", "location": {"building": "3"}}
            mosquitto_pub(port, "cgw/v1/aq-1/request", orjson.dumps(request))
            vote = {
                "vote_id": "s-2",
                "proposal_id": "P-0001",
                "choice": "yes",
                "household": {"building": "3", "unit": "2-301", "pin": PIN},
            }
            mosquitto_pub(port, "cgw/v1/aq-1/vote", orjson.dumps(vote))
            rating = {"rating_id": "s-3", "service_request_id": "testville-X", "score": 1}
            mosquitto_pub(port, "cgw/v1/aq-1/rating", orjson.dumps(rating))
            answers = [
                await acks.next("request_id", "s-1"),
                await acks.next("vote_id", "s-2"),
                await acks.next("rating_id", "s-3"),
            ]
        finally:
            acks.close()
        for answer in answers:
            assert answer["status"] == "rejected"
            assert answer["error"].startswith("not_a_terminal: aq-1 is a air_quality device")

        async def letters() -> Any:
            items = (await operator.get("/api/v1/dead-letters", params={"device_id": "aq-1"})).json()["items"]
            return items if len(items) >= 3 else None

        items = await eventually(letters, 5.0, "three dead letters")
        assert {(d["channel"], d["reason_code"]) for d in items} == {
            ("request", "not_a_terminal"),
            ("vote", "not_a_terminal"),
            ("rating", "not_a_terminal"),
        }
        assert rejected_count((await operator.get("/metrics")).text, "not_a_terminal") == 3
        assert (await operator.get("/api/v1/requests")).json()["items"] == []


async def test_a_rating_comes_from_the_filing_channel_or_with_the_rating_code(
    tmp_path: Path, mosquitto: Any
) -> None:
    async with running(voice_settings(tmp_path, mosquitto.url)) as gw, api(gw, "operator-token") as operator:
        port = mosquitto.port
        mine, foreign = Acks(port, "kiosk-1"), Acks(port, "kiosk-2")
        try:
            await mine.ready()
            await foreign.ready()
            terminal_birth(port, "kiosk-1", "3")
            terminal_birth(port, "kiosk-2", "3")
            tickets = {}
            for request_id in ("r-1", "r-2", "r-3"):
                body = {
                    "request_id": request_id,
                    "service_code": "repair.plumbing",
                    "location": {"building": "3"},
                }
                mosquitto_pub(port, "cgw/v1/kiosk-1/request", orjson.dumps(body))
                tickets[request_id] = await mine.next("request_id", request_id)
            # Tickets are not guessable: 50 random bits each, nothing sequential.
            pattern = re.compile(rf"testville-[{TICKET_ALPHABET}]{{{TICKET_CHARS}}}")
            assert all(pattern.fullmatch(t["service_request_id"]) for t in tickets.values())
            assert len({t["rating_code"] for t in tickets.values()}) == 3
            for ack in tickets.values():
                await completed(gw, ack["service_request_id"])
            first, second, third = (t["service_request_id"] for t in tickets.values())

            # A foreign terminal, without the code: refused, and the resident is not locked out.
            forged = {"rating_id": "f-1", "service_request_id": first, "score": 1}
            mosquitto_pub(port, "cgw/v1/kiosk-2/rating", orjson.dumps(forged))
            refused = await foreign.next("rating_id", "f-1")
            assert refused["status"] == "rejected" and refused["error"].startswith("not_the_filer:")
            # The filing terminal rates its own ticket.
            own = {"rating_id": "o-1", "service_request_id": first, "score": 5}
            mosquitto_pub(port, "cgw/v1/kiosk-1/rating", orjson.dumps(own))
            assert (await mine.next("rating_id", "o-1"))["status"] == "accepted"
            # Another terminal with the receipt's rating code: accepted.
            coded = {
                "rating_id": "c-1",
                "service_request_id": second,
                "score": 4,
                "rating_code": tickets["r-2"]["rating_code"].lower(),
            }
            mosquitto_pub(port, "cgw/v1/kiosk-2/rating", orjson.dumps(coded))
            assert (await foreign.next("rating_id", "c-1"))["status"] == "accepted"
            # A wrong code (another request's): refused.
            wrong = {**coded, "rating_id": "w-1", "service_request_id": third}
            mosquitto_pub(port, "cgw/v1/kiosk-2/rating", orjson.dumps(wrong))
            assert (await foreign.next("rating_id", "w-1"))["error"].startswith("not_the_filer:")
        finally:
            mine.close()
            foreign.close()
        # A terminal token over HTTP: not its ticket, no code: 403; with the code: accepted.
        async with api(gw, "terminal-token") as terminal:
            refused_http = await terminal.post(f"/api/v1/requests/{third}/rating", json={"score": 1})
            assert refused_http.status_code == 403 and "not_the_filer" in refused_http.json()["detail"]
            coded_http = await terminal.post(
                f"/api/v1/requests/{third}/rating",
                json={"score": 2, "rating_code": tickets["r-3"]["rating_code"]},
            )
            assert coded_http.status_code == 200 and coded_http.json()["status"] == "accepted"
            # A ticket it filed itself, it rates without a code.
            filed = await terminal.post(
                "/open311/v2/requests.json", data={"service_code": "repair.plumbing", "building": "3"}
            )
            own_ticket = filed.json()[0]["service_request_id"]
            await completed(gw, own_ticket)
            own_http = await terminal.post(f"/api/v1/requests/{own_ticket}/rating", json={"score": 3})
            assert own_http.status_code == 200, own_http.text
        scores = {
            t: (await operator.get(f"/api/v1/requests/{t}")).json()["rating"] for t in (first, second, third)
        }
        assert {t: r["score"] for t, r in scores.items()} == {first: 5, second: 4, third: 2}
        # Refused over MQTT (two) and over HTTP (one): each dead-lettered (the HTTP one with the
        # desk's next output, the accepted rating above) and counted.
        found = await operator.get("/api/v1/dead-letters", params={"reason": "not_the_filer"})
        topics = sorted(d["topic"] for d in found.json()["items"])
        assert topics == ["api/rating", "cgw/v1/kiosk-2/rating", "cgw/v1/kiosk-2/rating"]
        assert rejected_count((await operator.get("/metrics")).text, "not_the_filer") == 3


async def test_a_vote_counts_only_for_a_registered_household_proved_by_its_pin(
    tmp_path: Path, mosquitto: Any
) -> None:
    async with running(voice_settings(tmp_path, mosquitto.url)) as gw, api(gw, "operator-token") as operator:
        proposal = (await operator.post("/api/v1/proposals", json={"title": "A ramp at building 3"})).json()[
            "id"
        ]
        port = mosquitto.port
        acks = Acks(port, "kiosk-1")
        try:
            await acks.ready()
            terminal_birth(port, "kiosk-1", "3")

            async def vote(vote_id: str, **household: str) -> dict[str, Any]:
                body = {"vote_id": vote_id, "proposal_id": proposal, "choice": "yes", "household": household}
                mosquitto_pub(port, "cgw/v1/kiosk-1/vote", orjson.dumps(body))
                return await acks.next("vote_id", vote_id)

            for vote_id, household in (
                ("v-nopin", {"building": "3", "unit": "2-301"}),
                ("v-wrong", {"building": "3", "unit": "2-301", "pin": "000000"}),
                ("v-invented", {"building": "9", "unit": "9-999", "pin": PIN}),
            ):
                answer = await vote(vote_id, **household)
                assert answer["status"] == "rejected", answer
                assert answer["error"].startswith("household_not_verified:")
                assert "2-301" not in answer["error"] and "9-999" not in answer["error"]
            assert (await vote("v-ok", building="3", unit="2-301", pin=PIN))["status"] == "accepted"
            again = await vote("v-again", building="3", unit="2-301", pin=PIN)
            assert again["status"] == "rejected" and again["error"].startswith("already_voted:")
        finally:
            acks.close()
        # A terminal token over HTTP: the same register.
        async with api(gw, "terminal-token") as terminal:
            url = f"/api/v1/proposals/{proposal}/votes"
            bare = await terminal.post(url, json={"building": "3", "unit": "2-302", "choice": "no"})
            assert bare.status_code == 403 and "household_not_verified" in bare.json()["detail"]
            proved = await terminal.post(
                url, json={"building": "3", "unit": "2-302", "choice": "no", "pin": "135790"}
            )
            assert proved.status_code == 200, proved.text
        counted = (await operator.get(f"/api/v1/proposals/{proposal}")).json()
        assert counted["votes"] == {"yes": 1, "no": 1, "abstain": 0} and counted["households_voted"] == 2
        metrics = (await operator.get("/metrics")).text
        assert rejected_count(metrics, "household_not_verified") == 4  # three over MQTT, one over HTTP
        api_letters = await operator.get("/api/v1/dead-letters", params={"reason": "household_not_verified"})
        assert "api/vote" in {d["topic"] for d in api_letters.json()["items"]}
        assert rejected_count(metrics, "already_voted") == 1


async def test_without_a_register_no_vote_counts(tmp_path: Path, mosquitto: Any) -> None:
    async with (
        running(gateway_settings(tmp_path, mosquitto.url)) as gw,
        api(gw, "operator-token") as operator,
    ):
        proposal = (await operator.post("/api/v1/proposals", json={"title": "x"})).json()["id"]
        async with api(gw, "terminal-token") as terminal:
            body = {"building": "3", "unit": "2-301", "choice": "yes", "pin": PIN}
            refused = await terminal.post(f"/api/v1/proposals/{proposal}/votes", json=body)
        assert refused.status_code == 409 and "no_register" in refused.json()["detail"]


def test_only_service_terminals_may_publish_for_residents_at_the_broker(tmp_path: Path) -> None:
    """The ACL `cgw mqtt-auth` writes: a sensor's `request` never reaches the gateway's account."""
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        "devices:\n  - {device_id: kiosk-a, kind: service_terminal}\n"
        "  - {device_id: sensor-a, kind: air_quality}\n"
    )
    folder = tmp_path / "auth"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "mqtt-auth",
            "--inventory",
            str(inventory),
            "--out",
            str(folder),
        ],
        check=True,
        capture_output=True,
    )
    acl = (folder / "acl").read_text()
    assert "user kiosk-a\ntopic write cgw/v1/kiosk-a/request" in acl and "user sensor-a" not in acl
    assert "pattern write cgw/v1/%u/request" not in acl
    passwords = dict(line.split(",", 1) for line in (folder / "credentials.csv").read_text().split()[1:])
    broker = MosquittoProcess(
        tmp_path / "mosquitto",
        extra=f"allow_anonymous false\npassword_file {folder / 'passwd'}\nacl_file {folder / 'acl'}\n",
    )
    broker.start()
    try:
        watcher = subprocess.Popen(
            ["mosquitto_sub", "-p", str(broker.port), "-u", GATEWAY_USER, "-P", passwords[GATEWAY_USER],
             "-t", "cgw/v1/+/request", "-t", "cgw/v1/+/status", "-q", "1", "-v"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert watcher.stdout is not None
        try:
            # The watcher is subscribed once it receives a retained message published for it.
            sensor = ("-u", "sensor-a", "-P", passwords["sensor-a"])
            mosquitto_pub(broker.port, "cgw/v1/sensor-a/status", '{"state":"online"}', "-r", *sensor)
            assert watcher.stdout.readline().startswith("cgw/v1/sensor-a/status")
            mosquitto_pub(broker.port, "cgw/v1/sensor-a/request", '{"request_id":"forged"}', *sensor)
            kiosk = ("-u", "kiosk-a", "-P", passwords["kiosk-a"])
            mosquitto_pub(broker.port, "cgw/v1/kiosk-a/request", '{"request_id":"real"}', *kiosk)
            # Each publish was acknowledged before the next: had the broker routed the sensor's, it
            # would have arrived first.
            assert watcher.stdout.readline().strip() == 'cgw/v1/kiosk-a/request {"request_id":"real"}'
        finally:
            watcher.kill()
            watcher.wait()
            watcher.stdout.close()  # its pipe, or a ResourceWarning (warnings are errors)
    finally:
        broker.kill()


async def test_dead_letters_of_refused_votes_name_no_household(tmp_path: Path, mosquitto: Any) -> None:
    async with running(voice_settings(tmp_path, mosquitto.url)) as gw:
        terminal_birth(mosquitto.port, "kiosk-1", "3")
        body = {
            "vote_id": "v-1",
            "proposal_id": "P-0001",
            "choice": "yes",
            "household": {"building": "3", "unit": "2-301", "pin": PIN},
        }
        mosquitto_pub(mosquitto.port, "cgw/v1/kiosk-1/vote", orjson.dumps(body))
        async with api(gw, "operator-token") as operator:

            async def letter() -> Any:
                items = (await operator.get("/api/v1/dead-letters", headers=AS_OPERATOR)).json()["items"]
                return items[0] if items else None

            found = await eventually(letter, 5.0, "the refused vote's dead letter")
        assert PIN not in found["payload"] and "2-301" not in found["payload"]
        assert "2-301" not in found["reason"]


async def test_tickets_filed_before_stay_readable_and_rateable_by_their_terminal(
    tmp_path: Path, mosquitto: Any
) -> None:
    """A box upgraded from before (services schema 4): its sequential tickets are kept, who filed
    each is taken from the audit trail, and the terminal that filed one still rates it."""
    old = sqlite3.connect(tmp_path / "services.sqlite3")
    for statements in MIGRATIONS[:4]:
        for statement in statements:
            old.execute(statement)
    old.execute(
        """INSERT INTO requests (seq, id, service_code, service_group, state, source, device_id,
            request_key, description, building, unit, household, contact, attributes, requested_ms,
            updated_ms, expected_ms, state_since_ms, completed_ms)
           VALUES (1, 'testville-000001', 'repair.plumbing', 'repair', 'completed', 'terminal',
            'kiosk-old', 'kiosk-old|r-0', 'tap drips', '3', '2-301', '3/2-301', '{}', '{}', 1, 2, 3, 2, 2)"""
    )
    old.execute(
        "INSERT INTO transitions (request_id, ts_ms, from_state, to_state, actor, note)"
        " VALUES ('testville-000001', 1, NULL, 'submitted', 'terminal kiosk-old', 'filed via terminal')"
    )
    old.execute("PRAGMA user_version=4")
    old.commit()
    old.close()
    async with running(voice_settings(tmp_path, mosquitto.url)) as gw, api(gw, "operator-token") as operator:
        found = await operator.get("/api/v1/requests/testville-000001")
        assert found.status_code == 200 and found.json()["description"] == "tap drips"
        port = mosquitto.port
        acks = Acks(port, "kiosk-old")
        try:
            await acks.ready()
            terminal_birth(port, "kiosk-old", "3")
            rating = {"rating_id": "o-1", "service_request_id": "testville-000001", "score": 5}
            mosquitto_pub(port, "cgw/v1/kiosk-old/rating", orjson.dumps(rating))
            assert (await acks.next("rating_id", "o-1"))["status"] == "accepted"
        finally:
            acks.close()
        assert (await operator.get("/api/v1/requests/testville-000001")).json()["rating"]["score"] == 5
