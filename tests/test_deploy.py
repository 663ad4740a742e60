"""The installer kit in deploy/: what can be proven without a container engine on this machine.

- The Prometheus scrape configuration and every query of the gateway-health Grafana dashboard
  run for real: VictoriaMetrics scrapes a running `cgw run` with deploy/compose/prometheus.yml
  (only the target and the token file's path changed) and answers each panel's PromQL.
- The compose file's gateway environment is a valid set of cgw settings; the Grafana
  provisioning names the data sources the dashboards use; the community dashboard's Flux
  queries ask only for measurements and fields the InfluxDB sink writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from gateway.instruments import Instruments
from gateway.models import Batch, Device, DeviceEvent, PresenceChange, Reading
from gateway.profiles import load_profiles
from gateway.settings import InfluxSettings, load_settings
from gateway.sinks.influx import InfluxSink
from gateway.sqlite import connect
from gateway.store.outbox import Outbox
from gateway.store.writer import StoreWriter
from tests.harness import mosquitto_pub, terminal_birth
from tests.services import GatewayProcess, MosquittoProcess, VictoriaMetricsProcess, wait_for

pytestmark = pytest.mark.integration

COMPOSE = Path(__file__).parent.parent / "deploy" / "compose"
METRICS_TOKEN = "deploy-metrics"


def dashboard(name: str) -> dict[str, Any]:
    board: dict[str, Any] = json.loads((COMPOSE / "grafana" / "dashboards" / name).read_text())
    return board


# -- the gateway-health dashboard, over real scrapes ---------------------------------------------------


@pytest.fixture
def scraped(
    tmp_path: Path, mosquitto: MosquittoProcess, victoria: VictoriaMetricsProcess
) -> Iterator[VictoriaMetricsProcess]:
    gateway = GatewayProcess(
        tmp_path / "gateway",
        {
            "CGW_MQTT__URL": mosquitto.url,
            "CGW_INFLUX__URL": victoria.url,
            "CGW_INFLUX__TOKEN": "t",
            "CGW_AUTH__TOKENS": orjson.dumps({METRICS_TOKEN: "viewer"}).decode(),
        },
    )
    gateway.start()
    # Prometheus' own configuration, pointed at this gateway and scraping every second.
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    job = config["scrape_configs"][0]
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{gateway.port}"]
    token = tmp_path / "metrics-token"
    token.write_text(METRICS_TOKEN)
    job["authorization"]["credentials_file"] = str(token)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    scraper = VictoriaMetricsProcess(
        tmp_path / "scraper", extra=(f"-promscrape.config={tmp_path / 'prometheus.yml'}",)
    )
    scraper.start()
    try:
        # Traffic after the first scrape, so that the rates see the counters move.
        wait_for(lambda: query(scraper, "cgw_readings_total"), 60, "the first scrape")
        traffic(mosquitto)
        yield scraper
    finally:
        scraper.stop()
        gateway.stop()


def traffic(broker: MosquittoProcess) -> None:
    """Something for every panel: telemetry, a refused message, an event, a service request."""
    birth = {"state": "online", "kind": "air_quality", "location": {"building": "1"}}
    mosquitto_pub(broker.port, "cgw/v1/deploy-aq/status", orjson.dumps(birth))
    for i in range(5):
        reading = {"ts": int(time.time() * 1000) - i, "metrics": {"pm25": 10.0 + i}}
        mosquitto_pub(broker.port, "cgw/v1/deploy-aq/telemetry", orjson.dumps(reading))
    mosquitto_pub(broker.port, "cgw/v1/deploy-aq/telemetry", b"{not json")
    event = {"type": "smoke_alarm", "severity": "critical"}
    mosquitto_pub(broker.port, "cgw/v1/deploy-aq/event", orjson.dumps(event))
    request = {"request_id": "d1", "service_code": "repair.plumbing", "location": {"building": "1"}}
    terminal_birth(broker.port, "deploy-term")
    mosquitto_pub(broker.port, "cgw/v1/deploy-term/request", orjson.dumps(request))


def query(scraper: VictoriaMetricsProcess, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{scraper.url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", f"{expr}: {answer}"
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def test_every_gateway_panel_answers_from_real_scrapes(scraped: VictoriaMetricsProcess) -> None:
    panels = dashboard("cgw-gateway.json")["panels"]
    expressions = {p["title"]: p["targets"][0]["expr"] for p in panels}
    assert expressions, "the health dashboard has no panels"
    # Rates need a few scrapes; then every panel must have data.
    wait_for(
        lambda: query(scraped, "sum(rate(cgw_messages_received_total[5m])) > 0"), 60, "scrapes with traffic"
    )
    wait_for(
        lambda: all(query(scraped, expr) for expr in expressions.values()),
        60,
        "every panel to have data",
    )
    refused = query(scraped, expressions["Messages refused per second, by reason"])
    assert {r["metric"]["reason"] for r in refused} >= {"bad_json"}
    presence = query(scraped, expressions["Devices by presence"])
    assert {r["metric"]["state"] for r in presence} >= {"online"}


# -- static checks of the compose stack --------------------------------------------------------------


def test_the_compose_gateway_environment_is_valid_settings() -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"mosquitto", "gateway", "influxdb", "prometheus", "grafana"}
    assert compose["services"]["influxdb"]["image"] == "influxdb:2.7"
    env = compose["services"]["gateway"]["environment"]

    def substitute(value: str) -> str:
        # ${NAME:?msg} and ${NAME} take a sample; ${NAME:-default} its default.
        value = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), value)
        return re.sub(r"\$\{(\w+)(:\?[^}]*)?\}", lambda m: f"sample{m.group(1).lower()}", value)

    settings = load_settings(env={k: substitute(str(v)) for k, v in env.items()})
    assert settings.mqtt.url == "mqtt://mosquitto:1883" and settings.influx.url == "http://influxdb:8086"
    assert settings.registration == "closed" and not settings.uplink.enabled
    assert {g.role for g in settings.auth.digests().values()} == {
        "operator",
        "metrics",
    }  # Prometheus scrapes with a metrics token


def test_grafana_provisions_the_data_sources_the_dashboards_use() -> None:
    provisioned = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/datasources.yaml").read_text())
    uids = {source["uid"] for source in provisioned["datasources"]}
    for name in ("cgw-gateway.json", "cgw-community.json"):
        for panel in dashboard(name)["panels"]:
            assert panel["datasource"]["uid"] in uids, panel["title"]
            assert panel["targets"] and all(t["datasource"]["uid"] in uids for t in panel["targets"])


def written_by_the_sink(tmp_path: Path) -> dict[str, set[str]]:
    """Measurement -> field names, from the lines the InfluxDB sink encodes for one of every record:
    a reading of each profile's kind, an alarm, a presence change, a completed request, a rating."""
    request = {
        "id": "r-1", "building": "3", "provider_id": "p-1", "service_code": "leak",
        "service_group": "repairs", "source": "terminal", "requested_ms": 0, "expected_ms": 3_600_000,
    }  # fmt: skip
    profiles = load_profiles()
    batch = Batch(
        readings=[Reading(f"d-{p.kind}", p.kind, 1, dict.fromkeys(p.metrics, 1.0)) for p in profiles],
        devices=[Device(device_id=f"d-{p.kind}", kind=p.kind, source="inventory") for p in profiles],
        events=[DeviceEvent("d", "generic", 1, "fault", "critical", "m", {}, "device")],
        presence=[PresenceChange("d", "generic", 1, True, "birth")],
        records=[
            {"kind": "step", "request": request, "from": "in_service", "to": "completed"}
            | {"ts_ms": 7_200_000, "actor": "p-1", "note": ""},
            {"kind": "rating", "request": request, "score": 5, "ts_ms": 7_300_000},
        ],
    )
    db, outbox, metrics = tmp_path / "s.db", Outbox(10**6, "block"), Instruments()
    sink = InfluxSink(InfluxSettings(url="http://127.0.0.1:9"), "c", metrics, db, outbox)

    async def commit() -> None:
        # Readings are rendered from the store's rows (the outbox refers to them): commit them.
        writer = StoreWriter(db, metrics, 64, outbox, [sink.encode])
        await writer.open()
        running = asyncio.create_task(writer.run())
        await writer.put_durable(batch)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await writer.close()

    asyncio.run(commit())
    with contextlib.closing(connect(db)) as conn:
        shipment = outbox.take(conn, "influx", 10**6, sink.expand)
    assert shipment is not None
    written: dict[str, set[str]] = {}
    for row in [shipment]:
        for line in row.body.split("\n"):
            head, fields, _ = re.sub(r'"(?:[^"\\]|\\.)*"', '""', line).rsplit(" ", 2)
            written.setdefault(head.split(",")[0], set()).update(f.split("=")[0] for f in fields.split(","))
    return written


