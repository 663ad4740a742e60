"""The service loop, simulated faster than real time: residents, providers, raters and voters.

Residents file needs at the station's terminals (MQTT `request`, waiting for each `ack`) with
daily and weekly rhythms per service; a hotspot can be injected (building 3's elevator breaks:
the elevator reports a fault and residents pile in). Providers triage, assign, start and finish
the work over the operator API with delays that vary by provider, and sometimes miss deadlines;
residents rate finished work (scores depend on delay) and households vote on a proposal drawn
from the needs list. Everything is stamped with simulated time, so a week runs in seconds.

`ServiceSimulation.run()` returns a `ServiceLog` of everything done and acknowledged, which is
what a test needs to recompute every figure the gateway reports on its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import httpx
import orjson

from gateway.services.catalogue import Catalogue, Service, load_catalogue
from gateway.services.households import Household, hash_secret, write_register
from simulators.device import BURST_IN_FLIGHT

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

# Relative demand per service (per day, before rhythms); the rest of the catalogue is rarer.
DEMAND = {
    "elderly.meal_delivery": 6.0,
    "elderly.home_visit": 2.5,
    "elderly.day_care": 1.0,
    "repair.plumbing": 3.0,
    "repair.electrical": 2.0,
    "repair.appliance": 1.5,
    "repair.door_lock": 1.0,
    "facility.elevator": 0.6,
    "facility.water_leak": 0.8,
    "facility.lighting": 1.5,
    "facility.access_door": 0.8,
    "sanitation.garbage": 2.5,
    "sanitation.cleaning": 1.5,
    "security.patrol": 0.8,
    "health.home_doctor": 1.5,
    "health.checkup": 1.5,
    "culture.activity": 2.0,
    "culture.tutoring": 1.0,
    "dispute.neighbours": 0.8,
    "complaint.service": 1.0,
    "complaint.property": 1.0,
}
# Share of the day's demand per hour: quiet at night, peaks mid-morning and late afternoon.
HOURLY = [
    0.1,
    0.05,
    0.05,
    0.05,
    0.1,
    0.3,
    0.8,
    1.4,
    2.0,
    2.2,
    2.0,
    1.6,
    1.2,
    1.3,
    1.6,
    1.8,
    1.9,
    1.6,
    1.2,
    1.0,
    0.8,
    0.5,
    0.3,
    0.2,
]
WEEKDAY = [1.1, 1.0, 1.0, 1.0, 1.05, 0.8, 0.7]  # Monday … Sunday
# How fast each provider works, as a share of the deadline (median), and its spread.
PACE = {
    "elev-maint": (0.5, 0.5),
    "handy-coop": (0.9, 0.6),
    "prop-mgmt": (0.7, 0.5),
    "meal-canteen": (0.3, 0.3),
    "care-centre": (0.6, 0.5),
    "clinic": (0.6, 0.4),
    "volunteers": (0.8, 0.7),
    "street-office": (0.7, 0.5),
    "mediation": (0.8, 0.5),
    "sanitation-co": (0.5, 0.4),
}


@dataclass
class Hotspot:
    """Extra demand for one service in one building on one day of the simulation."""

    building: str = "3"
    service_code: str = "facility.elevator"
    day: int = -1  # day index from the start; -1: the last 24 hours, whatever the time of day
    start_hour: int = 7  # on a given day; the last-24-hours hotspot ends two hours before the end
    hours: int = 12
    requests: int = 24
    device_id: str | None = "b03-elev-1"  # reports the fault that starts it


UNITS_PER_FLOOR = 4


def household_pin(seed: int, building: str, unit: str) -> str:
    """A simulated household's PIN: the same for the simulation and the register it is checked in."""
    digest = hashlib.sha256(f"{seed}|{building}/{unit}".encode()).digest()
    return f"{int.from_bytes(digest[:4], 'big') % 1_000_000:06d}"


def write_household_register(path: Path, seed: int, buildings: int, floors: int) -> int:
    """The simulated community's household register (every unit, its PIN hashed); its size."""
    entries = [
        Household(building=b, unit=unit, secret=hash_secret(household_pin(seed, b, unit)))
        for b in (str(n) for n in range(1, buildings + 1))
        for floor in range(1, floors + 1)
        for unit in (f"{b}-{floor}{u:02d}" for u in range(1, UNITS_PER_FLOOR + 1))
    ]
    write_register(path, entries)
    return len(entries)


