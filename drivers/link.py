"""What the gateway's MQTT clients share, without paho: the connection's state and the words for
why it is down (`BrokerLink`), the device-broker drivers' common part (`MqttIntake`), and TLS.

Kept apart from drivers/mqtt.py (paho's MQTT 3.1.1 driver), so a gateway on the MQTT 5 driver
(drivers/mqtt5.py, the default) never imports paho: memory on a small box (issue 15).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import socket
import ssl
import time
from collections import deque
from typing import Any

from prometheus_client import Gauge

from drivers.base import Driver
from gateway.instruments import Instruments
from gateway.models import RawMessage
from gateway.settings import BrokerSettings, MqttSettings


class BrokerLink:
    """What an MQTT client of the gateway keeps about its connection, and the paho callbacks that
    keep it: up or not (with its gauge), and why not, in words that name the setting to fix.

    Shared by the devices' broker (MqttDriver) and the district's (the uplink). `_stopping` is
    set by the owner while it shuts down, so its own disconnect is not reported as a loss.
    """

    last_error: str | None

    def _init_link(self, settings: BrokerSettings, target: str, env: str, gauge: Gauge) -> None:
        self._link_settings = settings
        self.target = target  # e.g. "the broker mqtt://…", for logs and /readyz
        self._link_env = env  # the settings' environment prefix, e.g. CGW_MQTT
        self._link_gauge = gauge
        self._connected = False
        self._stopping = False
        self.last_error = None
        # The client's own logger (drivers.mqtt5, drivers.mqtt, the uplink's): one connection's
        # lines under one name, whichever module wrote them.
        self._log = logging.getLogger(type(self).__module__)

    @property
    def connected(self) -> bool:
        return self._connected

    def _set_connected(self, value: bool) -> None:
        self._connected = value
        self._link_gauge.set(1 if value else 0)

    def _refused(self, reason: Any) -> bool:
        """In paho's `on_connect`: True (and why, logged) when the broker refused the login."""
        if not reason.is_failure:
            return False
        self._refusal(str(reason))
        return True

    def _refusal(self, reason: str) -> None:
        env = self._link_env
        self.last_error = f"{self.target} refused the connection: {reason}"
        self._log.error("%s (check %s__USERNAME / %s__PASSWORD)", self.last_error, env, env)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._unreachable()

    def _unreachable(self) -> None:
        # Clients retry quietly and keep the reason to themselves: find it out, so /readyz and
        # the log say what to fix.
        why = why_unreachable(self._link_settings, env=self._link_env)
        self._failing(f"cannot connect to {self.target}: {why}")

    def _failing(self, message: str) -> None:
        """A failed attempt, logged once per distinct reason: the client retries on its own."""
        if message != self.last_error:
            self._log.error("%s; retrying", message)
        self.last_error = message

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._lost(str(reason))

    def _lost(self, reason: str) -> None:
        was_connected = self._connected
        self._set_connected(False)
        # After a refused CONNECT the broker closes the socket too: keep the refusal as the reason.
        if not self._stopping and was_connected:
            self.last_error = f"lost {self.target}: {reason}"
            self._log.warning("%s; reconnecting", self.last_error)


# A broker drops the older of two connections with one client id [MQTT-3.1.4-2]; MQTT 3.1.1 says
# no more than that, so a drop this soon after connecting is reported as a likely takeover.
TAKEOVER_HINT_S = 10.0


class MqttIntake(BrokerLink, Driver):
    """What both device-broker drivers keep (this module's for MQTT 3.1.1, drivers/mqtt5.py's):
    settings, messages received and not yet handed to the pipeline, and the wake-up for that."""

    name = "mqtt"

    def _set_connected(self, value: bool) -> None:
        if value:
            self._connected_at = time.monotonic()
        super()._set_connected(value)

    def _closed_soon(self) -> bool:
        """Lost within TAKEOVER_HINT_S of connecting."""
        return time.monotonic() - self._connected_at < TAKEOVER_HINT_S

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
        self._connected_at = float("-inf")  # monotonic time of the last CONNACK
        self._init_link(
            settings,
            f"the broker {settings.url}",
            "CGW_MQTT",
            instruments.driver_connected.labels(driver=self.name),
        )
        self._init_client()

    @abc.abstractmethod
    def _init_client(self) -> None:
        """The driver's own state (its client, its ack bookkeeping)."""

    @abc.abstractmethod
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish to a device (acks, commands), from any thread; kept while offline."""


def tls_context(s: BrokerSettings) -> ssl.SSLContext:
    """The broker's certificate must be trusted (`tls_ca`, else the system's CAs);
    `tls_insecure` only stops checking that it names the host, as paho's tls_insecure_set."""
    context = ssl.create_default_context(cafile=str(s.tls_ca) if s.tls_ca else None)
    context.check_hostname = not s.tls_insecure
    return context


def why_unreachable(s: BrokerSettings, timeout_s: float = 2.0, env: str = "CGW_MQTT") -> str:
    """Why a connection to the broker fails, found by trying TCP (and TLS) directly.

    `env` names the settings' environment prefix, so the advice names the right variable.
    """
    try:
        with socket.create_connection((s.host, s.port), timeout_s) as sock:
            if s.tls:
                with tls_context(s).wrap_socket(sock, server_hostname=s.host):
                    pass
    except ssl.SSLCertVerificationError as exc:
        return f"the broker's TLS certificate is not trusted ({exc.verify_message}): check {env}__TLS_CA"
    except ssl.SSLError as exc:
        return f"TLS handshake failed ({exc.reason}): is the port a TLS listener? check {env}__URL"
    except OSError as exc:
        return f"{exc.strerror or exc}: is the broker running? check {env}__URL"
    return "the broker accepted the connection and then closed it"
