"""The durable outbox: what each outbound sink still has to send, on disk, bounded, in order.

Rows are appended by the store writer in the same transaction as the local store's own rows, so
a message is durable for the sinks exactly when it is durable locally (and only then is it
acknowledged to the broker). Each sink drains its rows in id order from its own connection and
deletes what the far side accepted. One row holds many points (one writer transaction's worth),
so the outbox costs a few rows per commit, not one per point.

Telemetry need not be copied: a sink may append a *reference* instead, the rows a commit
inserted (its `batch` number) within a span of their times (`from_ms`..`to_ms`), and render the
points from those rows when it takes them (`Expand`). The copy was most of what the gateway
wrote to its SD card (issue 15).
A referenced row is kept as long as raw telemetry is (`store.raw_retention`); points pruned
before the sink took them are gone for it too.

When the outbox reaches `outbox.max_bytes` (a reference counts the bytes its lines will take),
the policy decides: `drop_oldest_telemetry` deletes
the oldest telemetry rows (counted), `block` makes the writer wait. Important rows (events,
presence changes, service records) are never dropped: with only those left, the writer waits,
the pipeline waits, and the broker holds the messages.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gateway import clock

Policy = Literal["drop_oldest_telemetry", "block"]


class OutboxFull(Exception):
    """Nothing may be dropped to make room: the writer must wait for the sinks to drain."""


@dataclass(frozen=True, slots=True)
class Reference:
    """Telemetry rows of one commit (`batch`) whose times lie within from_ms..to_ms."""

    batch: int
    from_ms: int
    to_ms: int


@dataclass(slots=True)
class OutboxRow:
    sink: str
    important: bool
    body: str
    points: int
    ref: Reference | None = None  # a reference to telemetry rows; the body is then the sink's
    # context for rendering them (e.g. tags)
    size: int | None = None  # a reference's bytes once rendered, estimated by the sink

    @property
    def bytes(self) -> int:
        """What the row counts against `outbox.max_bytes`: what the sink owes the far side."""
        return len(self.body) if self.size is None else self.size


# A row's bytes against the bound: a reference counts what its lines will take, so the bound
# and its policy mean what they meant when telemetry was copied (what the far side is owed).
_SIZE = "COALESCE(size, length(body))"


# A sink's rendering of a reference's telemetry rows (on its own connection) into its lines,
# given the body it wrote with the reference.
Expand = Callable[[sqlite3.Connection, Reference, str], list[str]]


def rows_of(sink: str, important: list[str], telemetry: list[str]) -> list[OutboxRow]:
    """A commit's rows for one sink: one of what is never dropped, one of telemetry (each if any)."""
    rows = []
    if important:
        rows.append(OutboxRow(sink, True, "\n".join(important), len(important)))
    if telemetry:
        rows.append(OutboxRow(sink, False, "\n".join(telemetry), len(telemetry)))
    return rows


@dataclass(slots=True)
class Shipment:
    """What a sink takes from its outbox to send in one go: its rows up to `last_id`, their
    lines joined in order (references rendered), acknowledged as one once the far side has it."""

    last_id: int
    body: str
    points: int
    rows: int
    oldest_ms: int | None  # when the oldest of these rows was written (None: before migration 3)