@dataclass
class ServiceSimConfig:
    broker_url: str
    api_url: str
    operator_token: str
    terminals: tuple[str, ...] = ("station-term-1", "station-term-2", "station-term-3")
    seed: int = 7
    days: int = 7
    end_ms: int | None = None  # default: now
    buildings: int = 6
    floors: int = 6
    demand_scale: float = 1.0
    hotspot: Hotspot | None = field(default_factory=Hotspot)
    resend_rate: float = 0.05  # requests and ratings re-sent (the gateway must not double them)
    rating_rate: float = 0.75
    voters: int = 40
    concurrency: int = 16


@dataclass
class SimRequest:
    request_id: str
    terminal: str
    service_code: str
    service_group: str
    building: str
    unit: str
    requested_ms: int
    ticket: str = ""
    steps: list[tuple[int, str]] = field(default_factory=list)  # (ts, state) after submitted
    provider_id: str | None = None
    score: int | None = None
    merged_into: str | None = None  # the ticket it was merged into


@dataclass
class ServiceLog:
    start_ms: int
    end_ms: int
    requests: list[SimRequest] = field(default_factory=list)
    sensor_events: list[dict[str, Any]] = field(default_factory=list)
    assessments: list[dict[str, Any]] = field(default_factory=list)
    proposal_id: str | None = None
    votes: dict[str, str] = field(default_factory=dict)  # household → choice (first one counts)
    duplicates_acked: int = 0
    refused: list[dict[str, Any]] = field(default_factory=list)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def _poisson(rng: random.Random, lam: float) -> int:
    """Knuth's method: fine for the small rates of one hour."""
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def voting_households(
    rng: random.Random, buildings: int, floors: int, voters: int
) -> dict[str, tuple[str, str]]:
    """`voters` households drawn at random, as {"building/unit": (building, unit)}.

    A small community has fewer households than the configured voters: then every household votes
    (drawing until `voters` distinct ones were found never ended, and froze the demo's event loop).
    """
    wanted = min(voters, buildings * floors * UNITS_PER_FLOOR)
    households: dict[str, tuple[str, str]] = {}
    while len(households) < wanted:
        b = str(rng.randint(1, buildings))
        unit = f"{b}-{rng.randint(1, floors)}{rng.randint(1, UNITS_PER_FLOOR):02d}"
        households[f"{b}/{unit}"] = (b, unit)
    return households


