"""SQLite the way every part of the gateway uses it: one connection on one thread of its own.

sqlite3 blocks, so no connection is used on the event loop. A `SqliteThread` opens its
connection on a dedicated thread at first use and runs every function given to it there, in
order (`await db.call(fn, *args)` runs `fn(conn, *args)`); the store writer, each sink's outbox
drain and the services' database hold one each, the API's readers a few (`SqliteReaders`, as
WAL lets readers run beside the writer). Connecting, transactions and migrations are here too,
so both files (the telemetry store, `cgw.sqlite3`, and `services.sqlite3`) are opened, written
and upgraded the same way; each file's migrations stay with its owner (`gateway/store/schema.py`,
`gateway/services/schema.py`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# Small pages: a commit writes every page it touches to the WAL whole, and a trickle's commit
# touches a few (the ends of telemetry and of the outbox), so 1 KiB pages write a quarter
# of what 4 KiB pages would. Set before the file exists; an older file keeps its page size.
PAGE_SIZE = 1024


def connect(path: Path, *, synchronous: str = "FULL") -> sqlite3.Connection:
    """A connection set up the way every part of the gateway uses its SQLite files."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed batch survives power loss, not only a crash of the process.
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection, *, immediate: bool = False) -> Iterator[None]:
    """One transaction on a `connect()`ed (autocommit) connection: committed when the block
    ends, rolled back when the block or the commit fails. `immediate` takes the write lock at
    once, so a read-then-write block cannot fail half-way on a busy database."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # A failed COMMIT (a full disk) may have rolled back already: the first error is the one
        # to report, not "no transaction is active".
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def migrate(conn: sqlite3.Connection, migrations: list[list[str]], what: str) -> int:
    """Apply every migration the file has not seen, each in its own transaction; returns the
    resulting version. A file from a newer gateway is refused, never opened half-understood.

    `PRAGMA user_version` holds the schema version; each migration is a list of statements
    applied in one transaction, so an upgrade either completes or leaves the old schema intact.
    """
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise RuntimeError(
            f"{what} has schema version {version}, newer than this gateway knows "
            f"({len(migrations)}): upgrade cgw or restore a backup"
        )
    for number, statements in enumerate(migrations[version:], start=version + 1):
        with transaction(conn, immediate=True):
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")
    return len(migrations)


class SqliteThread:
    """One connection, opened and used only on one dedicated thread."""

    def __init__(self, name: str, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cgw-{name}")
        self._conn: sqlite3.Connection | None = None  # touched on the thread only

    async def call(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run fn(conn, *args, **kwargs) on the thread (the connection is opened there on first use)."""

        def run() -> T:
            if self._conn is None:
                # Opened on first use, and again after a failed attempt (a full disk, a locked file).
                self._conn = self._connect()
            return fn(self._conn, *args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(self._thread, run)

    async def close(self) -> None:
        """Close the connection on its thread and end the thread; later calls raise RuntimeError."""

        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, close)
        except RuntimeError:  # closed before: the thread is gone, and the connection with it
            return
        self._thread.shutdown(wait=True)


class SqliteReaders:
    """A few `SqliteThread`s for read-only queries, each call on the least busy one: one slow
    query does not hold up the others (WAL lets them all read beside the writer). No asyncio
    queue or lock, so the pool is not tied to one event loop."""

    def __init__(self, name: str, connect: Callable[[], sqlite3.Connection], threads: int) -> None:
        self._threads = [SqliteThread(f"{name}-{n}", connect) for n in range(threads)]
        self._calls = [0] * threads  # calls given to each thread and not yet answered

    async def call(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run fn(conn, *args, **kwargs) on an idle reader's thread (when all are busy, behind
        the fewest calls)."""
        n = min(range(len(self._threads)), key=self._calls.__getitem__)
        self._calls[n] += 1
        try:
            return await self._threads[n].call(fn, *args, **kwargs)
        finally:
            self._calls[n] -= 1

    async def close(self) -> None:
        for thread in self._threads:
            await thread.close()


class Where:
    """The WHERE clause of a filtered listing, built from the filters a caller gave (None: not
    given), and its arguments in order. `str()` is "" without a condition, else " WHERE a AND b"."""

    def __init__(self) -> None:
        self._conditions: list[str] = []
        self.args: list[object] = []

    def add(self, condition: str, *args: object) -> None:
        """A condition that always applies, with its arguments."""
        self._conditions.append(condition)
        self.args.extend(args)

    def given(self, condition: str, value: object | None) -> None:
        """`condition` (one `?`) with `value`, unless the filter was not given."""
        if value is not None:
            self.add(condition, value)

    def equal(self, **columns: object | None) -> None:
        """`column = ?` for each column whose filter was given."""
        for column, value in columns.items():
            self.given(f"{column} = ?", value)

    def among(self, column: str, values: Sequence[object] | None) -> None:
        """`column IN (...)`, unless no value was given."""
        if values:
            self.add(f"{column} IN ({', '.join('?' * len(values))})", *values)

    def __str__(self) -> str:
        return f" WHERE {' AND '.join(self._conditions)}" if self._conditions else ""
