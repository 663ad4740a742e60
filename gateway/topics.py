"""The contract's MQTT topic scheme, in one place.

docs/contract.md section 1: "Topic: `cgw/v1/{device_id}/{channel}`. `device_id` matches
`[A-Za-z0-9_-]{1,64}`." Devices publish `status`, `telemetry`, `event`, `request`, `rating`
and (an extension) `vote`; the gateway publishes `ack` and `cmd`.
"""

from __future__ import annotations

import re

PREFIX = "cgw/v1/"
INBOUND_CHANNELS = ("status", "telemetry", "event", "request", "rating", "vote")
TERMINAL_CHANNELS = ("request", "rating", "vote")
OUTBOUND_CHANNELS = ("ack", "cmd")
DEVICE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# One subscription per inbound channel, not `cgw/v1/+/+`: the gateway must not receive its own
# `ack` and `cmd` publications back.
SUBSCRIPTIONS = tuple(f"{PREFIX}+/{channel}" for channel in INBOUND_CHANNELS)


class TopicError(ValueError):
    """The topic does not follow the contract's scheme."""


def parse(topic: str) -> tuple[str, str]:
    """Split a topic into `(device_id, channel)`, refusing anything off-contract."""
    if not topic.startswith(PREFIX):
        raise TopicError(f"bad_topic: {topic[:100]!r} does not start with {PREFIX!r}")
    rest = topic[len(PREFIX) :]
    device_id, sep, channel = rest.partition("/")
    if not sep or channel not in INBOUND_CHANNELS:
        raise TopicError(f"bad_topic: {topic[:100]!r} is not cgw/v1/{{device_id}}/{{channel}}")
    if DEVICE_ID.fullmatch(device_id) is None:
        raise TopicError(f"bad_topic: device id {device_id[:80]!r} must match [A-Za-z0-9_-]{{1,64}}")
    return device_id, channel


def device_topic(device_id: str, channel: str) -> str:
    """The topic a device publishes on, or the gateway publishes to a device."""
    return f"{PREFIX}{device_id}/{channel}"
