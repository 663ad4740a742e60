"""Helpers for tests that run a whole gateway in the test's event loop over real connections."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar, overload

import httpx
import orjson
from fastapi.testclient import TestClient

from gateway.application import Gateway
from gateway.settings import Settings, load_settings

T = TypeVar("T")

TOKENS = {
    "viewer-token": "viewer",
    "operator-token": "operator",
    "terminal-token": "terminal",
    "installer-token": "installer",
}

# Headers for a read that needs an operator (dead letters, residents' personal data).
AS_OPERATOR = {"Authorization": "Bearer operator-token"}


def gateway_settings(data_dir: Path, mqtt_url: str, **overrides: Any) -> Settings:
    env = {
        "CGW_COMMUNITY": "testville",
        "CGW_DATA_DIR": str(data_dir),
        "CGW_MQTT__URL": mqtt_url,
        "CGW_API__PORT": "0",
        "CGW_PIPELINE__PRESENCE_SWEEP_S": "0.2",
        "CGW_INFLUX__FLUSH_INTERVAL_S": "0.1",
        # Starlette's in-process TestClient sends `Host: testserver`.
        "CGW_API__ALLOWED_HOSTS": '["localhost", "127.0.0.1", "::1", "testserver"]',
    }
    settings = load_settings(env=env)
    # No write limit: simulated weeks post months of operators' work in seconds (test_security.py
    # proves the limit).
    auth = settings.auth.model_copy(update={"tokens": dict(TOKENS), "write_rate_limit": ""})
    return settings.model_copy(update={"auth": auth, **overrides})


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Gateway]:
    """A started gateway (broker connected), stopped and drained on exit."""
    gateway = Gateway(settings)
    task = asyncio.create_task(gateway.run())
    try:
        await _ready(gateway, task)
        yield gateway
    finally:
        gateway.stop()
        await asyncio.wait_for(task, 30)


async def _ready(gateway: Gateway, task: asyncio.Task[None]) -> None:
    """Every stage runs (the gateway's `ready` event, raced with its run failing), and the broker
    connection is up."""
    started = asyncio.ensure_future(gateway.ready.wait())
    done, _ = await asyncio.wait({started, task}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        task.result()  # its error
        raise RuntimeError("the gateway stopped before it was ready")
    if not done:
        started.cancel()
        raise TimeoutError(f"gateway not started: {gateway.readiness()}")
    # The drivers tell their connection by a property (/readyz reads it), with no event to await:
    # this one wait polls, until the MQTT part gives the connection a signal.
    await eventually(lambda: gateway.mqtt.connected or task.done(), 15, "the broker connection")
    if task.done():
        task.result()
        raise RuntimeError("the gateway stopped before it was ready")


def api(gateway: Gateway, token: str = "viewer-token") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{gateway.api_port}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


@overload
async def eventually(
    probe: Callable[[], Awaitable[T | None]], timeout: float = ..., what: str = ...
) -> T: ...


@overload
async def eventually(probe: Callable[[], T | None], timeout: float = ..., what: str = ...) -> T: ...


async def eventually(probe: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    """Poll `probe` (a coroutine function, or a plain one) until it returns something truthy;
    the value is returned.

    A bounded poll, for state with no signal to await: a row behind the API, a point in
    VictoriaMetrics, a driver's `connected` property. Await a signal instead where there is one
    (docs/testing.md, "How tests wait")."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        result = probe()
        last = await result if inspect.isawaitable(result) else result
        if last:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or probe}: last {last!r}")


def mosquitto_pub(port: int, topic: str, message: str | bytes, *extra: str) -> None:
    """Publish with the real mosquitto_pub client, as an installer would (QoS 1)."""
    payload = message.encode() if isinstance(message, str) else message
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic, "-s", *extra],
        input=payload,
        check=True,
        timeout=10,
    )


def terminal_birth(port: int, device_id: str, building: str = "1") -> None:
    """A service terminal's birth: only such devices file requests, ratings and votes."""
    birth = {"state": "online", "kind": "service_terminal", "location": {"building": building}}
    mosquitto_pub(port, f"cgw/v1/{device_id}/status", orjson.dumps(birth))


@asynccontextmanager
async def live_stream(
    client: httpx.AsyncClient, types: str
) -> AsyncIterator[list[tuple[str, dict[str, Any]]]]:
    """Subscribe to the SSE stream; yields the list that (event name, data) pairs arrive in."""
    received: list[tuple[str, dict[str, Any]]] = []
    connected = asyncio.Event()

    async def listen() -> None:
        async with client.stream("GET", "/api/v1/stream", params={"types": types}) as response:
            assert response.status_code == 200, response.status_code
            name = ""
            async for line in response.aiter_lines():
                if line.startswith(": connected"):
                    connected.set()
                elif line.startswith("event:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    received.append((name, orjson.loads(line.split(":", 1)[1])))

    listener = asyncio.create_task(listen())
    try:
        await asyncio.wait_for(connected.wait(), 5)
        yield received
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)


@contextmanager
def served(gateway: Gateway) -> Iterator[TestClient]:
    """The API in-process, with the store writer (opened by the caller) running in the client's
    event loop as in a running gateway: answers that wait until something is durable get it."""
    with TestClient(gateway.api) as client:

        async def start() -> asyncio.Task[None]:
            return asyncio.create_task(gateway.writer.run())

        portal = client.portal
        assert portal is not None, "a TestClient has a portal inside its `with`"
        task = portal.call(start)
        try:
            yield client
        finally:

            async def stop() -> None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
                await gateway.writer.close()

            portal.call(stop)
