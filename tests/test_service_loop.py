"""The precision-service loop end to end: a simulated week over real MQTT and HTTP.

Residents file needs at terminals (MQTT, with acks), a hotspot is injected (building 3's elevator
breaks: the elevator reports a fault and residents pile in), providers work the requests through
the operator API, residents rate and vote. Then every figure the gateway reports is recomputed
here from the simulation's own log, with the definitions of docs/services.md, and compared.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from gateway.settings import InfluxSettings, PipelineSettings, ServicesSettings
from simulators.residents import (
    Hotspot,
    ServiceLog,
    ServiceSimConfig,
    ServiceSimulation,
    SimRequest,
    write_household_register,
)
from tests.harness import (
    AS_OPERATOR,
    api,
    eventually,
    gateway_settings,
    live_stream,
    mosquitto_pub,
    running,
    terminal_birth,
)

CATALOGUE = Path(__file__).parent.parent / "gateway" / "services" / "data" / "catalogue.yaml"
UNITS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000}
ACTIVE = {"submitted", "triaged", "planned", "assigned", "in_service", "reopened"}


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def catalogue_facts() -> tuple[dict[str, int], dict[str, str]]:
    """Deadlines (ms) and groups per service, read straight from the YAML."""
    data = yaml.safe_load(CATALOGUE.read_text(encoding="utf-8"))
    deadlines = {
        s["service_code"]: int(s["deadline"][:-1]) * UNITS[s["deadline"][-1]] for s in data["services"]
    }
    groups = {s["service_code"]: s["group"] for s in data["services"]}
    return deadlines, groups


def outcome(r: SimRequest) -> tuple[str, int | None]:
    """Final state and completion time (a reopening clears the completion) from the log's steps."""
    state, completed = "submitted", None
    for ts, step in r.steps:
        state = step
        if step == "completed":
            completed = ts
        elif step == "reopened":
            completed = None
    return state, completed


def expected_figures(requests: list[SimRequest], assessments: list[dict[str, Any]]) -> dict[str, Any]:
    deadlines, _ = catalogue_facts()
    valid, completed, on_time, hours = [], [], [], []
    complaints = resolved = 0
    for r in requests:
        state, done = outcome(r)
        if state in ("rejected", "merged"):
            continue
        valid.append(r)
        if r.service_group == "complaint":
            complaints += 1
            resolved += done is not None
        if done is not None:
            completed.append(r)
            on_time.append(done <= r.requested_ms + deadlines[r.service_code])
            hours.append((done - r.requested_ms) / 3_600_000)
    scores = [r.score for r in requests if r.score is not None]
    hours.sort()
    p90 = hours[math.ceil(0.9 * len(hours)) - 1] if hours else None
    return {
        "requests": len(requests),
        "valid": len(valid),
        "completed": len(completed),
        "completion_rate": len(completed) / len(valid) if valid else None,
        "on_time": sum(on_time),
        "on_time_rate": sum(on_time) / len(completed) if completed else None,
        "ratings": len(scores),
        "satisfaction_mean": statistics.fmean(scores) if scores else None,
        "satisfaction_rate": sum(1 for s in scores if s >= 4) / len(scores) if scores else None,
        "complaints": complaints,
        "complaints_resolved": resolved,
        "complaint_resolution_rate": resolved / complaints if complaints else None,
        "median_hours_to_complete": statistics.median(hours) if hours else None,
        "p90_hours_to_complete": p90,
        "assessments": len(assessments),
        "assessment_mean": statistics.fmean(a["score"] for a in assessments) if assessments else None,
    }


