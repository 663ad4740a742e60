"""A private MQTT broker for `cgw demo`: Mosquitto when installed, else amqtt in-process.

docs/contract.md section 3: `cgw demo` works "with no outside services (embedded broker when no
Mosquitto is available ...)". Mosquitto is preferred (it is what real installations run); the
pure-Python amqtt broker keeps the demo working on a machine without it.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import shutil
import socket
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class LocalBroker:
    """Start with `await start()`, which returns the broker's URL; `await stop()` when done."""

    def __init__(
        self, data_dir: Path, host: str = "127.0.0.1", port: int | None = None, prefer_mosquitto: bool = True
    ) -> None:
        self._data_dir = data_dir
        self._host = host
        self._port = port or free_port(host)
        self._prefer_mosquitto = prefer_mosquitto
        self._process: asyncio.subprocess.Process | None = None
        self._amqtt: Any = None
        self.kind = ""
        self.protocol: Literal["5", "3.1.1"] = "5"  # the MQTT version the gateway speaks to it

    @property
    def url(self) -> str:
        return f"mqtt://{self._host}:{self._port}"

    async def start(self) -> str:
        # Debian puts it in /usr/sbin, which is not on every user's PATH.
        binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
        if self._prefer_mosquitto and binary:
            await self._start_mosquitto(binary)
        else:
            await self._start_amqtt()
        return self.url

    async def _start_mosquitto(self, binary: str) -> None:
        folder = self._data_dir / "broker"
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "mosquitto.conf"
        conf.write_text(
            f"listener {self._port} {self._host}\n"
            "allow_anonymous true\n"
            # As root, Mosquitto would switch to the `mosquitto` user and could not write its
            # persistence file into our data folder: stay whoever runs the demo.
            f"user {getpass.getuser()}\n"
            "persistence true\n"
            f"persistence_location {folder}/\n"
            "max_queued_messages 100000\n"
            # The gateway acknowledges only once a message is durable (after a commit), so a
            # window of 20 in flight (the default) would cap its intake: allow a commit's worth.
            "max_inflight_messages 1000\n"
            "log_dest stderr\n"
            "log_type error\n"
        )
        self._process = await asyncio.create_subprocess_exec(
            binary,
            "-c",
            str(conf),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            # Its own session: Ctrl-C at the terminal reaches the demo, which stops the gateway
            # first and the broker last, not both at once.
            start_new_session=True,
        )
        for _ in range(100):
            if port_open(self._host, self._port):
                self.kind = "mosquitto"
                log.info("started Mosquitto on %s", self.url)
                return
            if self._process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        err = b""
        if self._process.stderr is not None and self._process.returncode is not None:
            err = await self._process.stderr.read()
        await self.stop()
        raise RuntimeError(f"Mosquitto did not start on {self.url}: {err.decode(errors='replace').strip()}")

    async def _start_amqtt(self) -> None:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self._host}:{self._port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._amqtt = Broker(config)
        await self._amqtt.start()
        self.kind = "amqtt (embedded)"
        self.protocol = "3.1.1"  # amqtt has no MQTT 5: the gateway uses its paho driver
        log.info("started the embedded amqtt broker on %s", self.url)

    async def stop(self) -> None:
        if self._process is not None:
            if self._process.returncode is None:
                self._process.terminate()
                try:
                    await asyncio.wait_for(self._process.wait(), 5)
                except TimeoutError:
                    self._process.kill()
                    await self._process.wait()
            self._process = None
        if self._amqtt is not None:
            await self._amqtt.shutdown()
            self._amqtt = None
