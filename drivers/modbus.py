"""The Modbus TCP driver: polls meters and turns each poll into a contract telemetry message.

Each configured device is polled on its own loop with pymodbus's async client: registers of one
table are read in as few requests as the protocol allows (one when the span fits in 125), decoded
with pymodbus's own converters, scaled, and emitted as `cgw/v1/{device_id}/telemetry`. A birth
`status` is emitted when a device first answers, `{"state":"offline"}` once when it stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from drivers.base import Driver, Ingress
from gateway.instruments import Instruments
from gateway.models import RawMessage
from gateway.settings import ModbusDevice, ModbusRegister, ModbusSettings

log = logging.getLogger(__name__)

MAX_REGISTERS_PER_READ = 125  # the Modbus limit for one read request
MAX_BACKOFF_S = 30.0
DATATYPES = {
    "uint16": AsyncModbusTcpClient.DATATYPE.UINT16,
    "int16": AsyncModbusTcpClient.DATATYPE.INT16,
    "uint32": AsyncModbusTcpClient.DATATYPE.UINT32,
    "int32": AsyncModbusTcpClient.DATATYPE.INT32,
    "float32": AsyncModbusTcpClient.DATATYPE.FLOAT32,
}


def register_size(register: ModbusRegister) -> int:
    return 1 if register.type.endswith("16") else 2


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """One read request: a table, a start address, a count, and the registers inside it."""

    table: str
    start: int
    count: int
    registers: tuple[ModbusRegister, ...]


def plan_reads(registers: list[ModbusRegister]) -> list[ReadPlan]:
    """Group registers per table into as few requests as fit the 125-register limit."""
    plans: list[ReadPlan] = []
    for table in ("holding", "input"):
        members = sorted((r for r in registers if r.table == table), key=lambda r: r.address)
        group: list[ModbusRegister] = []
        for register in members:
            end = register.address + register_size(register)
            if group and end - group[0].address > MAX_REGISTERS_PER_READ:
                plans.append(_plan(table, group))
                group = []
            group.append(register)
        if group:
            plans.append(_plan(table, group))
    return plans


def _plan(table: str, group: list[ModbusRegister]) -> ReadPlan:
    start = group[0].address
    end = max(r.address + register_size(r) for r in group)
    return ReadPlan(table, start, end - start, tuple(group))


class ModbusDriver(Driver):
    name = "modbus"

    def __init__(self, settings: ModbusSettings, instruments: Instruments | None = None) -> None:
        self._settings = settings
        self._instruments = instruments
        self._online: set[str] = set()
        self._stop = asyncio.Event()

    @property
    def connected(self) -> bool:
        """True while at least one configured device answers."""
        return bool(self._online)

    async def run(self, ingress: Ingress) -> None:
        async with asyncio.TaskGroup() as tg:
            for device in self._settings.devices:
                tg.create_task(self._poll_loop(device, ingress), name=f"modbus-{device.device_id}")

    async def stop(self) -> None:
        self._stop.set()

    async def _poll_loop(self, device: ModbusDevice, ingress: Ingress) -> None:
        client = AsyncModbusTcpClient(device.host, port=device.port, timeout=device.timeout_s, retries=0)
        plans = plan_reads(device.registers)
        seq = 0
        backoff = 1.0
        try:
            while not self._stop.is_set():
                try:
                    if not client.connected and not await client.connect():
                        raise ConnectionError(f"cannot connect to {device.host}:{device.port}")
                    values = await self._read(client, device, plans)
                except (ModbusException, ConnectionError, OSError, TimeoutError) as exc:
                    client.close()
                    await self._went_offline(device, ingress, str(exc))
                    await self._wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                    continue
                backoff = 1.0
                now_ms = time.time_ns() // 1_000_000
                if device.device_id not in self._online:
                    self._online.add(device.device_id)
                    log.info("modbus device %s answers at %s:%d", device.device_id, device.host, device.port)
                    await ingress.put(
                        [
                            _message(
                                device.device_id, "status", {"state": "online", "kind": device.kind}, now_ms
                            )
                        ]
                    )
                if values:
                    seq += 1
                    # No `ts`: the poll's time is the receive time below, which the gateway
                    # corrects while its clock is not set (gateway/clock.py).
                    payload = {"seq": seq, "metrics": values}
                    await ingress.put([_message(device.device_id, "telemetry", payload, now_ms)])
                await self._wait(device.poll_s)
        finally:
            client.close()

    async def _read(
        self, client: AsyncModbusTcpClient, device: ModbusDevice, plans: list[ReadPlan]
    ) -> dict[str, float]:
        values: dict[str, float] = {}
        for plan in plans:
            read = client.read_holding_registers if plan.table == "holding" else client.read_input_registers
            response = await read(plan.start, count=plan.count, device_id=device.unit)
            if response.isError():
                # The device answered but refused this span (e.g. an address it does not have):
                # the other spans still count, and the installer sees which one.
                self._count_error(device, "exception")
                names = ", ".join(r.metric for r in plan.registers)
                log.warning(
                    "modbus device %s refused %s registers %d..%d (%s): %s",
                    device.device_id,
                    plan.table,
                    plan.start,
                    plan.start + plan.count - 1,
                    names,
                    response,
                )
                continue
            for register in plan.registers:
                offset = register.address - plan.start
                words = response.registers[offset : offset + register_size(register)]
                raw = client.convert_from_registers(
                    words, DATATYPES[register.type], word_order=register.word_order
                )
                assert isinstance(raw, int | float)
                values[register.metric] = round(float(raw) * register.scale, 9)
        return values

    async def _went_offline(self, device: ModbusDevice, ingress: Ingress, why: str) -> None:
        self._count_error(device, "unreachable")
        if device.device_id in self._online:
            self._online.discard(device.device_id)
            log.warning("modbus device %s stopped answering: %s", device.device_id, why)
            now_ms = time.time_ns() // 1_000_000
            await ingress.put([_message(device.device_id, "status", {"state": "offline"}, now_ms)])

    def _count_error(self, device: ModbusDevice, reason: str) -> None:
        if self._instruments is not None:
            self._instruments.driver_errors.labels(driver=self.name, reason=reason).inc()

    async def _wait(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass


def _message(device_id: str, channel: str, payload: dict[str, Any], received_ms: int) -> RawMessage:
    return (f"cgw/v1/{device_id}/{channel}", orjson.dumps(payload), received_ms)