class Outbox:
    """Shared by the writer (appends, on its thread) and the sinks (take and acknowledge)."""

    def __init__(self, max_bytes: int, policy: Policy) -> None:
        self.max_bytes = max_bytes
        self.policy = policy
        self._lock = threading.Lock()
        self._bytes = 0
        self._points: dict[str, int] = {}
        self.dropped_points = 0

    # -- writer side (inside the writer's transaction) -----------------------------------------

    def load(self, conn: sqlite3.Connection) -> None:
        """Size and per-sink backlog of what an earlier run left behind."""
        with self._lock:
            self._bytes = conn.execute(f"SELECT COALESCE(SUM({_SIZE}), 0) FROM outbox").fetchone()[0]
            self._points = dict(conn.execute("SELECT sink, SUM(points) FROM outbox GROUP BY sink").fetchall())

    def append(self, conn: sqlite3.Connection, rows: list[OutboxRow]) -> int:
        """Insert rows, making room first; returns telemetry points dropped to make room."""
        size = sum(r.bytes for r in rows)
        dropped = 0
        with self._lock:
            over = self._bytes + size - self.max_bytes
        if over > 0:
            if self.policy == "block":
                raise OutboxFull(f"the outbox is full ({self.max_bytes} bytes) and the policy is block")
            dropped = self._drop_oldest_telemetry(conn, over)
        now_ms = clock.now_ms()
        conn.executemany(
            "INSERT INTO outbox (sink, important, body, points, created_ms, batch, from_ms, to_ms, size) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(r.sink, int(r.important), r.body, r.points, now_ms, *_columns(r.ref), r.size) for r in rows],
        )
        with self._lock:
            self._bytes += size
            for r in rows:
                self._points[r.sink] = self._points.get(r.sink, 0) + r.points
        return dropped

    def _drop_oldest_telemetry(self, conn: sqlite3.Connection, need: int) -> int:
        freed = dropped = 0
        victims: list[int] = []
        per_sink: dict[str, int] = {}
        for row_id, sink, length, points in conn.execute(
            f"SELECT id, sink, {_SIZE}, points FROM outbox WHERE important = 0 ORDER BY id"
        ):
            if freed >= need:
                break
            victims.append(row_id)
            freed += length
            dropped += points
            per_sink[sink] = per_sink.get(sink, 0) + points
        if freed < need:
            raise OutboxFull(
                f"the outbox is full ({self.max_bytes} bytes) of records that are never dropped; "
                "waiting for the sinks to drain"
            )
        conn.executemany("DELETE FROM outbox WHERE id = ?", [(v,) for v in victims])
        with self._lock:
            self._bytes -= freed
            for sink, points in per_sink.items():
                self._points[sink] = self._points.get(sink, 0) - points
            self.dropped_points += dropped
        return dropped

    # -- sink side (each sink's own connection) --------------------------------------------------

    def take(
        self, conn: sqlite3.Connection, sink: str, max_points: int, expand: Expand | None = None
    ) -> Shipment | None:
        """The oldest rows of `sink`, up to `max_points` (at least one row), joined in order;
        references are rendered by `expand`."""
        bodies: list[str] = []
        points = 0
        last_id = 0
        oldest_ms: int | None = None
        for row_id, body, n, created_ms, batch, from_ms, to_ms in conn.execute(
            "SELECT id, body, points, created_ms, batch, from_ms, to_ms FROM outbox WHERE sink = ? "
            "ORDER BY id",
            (sink,),
        ):
            if bodies and points + n > max_points:
                break
            if not bodies:
                oldest_ms = created_ms
            if batch is not None and expand is not None:
                body = "\n".join(expand(conn, Reference(batch, from_ms, to_ms), body))
            if body:  # a reference whose rows were all pruned renders nothing
                bodies.append(body)
            points += n
            last_id = row_id
        if not last_id:
            return None
        return Shipment(last_id, "\n".join(bodies), points, len(bodies), oldest_ms)

    def acknowledge(self, conn: sqlite3.Connection, sink: str, shipment: Shipment) -> None:
        """The far side has what `shipment` held: delete it (rows dropped meanwhile are gone already)."""
        cursor = conn.execute(
            f"DELETE FROM outbox WHERE sink = ? AND id <= ? RETURNING {_SIZE}, points",
            (sink, shipment.last_id),
        )
        removed = cursor.fetchall()
        with self._lock:
            self._bytes -= sum(r[0] for r in removed)
            self._points[sink] = self._points.get(sink, 0) - sum(r[1] for r in removed)

    # -- figures ---------------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def pending(self, sink: str) -> int:
        with self._lock:
            return self._points.get(sink, 0)


def _columns(ref: Reference | None) -> tuple[int | None, int | None, int | None]:
    return (None, None, None) if ref is None else (ref.batch, ref.from_ms, ref.to_ms)