class ServiceSimulation:
    def __init__(self, config: ServiceSimConfig, catalogue: Catalogue | None = None) -> None:
        self.config = config
        self.catalogue = catalogue or load_catalogue()
        self.rng = random.Random(config.seed)
        end = config.end_ms or int(datetime.now(UTC).timestamp() * 1000)
        # Start half an hour inside the window, so the oldest request is not at the edge of
        # how far back the gateway accepts timestamps.
        self.log = ServiceLog(start_ms=end - config.days * DAY_MS + HOUR_MS // 2, end_ms=end)
        self._acks: dict[str, asyncio.Future[dict[str, Any]]] = {}

    # -- the plan of the week ------------------------------------------------------------------

    def arrivals(self) -> list[SimRequest]:
        cfg, rng, log = self.config, self.rng, self.log
        out: list[SimRequest] = []
        hour_ms = log.start_ms - log.start_ms % HOUR_MS
        while hour_ms < log.end_ms:
            moment = datetime.fromtimestamp(hour_ms / 1000, UTC)
            rhythm = HOURLY[moment.hour] * WEEKDAY[moment.weekday()] / 24
            for code, per_day in DEMAND.items():
                for _ in range(_poisson(rng, per_day * rhythm * cfg.demand_scale)):
                    ts = hour_ms + rng.randrange(HOUR_MS)
                    if log.start_ms <= ts < log.end_ms:
                        out.append(self._request(code, ts, str(rng.randint(1, cfg.buildings))))
            hour_ms += HOUR_MS
        spot = cfg.hotspot
        if spot is not None:
            if spot.day >= 0:
                first = log.start_ms - log.start_ms % DAY_MS + spot.day * DAY_MS + spot.start_hour * HOUR_MS
            else:
                # Relative to the end, not to a calendar day: "today's" hotspot is then inside the
                # gateway's default one-day window at any time of day.
                first = log.end_ms - (spot.hours + 2) * HOUR_MS
            first = max(log.start_ms, min(first, log.end_ms - spot.hours * HOUR_MS))
            for _ in range(spot.requests):
                out.append(
                    self._request(
                        spot.service_code, first + rng.randrange(spot.hours * HOUR_MS), spot.building
                    )
                )
            if spot.device_id:
                log.sensor_events.append(
                    {"device_id": spot.device_id, "ts_ms": first, "type": "fault", "building": spot.building}
                )
        out.sort(key=lambda r: r.requested_ms)
        return out

    def _request(self, code: str, ts: int, building: str) -> SimRequest:
        service = self.catalogue.services[code]
        floor = self.rng.randint(1, self.config.floors)
        unit = f"{building}-{floor}{self.rng.randint(1, 4):02d}"
        return SimRequest(
            request_id=str(uuid.UUID(int=self.rng.getrandbits(128))),
            terminal=self.rng.choice(self.config.terminals),
            service_code=code,
            service_group=service.group,
            building=building,
            unit=unit,
            requested_ms=ts,
        )

    def work_plan(self, request: SimRequest, earlier: list[SimRequest]) -> None:
        """The steps providers will take on one request, in simulated time (only those before the end)."""
        rng, end = self.rng, self.log.end_ms
        service = self.catalogue.services[request.service_code]
        t = request.requested_ms
        steps: list[tuple[int, str]] = []

        def step(after_ms: float, state: str) -> bool:
            nonlocal t
            t = int(t + max(60_000, after_ms))
            if t >= end:
                return False
            steps.append((t, state))
            return True

        # Residents often report what a neighbour already reported: the same shared facility, or
        # the same household twice within a day. Such a request is merged into the first.
        twin = next((e for e in reversed(earlier) if _same_need(e, request)), None)
        if twin is not None and rng.random() < 0.6:
            step(rng.uniform(0.1, 1) * HOUR_MS, "merged")
            request.steps = steps
            request.provider_id = twin.ticket  # remembered as the merge target
            return
        if request.service_group == "complaint" and rng.random() < 0.25:
            step(rng.uniform(0.5, 6) * HOUR_MS, "rejected")  # not a valid complaint
            request.steps = steps
            return
        deadline = service.deadline_ms
        provider = (
            service.providers[0]
            if rng.random() < 0.7 or len(service.providers) == 1
            else rng.choice(service.providers[1:])
        )
        median, spread = PACE[provider]
        total = deadline * median * math.exp(rng.gauss(0, spread))
        if not step(min(total * 0.1, deadline * 0.1), "triaged"):
            request.steps = steps
            return
        if service.group in ("culture", "health") and rng.random() < 0.3:
            step(total * 0.1, "planned")
        ok = (
            step(total * 0.1, "assigned")
            and step(total * 0.2, "in_service")
            and step(total * 0.5, "completed")
        )
        request.steps = steps
        if any(state == "assigned" for _, state in steps):
            request.provider_id = provider  # only once the week got that far
        if not ok:
            return
        if rng.random() < 0.04:  # the resident says it is not fixed
            step(rng.uniform(1, 10) * HOUR_MS, "reopened") and step(deadline * 0.2, "in_service") and step(
                deadline * 0.3, "completed"
            )
            request.steps = steps

    def score_for(self, request: SimRequest) -> int:
        service = self.catalogue.services[request.service_code]
        done = max(ts for ts, state in request.steps if state == "completed")
        late = (done - request.requested_ms) / service.deadline_ms
        weights = [1, 1, 2, 5, 6] if late <= 1 else ([2, 4, 4, 2, 1] if late <= 2 else [5, 4, 2, 1, 0])
        return self.rng.choices([1, 2, 3, 4, 5], weights)[0]

    # -- running it ----------------------------------------------------------------------------

    async def run(self) -> ServiceLog:
        cfg = self.config
        parts = urlsplit(cfg.broker_url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 1883
        requests = self.arrivals()
        headers = {"Authorization": f"Bearer {cfg.operator_token}"}
        async with (
            httpx.AsyncClient(base_url=cfg.api_url, headers=headers, timeout=30) as http,
            aiomqtt.Client(
                host, port, identifier=f"cgw-sim-desk-{uuid.uuid4().hex[:8]}", clean_session=True
            ) as mqtt,
        ):
            mqtt.pending_calls_threshold = BURST_IN_FLIGHT
            listener = asyncio.create_task(self._listen(mqtt))
            await mqtt.subscribe([(f"cgw/v1/{t}/ack", 1) for t in cfg.terminals])
            for terminal in cfg.terminals:  # only service terminals speak for residents
                birth = {"state": "online", "kind": "service_terminal", "location": {"building": "station"}}
                await mqtt.publish(f"cgw/v1/{terminal}/status", orjson.dumps(birth), qos=1)
            try:
                await self._file(mqtt, requests)
                requests.extend(await self._sensor_events(mqtt, http))
                requests.sort(key=lambda r: r.requested_ms)
                await self._work(http, requests)
                await self._rate(mqtt, requests)
                await self._assess(http)
                await self._vote(http, mqtt)
            finally:
                listener.cancel()
        self.log.requests = requests
        return self.log

    async def _sensor_events(self, mqtt: aiomqtt.Client, http: httpx.AsyncClient) -> list[SimRequest]:
        """Publish the devices' faults; return the requests they opened, to be worked like the rest."""
        opened: list[SimRequest] = []
        for event in self.log.sensor_events:
            device = event["device_id"]
            birth = {"state": "online", "kind": "elevator", "location": {"building": event["building"]}}
            await mqtt.publish(f"cgw/v1/{device}/status", orjson.dumps(birth), qos=1)
            body = {"ts": event["ts_ms"], "type": event["type"], "message": "elevator stopped between floors"}
            await mqtt.publish(f"cgw/v1/{device}/event", orjson.dumps(body), qos=1)
            for _ in range(300):
                found = await http.get(
                    "/api/v1/requests", params={"building": event["building"], "limit": 1000}
                )
                mine = [r for r in found.raise_for_status().json()["items"] if r["device_id"] == device]
                if mine:
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"the fault of {device} opened no request")
            r = mine[0]
            event["ticket"] = r["id"]
            opened.append(
                SimRequest(
                    request_id=f"sensor-{r['id']}",
                    terminal="",
                    service_code=r["service_code"],
                    service_group=r["service_group"],
                    building=event["building"],
                    unit="",
                    requested_ms=r["requested_ms"],
                    ticket=r["id"],
                )
            )
        return opened

    async def _listen(self, mqtt: aiomqtt.Client) -> None:
        async for message in mqtt.messages:
            ack = orjson.loads(message.payload)
            key = ack.get("request_id") or ack.get("vote_id") or ack.get("rating_id")
            future = self._acks.get(key or "")
            if future is not None and not future.done():
                future.set_result(ack)

    async def _send(
        self, mqtt: aiomqtt.Client, terminal: str, channel: str, key: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._acks[key] = future
        await mqtt.publish(f"cgw/v1/{terminal}/{channel}", orjson.dumps(body), qos=1)
        try:
            return await asyncio.wait_for(future, 15)
        finally:
            self._acks.pop(key, None)

    async def _file(self, mqtt: aiomqtt.Client, requests: list[SimRequest]) -> None:
        gate = asyncio.Semaphore(self.config.concurrency)

        async def one(r: SimRequest) -> None:
            body = {
                "request_id": r.request_id,
                "ts": r.requested_ms,
                "service_code": r.service_code,
                "description": f"{self.catalogue.services[r.service_code].name_zh}（{r.unit}）",
                "location": {"building": r.building, "unit": r.unit},
                "attributes": _attributes(self.catalogue.services[r.service_code], self.rng, r.requested_ms),
            }
            async with gate:
                ack = await self._send(mqtt, r.terminal, "request", r.request_id, body)
                if ack["status"] != "accepted":
                    raise RuntimeError(f"request {r.request_id} was {ack['status']}: {ack.get('error')}")
                r.ticket = ack["service_request_id"]
                if self.rng.random() < self.config.resend_rate:
                    again = await self._send(mqtt, r.terminal, "request", r.request_id, body)
                    if again["status"] != "duplicate" or again["service_request_id"] != r.ticket:
                        raise RuntimeError(f"a re-sent request was not recognised: {again}")
                    self.log.duplicates_acked += 1

        await asyncio.gather(*(one(r) for r in requests))

    async def _work(self, http: httpx.AsyncClient, requests: list[SimRequest]) -> None:
        earlier: list[SimRequest] = []
        for r in requests:
            self.work_plan(r, earlier)
            earlier.append(r)
        gate = asyncio.Semaphore(self.config.concurrency)

        async def one(r: SimRequest) -> None:
            async with gate:
                for ts, state in r.steps:
                    body: dict[str, Any] = {"to": state, "ts": _iso(ts), "note": f"simulated {state}"}
                    if state == "assigned":
                        body["provider_id"] = r.provider_id
                    if state == "merged":
                        body["merged_into"] = r.provider_id
                    response = await _post(http, f"/api/v1/requests/{r.ticket}/transitions", json=body)
                    if response.status_code != 200:
                        raise RuntimeError(f"{r.ticket} → {state}: {response.status_code} {response.text}")
                if r.steps and r.steps[0][1] == "merged":
                    r.merged_into, r.provider_id = r.provider_id, None

        await asyncio.gather(*(one(r) for r in requests))

    async def _rate(self, mqtt: aiomqtt.Client, requests: list[SimRequest]) -> None:
        for r in requests:
            states = [s for _, s in r.steps]
            if not r.terminal or not states or states[-1] != "completed":
                continue
            if self.rng.random() > self.config.rating_rate:
                continue
            done = r.steps[-1][0]
            ts = done + int(self.rng.uniform(0.5, 24) * HOUR_MS)
            if ts >= self.log.end_ms:
                continue
            score = self.score_for(r)
            key = f"rate-{r.request_id}"
            body = {"rating_id": key, "service_request_id": r.ticket, "score": score, "ts": ts, "comment": ""}
            ack = await self._send(mqtt, r.terminal, "rating", key, body)
            if ack["status"] != "accepted":
                raise RuntimeError(f"rating of {r.ticket} was {ack}")
            r.score = score
            r.steps.append((ts, "evaluated"))
            if self.rng.random() < self.config.resend_rate:
                again = await self._send(mqtt, r.terminal, "rating", key, {**body, "score": 1})
                if again["status"] != "duplicate":
                    raise RuntimeError(f"a re-sent rating was not recognised: {again}")
                self.log.duplicates_acked += 1

    async def _assess(self, http: httpx.AsyncClient) -> None:
        for provider in sorted(self.catalogue.providers):
            if self.rng.random() < 0.5:
                continue
            body = {
                "provider_id": provider,
                "score": self.rng.randint(2, 5),
                "assessor": "District supervision office",
                "ts": _iso(self.log.end_ms - self.rng.randrange(self.config.days * DAY_MS // 2)),
            }
            response = await _post(http, "/api/v1/assessments", json=body)
            response.raise_for_status()
            self.log.assessments.append({**body, "ts_ms": response.json()["ts_ms"]})

    async def _vote(self, http: httpx.AsyncClient, mqtt: aiomqtt.Client) -> None:
        listed = (await http.get("/api/v1/needs")).raise_for_status().json()["items"]
        if not listed:
            return
        top = listed[0]
        created = await _post(
            http,
            "/api/v1/proposals",
            json={
                "title": f"Fix {top['need_id']} for good",
                "description": top["why"],
                "need_ids": [top["need_id"]],
            },
        )
        proposal = created.raise_for_status().json()["id"]
        self.log.proposal_id = proposal
        config = self.config
        households = voting_households(self.rng, config.buildings, config.floors, config.voters)
        terminal = self.config.terminals[0]
        for key, (b, unit) in households.items():
            choice = self.rng.choices(["yes", "no", "abstain"], [6, 3, 1])[0]
            vote_id = uuid.UUID(int=self.rng.getrandbits(128)).hex
            body = {
                "vote_id": vote_id,
                "proposal_id": proposal,
                "household": {"building": b, "unit": unit, "pin": household_pin(self.config.seed, b, unit)},
                "choice": choice,
                "ts": self.log.end_ms - 1,
            }
            ack = await self._send(mqtt, terminal, "vote", vote_id, body)
            if ack["status"] != "accepted":
                raise RuntimeError(f"vote refused: {ack}")
            self.log.votes[key] = choice
            if not self.log.refused or self.rng.random() < 0.1:  # the same household tries again
                second = uuid.UUID(int=self.rng.getrandbits(128)).hex
                again = await self._send(
                    mqtt, terminal, "vote", second, {**body, "vote_id": second, "choice": "no"}
                )
                if again["status"] != "rejected":
                    raise RuntimeError(f"a second vote by {key} was not refused: {again}")
                self.log.refused.append(again)


def _same_need(earlier: SimRequest, later: SimRequest) -> bool:
    return (
        earlier.service_code == later.service_code
        and earlier.building == later.building
        and earlier.requested_ms > later.requested_ms - DAY_MS
        and (earlier.unit == later.unit or earlier.service_group == "facility")
        and not (earlier.steps and earlier.steps[0][1] == "merged")
    )


def _attributes(service: Service, rng: random.Random, ts: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attribute in service.attributes:
        if not attribute.required:
            continue
        if attribute.values:
            out[attribute.code] = rng.choice(attribute.values).key
        elif attribute.datatype == "datetime":
            out[attribute.code] = _iso(ts + DAY_MS)
        else:
            out[attribute.code] = "simulated"
    return out


async def _post(http: httpx.AsyncClient, url: str, **kwargs: Any) -> httpx.Response:
    """POST as a well-behaved client: over the token's write-rate limit (429), wait as told."""
    while True:
        response = await http.post(url, **kwargs)
        if response.status_code != 429:
            return response
        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
