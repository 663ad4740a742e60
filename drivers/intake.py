"""What both device-broker drivers keep (drivers/mqtt.py's for MQTT 3.1.1, drivers/mqtt5.py's):
settings, messages received and not yet handed to the pipeline, the wake-up for that, and the
words for a session taken over. The connection's state is a `BrokerLink` (gateway/mqtt/link.py).

Kept apart from drivers/mqtt.py (paho), so a gateway on the MQTT 5 driver (the default) never
imports paho: memory on a small box (issue 15).
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections import deque

from drivers.base import Driver
from gateway.instruments import Instruments
from gateway.models import RawMessage
from gateway.mqtt.link import BrokerLink
from gateway.settings import MqttSettings

# A broker drops the older of two connections with one client id [MQTT-3.1.4-2]; MQTT 3.1.1 says
# no more than that, so a drop this soon after connecting is reported as a likely takeover.
TAKEOVER_HINT_S = 10.0


class MqttIntake(Driver):
    """The common part of the device-broker drivers; subclasses run the client."""

    name = "mqtt"

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        instruments: Instruments,
        batch_size: int = 2000,
        max_pending: int = 20_000,
    ) -> None:
        self._settings = settings
        self._client_id = client_id
        self._instruments = instruments
        self._batch_size = batch_size
        self._max_pending = max_pending
        self._pending: deque[RawMessage] = deque()
        self._generation = 0  # connection count: acks of an earlier connection are void
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # The driver's own logger (drivers.mqtt5, drivers.mqtt): one connection's lines under
        # one name, whichever module wrote them.
        self.link = BrokerLink(
            settings,
            f"the broker {settings.url}",
            "CGW_MQTT",
            instruments.driver_connected.labels(driver=self.name),
            logging.getLogger(type(self).__module__),
        )

    @property
    def connected(self) -> bool:
        """Connected and subscribed: the broker answered CONNECT and every SUBSCRIBE."""
        return self.link.connected

    @property
    def last_error(self) -> str | None:
        return self.link.last_error

    @property
    def target(self) -> str:
        return self.link.target

    def _closed_soon(self) -> bool:
        """Lost within TAKEOVER_HINT_S of connecting."""
        return self.link.connected_for() < TAKEOVER_HINT_S

    def _taken_over(self, certain: bool) -> str:
        """Why the connection was lost when another client connected with our client id."""
        who = f"another client connected with this gateway's client id {self._client_id!r}"
        fix = (
            "(a second gateway for the same community on this broker? give each its own "
            "CGW_COMMUNITY or CGW_MQTT__CLIENT_ID)"
        )
        if certain:
            return f"{who} and took over its session {fix}"
        return f"the broker closed the connection soon after it was made, as it does when {who} {fix}"

    @abc.abstractmethod
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish to a device (acks, commands), from any thread; kept while offline."""
