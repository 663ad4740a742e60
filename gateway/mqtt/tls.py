"""The TLS context of a connection to a broker, from its settings (`tls_ca`, `tls_insecure`:
docs/configuration.md; what it guards against: docs/reliability.md)."""

from __future__ import annotations

import ssl

from gateway.settings import BrokerSettings


def tls_context(s: BrokerSettings) -> ssl.SSLContext:
    """The broker's certificate must be trusted (`tls_ca`, else the system's CAs);
    `tls_insecure` only stops checking that it names the host, as paho's tls_insecure_set."""
    context = ssl.create_default_context(cafile=str(s.tls_ca) if s.tls_ca else None)
    context.check_hostname = not s.tls_insecure
    return context
