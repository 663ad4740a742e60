"""Reads from the local store for the API: telemetry ranges, events and alarms, dead letters.

Readers use their own connections, each on a thread of its own (`gateway.sqlite.SqliteReaders`;
WAL lets them run beside the writer), so a slow query never blocks the event loop or the pipeline.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.sqlite import SqliteReaders, Where, connect

MAX_POINTS = 10_000


@dataclass(frozen=True, slots=True)
class EventFilter:
    device_id: str | None = None
    kind: str | None = None
    building: str | None = None
    type: str | None = None
    severity: str | None = None
    source: str | None = None
    alarm: bool | None = None
    acked: bool | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    limit: int = 100
    offset: int = 0


class StoreReader:
    """Read-only queries; `close()` when the application stops."""

    def __init__(self, path: Path, raw_retention_ms: int, threads: int = 4) -> None:
        self._raw_retention_ms = raw_retention_ms
        self._db = SqliteReaders("read", lambda: connect(path, synchronous="NORMAL"), threads)

    async def close(self) -> None:
        await self._db.close()

    # -- events and alarms -------------------------------------------------------------------

    async def events(self, flt: EventFilter) -> list[dict[str, Any]]:
        return await self._db.call(_events, flt)

    async def event(self, event_id: int) -> dict[str, Any] | None:
        rows = await self._db.call(_event_by_id, event_id)
        return rows

    async def acknowledge(self, event_id: int, by: str, note: str, now_ms: int) -> dict[str, Any] | None:
        """Mark an event acknowledged (idempotent: the first acknowledgement is kept)."""
        return await self._db.call(_ack, event_id, by, note, now_ms)

    # -- telemetry ---------------------------------------------------------------------------

    async def telemetry(
        self,
        device_id: str,
        metrics: list[str] | None,
        start_ms: int,
        end_ms: int,
        step_ms: int | None,
        now_ms: int,
    ) -> dict[str, Any]:
        """Points of a device over [start, end): raw, or aggregated per `step` when given.

        With a step, the part of the range older than raw retention comes from the minute
        roll-ups (the step is then rounded to whole minutes) and the rest from raw telemetry.
        """
        raw_from_ms = now_ms - self._raw_retention_ms
        if step_ms is not None and start_ms < raw_from_ms:
            step_ms = max(60_000, step_ms - step_ms % 60_000)
        return await self._db.call(_telemetry, device_id, metrics, start_ms, end_ms, step_ms, raw_from_ms)

    # -- dead letters ------------------------------------------------------------------------

    async def dead_letters(
        self, device_id: str | None, reason: str | None, limit: int, offset: int
    ) -> list[dict[str, Any]]:
        return await self._db.call(_dead_letters, device_id, reason, limit, offset)

    async def counts(self) -> dict[str, int]:
        return await self._db.call(_counts)


_EVENT_COLUMNS = (
    "id, ts_ms, device_id, kind, building, type, severity, source, message, data, alarm, "
    "acked_ms, acked_by, ack_note"
)


def _event_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    (
        eid,
        ts_ms,
        device_id,
        kind,
        building,
        etype,
        severity,
        source,
        message,
        data,
        alarm,
        acked_ms,
        acked_by,
        ack_note,
    ) = row
    return {
        "id": eid,
        "ts_ms": ts_ms,
        "device_id": device_id,
        "kind": kind,
        "building": building,
        "type": etype,
        "severity": severity,
        "source": source,
        "message": message,
        "data": orjson.loads(data),
        "alarm": bool(alarm),
        "acked": acked_ms is not None,
        "acked_ms": acked_ms,
        "acked_by": acked_by,
        "ack_note": ack_note,
    }


def _events(conn: sqlite3.Connection, flt: EventFilter) -> list[dict[str, Any]]:
    where = Where()
    where.equal(
        device_id=flt.device_id,
        kind=flt.kind,
        building=flt.building,
        type=flt.type,
        severity=flt.severity,
        source=flt.source,
    )
    where.given("alarm = ?", None if flt.alarm is None else int(flt.alarm))
    if flt.acked is not None:
        where.add("acked_ms IS NOT NULL" if flt.acked else "acked_ms IS NULL")
    where.given("ts_ms >= ?", flt.since_ms)
    where.given("ts_ms < ?", flt.until_ms)
    sql = f"SELECT {_EVENT_COLUMNS} FROM events{where} ORDER BY ts_ms DESC, id DESC LIMIT ? OFFSET ?"
    return [_event_dict(row) for row in conn.execute(sql, (*where.args, flt.limit, flt.offset))]


def _event_by_id(conn: sqlite3.Connection, event_id: int) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {_EVENT_COLUMNS} FROM events WHERE id = ?", (event_id,)).fetchone()
    return None if row is None else _event_dict(row)


def _ack(conn: sqlite3.Connection, event_id: int, by: str, note: str, now_ms: int) -> dict[str, Any] | None:
    conn.execute(
        "UPDATE events SET acked_ms = ?, acked_by = ?, ack_note = ? WHERE id = ? AND acked_ms IS NULL",
        (now_ms, by, note, event_id),
    )
    return _event_by_id(conn, event_id)


def _telemetry(
    conn: sqlite3.Connection,
    device_id: str,
    metrics: list[str] | None,
    start_ms: int,
    end_ms: int,
    step_ms: int | None,
    raw_from_ms: int,
) -> dict[str, Any]:
    names = metrics or _metric_names(conn, device_id)
    series: dict[str, list[dict[str, Any]]] = {}
    truncated = False
    used_rollup = False
    for metric in names:
        if step_ms is None:
            rows = conn.execute(
                "SELECT ts_ms, value, seq FROM telemetry WHERE device_id = ? AND metric = ? "
                "AND ts_ms >= ? AND ts_ms < ? ORDER BY ts_ms LIMIT ?",
                (device_id, metric, start_ms, end_ms, MAX_POINTS + 1),
            ).fetchall()
            truncated |= len(rows) > MAX_POINTS
            series[metric] = [{"ts_ms": t, "value": v, "seq": s} for t, v, s in rows[:MAX_POINTS]]
            continue
        # bucket → [sum, count, min, max], merged from roll-ups (old part) and raw (recent part)
        buckets: dict[int, list[float]] = {}
        split_ms = min(max(start_ms, raw_from_ms - raw_from_ms % 60_000), end_ms)
        parts = []
        if start_ms < split_ms:
            used_rollup = True
            parts.append(
                (
                    "SELECT (minute_ms - ?) / ? AS bucket, sum(sum), sum(n), min(min), max(max) "
                    "FROM rollup_1m WHERE device_id = ? AND metric = ? AND minute_ms >= ? "
                    "AND minute_ms < ? GROUP BY bucket",
                    start_ms,
                    split_ms,
                )
            )
        if split_ms < end_ms:
            parts.append(
                (
                    "SELECT (ts_ms - ?) / ? AS bucket, sum(value), count(*), min(value), max(value) "
                    "FROM telemetry WHERE device_id = ? AND metric = ? AND ts_ms >= ? AND ts_ms < ? "
                    "GROUP BY bucket",
                    split_ms,
                    end_ms,
                )
            )
        for sql, lo_ms, hi_ms in parts:
            for bucket, total, count, low, high in conn.execute(
                sql, (start_ms, step_ms, device_id, metric, lo_ms, hi_ms)
            ):
                have = buckets.get(bucket)
                if have is None:
                    buckets[bucket] = [total, count, low, high]
                else:
                    have[0] += total
                    have[1] += count
                    have[2] = min(have[2], low)
                    have[3] = max(have[3], high)
        ordered = sorted(buckets.items())
        truncated |= len(ordered) > MAX_POINTS
        series[metric] = [
            {"ts_ms": start_ms + b * step_ms, "avg": t / n, "min": lo, "max": hi, "count": int(n)}
            for b, (t, n, lo, hi) in ordered[:MAX_POINTS]
        ]
    return {
        "device_id": device_id,
        "start_ms": start_ms,
        "end_ms": end_ms,
        "step_ms": step_ms,
        "source": "rollup_1m+raw" if used_rollup else "raw",
        "truncated": truncated,
        "series": series,
    }


def _metric_names(conn: sqlite3.Connection, device_id: str) -> list[str]:
    rows = conn.execute(
        "SELECT DISTINCT metric FROM rollup_1m WHERE device_id = ? "
        "UNION SELECT DISTINCT metric FROM telemetry WHERE device_id = ?",
        (device_id, device_id),
    ).fetchall()
    return sorted(r[0] for r in rows)


def _dead_letters(
    conn: sqlite3.Connection, device_id: str | None, reason: str | None, limit: int, offset: int
) -> list[dict[str, Any]]:
    where = Where()
    where.equal(device_id=device_id, reason_code=reason)
    sql = (
        "SELECT id, received_ms, topic, device_id, channel, reason_code, reason, payload FROM dead_letters"
        f"{where} ORDER BY id DESC LIMIT ? OFFSET ?"
    )
    out = []
    for lid, received, topic, dev, channel, code, why, payload in conn.execute(
        sql, [*where.args, limit, offset]
    ):
        out.append(
            {
                "id": lid,
                "received_ms": received,
                "topic": topic,
                "device_id": dev,
                "channel": channel,
                "reason_code": code,
                "reason": why,
                # Payloads may be any bytes (that is often why they were refused): show them safely.
                "payload": bytes(payload[:4096]).decode("utf-8", errors="replace"),
                "payload_bytes": len(payload),
            }
        )
    return out


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {
        table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        for table in ("telemetry", "rollup_1m", "events", "dead_letters", "devices")
    }
