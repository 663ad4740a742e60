"""Real Mosquitto and VictoriaMetrics processes for the tests, on free ports in temporary folders.

Both come from Debian's packages (`scripts/dev test` installs them). Each helper starts its
server, waits until it answers, and can be stopped, killed and restarted with its data kept.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
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


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


class _Process:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _wait_ready(self) -> None:
        assert self._process is not None
        wait_port(self.port, self._process)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "server.log").open("ab")
        self._process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()

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
            "-loggerLevel=ERROR",
            *self.extra,
        ]

    def _wait_ready(self) -> None:
        super()._wait_ready()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("VictoriaMetrics did not become healthy")

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

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "server.log").open("ab")
        self._process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT, env=self.env)
        wait_port(self.port, self._process, timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.folder / "data" / "cgw.sqlite3"

    def log_text(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")

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
