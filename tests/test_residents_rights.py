"""Retention and residents' rights (docs/privacy.md): export, erasure, pseudonymisation.

Over a real Mosquitto, the real HTTP API and the real `cgw` commands: a household files, is
served, rates and votes; `cgw residents export` gives everything kept about it; `cgw residents
erase` leaves no trace of it in the stores, the dead letters or a backup made afterwards, while
the evaluation figures and the vote tally are the same as before. Closed requests past
`privacy.personal_data_retention` are pseudonymised by the desk's periodic task.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from gateway.services.households import add_household
from gateway.settings import ServicesSettings, Settings
from tests.harness import api, gateway_settings, mosquitto_pub, running, terminal_birth
from tests.services import free_port
from tests.test_privacy import Acks

PHONE = "13912345678"
WORDS = "the lift on my floor squeaks, Mrs Chen"
COMMENT = "thank you Master Liu"
HOUSEHOLD = ("3", "9-901")
PIN = "424242"


def cgw(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CGW_DATA_DIR": str(data_dir), "CGW_COMMUNITY": "testville",
           "CGW_API__PORT": str(free_port())}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def rights_settings(tmp_path: Path, url: str) -> tuple[Path, Settings]:
    """The gateway's data folder, and its settings with the household in the register."""
    register = tmp_path / "households.yaml"
    add_household(register, *HOUSEHOLD, PIN)
    data = tmp_path / "data"
    return data, gateway_settings(data, url, services=ServicesSettings(households=register))


async def serve_a_household(gw: Any, port: int) -> tuple[str, str, str]:
    """The household files twice (one refused), is served, rates and votes; another household
    files once. Returns (the household's ticket, the other's ticket, the proposal)."""
    acks = Acks(port, "kiosk-1")
    try:
        await acks.ready()
        terminal_birth(port, "kiosk-1", "3")
        location = {"building": HOUSEHOLD[0], "floor": 9, "unit": HOUSEHOLD[1]}
        refused = {"request_id": "x-1", "service_code": "no.such", "location": location, "contact": PHONE}
        mosquitto_pub(port, "cgw/v1/kiosk-1/request", orjson.dumps(refused))
        assert (await acks.next("request_id", "x-1"))["status"] == "rejected"
        mine = {
            "request_id": "r-1",
            "service_code": "repair.plumbing",
            "description": WORDS,
            "location": location,
            "contact": PHONE,
        }
        mosquitto_pub(port, "cgw/v1/kiosk-1/request", orjson.dumps(mine))
        ticket = (await acks.next("request_id", "r-1"))["service_request_id"]
        other = {
            "request_id": "r-2",
            "service_code": "repair.plumbing",
            "location": {"building": "3", "unit": "1-101"},
        }
        mosquitto_pub(port, "cgw/v1/kiosk-1/request", orjson.dumps(other))
        other_ticket = (await acks.next("request_id", "r-2"))["service_request_id"]
        async with api(gw, "operator-token") as operator:
            for t in (ticket, other_ticket):
                for step in (
                    {"to": "triaged", "note": f"called {PHONE}" if t == ticket else "called back"},
                    {"to": "assigned", "provider_id": "handy-coop"},
                    {"to": "in_service"},
                    {"to": "completed"},
                ):
                    assert (
                        await operator.post(f"/api/v1/requests/{t}/transitions", json=step)
                    ).status_code == 200
            proposal = (await operator.post("/api/v1/proposals", json={"title": "New lift"})).json()["id"]
        rating = {"rating_id": "g-1", "service_request_id": ticket, "score": 4, "comment": COMMENT}
        mosquitto_pub(port, "cgw/v1/kiosk-1/rating", orjson.dumps(rating))
        assert (await acks.next("rating_id", "g-1"))["status"] == "accepted"
        vote = {
            "vote_id": "v-1",
            "proposal_id": proposal,
            "choice": "yes",
            "household": {"building": HOUSEHOLD[0], "unit": HOUSEHOLD[1], "pin": PIN},
        }
        mosquitto_pub(port, "cgw/v1/kiosk-1/vote", orjson.dumps(vote))
        assert (await acks.next("vote_id", "v-1"))["status"] == "accepted"
    finally:
        acks.close()
    return ticket, other_ticket, proposal


# One fixed period, so two reads of the figures are of the same period.
PERIOD = {
    "start": (datetime.now(UTC) - timedelta(days=1)).isoformat(),
    "end": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
}


async def figures(gw: Any, proposal: str) -> dict[str, Any]:
    """The evaluation figures (overall, by provider, by service), the vote tally, the heat map."""
    async with api(gw, "operator-token") as operator:
        out = {
            by: (await operator.get("/api/v1/evaluation", params={"by": by, **PERIOD})).json()
            for by in ("overall", "provider", "service")
        }
        votes = (await operator.get(f"/api/v1/proposals/{proposal}")).json()
        out["votes"] = {k: votes[k] for k in ("votes", "households_voted")}
        needs = (await operator.get("/api/v1/needs/heatmap", params=PERIOD)).json()
        out["heatmap"] = needs["buildings"]
        return out


def traces(files: list[Path]) -> list[str]:
    """Which of the household's words any of `files` still holds, byte for byte."""
    found = []
    for path in files:
        data = path.read_bytes()
        for word in (PHONE, WORDS, COMMENT, HOUSEHOLD[1], "Mrs Chen"):
            if word.encode() in data:
                found.append(f"{path.name}: {word}")
    return found


