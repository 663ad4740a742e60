"""Presence: online on birth or any message, offline on the Last Will or a heartbeat timeout.

docs/contract.md section 1: "Presence: online on birth or any message; offline on the Last Will, or
after the profile's heartbeat timeout with no message." Every change becomes a `PresenceChange`
and an event. Timeouts use the gateway's monotonic clock, never the device's own `ts` nor the
wall clock, which jumps when a box without a real-time clock syncs (gateway/clock.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.models import Device, DeviceEvent, PresenceChange, Severity
from gateway.profiles import ProfileSet
from gateway.registry import DeviceRegistry


class PresenceTracker:
    """Turns traffic and silence into presence changes; owned by the pipeline task alone."""

    def __init__(
        self, registry: DeviceRegistry, profiles: ProfileSet, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._registry = registry
        self._profiles = profiles
        self._clock = clock
        self._seen_at: dict[str, float] = {}  # device -> the monotonic clock at its last message

    def seen(self, device: Device, received_ms: int, reason: str) -> PresenceChange | None:
        """Record traffic from `device`; a change when it was offline."""
        device.last_seen_ms = received_ms
        self._seen_at[device.device_id] = self._clock()
        if device.first_seen_ms is None:
            device.first_seen_ms = received_ms
        if device.online:
            return None
        return self._change(device, received_ms, online=True, reason=reason)

    def went_offline(self, device: Device, at_ms: int, reason: str) -> PresenceChange | None:
        """The device said it is offline (Last Will or clean shutdown)."""
        if not device.online:
            return None
        return self._change(device, at_ms, online=False, reason=reason)

    def sweep(self, now_ms: int) -> list[PresenceChange]:
        """Devices silent for longer than their profile's heartbeat timeout go offline (the
        silence measured on the monotonic clock; `now_ms` only stamps the change)."""
        changes: list[PresenceChange] = []
        now = self._clock()
        for device in self._registry.all():
            if not device.online or device.last_seen_ms is None:
                continue
            timeout_s = (self._profiles.get(device.kind) or self._profiles.generic).heartbeat_timeout_s
            seen_at = self._seen_at.get(device.device_id)
            if seen_at is None:
                # Known from an earlier run: its silence so far by the wall clock, which may be
                # wrong after a reboot, so never more than one time-out nor less than nothing.
                silent_s = min(max((now_ms - device.last_seen_ms) / 1000, 0.0), timeout_s)
                seen_at = self._seen_at[device.device_id] = now - silent_s
            if now - seen_at > timeout_s:
                changes.append(self._change(device, now_ms, online=False, reason="timeout"))
        return changes

    def _change(self, device: Device, at_ms: int, *, online: bool, reason: str) -> PresenceChange:
        device.online = online
        device.presence_ms = at_ms
        self._registry.mark_dirty(device.device_id)
        return PresenceChange(
            device_id=device.device_id,
            kind=device.kind,
            ts_ms=at_ms,
            online=online,
            reason=reason,
            building=device.building,
        )


def presence_event(change: PresenceChange) -> DeviceEvent:
    """The event an operator sees for a presence change; a silent death is a warning."""
    state = "online" if change.online else "offline"
    severity: Severity = "warning" if change.reason == "timeout" else "info"
    why = {
        "timeout": "no message within the heartbeat timeout",
        "will": "Last Will / offline status received",
        "birth": "birth message received",
    }.get(change.reason, f"{change.reason} received")
    return DeviceEvent(
        device_id=change.device_id,
        kind=change.kind,
        ts_ms=change.ts_ms,
        type=state,
        severity=severity,
        message=f"{change.device_id} is {state}: {why}",
        data={"reason": change.reason},
        source="gateway",
        building=change.building,
    )
