"""Real Mosquitto and VictoriaMetrics processes for the tests, on free ports in temporary folders.

Both come from Debian's packages (`scripts/dev test` installs them). Each helper starts its
server, waits until the server says it serves, and can be stopped, killed and restarted with its
data kept. Nothing here polls a port: Mosquitto says READY=1 over the systemd notify protocol
(sd_notify(3)), VictoriaMetrics and `cgw run` log a line once they listen, and a server that
exits instead wakes the wait at once (its pidfd, or the end of its output).
"""

from __future__ import annotations

import getpass
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import trustme


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/usr/local/sbin")
    if found is None:
        raise RuntimeError(f"{name} is not installed: run `scripts/dev test`, which installs it")
    return found


def start_notified(
    command: list[str], log: Path, timeout: float = 10, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a server that speaks the systemd notify protocol and return once it sent READY=1.

    Mosquitto (built with systemd, as Debian's) sends it once its listeners are open. The socket
    is in the abstract namespace (`@name`), so no path length limit and no file to remove. A
    server that exits first wakes the wait through its pidfd and the error says so.
    """
    name = f"cgw-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, log.open("ab") as out:
        notify.bind(f"\0{name}")
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**(env or os.environ), "NOTIFY_SOCKET": f"@{name}"},
        )
        exited = os.pidfd_open(process.pid)
        try:
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                readable, _, _ = select.select([notify.fileno(), exited], [], [], left)
                if exited in readable:
                    raise RuntimeError(f"{command[0]} exited with {process.wait()}: see {log}")
                if notify.fileno() in readable and b"READY=1" in notify.recv(4096).split(b"\n"):
                    return process
        finally:
            os.close(exited)
    process.kill()
    process.wait()
    raise RuntimeError(f"{command[0]} did not say READY=1 within {timeout} s: see {log}")


# The line `cgw run` logs once its API listens.
RUNNING = re.compile(rb"gateway for community \S+ running: API on")


def connect_soon(port: int, process: subprocess.Popen[bytes], timeout: float = 5) -> None:
    """Connect to a server that said it is about to listen, until it does.

    A bounded retry, for a server whose last word comes just before its listen call
    (VictoriaMetrics): no signal follows the listen, so this is the one wait here that polls.
    A server that exits wakes it through its pidfd.
    """
    exited = os.pidfd_open(process.pid)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nothing listens on port {port} after {timeout} s") from None
            if select.select([exited], [], [], 0.01)[0]:
                raise RuntimeError(f"the server on port {port} exited with {process.wait()}")
    finally:
        os.close(exited)


class LogCopy(threading.Thread):
    """Copies a server's output into its log file line by line, and notes the line saying it serves.

    Reading the output is the signal (no polling); copying it keeps the pipe from filling. The
    thread ends with the output, when the process exits.
    """

    def __init__(self, process: subprocess.Popen[bytes], log: Path, ready: re.Pattern[bytes]) -> None:
        super().__init__(name=f"log {log}", daemon=True)
        self.process, self.log, self.ready = process, log, ready
        self.said_ready = False
        self.changed = threading.Event()  # the ready line, or the end of the output

    def run(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout as output, self.log.open("ab") as out:
            for line in output:
                out.write(line)
                out.flush()  # tests read the log while the server runs
                if not self.said_ready and self.ready.search(line):
                    self.said_ready = True
                    self.changed.set()
        self.changed.set()

    def wait_ready(self, timeout: float) -> None:
        if not self.changed.wait(timeout):
            raise RuntimeError(f"no line matching {self.ready.pattern!r} within {timeout} s: see {self.log}")
        if not self.said_ready:
            raise RuntimeError(f"the server exited with {self.process.wait()}: see {self.log}")


def start_logged(
    command: list[str],
    log: Path,
    ready: re.Pattern[bytes],
    timeout: float = 10,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], LogCopy]:
    """Start a server and return once it logged the line `ready`, its output copied into `log`."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    copy = LogCopy(process, log, ready)
    copy.start()
    try:
        copy.wait_ready(timeout)
    except RuntimeError:
        process.kill()
        process.wait()
        copy.join()
        raise
    return process, copy


class _Process:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._copy: LogCopy | None = None

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _launch(self) -> subprocess.Popen[bytes]:
        """Start the server; return once it said it serves."""
        raise NotImplementedError

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._process = self._launch()

    @property
    def pid(self) -> int:
        assert self._process is not None, "not running"
        return self._process.pid

    def stop(self) -> None:
        """Graceful stop (SIGTERM); data on disk is kept for a restart."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _end(self, sig: signal.Signals) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(sig)
            try:
                self._process.wait(15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._copy is not None:  # its output has ended with the process
            self._copy.join()
            self._copy = None


class MosquittoProcess(_Process):
    """Mosquitto with persistence, so persistent sessions survive a broker restart.

    `listener_extra` goes right under the listener (TLS files); `extra` at the end (auth files,
    which also set `allow_anonymous false`).
    """

    def __init__(self, folder: Path, listener_extra: str = "", extra: str = "") -> None:
        super().__init__(folder)
        self.listener_extra = listener_extra
        self.extra = extra

    def _command(self) -> list[str]:
        conf = self.folder / "mosquitto.conf"
        anonymous = "" if "allow_anonymous" in self.extra else "allow_anonymous true\n"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n{self.listener_extra}"
            # Run as root, Mosquitto would switch to the `mosquitto` user and could not write its
            # persistence file here; `user` keeps it as whoever runs the tests.
            f"user {getpass.getuser()}\n{anonymous}persistence true\n"
            f"persistence_location {self.folder}/\nmax_queued_messages 1000000\n"
            f"max_inflight_messages 0\nlog_type error\nlog_type warning\n{self.extra}"
        )
        return [_binary("mosquitto"), "-c", str(conf)]

    def _launch(self) -> subprocess.Popen[bytes]:
        return start_notified(self._command(), self.log)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


class VictoriaMetricsProcess(_Process):
    """VictoriaMetrics taking InfluxDB v2 writes on /api/v2/write.

    `-dedup.minScrapeInterval=1ms` makes the same series and timestamp land once, as InfluxDB does.
    `extra` adds flags (e.g. `-promscrape.config=...`: it then scrapes like Prometheus).
    """

    def __init__(self, folder: Path, extra: tuple[str, ...] = ()) -> None:
        super().__init__(folder)
        self.extra = extra

    def _command(self) -> list[str]:
        return [
            _binary("victoria-metrics"),
            f"-storageDataPath={self.folder / 'data'}",
            f"-httpListenAddr=127.0.0.1:{self.port}",
            "-retentionPeriod=100y",
            "-dedup.minScrapeInterval=1ms",
            "-search.latencyOffset=0s",
            "-loggerLevel=INFO",  # the line saying it serves is at INFO
            *self.extra,
        ]

    def _launch(self) -> subprocess.Popen[bytes]:
        # It opens its storage, then logs this line and listens (lib/httpserver logs it, and the
        # pprof line, just before its listen call; nothing is logged after), so the port may
        # refuse a connection for an instant after the line: `connect_soon` covers that instant.
        process, self._copy = start_logged(self._command(), self.log, re.compile(rb"starting http server at"))
        connect_soon(self.port, process)
        return process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def flush(self) -> None:
        httpx.get(f"{self.url}/internal/force_flush", timeout=5)

    def export(self, match: str) -> list[dict[str, Any]]:
        """Every stored sample of the series matching the selector, one dict per series."""
        self.flush()
        response = httpx.post(f"{self.url}/api/v1/export", data={"match[]": match}, timeout=10)
        response.raise_for_status()
        return [orjson.loads(line) for line in response.text.splitlines() if line.strip()]


class GatewayProcess(_Process):
    """`cgw run` as an installer runs it, configured by environment variables; `kill()` is SIGKILL."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        super().__init__(folder)
        self.env = {
            **os.environ,
            **env,
            "CGW_DATA_DIR": str(folder / "data"),
            "CGW_API__PORT": str(self.port),
        }

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "gateway.cli", "run"]

    def _launch(self) -> subprocess.Popen[bytes]:
        # Logged once the API's socket listens (gateway/application.py binds it first).
        process, self._copy = start_logged(self._command(), self.log, RUNNING, timeout=30, env=self.env)
        return process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.folder / "data" / "cgw.sqlite3"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def checks(self) -> dict[str, Any]:
        """Its /readyz checks by name; empty while it does not answer."""
        try:
            checks: dict[str, Any] = httpx.get(f"{self.url}/readyz", timeout=2).json()["checks"]
        except (httpx.HTTPError, ValueError, KeyError):
            return {}
        return checks

    def metrics(self, token: str) -> dict[str, float]:
        """Its Prometheus figures, keyed by name and labels as printed (`name{label="v"}`)."""
        headers = {"Authorization": f"Bearer {token}"}
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=5).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out


def wait_for(probe: Callable[..., Any], timeout: float, what: str) -> Any:
    """`eventually` for synchronous tests: poll `probe` until it returns something truthy.

    A bounded poll, for state in another process with no signal to await (a gateway's HTTP
    answers, a message at a district broker); docs/testing.md, "How tests wait"."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}: last {last!r}")


def tls_files(folder: Path, *names: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for `names` (default 127.0.0.1 and localhost).

    Returns (ca_file, cert_file, key_file) written under `folder`, for a TLS listener in a test.
    """
    ca = trustme.CA()
    cert = ca.issue_cert(*(names or ("127.0.0.1", "localhost")))
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return ca_file, cert_file, key_file
