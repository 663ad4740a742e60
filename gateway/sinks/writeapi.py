"""The one request of InfluxDB's v2 write API (`POST /api/v2/write`), over the standard library.

This is all the InfluxDB sink asks of a client: the org, bucket and precision in the query, the
token as `Authorization: Token ...` (no header when it is empty), line protocol as plain text,
and the answer's status, `Retry-After` and text. It is what influxdb-client sent (without gzip,
its default), in `http.client` rather than influxdb-client or httpx: each of those costs the
idle gateway megabytes of its memory target of 63 MB (issue 15; the figures are in
docs/performance.md, "Memory"). What each answer means is the sink's business
(gateway/sinks/influx.py).

One connection is kept alive between writes and used from one thread (the sink's sending thread).
"""

from __future__ import annotations

import http.client
import ssl
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

from gateway.settings import InfluxSettings

# The server closed a kept-alive connection between two writes (its idle time-out, a restart):
# the request did not reach it, or reached it only in part, so it goes once more on a new one.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


@dataclass(frozen=True)
class Answer:
    status: int
    retry_after: str | None  # the `Retry-After` header as sent, if any
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class WriteApi:
    """`post(body)` sends line protocol to `<url>/api/v2/write`; network failures raise
    `OSError` or `http.client.HTTPException` (a time-out is an `OSError`)."""

    def __init__(self, settings: InfluxSettings) -> None:
        url = urlsplit(settings.url)
        self._https = url.scheme == "https"
        self._host, self._port = url.hostname or "", url.port
        query = urlencode({"org": settings.org, "bucket": settings.bucket, "precision": "ms"})
        self._path = f"{url.path}/api/v2/write?{query}"
        token = settings.token.get_secret_value()
        self._headers = {
            "Content-Type": "text/plain; charset=utf-8",
            "Accept": "application/json",
            **({"Authorization": f"Token {token}"} if token else {}),
        }
        self._timeout = settings.timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes) -> Answer:
        while True:
            kept = self._conn is not None
            if self._conn is None:
                self._conn = self._connect()
            try:
                self._conn.request("POST", self._path, body, self._headers)
                response = self._conn.getresponse()
                text = response.read().decode("utf-8", errors="replace")
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                # Only a kept connection gets a second try, so a refusing server is not hammered.
                if kept and isinstance(exc, _STALE):
                    continue
                raise
            if response.will_close:
                self.close()
            return Answer(response.status, response.getheader("Retry-After"), text)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connect(self) -> http.client.HTTPConnection:
        if self._https:
            # The system's trusted certificates, as influxdb-client's urllib3 used; loaded only
            # for an https:// URL, when the first write goes.
            context = ssl.create_default_context()
            return http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=context)
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
