"""Why a broker is unreachable, in words that name the setting to fix.

MQTT clients retry quietly and keep the reason to themselves; this tries TCP (and TLS) directly
to find it out, for the log, /readyz and `cgw doctor`.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence

from gateway.mqtt.tls import tls_context
from gateway.settings import BrokerSettings


def why_unreachable(s: BrokerSettings, timeout_s: float = 2.0, env: str = "CGW_MQTT") -> str:
    """Why a connection to the broker fails. Blocking.

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


def why_not_subscribed(target: str, refusals: Sequence[tuple[str, str]], env: str = "CGW_MQTT") -> str:
    """What to say when the broker refused topic filters: `refusals` are (filter, SUBACK reason)."""
    which = "; ".join(f"{topic} ({reason})" for topic, reason in refusals)
    return (
        f"{target} refused the subscription to {which}: "
        f"allow it in the broker's ACL for the user {env}__USERNAME"
    )