def assert_figures(actual: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    for name, value in expected.items():
        got = actual[name]
        if value is None or got is None:
            assert got == value, f"{where}: {name} is {got}, expected {value}"
        else:
            assert got == pytest.approx(value, rel=1e-9, abs=1e-9), (
                f"{where}: {name} is {got}, expected {value}"
            )


def signals_of(requests: list[SimRequest]) -> list[tuple[int, str, str, str]]:
    """Need signals (docs/services.md): one per request filed; the one a sensor's fault filed is
    the sensor's signal, not a resident's."""
    return [
        (r.requested_ms, r.service_group, r.building or "community",
         "sensor" if r.request_id.startswith("sensor-") else "resident")
        for r in requests
    ]  # fmt: skip


def poisson_upper_tail(k: int, lam: Decimal) -> Decimal:
    """P(X >= k), X ~ Poisson(lam), as 1 - P(X < k) in 60-digit decimals (not the gateway's sum)."""
    term, below = Decimal(1), Decimal(0)
    for i in range(k):
        if i:
            term = term * lam / i
        below += term
    return 1 - (-lam).exp() * below


def expected_hotspots(
    requests: list[SimRequest], end_ms: int, window_ms: int, baseline_ms: int, alpha: float = 0.001
) -> dict[tuple[str, str | None], dict[str, Any]]:
    """Hotspot cells in the order the API must give them, each with k, b, λ, p and threshold."""
    start, baseline_start = end_ms - window_ms, end_ms - window_ms - baseline_ms
    k: Counter[tuple[str, str]] = Counter()
    b: Counter[tuple[str, str]] = Counter()
    sources: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for ts, group, building, source in signals_of(requests):
        if start <= ts < end_ms:
            k[(group, building)] += 1
            sources[(group, building)][source] += 1
        elif baseline_start <= ts < start:
            b[(group, building)] += 1
    level = alpha / len(set(k) | set(b))
    spots: list[tuple[tuple[str, str], dict[str, Any]]] = []
    with localcontext() as ctx:
        ctx.prec = 60
        for cell, count in k.items():
            lam = (b[cell] + Decimal("0.5")) * window_ms / baseline_ms
            p = poisson_upper_tail(count, lam)
            if count >= 3 and p < Decimal(level):
                spots.append((cell, {"k": count, "b": b[cell], "lam": float(lam), "p": float(p),
                                     "level": level, "sources": dict(sources[cell])}))  # fmt: skip
    spots.sort(key=lambda s: (-round(-math.log10(s[1]["p"]), 2), -s[1]["k"]))
    return {(g, None if building == "community" else building): spot for (g, building), spot in spots}


def expected_needs_list(requests: list[SimRequest]) -> dict[str, dict[str, Any]]:
    """Each need's members, households, sensor signals, priority and its score as a function of
    the time it is computed at: priority × (households + ½ × sensor signals) × (1 + age days / 7)."""
    data = yaml.safe_load(CATALOGUE.read_text(encoding="utf-8"))
    priorities = {code: group["priority"] for code, group in data["groups"].items()}
    final = {r.ticket: outcome(r)[0] for r in requests}
    members: dict[str, list[SimRequest]] = defaultdict(list)
    for r in requests:
        if final[r.ticket] in ACTIVE or (
            final[r.ticket] == "merged" and final[r.merged_into or ""] in ACTIVE
        ):
            members[f"{r.service_code}@{r.building or 'community'}"].append(r)
    sensors = Counter(
        f"{r.service_code}@{r.building}" for r in requests if r.request_id.startswith("sensor-")
    )  # all within the last week (the default `recent`)
    out = {}
    for need_id, group in members.items():
        households = len({f"{r.building}/{r.unit}" if r.unit else r.ticket for r in group})
        oldest = min(r.requested_ms for r in group)
        priority = priorities[group[0].service_group]

        def score(now: float, h: int = households, s: int = sensors[need_id], p: int = priority,
                  o: int = oldest) -> float:  # fmt: skip
            return round(p * (h + 0.5 * s) * (1 + (now - o) / 86_400_000 / 7), 3)

        out[need_id] = {"requests": sorted(r.ticket for r in group), "households": households,
                        "sensor_signals": sensors[need_id], "priority": priority, "oldest_ms": oldest,
                        "score": score}  # fmt: skip
    return out


@pytest.fixture
async def simulated_week(tmp_path: Path, mosquitto: Any, victoria: Any) -> Any:
    influx = InfluxSettings(url=victoria.url, token="t", org="o", bucket="b", flush_interval_s=0.1)
    register = tmp_path / "households.yaml"  # the simulated households, so their votes count
    write_household_register(register, 2026, 6, 6)
    settings = gateway_settings(
        tmp_path,
        mosquitto.url,
        influx=influx,
        community="weekville",
        pipeline=PipelineSettings(max_past=timedelta(days=30), presence_sweep_s=0.5),
        services=ServicesSettings(households=register),
    )
    async with running(settings) as gw:
        config = ServiceSimConfig(
            broker_url=mosquitto.url,
            api_url=f"http://127.0.0.1:{gw.api_port}",
            operator_token="operator-token",
            seed=2026,
            hotspot=Hotspot(building="3", service_code="facility.elevator", requests=24),
        )
        log = await ServiceSimulation(config).run()
        yield gw, log, victoria


async def test_a_simulated_week_is_reported_exactly(simulated_week: Any) -> None:
    log: ServiceLog
    gw, log, victoria = simulated_week
    assert len(log.requests) > 150 and log.duplicates_acked > 0
    async with api(gw) as client:
        start, end = iso(log.start_ms - 3_600_000), iso(log.end_ms + 1)

        # 1. The hotspot is found, with its k, b, λ, p and threshold recomputed from the log; a
        # window before it has no such hotspot.
        found = (
            await client.get("/api/v1/needs/hotspots", params={"end": iso(log.end_ms), "baseline": "6d"})
        ).json()
        expected_spots = expected_hotspots(log.requests, log.end_ms, 86_400_000, 6 * 86_400_000)
        assert [(h["service_group"], h["building"]) for h in found["items"]] == list(expected_spots)
        assert ("facility", "3") in expected_spots
        for h in found["items"]:
            spot = expected_spots[(h["service_group"], h["building"])]
            assert h["count"] == spot["k"] and h["expected"] == round(spot["lam"], 3)
            assert h["p_value"] == pytest.approx(spot["p"], rel=1e-9, abs=0)
            assert h["sources"] == spot["sources"] and f"threshold {spot['level']:.2g}" in h["why"]
        top = found["items"][0]
        assert top["sources"]["sensor"] == 1 and "building 3" in top["why"]
        earlier = await client.get(
            "/api/v1/needs/hotspots", params={"end": iso(log.end_ms - 2 * 86_400_000), "baseline": "4d"}
        )
        before = expected_hotspots(log.requests, log.end_ms - 2 * 86_400_000, 86_400_000, 4 * 86_400_000)
        assert ("facility", "3") not in before
        assert [(h["service_group"], h["building"]) for h in earlier.json()["items"]] == list(before)

        # 2. Every evaluation figure, overall and by service and by provider, recomputed here.
        overall = (await client.get("/api/v1/evaluation", params={"start": start, "end": end})).json()["rows"]
        assert len(overall) == 1
        assert_figures(overall[0], expected_figures(log.requests, log.assessments), "overall")
        by_service = (
            await client.get("/api/v1/evaluation", params={"start": start, "end": end, "by": "service"})
        ).json()["rows"]
        grouped: dict[str, list[SimRequest]] = defaultdict(list)
        for r in log.requests:
            grouped[r.service_code].append(r)
        assert {row["key"] for row in by_service} == set(grouped)
        for row in by_service:
            assert_figures(row, expected_figures(grouped[row["key"]], []), row["key"])
        by_provider = (
            await client.get("/api/v1/evaluation", params={"start": start, "end": end, "by": "provider"})
        ).json()["rows"]
        providers: dict[str, list[SimRequest]] = defaultdict(list)
        for r in log.requests:
            providers[r.provider_id or "unassigned"].append(r)
        assessed: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for a in log.assessments:
            assessed[a["provider_id"]].append(a)
        assert {row["key"] for row in by_provider} == set(providers) | set(assessed)
        for row in by_provider:
            assert_figures(row, expected_figures(providers[row["key"]], assessed[row["key"]]), row["key"])

        # 3. The needs list: open requests (and those merged into them) by service and building,
        # households counted once, each score recomputed from the formula of docs/services.md.
        asked = time.time() * 1000
        needs = (await client.get("/api/v1/needs")).json()["items"]
        answered = time.time() * 1000
        expected_needs = expected_needs_list(log.requests)
        assert {n["need_id"] for n in needs} == set(expected_needs)
        for need in needs:
            expected = expected_needs[need["need_id"]]
            assert {
                k: need[k] for k in ("requests", "households", "sensor_signals", "priority", "oldest_ms")
            } == {
                k: expected[k] for k in ("requests", "households", "sensor_signals", "priority", "oldest_ms")
            }, need["need_id"]
            # The server's clock read lies between the two reads here; the score grows with age.
            assert expected["score"](asked) <= need["score"] <= expected["score"](answered), need["need_id"]
        assert [n["rank"] for n in needs] == list(range(1, len(needs) + 1))
        assert needs == sorted(needs, key=lambda n: (-n["score"], n["oldest_ms"]))
        final = {r.ticket: outcome(r)[0] for r in log.requests}

        # 4. Votes: one per household, counted as cast.
        proposal = (await client.get(f"/api/v1/proposals/{log.proposal_id}")).json()
        assert proposal["votes"] == {c: Counter(log.votes.values())[c] for c in ("yes", "no", "abstain")}
        assert proposal["households_voted"] == len(log.votes) and log.refused
        async with api(gw, "operator-token") as operator:
            closed = (
                await operator.post(f"/api/v1/proposals/{log.proposal_id}/close", json={"file": True})
            ).json()
        tally = Counter(log.votes.values())
        assert (
            closed["result"] == ("passed" if tally["yes"] > tally["no"] else "rejected")
            and closed["filed_ms"]
        )
        plan = (await client.get("/api/v1/plan.json", params={"filed_only": True})).json()
        assert [p["proposal_id"] for p in plan["proposals"]] == [log.proposal_id]
        csv_text = (await client.get("/api/v1/plan.csv")).text.lstrip("\ufeff").splitlines()
        assert csv_text[0].startswith("proposal_id,title,result,yes,no,abstain")
        assert (
            csv_text[1].startswith(f"{log.proposal_id},") and f",{tally['yes']},{tally['no']}," in csv_text[1]
        )

        # 5. Every request and its lifecycle in the API exactly as the simulation did it.
        for r in log.requests[:: max(1, len(log.requests) // 40)]:
            detail = (await client.get(f"/api/v1/requests/{r.ticket}")).json()
            assert detail["state"] == final[r.ticket]
            steps = [(h["ts_ms"], h["to_state"]) for h in detail["history"][1:]]
            assert steps == r.steps, r.ticket

    # 6. The time-series store holds one service_request point per lifecycle step, and the ratings.
    steps_total = sum(1 + len(r.steps) for r in log.requests)

    def points() -> int | None:
        series = victoria.export('{__name__="service_request_count",community="weekville"}')
        n = sum(len(s["values"]) for s in series)
        return n if n >= steps_total else None

    assert await eventually(points, 10.0, "the time-series store") == steps_total
    ratings = victoria.export('{__name__="rating_score",community="weekville"}')
    assert sorted(s["values"][0] for s in ratings) == sorted(float(r.score) for r in log.requests if r.score)


async def test_overdue_and_stalled_work_raises_alarms_on_the_live_stream(
    tmp_path: Path, mosquitto: Any
) -> None:
    settings = gateway_settings(
        tmp_path,
        mosquitto.url,
        services=ServicesSettings(check_interval_s=0.2, stall_after=timedelta(hours=1)),
    )
    async with (
        running(settings) as gw,
        api(gw) as client,
        api(gw, "operator-token") as operator,
        live_stream(client, "alarm,request") as stream,
    ):
        await _overdue_and_stalled(mosquitto, client, operator, stream)


async def _overdue_and_stalled(
    mosquitto: Any, client: Any, operator: Any, stream: list[tuple[str, dict[str, Any]]]
) -> None:
    two_days_ago = int(time.time() * 1000) - 2 * 86_400_000
    request = {
        "request_id": "late-1",
        "ts": two_days_ago,
        "service_code": "facility.elevator",
        "location": {"building": "2"},
    }
    terminal_birth(mosquitto.port, "term-a")
    mosquitto_pub(mosquitto.port, "cgw/v1/term-a/request", orjson.dumps(request))

    async def alarms() -> set[str] | None:
        types = {data["type"] for name, data in stream if name == "alarm"}
        return types if {"request_overdue", "request_stalled"} <= types else None

    await eventually(alarms, 5.0, "overdue and stalled alarms on the stream")
    filed = next(data for name, data in stream if name == "request")
    assert filed["step"] == {
        "from": None,
        "to": "submitted",
        "ts_ms": two_days_ago,
        "actor": "terminal term-a",
    }
    stored = (await client.get("/api/v1/alarms", params={"type": "request_overdue"})).json()["items"]
    assert stored[0]["data"]["service_request_id"] == filed["id"] and stored[0]["kind"] == "service_request"
    # Workloads show the provider's active and overdue work once assigned.
    for step in ({"to": "triaged"}, {"to": "assigned", "provider_id": "elev-maint"}):
        assert (
            await operator.post(f"/api/v1/requests/{filed['id']}/transitions", json=step)
        ).status_code == 200
    providers = {p["id"]: p for p in (await client.get("/api/v1/providers")).json()}
    assert providers["elev-maint"]["workload"] == {"active": 1, "overdue": 1, "assigned": 1}


async def test_terminal_refusals_are_acked_and_dead_lettered(tmp_path: Path, mosquitto: Any) -> None:
    async with running(gateway_settings(tmp_path, mosquitto.url)) as gw, api(gw) as client:
        acks: list[dict[str, Any]] = []
        subscriber = paho.Client(CallbackAPIVersion.VERSION2)
        subscriber.on_message = lambda c, u, m: acks.append(orjson.loads(m.payload))
        subscribed = threading.Event()
        subscriber.on_subscribe = lambda *_: subscribed.set()
        subscriber.connect("127.0.0.1", mosquitto.port)
        subscriber.subscribe("cgw/v1/term-b/ack", qos=1)
        subscriber.loop_start()
        try:
            assert await asyncio.to_thread(subscribed.wait, 10), "no SUBACK"
            bad = {"request_id": "r-9", "service_code": "no.such.service"}
            terminal_birth(mosquitto.port, "term-b")
            mosquitto_pub(mosquitto.port, "cgw/v1/term-b/request", orjson.dumps(bad))
            mosquitto_pub(mosquitto.port, "cgw/v1/term-b/rating", '{"service_request_id":"nope","score":5}')
            mosquitto_pub(mosquitto.port, "cgw/v1/term-b/rating", '{"service_request_id":"x","score":9}')

            async def three() -> list[dict[str, Any]] | None:
                return acks if len(acks) >= 3 else None

            got = await eventually(three, 5.0, "three acks")
        finally:
            subscriber.loop_stop()
        assert got[0] == {
            "status": "rejected",
            "error": "unknown_service: 'no.such.service' is not in the service catalogue",
            "request_id": "r-9",
        }
        assert got[1]["status"] == "rejected" and "no service request 'nope'" in got[1]["error"]
        assert got[2]["status"] == "rejected" and got[2]["error"].startswith("schema: score")

        # The acks leave once the desk has committed; the dead letters are in the local store after
        # its next (group) commit, a moment later.
        async def letters() -> set[str] | None:
            items = (
                await client.get(
                    "/api/v1/dead-letters",
                    params={"device_id": "term-b"},
                    headers=AS_OPERATOR,
                )
            ).json()["items"]
            return {d["reason_code"] for d in items} if len(items) >= 3 else None

        expected = {"unknown_service", "refused", "schema"}
        assert await eventually(letters, 5.0, "three dead letters") == expected
