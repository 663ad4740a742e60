"""paho-mqtt, set up once: for brokers that speak MQTT 3.1.1 only.

The device driver for such a broker (drivers/mqtt.py) and the district uplink
(gateway/uplink/sink.py; docs/uplink.md promises that any MQTT 3.1.1 broker works) both build
their client here, so login, TLS, reconnection backoff and the reports to their `BrokerLink`
are written once. Imported only where configured: paho is memory a box on the MQTT 5 driver
without an uplink does not need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway.mqtt.link import BrokerLink
from gateway.mqtt.tls import tls_context
from gateway.settings import BrokerSettings

RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30


def broker_client(
    s: BrokerSettings,
    client_id: str,
    link: BrokerLink | None = None,
    *,
    clean_session: bool,
    manual_ack: bool = True,
    on_connect: Callable[..., None] | None = None,
    on_subscribe: Callable[..., None] | None = None,
    on_message: Callable[..., None] | None = None,
) -> paho.Client:
    """A paho client set up from broker settings: MQTT 3.1.1, login, TLS, reconnect backoff,
    and the owner's callbacks (paho's VERSION2 signatures).

    With a `link`, failed attempts and lost connections are reported to it (set your own
    `on_disconnect` to say more).
    """
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=paho.MQTTv311,
        manual_ack=manual_ack,
    )
    if s.username:
        client.username_pw_set(s.username, s.password.get_secret_value() if s.password else None)
    if s.tls:
        client.tls_set_context(tls_context(s))
    client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)
    if link is not None:

        def on_connect_fail(client: paho.Client, userdata: Any) -> None:
            link.unreachable()

        def on_disconnect(client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            link.lost(str(reason))

        client.on_connect_fail = on_connect_fail
        client.on_disconnect = on_disconnect
    if on_connect is not None:
        client.on_connect = on_connect
    if on_subscribe is not None:
        client.on_subscribe = on_subscribe
    if on_message is not None:
        client.on_message = on_message
    return client


def refused(link: BrokerLink, reason: Any) -> bool:
    """In `on_connect`: True (and why, told to the link) when the broker refused the login."""
    if not reason.is_failure:
        return False
    link.refused(str(reason))
    return True


def refused_filters(filters: Sequence[str], reason_codes: Sequence[Any]) -> list[tuple[str, str]]:
    """In `on_subscribe`: the topic filters the broker refused (SUBACK 0x80), with its reason."""
    return [(topic, str(code)) for topic, code in zip(filters, reason_codes, strict=False) if code.is_failure]
