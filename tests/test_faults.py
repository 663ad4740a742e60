"""Fault injection with real processes: `cgw run`, Mosquitto and VictoriaMetrics.

Each test publishes numbered telemetry (and service requests from a terminal) with QoS 1 from a
persistent session, breaks one part mid-stream, and then checks that every number is present
exactly once in the local store and in the time-series store, and every request exactly once
in the service desk and as a `submitted` point. docs/reliability.md names these tests.

"Exactly once" here is idempotence, not an absence of duplicates on the way: QoS 1 redelivers
what was not acknowledged, and the local store (`INSERT OR IGNORE` on its primary key), the
service desk (a request's key is unique) and the time-series store (one value per series and
time) each absorb a replay. These tests prove that nothing is lost and that replays land once;
that nothing is sent twice is counted where no store absorbs it, at the district
(tests/test_uplink.py counts every item's key).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import httpx
import orjson
import pytest

from tests.devices import Publisher
from tests.services import GatewayProcess, MosquittoProcess, VictoriaMetricsProcess, wait_for

pytestmark = pytest.mark.integration

VIEWER = "fault-viewer"
OPERATOR = "fault-operator"  # reads residents' descriptions (docs/privacy.md)


def start_gateway(folder: Path, broker: MosquittoProcess, victoria: VictoriaMetricsProcess,
                  community: str, **env: str) -> GatewayProcess:  # fmt: skip
    gateway = GatewayProcess(
        folder,
        {
            "CGW_COMMUNITY": community,
            "CGW_MQTT__URL": broker.url,
            "CGW_INFLUX__URL": victoria.url,
            "CGW_INFLUX__TOKEN": "t",
            "CGW_INFLUX__FLUSH_INTERVAL_S": "0.1",
            "CGW_AUTH__TOKENS": orjson.dumps({VIEWER: "viewer", OPERATOR: "operator"}).decode(),
            "CGW_LOG_LEVEL": "info",
            "CGW_PIPELINE__DEVICE_RATE_LIMIT": "100000/second",  # this load is wanted
            **env,
        },
    )
    gateway.start()
    wait_for(lambda: _connected(gateway), 30, "the gateway to connect to the broker")
    return gateway


def _connected(gateway: GatewayProcess) -> bool:
    checks = gateway.checks()
    return bool(checks and checks["broker"]["ok"])


# -- what "exactly once" means here: idempotent landing ------------------------------------------


def local_numbers(gateway: GatewayProcess) -> list[int]:
    with sqlite3.connect(f"file:{gateway.db_path}?mode=ro", uri=True, timeout=10) as conn:
        rows = conn.execute("SELECT value FROM telemetry WHERE device_id LIKE 'fault-%' AND metric = 'v'")
        return sorted(int(v) for (v,) in rows)


def stored_numbers(victoria: VictoriaMetricsProcess, community: str) -> list[int]:
    series = victoria.export(f'{{__name__="generic_v",community="{community}"}}')
    return sorted(int(v) for s in series for v in s["values"])


def submitted_points(victoria: VictoriaMetricsProcess, community: str) -> list[str]:
    match = f'{{__name__="service_request_count",community="{community}",state="submitted"}}'
    series = victoria.export(match)
    return sorted(s["metric"]["service_request_id"] for s in series for _ in s["values"])


def assert_exactly_once(
    gateway: GatewayProcess, victoria: VictoriaMetricsProcess, community: str, pub: Publisher
) -> None:
    pub.wait_acknowledged()
    expected = list(range(pub.sent))
    wait_for(lambda: len(local_numbers(gateway)) >= pub.sent, 60, "the local store")
    assert local_numbers(gateway) == expected
    wait_for(lambda: len(stored_numbers(victoria, community)) >= pub.sent, 90, "the time-series store")
    assert stored_numbers(victoria, community) == expected
    requests = httpx.get(
        f"{gateway.url}/api/v1/requests",
        params={"limit": 1000},
        headers={"Authorization": f"Bearer {OPERATOR}"},
        timeout=10,
    ).json()["items"]
    assert sorted(r["description"] for r in requests) == sorted(pub.requests)
    tickets = sorted(r["id"] for r in requests)
    wait_for(lambda: len(submitted_points(victoria, community)) >= len(tickets), 30, "submitted points")
    assert submitted_points(victoria, community) == tickets


# -- the faults ---------------------------------------------------------------------------------------


# Both MQTT drivers: MQTT 5 (the default) and paho's MQTT 3.1.1, for brokers without MQTT 5.
PROTOCOLS = pytest.mark.parametrize("protocol", ["5", "3.1.1"])


def _community(name: str, protocol: str) -> str:
    return name if protocol == "5" else f"{name}-311"


@PROTOCOLS
def test_broker_restart_mid_stream_loses_nothing_and_lands_once(
    tmp_path: Path,
    mosquitto: MosquittoProcess,
    victoria: VictoriaMetricsProcess,
    publisher: Publisher,
    protocol: str,
) -> None:
    community = _community("fault-broker", protocol)
    gateway = start_gateway(tmp_path / "gw", mosquitto, victoria, community, CGW_MQTT__PROTOCOL=protocol)
    try:
        publisher.publish(2000)
        mosquitto.restart()  # persistence keeps the gateway's session and its queued messages
        publisher.publish(2000)
        assert_exactly_once(gateway, victoria, community, publisher)
    finally:
        gateway.stop()


@PROTOCOLS
def test_gateway_killed_mid_stream_and_restarted_loses_nothing_and_lands_once(
    tmp_path: Path,
    mosquitto: MosquittoProcess,
    victoria: VictoriaMetricsProcess,
    publisher: Publisher,
    protocol: str,
) -> None:
    folder = tmp_path / "gw"
    community = _community("fault-kill", protocol)
    gateway = start_gateway(folder, mosquitto, victoria, community, CGW_MQTT__PROTOCOL=protocol)
    try:
        done = threading.Event()

        def feed() -> None:
            publisher.publish(6000, rate=2000)
            done.set()

        feeder = threading.Thread(target=feed)
        feeder.start()
        wait_for(lambda: len(local_numbers(gateway)) > 1000, 30, "the first thousand")
        gateway.kill()  # SIGKILL mid-stream: whatever it held unacknowledged is redelivered
        # Devices go on publishing while it is down (the broker keeps it): 500 more at least.
        down_at = publisher.sent
        wait_for(lambda: publisher.sent >= down_at + 500 or done.is_set(), 30, "publishing while it is down")
        gateway = start_gateway(folder, mosquitto, victoria, community, CGW_MQTT__PROTOCOL=protocol)
        feeder.join()
        assert done.is_set()
        assert_exactly_once(gateway, victoria, community, publisher)
    finally:
        gateway.stop()


def test_time_series_store_down_for_a_minute_under_load(
    tmp_path: Path,
    mosquitto: MosquittoProcess,
    victoria_private: VictoriaMetricsProcess,
    publisher: Publisher,
) -> None:
    gateway = start_gateway(tmp_path / "gw", mosquitto, victoria_private, "fault-tsdb")
    try:
        publisher.publish(500)
        victoria_private.stop()
        publisher.publish_for(60, rate=300)  # a minute of load with nowhere to write to
        backlog = wait_for(lambda: _metric(gateway, "cgw_outbox_pending_points"), 10, "a backlog")
        assert backlog > 0
        # The backlog's age is watched: a minute old, give or take the sink's 5 s between tries.
        assert _metric(gateway, "cgw_outbox_oldest_seconds") >= 50
        victoria_private.start()
        assert_exactly_once(gateway, victoria_private, "fault-tsdb", publisher)
        wait_for(
            lambda: _metric(gateway, "cgw_outbox_oldest_seconds") == 0, 15, "the backlog's age back to 0"
        )
        print(f"\n  backlog after a minute down: {backlog:.0f} points; drained in order")
    finally:
        gateway.stop()


def test_a_full_outbox_with_the_block_policy_slows_intake_and_loses_nothing(
    tmp_path: Path,
    mosquitto: MosquittoProcess,
    victoria_private: VictoriaMetricsProcess,
    publisher: Publisher,
) -> None:
    gateway = start_gateway(
        tmp_path / "gw",
        mosquitto,
        victoria_private,
        "fault-full",
        CGW_OUTBOX__MAX_BYTES=str(1024 * 1024),
        CGW_OUTBOX__WHEN_FULL="block",
    )
    try:
        overfill(victoria_private, publisher)  # the broker has all of it...
        wait_for(lambda: "the outbox is full" in gateway.log_text(), 30, "the outbox to fill")
        held = len(local_numbers(gateway))
        assert held < publisher.sent  # ...and holds back what the gateway cannot yet take
        assert _metric(gateway, "cgw_outbox_bytes") <= 1024 * 1024
        victoria_private.start()
        assert_exactly_once(gateway, victoria_private, "fault-full", publisher)
    finally:
        gateway.stop()


def test_a_full_outbox_drops_only_the_oldest_telemetry_and_counts_it(
    tmp_path: Path,
    mosquitto: MosquittoProcess,
    victoria_private: VictoriaMetricsProcess,
    publisher: Publisher,
) -> None:
    gateway = start_gateway(
        tmp_path / "gw", mosquitto, victoria_private, "fault-drop", CGW_OUTBOX__MAX_BYTES=str(1024 * 1024)
    )
    try:
        overfill(victoria_private, publisher)
        # The local store keeps everything; only the outbox (what InfluxDB is still owed) is bounded.
        wait_for(lambda: len(local_numbers(gateway)) == publisher.sent, 60, "the local store")
        dropped = int(_metric(gateway, "cgw_outbox_dropped_points_total"))
        assert dropped > 0
        victoria_private.start()
        want = publisher.sent - dropped
        wait_for(lambda: len(stored_numbers(victoria_private, "fault-drop")) >= want, 60, "the rest")
        # Exactly the oldest telemetry is missing, nothing else.
        assert stored_numbers(victoria_private, "fault-drop") == list(range(dropped, publisher.sent))
        tickets = wait_for(
            lambda: (
                len(submitted_points(victoria_private, "fault-drop")) >= len(publisher.requests)
                and submitted_points(victoria_private, "fault-drop")
            ),
            30,
            "every service request",
        )
        assert len(tickets) == len(set(tickets)) == len(publisher.requests)
    finally:
        gateway.stop()


def overfill(victoria: VictoriaMetricsProcess, publisher: Publisher) -> None:
    """With the time-series store down, about 1.7 MB of lines: more than a 1 MiB outbox holds."""
    victoria.stop()
    publisher.publish(20_000, rate=5000)
    publisher.wait_acknowledged()


def _metric(gateway: GatewayProcess, name: str) -> float:
    """One figure, summed over its labels."""
    figures = gateway.metrics(VIEWER)
    return sum(value for key, value in figures.items() if key == name or key.startswith(name + "{"))
