"""The local SQLite store: idempotent writes, roll-ups, retention, migrations, telemetry ranges."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from anyio import wait_all_tasks_blocked

from gateway.instruments import Instruments
from gateway.models import Batch, DeadLetter, Device, DeviceEvent, Reading, event_id
from gateway.settings import StoreSettings
from gateway.sqlite import connect, migrate
from gateway.store.maintenance import StoreMaintenance
from gateway.store.queries import EventFilter, StoreReader
from gateway.store.schema import MIGRATIONS
from gateway.store.writer import StoreWriter

MINUTE = 60_000
T0 = 1_790_000_040_000 - 1_790_000_040_000 % MINUTE  # a whole minute


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    writer = StoreWriter(tmp_path / "cgw.sqlite3", Instruments())
    await writer.open()
    reader = StoreReader(tmp_path / "cgw.sqlite3", raw_retention_ms=48 * 3_600_000)
    yield writer, reader
    await reader.close()
    await writer.close()


def batch(*readings: Reading, events: tuple[DeviceEvent, ...] = ()) -> Batch:
    return Batch(readings=list(readings), events=list(events))


def _count(conn: sqlite3.Connection, table: str) -> int:
    count: int = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    return count


async def write(writer: StoreWriter, processed: Batch) -> None:
    await writer._write_with_retry([processed])


async def test_replays_land_once(store) -> None:  # type: ignore[no-untyped-def]
    writer, reader = store
    r = Reading("d1", "air_quality", T0, {"pm25": 10.0, "temp_c": 20.0}, 1, "1")
    e = DeviceEvent("d1", "air_quality", T0, "smoke_alarm", "critical", "x", {"a": 1}, "device", "1")
    for _ in range(3):
        await write(writer, batch(r, events=(e,)))
    counts = await reader.counts()
    assert counts["telemetry"] == 2 and counts["events"] == 1
    stored = await reader.event(event_id(e))
    assert stored is not None and stored["data"] == {"a": 1} and stored["alarm"]


async def test_rollups_are_recomputed_not_accumulated(store) -> None:  # type: ignore[no-untyped-def]
    writer, _ = store
    readings = [Reading("d1", "generic", T0 + i * 10_000, {"v": float(i)}) for i in range(12)]  # two minutes
    await write(writer, batch(*readings))
    maintenance = StoreMaintenance(writer, StoreSettings())
    await maintenance.run_once(now_ms=T0 + 3 * MINUTE)
    await write(writer, batch(*readings))  # replayed after the roll-up
    await maintenance.run_once(now_ms=T0 + 3 * MINUTE)
    rows = await writer.call(
        lambda conn: conn.execute(
            "SELECT minute_ms, n, sum, min, max FROM rollup_1m ORDER BY minute_ms"
        ).fetchall()
    )
    assert rows == [(T0, 6, 15.0, 0.0, 5.0), (T0 + MINUTE, 6, 51.0, 6.0, 11.0)]


async def test_open_minutes_wait_for_the_next_round(store) -> None:  # type: ignore[no-untyped-def]
    writer, _ = store
    await write(writer, batch(Reading("d1", "generic", T0 + 1000, {"v": 1.0})))
    maintenance = StoreMaintenance(writer, StoreSettings())
    await maintenance.run_once(now_ms=T0 + 30_000)  # the minute is still open
    assert await writer.call(_count, "rollup_1m") == 0
    await maintenance.run_once(now_ms=T0 + 2 * MINUTE)
    assert await writer.call(_count, "rollup_1m") == 1


async def test_retention_prunes_raw_rollups_events_and_dead_letters(store) -> None:  # type: ignore[no-untyped-def]
    writer, reader = store
    old, recent = T0, T0 + 3 * 86_400_000
    await write(
        writer,
        Batch(
            readings=[
                Reading("d1", "generic", old, {"v": 1.0}),
                Reading("d1", "generic", recent, {"v": 2.0}),
            ],
            events=[DeviceEvent("d1", "generic", old, "x", "info")],
            dead_letters=[DeadLetter(old, "cgw/v1/d1/telemetry", "d1", "bad_json: x", b"{")],
        ),
    )
    settings = StoreSettings(
        raw_retention=timedelta(days=2),
        rollup_retention=timedelta(days=90),
        dead_letter_retention=timedelta(days=1),
    )
    await StoreMaintenance(writer, settings).run_once(now_ms=recent + MINUTE, settle=False)
    counts = await reader.counts()
    assert counts["telemetry"] == 1  # the old raw reading is gone...
    assert counts["rollup_1m"] == 2  # ...its minute roll-up stays
    assert counts["events"] == 1 and counts["dead_letters"] == 0


async def test_telemetry_ranges_raw_and_bucketed(store) -> None:  # type: ignore[no-untyped-def]
    writer, reader = store
    readings = [Reading("d1", "generic", T0 + i * 1000, {"v": float(i), "w": 1.0}, i) for i in range(120)]
    await write(writer, batch(*readings))
    raw = await reader.telemetry("d1", ["v"], T0, T0 + 10_000, None, now_ms=T0 + MINUTE)
    assert [p["value"] for p in raw["series"]["v"]] == [float(i) for i in range(10)]
    bucketed = await reader.telemetry("d1", None, T0, T0 + 2 * MINUTE, 30_000, now_ms=T0 + 2 * MINUTE)
    assert set(bucketed["series"]) == {"v", "w"}
    assert [(b["count"], b["min"], b["max"]) for b in bucketed["series"]["v"]] == [
        (30, 0.0, 29.0),
        (30, 30.0, 59.0),
        (30, 60.0, 89.0),
        (30, 90.0, 119.0),
    ]
    assert bucketed["series"]["v"][0]["avg"] == pytest.approx(14.5)


async def test_old_ranges_merge_rollups_with_raw(store) -> None:  # type: ignore[no-untyped-def]
    writer, reader = store
    now = T0 + 50 * 3_600_000
    old = [Reading("d1", "generic", T0 + i * 1000, {"v": 1.0}) for i in range(60)]
    new = [Reading("d1", "generic", now - MINUTE + i * 1000, {"v": 3.0}) for i in range(30)]
    await write(writer, batch(*old, *new))
    await StoreMaintenance(writer, StoreSettings()).run_once(now_ms=now)
    # as retention would:
    await writer.call(lambda conn: conn.execute("DELETE FROM telemetry WHERE ts_ms < ?", (T0 + MINUTE,)))
    result = await reader.telemetry("d1", ["v"], T0, now, 3_600_000, now_ms=now)
    assert result["source"] == "rollup_1m+raw"
    assert sum(b["count"] for b in result["series"]["v"]) == 90
    assert result["series"]["v"][0] == {"ts_ms": T0, "avg": 1.0, "min": 1.0, "max": 1.0, "count": 60}


async def test_events_filter_and_acknowledge_once(store) -> None:  # type: ignore[no-untyped-def]
    writer, reader = store
    alarm = DeviceEvent("d1", "smoke_detector", T0, "smoke_alarm", "critical", "", {}, "device", "2")
    info = DeviceEvent("d2", "generic", T0 + 1, "online", "info", "", {}, "gateway", "1")
    await write(writer, batch(events=(alarm, info)))
    assert [e["type"] for e in await reader.events(EventFilter(alarm=True))] == ["smoke_alarm"]
    assert [e["type"] for e in await reader.events(EventFilter(building="1"))] == ["online"]
    first = await reader.acknowledge(event_id(alarm), "operator:abc", "checked", T0 + 5)
    second = await reader.acknowledge(event_id(alarm), "operator:def", "again", T0 + 9)
    assert first == second and first is not None and first["acked_by"] == "operator:abc"
    assert await reader.events(EventFilter(alarm=True, acked=False)) == []
    assert await reader.acknowledge(12345, "x", "", 0) is None


async def test_devices_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "cgw.sqlite3"
    writer = StoreWriter(path, Instruments())
    await writer.open()
    device = Device("d1", "elevator", "birth", building="3", online=True, last_values={"floor": 4.0})
    await writer.save_devices([device])
    await writer.close()
    again = StoreWriter(path, Instruments())
    restored = await again.open()
    await again.close()
    assert restored == [device]


def test_migrations_apply_once_and_refuse_newer_files(tmp_path: Path) -> None:
    conn = connect(tmp_path / "m.sqlite3")
    assert migrate(conn, MIGRATIONS, "the local store") == len(MIGRATIONS)
    assert migrate(conn, MIGRATIONS, "the local store") == len(MIGRATIONS)  # idempotent
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match="newer than this gateway"):
        migrate(conn, MIGRATIONS, "the local store")
    conn.close()


async def test_a_failing_disk_is_retried_not_lost(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "cgw.sqlite3", Instruments())
    await writer.open()
    real = writer._write
    calls = 0

    def flaky(conn: sqlite3.Connection, batches: list[Batch]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("database or disk is full")
        real(conn, batches)

    writer._write = flaky  # type: ignore[method-assign]
    await write(writer, batch(Reading("d1", "generic", T0, {"v": 1.0})))
    assert calls == 2 and writer.last_error is None
    assert await writer.call(_count, "telemetry") == 1
    await writer.close()


async def test_a_trickle_is_one_group_commit_and_a_waiting_caller_cuts_it_short(tmp_path: Path) -> None:
    metrics = Instruments()
    # A group commit window far longer than the test: only the durable put can end it.
    writer = StoreWriter(tmp_path / "cgw.sqlite3", metrics, group_commit_s=600)
    await writer.open()
    running = asyncio.create_task(writer.run())
    try:
        for i in range(10):  # single readings, one batch each, as a trickle arrives
            await writer.put(batch(Reading("d1", "generic", T0 + i, {"v": float(i)})))
            await wait_all_tasks_blocked()  # the writer has taken it and waits for the next
        last = batch(Reading("d1", "generic", T0 + 10, {"v": 10.0}))
        await asyncio.wait_for(writer.put_durable(last), 30)
        await writer.drain()
        commits = next(iter(metrics.store_write_seconds.collect())).samples
        count = next(s.value for s in commits if s.name.endswith("_count"))
        assert count == 1, "eleven batches, one transaction"
        with sqlite3.connect(tmp_path / "cgw.sqlite3") as conn:
            assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 11
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await writer.close()
