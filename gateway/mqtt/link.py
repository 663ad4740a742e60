"""A client's connection to a broker: up or not (with its gauge), and why not, in words that name
the setting to fix.

Composed into each MQTT client of the gateway (the device drivers, the district uplink), which
tell it what happened: connected, refused, unreachable, lost. It logs under the owner's logger,
so one connection's lines are under one name whichever module wrote them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from prometheus_client import Gauge

from gateway.mqtt.diagnosis import why_not_subscribed, why_unreachable
from gateway.settings import BrokerSettings


class BrokerLink:
    """The state of one client's connection. `stopping` is set by the owner while it shuts down,
    so its own disconnect is not reported as a loss."""

    def __init__(
        self, settings: BrokerSettings, target: str, env: str, gauge: Gauge, log: logging.Logger
    ) -> None:
        self._settings = settings
        self.target = target  # e.g. "the broker mqtt://…", for logs and /readyz
        self.env = env  # the settings' environment prefix, e.g. CGW_MQTT
        self._gauge = gauge
        self._log = log
        self._connected = False
        self.connected_at = float("-inf")  # monotonic time of the last accepted CONNECT
        self.stopping = False
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    def set_connected(self, value: bool) -> None:
        if value:
            self.connected_at = time.monotonic()
            self.last_error = None
        self._connected = value
        self._gauge.set(1 if value else 0)

    def connected_for(self) -> float:
        """Seconds since the last accepted CONNECT."""
        return time.monotonic() - self.connected_at

    def refused(self, reason: str) -> None:
        """The broker refused the login (CONNACK with a failure reason)."""
        env = self.env
        self.last_error = f"{self.target} refused the connection: {reason}"
        self._log.error("%s (check %s__USERNAME / %s__PASSWORD)", self.last_error, env, env)

    def unreachable(self) -> None:
        """A connection attempt failed. Blocking (it tries a connection itself): call it from a
        network thread, or through `asyncio.to_thread`."""
        # Clients retry quietly and keep the reason to themselves: find it out, so /readyz and
        # the log say what to fix.
        why = why_unreachable(self._settings, env=self.env)
        self.failing(f"cannot connect to {self.target}: {why}")

    def failing(self, message: str) -> None:
        """A failed attempt, logged once per distinct reason: the client retries on its own."""
        if message != self.last_error:
            self._log.error("%s; retrying", message)
        self.last_error = message

    def subscription_refused(self, refusals: Sequence[tuple[str, str]]) -> None:
        """The broker took the login but refused topic filters (their SUBACK reason codes): the
        client is connected and not doing its job, so it is down for /readyz, and says why."""
        message = why_not_subscribed(self.target, refusals, self.env)
        self._connected = False
        self._gauge.set(0)
        if message != self.last_error:
            self._log.error("%s", message)
        self.last_error = message

    def lost(self, reason: str) -> None:
        was_connected = self._connected
        self._connected = False
        self._gauge.set(0)
        # After a refused CONNECT the broker closes the socket too: keep the refusal as the reason.
        if not self.stopping and was_connected:
            self.last_error = f"lost {self.target}: {reason}"
            self._log.warning("%s; reconnecting", self.last_error)
