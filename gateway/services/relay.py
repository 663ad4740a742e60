"""What the services hand to the local store: service records, and the API's refusals.

A lifecycle step or a rating is kept as a record (JSON) in `services.sqlite3`'s `outbox_records`,
in the same transaction as the change it describes, so no acknowledged change loses its record.
`RecordRelay` is the one way they leave: it adds the records not yet handed on to the next batch
the local store commits (whoever's batch that is: the pipeline's, an operator's action, the
deadline loop's), and forgets them here once that batch is durable. At least once: a record
handed on again after a crash is idempotent, as each sink's encoding of it is
(gateway/sinks/lineprotocol.py, gateway/uplink/items.py). The same batch carries the dead letters
of ratings and votes refused over the API, held here meanwhile so a refusal costs the client no
wait for a commit.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import deque
from typing import Any

import orjson

from gateway.models import Batch, DeadLetter
from gateway.sqlite import SqliteThread

log = logging.getLogger(__name__)

HELD_REFUSALS = 1000  # a flood keeps the newest (all are counted)


def keep(conn: sqlite3.Connection, records: list[dict[str, Any]]) -> None:
    """Keep records for the sinks; called inside the transaction of the change they describe."""
    conn.executemany(
        "INSERT INTO outbox_records (body) VALUES (?)", [(orjson.dumps(r).decode(),) for r in records]
    )


def unsent(conn: sqlite3.Connection, after: int) -> tuple[int, list[dict[str, Any]]]:
    """The records kept after id `after`, in order, and the last one's id (`after` if none)."""
    rows = conn.execute("SELECT id, body FROM outbox_records WHERE id > ? ORDER BY id", (after,)).fetchall()
    return (rows[-1][0] if rows else after), [orjson.loads(r[1]) for r in rows]


def forget(conn: sqlite3.Connection, upto: int) -> None:
    """The local store's outbox has every record up to `upto`: they need not be kept here."""
    conn.execute("DELETE FROM outbox_records WHERE id <= ?", (upto,))


class RecordRelay:
    def __init__(self, db: SqliteThread) -> None:
        self._db = db
        self._sent_upto = 0  # records up to this id are handed on in this run (read on the thread)
        self._refusals: deque[DeadLetter] = deque(maxlen=HELD_REFUSALS)
        self._forgetting: set[asyncio.Task[None]] = set()

    def hold(self, letter: DeadLetter) -> None:
        """A refusal over the API, dead-lettered with the next batch handed on."""
        self._refusals.append(letter)

    async def hand_on(self, batch: Batch) -> None:
        """Add the records kept and not yet handed on, and the held refusals, to `batch`; the
        records are forgotten here once the batch is durable."""
        while self._refusals:
            batch.dead_letters.append(self._refusals.popleft())
        upto, records = await self._db.call(self._take)
        if records:
            batch.records.extend(records)
            batch.on_durable.append(lambda: self._forget(upto))

    def _take(self, conn: sqlite3.Connection) -> tuple[int, list[dict[str, Any]]]:
        # On the services' thread, so two hand-ons never take the same records.
        self._sent_upto, records = unsent(conn, self._sent_upto)
        return self._sent_upto, records

    def _forget(self, upto: int) -> None:
        task = asyncio.get_running_loop().create_task(self._forget_on_thread(upto))
        self._forgetting.add(task)
        task.add_done_callback(self._forgetting.discard)

    async def _forget_on_thread(self, upto: int) -> None:
        try:
            await self._db.call(forget, upto)
        except (sqlite3.Error, RuntimeError) as exc:  # a full disk, or closed: kept, and handed
            # on again after a restart, which is harmless (each sink's encoding is idempotent)
            log.warning("could not forget service records handed on (%s)", exc)

    async def close(self) -> None:
        """Wait for the records being forgotten (before the services' thread closes)."""
        await asyncio.gather(*self._forgetting, return_exceptions=True)