async def test_an_erased_household_leaves_no_trace_and_the_figures_stay(
    tmp_path: Path, mosquitto: Any
) -> None:
    data, settings = rights_settings(tmp_path, mosquitto.url)
    async with running(settings) as gw:
        ticket, other_ticket, proposal = await serve_a_household(gw, mosquitto.port)
        await gw.writer.drain()
        before = await figures(gw, proposal)

        # The export: machine-readable, everything kept about the household, and itself logged.
        household = f"{HOUSEHOLD[0]}/{HOUSEHOLD[1]}"
        made = await asyncio.to_thread(cgw, data, "residents", "export", "--household", household)
        assert made.returncode == 0, made.stderr
        exported = json.loads(made.stdout)
        assert exported["format"] == "cgw-residents-export/1"
        [request] = exported["requests"]
        assert request["id"] == ticket and request["contact"] == {"contact": PHONE}
        assert request["description"] == WORDS and request["unit"] == HOUSEHOLD[1]
        assert request["rating"]["comment"] == COMMENT and request["history"][1]["note"] == f"called {PHONE}"
        assert exported["votes"] == [
            {"proposal_id": proposal, "choice": "yes", "ts_ms": exported["votes"][0]["ts_ms"]}
        ]
        by_contact = json.loads(
            (await asyncio.to_thread(cgw, data, "residents", "export", "--contact", PHONE)).stdout
        )
        assert [r["id"] for r in by_contact["requests"]] == [ticket]
        async with api(gw, "installer-token") as installer:
            logged = (await installer.get("/api/v1/access-log", params={"record": ticket})).json()["items"]
            assert any(
                e["endpoint"] == "cgw residents export" and e["who"].startswith("cli:") for e in logged
            )

        # The erasure, with its report.
        erased = await asyncio.to_thread(cgw, data, "residents", "erase", "--household", household, "--yes")
        assert erased.returncode == 0, erased.stderr
        report = json.loads(erased.stdout)
        assert report["requests"] == [ticket] and report["requests_still_open"] == []
        assert report["votes_unlinked"] == 1 and report["ratings_emptied"] == 1
        assert household not in erased.stdout and PHONE not in erased.stdout

        # The figures are the same; the request is still counted, named by nothing personal.
        assert await figures(gw, proposal) == before
        async with api(gw, "operator-token") as operator:
            seen = (await operator.get(f"/api/v1/requests/{ticket}")).json()
            assert seen["description"] == "" and seen["unit"] is None and seen["household"] is None
            assert (
                seen["address"] is None and seen["rating"]["comment"] == "" and seen["rating"]["score"] == 4
            )
            assert all(step["note"] == "" for step in seen["history"])
            assert seen["state"] == "evaluated" and seen["building"] == "3"
            other = (await operator.get(f"/api/v1/requests/{other_ticket}")).json()
            assert other["unit"] == "1-101"  # another household is untouched
        again = json.loads(
            (await asyncio.to_thread(cgw, data, "residents", "export", "--household", household)).stdout
        )
        assert again["requests"] == [] and again["votes"] == []

        # A backup made afterwards holds no trace of it.
        backups = tmp_path / "backups"
        assert (await asyncio.to_thread(cgw, data, "backup", "--out", str(backups))).returncode == 0
        (folder,) = backups.iterdir()
        assert traces(sorted(folder.glob("*.sqlite3"))) == []
    # Nor do the stores themselves (their WAL files folded in as the gateway closed them).
    assert traces(sorted(p for p in data.iterdir() if ".sqlite3" in p.name)) == []


async def test_closed_requests_are_pseudonymised_after_the_retention(tmp_path: Path, mosquitto: Any) -> None:
    data, settings = rights_settings(tmp_path, mosquitto.url)
    async with running(settings) as gw:
        ticket, other_ticket, proposal = await serve_a_household(gw, mosquitto.port)
        async with api(gw, "operator-token") as operator:
            filed = await operator.get("/api/v1/requests")
            open_one = next(r for r in filed.json()["items"] if r["id"] == other_ticket)
            assert open_one["state"] == "completed"  # completed is closed in Open311 terms
            await operator.post(f"/api/v1/proposals/{proposal}/close", json={})
        before = await figures(gw, proposal)
        # Within the retention nothing changes; past it, the periodic task pseudonymises.
        now = int(time.time() * 1000)
        await gw.deadlines.keep_to_retention(now)
        async with api(gw, "operator-token") as operator:
            assert (await operator.get(f"/api/v1/requests/{ticket}")).json()["description"] == WORDS
        keep_ms = int(settings.privacy.personal_data_retention.total_seconds() * 1000)
        await gw.deadlines.keep_to_retention(now + keep_ms + 60_000)
        async with api(gw, "operator-token") as operator:
            for t in (ticket, other_ticket):
                seen = (await operator.get(f"/api/v1/requests/{t}")).json()
                assert seen["description"] == "" and seen["unit"] is None and seen["household"] is None
                assert all(step["note"] == "" for step in seen["history"])
        assert await figures(gw, proposal) == before
        backups = tmp_path / "backups"
        assert (await asyncio.to_thread(cgw, data, "backup", "--out", str(backups))).returncode == 0
        (folder,) = backups.iterdir()
        # The dead letter of the refused request never held the phone number or the unit.
        assert traces(sorted(folder.glob("*.sqlite3"))) == []