def test_the_community_dashboard_asks_for_what_the_sink_writes(tmp_path: Path) -> None:
    written = written_by_the_sink(tmp_path)
    # Every kind of record was encoded (a missing one would make the check below vacuous).
    assert {"service_request", "service_usage", "rating", "device_event", "device_presence"} <= set(written)
    for panel in dashboard("cgw-community.json")["panels"]:
        flux = panel["targets"][0]["query"]
        measurement = re.search(r'r\._measurement == "(\w+)"', flux)
        field = re.search(r'r\._field == "(\w+)"', flux)
        assert measurement and field, panel["title"]
        assert field.group(1) in written.get(measurement.group(1), set()), panel["title"]


def test_compose_setup_makes_secrets_once(tmp_path: Path) -> None:
    """deploy/compose/setup.sh's own logic; `docker` is a stand-in that records its arguments and
    answers the `influx` CLI as InfluxDB 2.7's does (a bucket list, `auth create --json`)."""
    deploy = tmp_path / "deploy"
    shutil.copytree(COMPOSE.parent, deploy)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "docker-calls"
    answer = 'printf \'{\\n  "id": "%s",\\n  "token": "%s",\\n  "status": "active"\\n}\\n\''
    (bin_dir / "docker").write_text(
        f'#!/bin/sh\necho "$@" >>{calls}\n'
        'case "$*" in\n'
        '  *"bucket list"*) printf "0a1b2c3d\\tcommunity\\t9600h0m0s\\n" ;;\n'
        f'  *"--write-bucket 0a1b2c3d"*) {answer % (1, "w-tok==")} ;;\n'
        f'  *"--read-bucket 0a1b2c3d"*) {answer % (2, "r-tok==")} ;;\n'
        "esac\n"
    )
    (bin_dir / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def setup() -> dict[str, str]:
        subprocess.run(
            ["bash", str(deploy / "compose/setup.sh"), "riverside"], env=env, check=True, timeout=60
        )
        lines = (deploy / "compose/.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))

    first = setup()
    assert first["COMMUNITY"] == "riverside"
    for key in (
        "INFLUX_TOKEN",
        "INFLUX_ADMIN_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
        "OPERATOR_TOKEN",
        "MQTT_PASSWORD",
    ):
        assert len(first[key]) == 32, key
    assert (deploy / "compose/secrets/metrics-token").read_text() == first["METRICS_TOKEN"]
    assert (
        f"cgw-gateway,{first['MQTT_PASSWORD']}"
        in (deploy / "compose/mosquitto-auth/credentials.csv").read_text()
    )
    assert "mqtt-auth --inventory /etc/cgw/inventory.yaml --out /out" in calls.read_text()
    assert oct((deploy / "compose/.env").stat().st_mode & 0o777) == "0o600"
    # The gateway may only write the bucket and Grafana only read it; the admin token stays put.
    assert first["INFLUX_WRITE_TOKEN"] == "w-tok==" and first["INFLUX_READ_TOKEN"] == "r-tok=="
    compose = yaml.safe_load((deploy / "compose/docker-compose.yml").read_text())["services"]
    assert compose["gateway"]["environment"]["CGW_INFLUX__TOKEN"] == "${INFLUX_WRITE_TOKEN:?run setup.sh}"
    assert compose["grafana"]["environment"]["INFLUX_TOKEN"] == "${INFLUX_READ_TOKEN:?run setup.sh}"
    # Published ports listen where .env says, this box only by default; devices get TLS.
    ports = [port for service in compose.values() for port in service.get("ports", [])]
    assert ports and all(p.startswith(("${BIND_ADDRESS:-127.0.0.1}:", "${MQTT_BIND_ADDRESS:-127.0.0.1}:",
                                       "${MQTT_TLS_BIND_ADDRESS:-0.0.0.0}:8883")) for p in ports)  # fmt: skip
    certs = deploy / "compose/mosquitto-certs"
    assert {p.name for p in certs.iterdir()} >= {"ca.crt", "ca.key", "server.crt", "server.key"}
    assert oct((certs / "server.key").stat().st_mode & 0o777) == "0o600"
    assert oct((deploy / "compose/secrets/metrics-token").stat().st_mode & 0o777) == "0o600"
    assert oct((deploy / "compose/mosquitto-auth/credentials.csv").stat().st_mode & 0o777) == "0o600"
    calls.write_text("")
    assert setup() == first  # again: nothing changes
    assert "auth create" not in calls.read_text()


def test_the_systemd_unit_is_hardened_by_systemd_analyze() -> None:
    """`systemd-analyze security --offline=true` on the shipped unit: exposure 2.5 or lower."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here (Debian: systemd)")
    unit = COMPOSE.parent / "systemd" / "cgw.service"
    result = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for cgw\.service: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.5, result.stdout
    for setting in ("UMask=0077", "StateDirectoryMode=0700", "CapabilityBoundingSet=\n"):
        assert setting in unit.read_text()
