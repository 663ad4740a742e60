"""gateway/sqlite.py: a connection opened and used on one thread of its own, and a pool of readers."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from gateway.sqlite import SqliteReaders, SqliteThread, Where, connect, transaction


def _where(conn: sqlite3.Connection, plus: int, *, times: int = 1) -> tuple[str, int]:
    return threading.current_thread().name, conn.execute("SELECT ? * ?", (plus, times)).fetchone()[0]


async def test_a_thread_opens_its_connection_on_first_use_and_runs_every_call_there(tmp_path: Path) -> None:
    opened_on: list[str] = []

    def opener() -> sqlite3.Connection:
        opened_on.append(threading.current_thread().name)
        return connect(tmp_path / "t.sqlite3")

    db = SqliteThread("test", opener)
    assert opened_on == []  # nothing opened before the first call
    first = await db.call(_where, 2, times=3)
    second = await db.call(_where, 5)
    assert first[1] == 6 and second[1] == 5
    assert opened_on == [first[0]] == [second[0]]
    assert first[0].startswith("cgw-test") and first[0] != threading.current_thread().name
    await db.close()
    await db.close()  # closing twice is harmless
    with pytest.raises(RuntimeError):
        await db.call(_where, 1)


async def test_a_failed_open_is_tried_again_at_the_next_call(tmp_path: Path) -> None:
    attempts: list[int] = []

    def opener() -> sqlite3.Connection:
        attempts.append(1)
        if len(attempts) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return connect(tmp_path / "t.sqlite3")

    db = SqliteThread("test", opener)
    with pytest.raises(sqlite3.OperationalError):
        await db.call(_where, 1)
    assert (await db.call(_where, 4))[1] == 4
    assert len(attempts) == 2
    await db.close()


async def test_an_error_in_a_call_reaches_the_caller_and_rolls_back(tmp_path: Path) -> None:
    db = SqliteThread("test", lambda: connect(tmp_path / "t.sqlite3"))
    await db.call(lambda conn: conn.execute("CREATE TABLE t (x INTEGER)"))

    def half_done(conn: sqlite3.Connection) -> None:
        with transaction(conn):
            conn.execute("INSERT INTO t VALUES (1)")
            raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        await db.call(half_done)
    assert await db.call(lambda conn: conn.execute("SELECT count(*) FROM t").fetchone()[0]) == 0
    await db.close()


async def test_readers_run_a_call_on_a_free_thread_while_another_is_busy(tmp_path: Path) -> None:
    connect(tmp_path / "t.sqlite3").close()
    readers = SqliteReaders("read", lambda: connect(tmp_path / "t.sqlite3", synchronous="NORMAL"), 2)
    release = threading.Event()
    held = asyncio.create_task(readers.call(lambda _conn: release.wait(30)))
    try:
        # Answered while the first reader is still held: the other reader took it.
        name, value = await readers.call(_where, 7)
        assert value == 7 and name.startswith("cgw-read-")
    finally:
        release.set()
    assert await held is True
    await readers.close()


def test_a_where_clause_holds_only_the_filters_given() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (a TEXT, b INTEGER, c TEXT)")
    conn.executemany("INSERT INTO t VALUES (?, ?, ?)", [("x", 1, None), ("y", 2, "z"), ("x", 3, "z")])

    def rows(where: Where) -> list[tuple[object, ...]]:
        return conn.execute(f"SELECT b FROM t{where} ORDER BY b", where.args).fetchall()

    assert str(Where()) == "" and rows(Where()) == [(1,), (2,), (3,)]
    where = Where()
    where.equal(a="x", c=None)  # c not given: no condition
    where.given("b >= ?", 2)
    assert str(where) == " WHERE a = ? AND b >= ?" and rows(where) == [(3,)]
    among = Where()
    among.among("b", [1, 2])
    among.among("a", [])  # nothing given: no condition
    among.add("c IS NOT NULL")
    assert rows(among) == [(2,)]
