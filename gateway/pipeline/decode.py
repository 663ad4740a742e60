"""Decode stage: raw MQTT payload bytes into a JSON object and a trusted timestamp.

docs/contract.md section 1: "Payloads are UTF-8 JSON objects, at most 64 KiB (configurable).
Timestamps (`ts`) are RFC 3339 strings or integer epoch milliseconds; when absent the gateway
stamps the receive time." Every refusal is a `Rejected` whose text starts with a reason code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from gateway.models import Rejected


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """How far a device's clock may be from the gateway's before its readings are refused.

    `max_future_ms` is None while the gateway's own clock is not set (gateway/clock.py): a
    device's time ahead of the gateway's estimate is then more likely right than wrong."""

    max_future_ms: int | None
    max_past_ms: int


def decode_object(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """Parse a payload that must be a JSON object no larger than `max_bytes`."""
    if len(payload) > max_bytes:
        raise Rejected(f"oversize: payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        # orjson refuses invalid UTF-8, NaN/Infinity literals and absurd nesting on its own.
        value = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise Rejected(f"bad_json: {exc}") from None
    if not isinstance(value, dict):
        raise Rejected(f"schema: payload must be a JSON object, got {type(value).__name__}")
    return value


def parse_timestamp(value: object, received_ms: int, window: TimeWindow) -> int:
    """The reading's time in epoch ms: `ts` if given and plausible, else the receive time."""
    if value is None:
        return received_ms
    if isinstance(value, bool):
        raise Rejected("bad_timestamp: ts must be an RFC 3339 string or integer epoch ms, got a boolean")
    if isinstance(value, int):
        ts_ms = value
    elif isinstance(value, str):
        ts_ms = _parse_rfc3339(value)
    else:
        raise Rejected(
            f"bad_timestamp: ts must be an RFC 3339 string or integer epoch ms, got {type(value).__name__}"
        )
    if window.max_future_ms is not None and ts_ms > received_ms + window.max_future_ms:
        ahead = (ts_ms - received_ms) / 1000
        raise Rejected(f"bad_timestamp: ts is {ahead:.0f} s in the future (clock skew?)")
    if ts_ms < received_ms - window.max_past_ms:
        behind = (received_ms - ts_ms) / 1000
        raise Rejected(f"bad_timestamp: ts is {behind:.0f} s in the past, beyond the accepted window")
    return ts_ms


def _parse_rfc3339(text: str) -> int:
    if len(text) > 40:
        raise Rejected("bad_timestamp: ts string too long for RFC 3339")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise Rejected(f"bad_timestamp: {text!r} is not an RFC 3339 timestamp") from None
    if moment.tzinfo is None:
        raise Rejected(f"bad_timestamp: {text!r} has no UTC offset (RFC 3339 needs Z or ±hh:mm)")
    return int(moment.timestamp() * 1000)
