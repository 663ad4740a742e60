"""Validate and enrich stage: one batch of raw messages in, typed records and refusals out.

Synchronous and free of I/O so it can be tested directly and so one task owns the registry,
presence and alarm state (no locks). Each message is judged alone: a bad one becomes a
dead letter with its reason, and the rest of the batch goes on.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import Any

import orjson

from gateway.clock import ClockWatch
from gateway.instruments import Instruments
from gateway.limits import Admission, DeviceRateLimit, FloodNotes
from gateway.models import (
    SEVERITIES,
    Batch,
    DeadLetter,
    Device,
    DeviceEvent,
    PresenceChange,
    RawMessage,
    Reading,
    Rejected,
    TerminalMessage,
)
from gateway.pipeline.decode import TimeWindow, decode_object, parse_timestamp
from gateway.presence import PresenceTracker, presence_event
from gateway.profiles import ProfileSet
from gateway.registry import DeviceRegistry
from gateway.rules import AlarmEngine
from gateway.topics import INBOUND_CHANNELS, TERMINAL_CHANNELS, TopicError, parse

log = logging.getLogger(__name__)

EVENT_TYPE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_BATCH_ITEMS = 1000
MAX_MESSAGE_CHARS = 1024
FLOOD_KEEP_BYTES = 256  # of each rate-limited payload, in its dead letter


class Processor:
    """Turns raw contract messages into readings, events and presence changes."""

    def __init__(
        self,
        profiles: ProfileSet,
        registry: DeviceRegistry,
        alarms: AlarmEngine,
        instruments: Instruments,
        window: TimeWindow,
        max_payload_bytes: int,
        rate_limit: DeviceRateLimit | None = None,
        clock: ClockWatch | None = None,
    ) -> None:
        self._profiles = profiles
        self._registry = registry
        self._presence = PresenceTracker(registry, profiles)
        self._alarms = alarms
        self._instruments = instruments
        self._set_window = window
        # While the gateway's clock is not set, a device's time is not refused for being ahead.
        self._unset_window = replace(window, max_future_ms=None)
        self._window = window
        self._clock = clock or ClockWatch()
        self._clock.on_jump(alarms.clock_jumped)  # durations being timed move with a jump
        self._max_bytes = max_payload_bytes
        self._rate_limit = rate_limit or DeviceRateLimit("")
        # Refusals are logged once a minute per device (or reason): every one is still counted
        # and dead-lettered, but junk from one device must not fill the journal.
        self._log_notes = FloodNotes()
        self._unlogged: dict[str, int] = {}
        self._received = {ch: instruments.messages_in.labels(channel=ch) for ch in INBOUND_CHANNELS}

    def process(self, messages: list[RawMessage]) -> Batch:
        """What `messages` (one driver's batch) become: readings, events, presence changes, dead
        letters, terminal messages."""
        out = Batch()
        # A jump is found before anything of this batch is timed, so the alarm engine's shift
        # comes first; the drivers stamp with the wall clock, corrected while it is not set.
        self._clock.check()
        correction = self._clock.correction_ms()
        self._window = self._set_window if self._clock.is_set else self._unset_window
        for topic, payload, received_ms in messages:
            received_ms += correction
            device_id: str | None = None
            channel: str | None = None
            try:
                device_id, channel = parse(topic)
                self._received[channel].inc()
                admission = self._rate_limit.admit(device_id, received_ms)
                if admission is Admission.REFUSED:
                    self._flooded(out, topic, device_id, channel, payload, received_ms)
                    continue
                obj = decode_object(payload, self._max_bytes)
                if admission is Admission.BACKLOG and not self._rate_limit.backlog(
                    device_id, _message_time(obj, received_ms)
                ):
                    self._flooded(out, topic, device_id, channel, payload, received_ms)
                    continue
                if channel in TERMINAL_CHANNELS:
                    self._terminal(device_id, channel, obj, topic, payload, received_ms, out)
                else:
                    _CHANNELS[channel](self, device_id, obj, received_ms, out)
            except (Rejected, TopicError) as exc:
                self._reject(out, topic, device_id, channel, str(exc), payload, received_ms)
        self._finish(out)
        return out

    def sweep(self, now_ms: int | None = None) -> Batch:
        """Heartbeat time-outs, run periodically by the pipeline task; stamped with the
        gateway's time unless `now_ms` is given."""
        now = self._clock.now_ms() if now_ms is None else now_ms
        out = Batch()
        for change in self._presence.sweep(now):
            self._add_presence(out, change)
        self._finish(out)
        # Forgetting idle devices is retention: a forward jump of the clock does not forget
        # every device at once (gateway/clock.py).
        out.forgotten = self._registry.forget_idle(self._clock.retention_ms() if now_ms is None else now)
        return out

    # -- channels -----------------------------------------------------------------------------

    def _status(self, device_id: str, obj: dict[str, Any], received_ms: int, out: Batch) -> None:
        state = obj.get("state")
        if state not in ("online", "offline"):
            raise Rejected(f"schema: status.state must be 'online' or 'offline', got {state!r}")
        if state == "offline":
            device = self._registry.get(device_id)
            if device is None:
                # A Last Will of a device we never knew says nothing worth keeping.
                return
            change = self._presence.went_offline(device, received_ms, "will")
        else:
            device = self._registry.on_birth(device_id, obj, received_ms)
            change = self._presence.seen(device, received_ms, "birth")
        if change is not None:
            self._add_presence(out, change)

    def _telemetry(self, device_id: str, obj: dict[str, Any], received_ms: int, out: Batch) -> None:
        device = self._registry.resolve(device_id, received_ms)
        self._seen(device, received_ms, out)
        profile = self._profiles.get(device.kind) or self._profiles.generic
        items = obj.get("batch")
        if items is None:
            out.readings.append(self._reading(device, profile, obj, received_ms))
            return
        if not isinstance(items, list) or not items:
            raise Rejected("schema: telemetry.batch must be a non-empty array of readings")
        if len(items) > MAX_BATCH_ITEMS:
            raise Rejected(f"schema: telemetry.batch holds {len(items)} readings, at most {MAX_BATCH_ITEMS}")
        topic = f"cgw/v1/{device_id}/telemetry"
        for index, item in enumerate(items):
            try:
                if not isinstance(item, dict):
                    raise Rejected(f"schema: batch item must be an object, got {type(item).__name__}")
                out.readings.append(self._reading(device, profile, item, received_ms))
            except Rejected as exc:
                # One bad item costs only itself; its siblings are kept.
                self._reject(
                    out,
                    topic,
                    device_id,
                    "telemetry",
                    f"{exc} (batch item {index})",
                    orjson.dumps(item, default=str),
                    received_ms,
                )

    def _reading(self, device: Device, profile: Any, obj: dict[str, Any], received_ms: int) -> Reading:
        ts_ms = parse_timestamp(obj.get("ts"), received_ms, self._window)
        seq = obj.get("seq")
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 0):
            raise Rejected(f"schema: seq must be a non-negative integer, got {seq!r}")
        try:
            values = profile.validate_metrics(obj.get("metrics"))
        except ValueError as exc:
            raise Rejected(str(exc)) from None
        stamped_here = obj.get("ts") is None
        return Reading(device.device_id, device.kind, ts_ms, values, seq, device.building, stamped_here)

    def _event(self, device_id: str, obj: dict[str, Any], received_ms: int, out: Batch) -> None:
        device = self._registry.resolve(device_id, received_ms)
        self._seen(device, received_ms, out)
        event_type = obj.get("type")
        if not isinstance(event_type, str) or EVENT_TYPE.fullmatch(event_type) is None:
            raise Rejected(f"schema: event.type must match [A-Za-z0-9_.-]{{1,64}}, got {event_type!r}")
        severity = obj.get("severity")
        if severity is not None and severity not in SEVERITIES:
            raise Rejected(f"schema: event.severity must be info, warning or critical, got {severity!r}")
        message = obj.get("message", "")
        if not isinstance(message, str):
            raise Rejected("schema: event.message must be a string")
        data = obj.get("data", {})
        if not isinstance(data, dict):
            raise Rejected("schema: event.data must be an object")
        ts_ms = parse_timestamp(obj.get("ts"), received_ms, self._window)
        profile = self._profiles.get(device.kind) or self._profiles.generic
        event = self._alarms.reported(
            DeviceEvent(
                device_id=device_id,
                kind=device.kind,
                ts_ms=ts_ms,
                type=event_type,
                severity=profile.event_severity(event_type, severity),
                message=message[:MAX_MESSAGE_CHARS],
                data=data,
                source="device",
                building=device.building,
            )
        )
        out.events.append(event)

    def _terminal(
        self,
        device_id: str,
        channel: str,
        obj: dict[str, Any],
        topic: str,
        payload: bytes,
        received_ms: int,
        out: Batch,
    ) -> None:
        """Requests, ratings and votes: checked here for the device, read by the service desk.

        Only a device whose profile is a service terminal speaks for residents; any other's
        message goes on to the desk already refused, to be answered like every refusal there.
        """
        device = self._registry.resolve(device_id, received_ms)
        self._seen(device, received_ms, out)
        ts_ms = parse_timestamp(obj.get("ts"), received_ms, self._window)
        profile = self._profiles.get(device.kind)
        refused = None
        if profile is None or not profile.terminal:
            refused = (
                f"not_a_terminal: {device_id} is a {device.kind} device; only service terminals "
                f"publish {channel} (docs/privacy.md)"
            )
        out.terminal.append(
            TerminalMessage(
                device_id, channel, obj, ts_ms, received_ms, topic, payload, device.building, refused
            )
        )

    # -- helpers -------------------------------------------------------------------------------

    def _seen(self, device: Device, received_ms: int, out: Batch) -> None:
        change = self._presence.seen(device, received_ms, "message")
        if change is not None:
            self._add_presence(out, change)

    def _add_presence(self, out: Batch, change: PresenceChange) -> None:
        out.presence.append(change)
        out.events.append(presence_event(change))
        self._instruments.presence_changes.labels(state="online" if change.online else "offline").inc()

    def _reject(
        self,
        out: Batch,
        topic: str,
        device_id: str | None,
        channel: str | None,
        reason: str,
        payload: bytes,
        received_ms: int,
        *,
        logged: bool = True,
    ) -> None:
        letter = DeadLetter(received_ms, topic, device_id, reason, payload, channel)
        out.dead_letters.append(letter)
        self._instruments.messages_rejected.labels(reason=letter.reason_code).inc()
        if logged:
            # Newcomers and bad topics each bring a new name: theirs are logged by reason.
            key = device_id if device_id and letter.reason_code not in _NEWCOMER else letter.reason_code
            if self._log_notes.should_log(key, received_ms):
                more = self._unlogged.pop(key, 0)
                also = f" ({more} more refused since the last line)" if more else ""
                log.warning("rejected message on %s: %s%s", topic[:200], reason, also)
            else:
                if len(self._unlogged) > 10_000:
                    self._unlogged.clear()
                self._unlogged[key] = self._unlogged.get(key, 0) + 1

    def _flooded(
        self, out: Batch, topic: str, device_id: str, channel: str, payload: bytes, received_ms: int
    ) -> None:
        """Over the device's rate limit: refused like any bad message, but logged once a minute
        and kept short (a flood must not fill the disk with copies of itself)."""
        reason = "rate_limited: the device sends faster than pipeline.device_rate_limit allows"
        short = payload[:FLOOD_KEEP_BYTES]
        self._reject(out, topic, device_id, channel, reason, short, received_ms, logged=False)
        if self._rate_limit.should_log(device_id, received_ms):
            log.warning("device %s is flooding: refusing what exceeds its rate limit", device_id)

    def _finish(self, out: Batch) -> None:
        """Update last values, run the alarm rules, and collect devices to persist."""
        for reading in out.readings:
            device = self._registry.get(reading.device_id)
            if device is not None and (device.last_ts_ms is None or reading.ts_ms >= device.last_ts_ms):
                device.last_ts_ms = reading.ts_ms
                device.last_values.update(reading.metrics)
                if reading.seq is not None:
                    device.last_seq = reading.seq
            out.events.extend(self._alarms.observe(reading))
        self._instruments.readings.inc(len(out.readings))
        for event in out.events:
            self._instruments.events.labels(severity=event.severity).inc()
        out.devices = self._registry.take_dirty()


def _message_time(obj: dict[str, Any], received_ms: int) -> int:
    """When the device says it sent this (its `ts`, or its batch's first), for the rate limit;
    the receive time when it says nothing usable (the message itself is judged later)."""
    ts = obj.get("ts")
    if (
        ts is None
        and isinstance(obj.get("batch"), list)
        and obj["batch"]
        and isinstance(obj["batch"][0], dict)
    ):
        ts = obj["batch"][0].get("ts")
    try:
        return parse_timestamp(ts, received_ms, _ANY_TIME)
    except Rejected:
        return received_ms


_NEWCOMER = frozenset({"unknown_device", "registration_full"})
_ANY_TIME = TimeWindow(max_future_ms=2**62, max_past_ms=2**62)

_CHANNELS = {
    "status": Processor._status,
    "telemetry": Processor._telemetry,
    "event": Processor._event,
}
