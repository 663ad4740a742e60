"""The uplink to the district platform: the durable outbox drained to the district's MQTT broker.

Up: `cgw/v1/up/{community}/{stream}` (gateway/uplink/items.py), QoS 1 by default. The store writer
puts the uplink's rows into the outbox in the same transaction as the local store, so what the
community's broker was told is kept is also kept for the district. A batch of rows is deleted
only once the district's broker has acknowledged every message made of it (PUBACK, or PUBCOMP at
QoS 2); until then it is sent again, so the district sees everything at least once, and drops
copies by each item's `key`.

Down (when `uplink.commands` is on): the district publishes commands on
`cgw/v1/down/{community}/cmd`; the answers go to
`cgw/v1/up/{community}/reply` (gateway/uplink/commands.py). The gateway's own presence is
`cgw/v1/up/{community}/status`, retained, with an `offline` Last Will.

The uplink has its own session (clean session off), so commands sent while the box is offline
arrive when it is back.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho

from gateway import __version__
from gateway.clock import now_ms
from gateway.instruments import Instruments
from gateway.models import Batch
from gateway.mqtt.link import BrokerLink
from gateway.mqtt.mqtt311 import broker_client, refused, refused_filters
from gateway.settings import UplinkSettings
from gateway.sinks.drain import OutboxDrain
from gateway.sqlite import transaction
from gateway.store.outbox import Outbox, OutboxFull, OutboxRow, Shipment
from gateway.uplink import items
from gateway.uplink.items import SNAPSHOTS, TelemetryChoice

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 15.0  # for the district's broker to acknowledge one batch
COMMAND_QUEUE = 100

Summarize = Callable[[], Awaitable[list[tuple[str, dict[str, Any]]]]]
Command = Callable[[bytes], Awaitable[dict[str, Any]]]


def up_topic(community: str, stream: str) -> str:
    return f"cgw/v1/up/{community}/{stream}"


def down_topic(community: str) -> str:
    return f"cgw/v1/down/{community}/cmd"


class UplinkSink(OutboxDrain):
    """`encode()` for the writer; `run()` drains, publishes summaries and answers commands."""

    name = "uplink"

    def __init__(
        self,
        settings: UplinkSettings,
        client_id: str,
        community: str,
        instruments: Instruments,
        db_path: Path,
        outbox: Outbox,
    ) -> None:
        self.target = f"the district broker {settings.url}"
        super().__init__(instruments, db_path, outbox, settings.batch_points, idle_s=1.0)
        self._settings = settings
        self._client_id = client_id
        self._community = community
        self.link = BrokerLink(
            settings,
            self.target,
            "CGW_UPLINK",
            instruments.driver_connected.labels(driver="uplink"),
            log,
        )
        self._choice = TelemetryChoice(settings.telemetry)
        self._client: paho.Client | None = None
        self._subscribe_mid: int | None = None  # the packet id of this connection's SUBSCRIBE
        self._loop: asyncio.AbstractEventLoop | None = None
        self._commands: asyncio.Queue[bytes] = asyncio.Queue(maxsize=COMMAND_QUEUE)
        self._command_counter = instruments.uplink_commands
        self._summarize: Summarize | None = None
        self._command: Command | None = None

    def serve(self, summarize: Summarize, command: Command) -> None:
        """What the uplink sends as snapshots, and who answers the district's commands."""
        self._summarize = summarize
        self._command = command

    @property
    def reachable(self) -> bool:
        return self.link.connected and self.healthy

    @property
    def last_error(self) -> str | None:
        """Why the uplink is not reachable: the link's reason while it is down, else the last
        send's."""
        if not self.link.connected and self.link.last_error:
            return self.link.last_error
        return self._send_error

    @last_error.setter
    def last_error(self, value: str | None) -> None:
        self._send_error = value

    # -- the writer's side -----------------------------------------------------------------------

    def encode(self, batches: list[Batch], commit_no: int | None) -> list[OutboxRow]:
        return items.encode(batches, self._choice, self.name)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client = self._make_client()
        self._client.connect_async(self._settings.host, self._settings.port, self._settings.keepalive_s)
        self._client.loop_start()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(super().run(), name="uplink-drain")
            tg.create_task(self._snapshots(), name="uplink-snapshots")
            tg.create_task(self._answer(), name="uplink-commands")

    async def _close_client(self) -> None:
        client = self._client
        if client is None:
            return
        self.link.stopping = True

        def close() -> None:
            if client.is_connected():
                # Said outright: a clean disconnect does not fire the Last Will.
                client.publish(
                    self._status_topic, self._status("offline"), qos=1, retain=True
                ).wait_for_publish(2.0)
            client.disconnect()
            client.loop_stop()

        await asyncio.to_thread(close)
        self.link.set_connected(False)

    # -- sending -----------------------------------------------------------------------------------

    async def _send(self, shipment: Shipment) -> bool:
        client = self._client
        if client is None or not self.link.connected:
            self._fail(self.link.last_error or f"not connected to {self.target}", shipment.points)
            return False
        try:
            await self._blocking(self._publish_all, client, shipment.body)
        except (RuntimeError, ValueError, TimeoutError) as exc:
            self._fail(f"{self.target} did not take the batch: {exc}", shipment.points)
            return False
        self._sent(shipment.points)
        return True

    def _publish_all(self, client: paho.Client, body: str) -> None:
        """Publish every message of a batch, then wait until the broker has acknowledged each."""
        pending = [
            client.publish(topic, payload, qos=self._settings.qos, retain=retain)
            for topic, payload, retain in self._messages(body)
        ]
        deadline = time.monotonic() + SEND_TIMEOUT_S
        for info in pending:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError(f"no acknowledgement within {SEND_TIMEOUT_S:.0f} s")

    def _messages(self, body: str) -> list[tuple[str, bytes, bool]]:
        """Items grouped by stream, in order, cut into messages of at most `max_message_bytes`."""
        by_stream: dict[str, list[bytes]] = {}
        for stream, item in items.parse(body):
            by_stream.setdefault(stream, []).append(item)
        head = b'{"community":' + orjson.dumps(self._community) + b',"items":['
        limit = self._settings.max_message_bytes - len(head) - 2
        out: list[tuple[str, bytes, bool]] = []
        for stream, stream_items in by_stream.items():
            topic = up_topic(self._community, stream)
            retain = stream in SNAPSHOTS
            chunk: list[bytes] = []
            size = 0
            for item in stream_items:
                # A snapshot is one message of its own: the retained message is the latest one.
                if chunk and (retain or size + len(item) + 1 > limit):
                    out.append((topic, head + b",".join(chunk) + b"]}", retain))
                    chunk, size = [], 0
                chunk.append(item)
                size += len(item) + 1
            if chunk:
                out.append((topic, head + b",".join(chunk) + b"]}", retain))
        return out

    # -- snapshots: the needs list and the evaluation ---------------------------------------------

    async def _snapshots(self) -> None:
        while True:
            await self.send_snapshots()
            await asyncio.sleep(self._settings.summary_interval_s)

    async def send_snapshots(self) -> int:
        """Put the current snapshots into the outbox; returns how many."""
        if self._summarize is None:
            return 0
        try:
            snapshots = await self._summarize()
        except Exception:
            log.exception("could not make the uplink's snapshots; trying again at the next interval")
            return 0
        rows = [items.snapshot_row(stream, item, self.name) for stream, item in snapshots]
        try:
            await self._db.call(self._append, rows)
        except OutboxFull as exc:
            # A snapshot is made again at the next interval: nothing is lost by skipping one.
            log.warning("uplink snapshots skipped: %s", exc)
            return 0
        self.wake()
        return len(rows)

    def _append(self, conn: sqlite3.Connection, rows: list[OutboxRow]) -> None:
        with transaction(conn, immediate=True):
            self._outbox.append(conn, rows)

    # -- commands from the district ---------------------------------------------------------------

    async def _answer(self) -> None:
        while True:
            payload = await self._commands.get()
            if self._command is None:
                continue
            reply = await self._command(payload)
            self._command_counter.labels(
                action=str(reply.get("action", "unknown")), outcome="ok" if reply.get("ok") else "error"
            ).inc()
            if self._client is not None:
                self._client.publish(up_topic(self._community, "reply"), orjson.dumps(reply), qos=1)

    # -- paho side (network thread) -----------------------------------------------------------------

    @property
    def _status_topic(self) -> str:
        return up_topic(self._community, "status")

    def _status(self, state: str) -> bytes:
        return orjson.dumps({"state": state, "ts_ms": now_ms(), "version": __version__})

    def _make_client(self) -> paho.Client:
        client = broker_client(
            self._settings,
            self._client_id,
            self.link,
            clean_session=False,
            manual_ack=False,
            on_connect=self._on_connect,
            on_subscribe=self._on_subscribe,
            on_message=self._on_message,
        )
        client.will_set(self._status_topic, self._status("offline"), qos=1, retain=True)
        client.max_inflight_messages_set(100)
        return client

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if refused(self.link, reason):
            return
        if self._settings.commands:
            self._subscribe_mid = client.subscribe(down_topic(self._community), qos=1)[1]
        client.publish(self._status_topic, self._status("online"), qos=1, retain=True)
        self.link.set_connected(True)
        self.wake_threadsafe()
        log.info("uplink connected to %s as %s", self._settings.url, self._client_id)

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[Any], properties: Any
    ) -> None:
        # A refused commands' subscription is said, but does not stop what goes up: the district
        # still receives everything, it only cannot send commands.
        if mid != self._subscribe_mid:
            return
        for topic, reason in refused_filters([down_topic(self._community)], reason_codes):
            log.error(
                "%s refused the subscription to %s (%s): the district's commands cannot arrive; "
                "allow it in the district broker's ACL for CGW_UPLINK__USERNAME",
                self.target,
                topic,
                reason,
            )

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._queue_command, bytes(msg.payload))

    def _queue_command(self, payload: bytes) -> None:
        try:
            self._commands.put_nowait(payload)
        except asyncio.QueueFull:
            self._command_counter.labels(action="unknown", outcome="dropped").inc()
            log.warning(
                "uplink: %d commands waiting; dropped one (the district may send it again)", COMMAND_QUEUE
            )

    def wake_threadsafe(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.wake)
