"""The Modbus driver against a real pymodbus TCP server (the simulated meter), and through a gateway."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.modbus import ModbusDriver, plan_reads
from gateway.instruments import Instruments
from gateway.models import RawMessage
from gateway.settings import ModbusDevice, ModbusRegister, ModbusSettings
from simulators.modbus_meter import SimulatedMeter, example_modbus_devices, serve_meter
from tests.harness import api, eventually, gateway_settings, running
from tests.services import free_port

pytestmark = pytest.mark.integration

KNOWN = {"energy_kwh": 12345.67, "power_w": 1500.5, "voltage_v": 221.3, "current_a": 6.78}


class Inbox:
    """Collects what the driver puts, and lets a test wait for the n-th message."""

    def __init__(self) -> None:
        self.messages: list[RawMessage] = []
        self._changed = asyncio.Event()

    async def put(self, batch: list[RawMessage], on_durable: Callable[[], None] | None = None) -> None:
        self.messages.extend(batch)
        self._changed.set()
        if on_durable is not None:  # kept as soon as put, as a pipeline that never refuses
            on_durable()

    async def wait_for(self, predicate: Any, timeout: float = 5.0) -> list[RawMessage]:
        async with asyncio.timeout(timeout):
            while True:
                found = [m for m in self.messages if predicate(m)]
                if found:
                    return found
                self._changed.clear()
                await self._changed.wait()

    def payloads(self, channel: str) -> list[dict[str, Any]]:
        return [orjson.loads(p) for t, p, _ in self.messages if t.endswith("/" + channel)]


def telemetry(message: RawMessage) -> bool:
    return message[0].endswith("/telemetry")


def test_registers_are_grouped_into_few_reads() -> None:
    regs = [
        ModbusRegister(metric="a", address=0, type="uint32"),
        ModbusRegister(metric="b", address=2),
        ModbusRegister(metric="c", address=200),
        ModbusRegister(metric="d", address=5, table="input", type="float32"),
    ]
    plans = plan_reads(regs)
    assert [(p.table, p.start, p.count) for p in plans] == [
        ("holding", 0, 3),
        ("holding", 200, 1),
        ("input", 5, 2),
    ]


async def test_driver_reads_scaled_values_and_reports_presence() -> None:
    port = free_port()
    meter = SimulatedMeter(values=dict(KNOWN))
    server = await serve_meter("127.0.0.1", port, meter)
    devices = example_modbus_devices("127.0.0.1", port, poll_s=0.05)
    driver = ModbusDriver(ModbusSettings(devices=devices), Instruments())
    inbox = Inbox()
    task = asyncio.create_task(driver.run(inbox))
    try:
        await inbox.wait_for(lambda m: telemetry(m) and orjson.loads(m[1])["seq"] >= 3)
        assert driver.connected
        assert inbox.payloads("status")[0] == {"state": "online", "kind": "energy_meter"}
        readings = inbox.payloads("telemetry")
        assert [r["seq"] for r in readings[:3]] == [1, 2, 3]
        first = readings[0]["metrics"]
        assert first["energy_kwh"] == pytest.approx(KNOWN["energy_kwh"])
        assert first["power_w"] == pytest.approx(KNOWN["power_w"])
        assert first["voltage_v"] == pytest.approx(KNOWN["voltage_v"])
        assert first["current_a"] == pytest.approx(KNOWN["current_a"])

        # The meter goes away: offline once; it comes back: online again.
        await server.shutdown()
        await inbox.wait_for(lambda m: m[1] == b'{"state":"offline"}')
        assert not driver.connected
        server = await serve_meter("127.0.0.1", port, meter)
        await inbox.wait_for(lambda _: len(inbox.payloads("status")) == 3, 10)  # back online
        assert inbox.payloads("status")[-1]["state"] == "online"
    finally:
        await driver.stop()
        await asyncio.wait_for(task, 5)
        await server.shutdown()


def _async(fn: Any) -> Any:
    async def probe() -> Any:
        return fn()

    return probe


# A fixed register image, words computed by hand (not by the converters the driver uses), so a
# wrong type, word order or table reads a different number. (register, holding words or input
# words, the value a correct driver reports).
IMAGE: list[tuple[ModbusRegister, str, list[int], float]] = [
    (ModbusRegister(metric="u16", address=0), "holding", [0xABCD], 43981),
    (ModbusRegister(metric="i16", address=1, type="int16"), "holding", [0xFFFE], -2),
    # 123456 = 0x0001E240: high word first (the default, a big-endian meter), then low word first.
    (ModbusRegister(metric="u32_be", address=2, type="uint32"), "holding", [0x0001, 0xE240], 123456),
    (ModbusRegister(metric="u32_le", address=4, type="uint32", word_order="little"), "holding",
     [0xE240, 0x0001], 123456),
    # -123456 = 0xFFFE1DC0 in two's complement.
    (ModbusRegister(metric="i32_be", address=6, type="int32"), "holding", [0xFFFE, 0x1DC0], -123456),
    (ModbusRegister(metric="i32_le", address=8, type="int32", word_order="little"), "holding",
     [0x1DC0, 0xFFFE], -123456),
    # 1500.5 = 1.0111011100 1 (binary) × 2^10: sign 0, exponent 137 = 0x89, so 0x44BB9000.
    (ModbusRegister(metric="f32_be", address=10, type="float32"), "holding", [0x44BB, 0x9000], 1500.5),
    (ModbusRegister(metric="f32_le", address=12, type="float32", word_order="little"), "holding",
     [0x9000, 0x44BB], 1500.5),
    (ModbusRegister(metric="u16_scaled", address=14, scale=0.1), "holding", [2213], 221.3),
    # The input table holds other words at the same addresses: reading the wrong table shows.
    (ModbusRegister(metric="in_u16", address=0, table="input"), "input", [0x1234], 4660),
    (ModbusRegister(metric="in_i32", address=2, table="input", type="int32", scale=0.01), "input",
     [0xFFFE, 0x1DC0], -1234.56),
]  # fmt: skip


async def serve_image(port: int) -> ModbusTcpServer:
    """A pymodbus server with separate holding and input tables holding IMAGE, nothing else."""
    tables: dict[str, list[int]] = {"holding": [0] * 16, "input": [0] * 16}
    for register, table, words, _ in IMAGE:
        tables[table][register.address : register.address + len(words)] = words
    blocks = ([SimData(0, count=16, datatype=DataType.BITS)], [SimData(0, count=16, datatype=DataType.BITS)],
              [SimData(0, values=tables["holding"], datatype=DataType.REGISTERS)],
              [SimData(0, values=tables["input"], datatype=DataType.REGISTERS)])  # fmt: skip
    server = ModbusTcpServer(SimDevice(id=1, simdata=blocks), address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    return server


async def test_each_type_word_order_and_table_reads_a_hand_computed_image() -> None:
    port = free_port()
    server = await serve_image(port)
    device = ModbusDevice(device_id="image-1", host="127.0.0.1", port=port, poll_s=0.05,
                          registers=[register for register, *_ in IMAGE])  # fmt: skip
    driver = ModbusDriver(ModbusSettings(devices=[device]), Instruments())
    inbox = Inbox()
    task = asyncio.create_task(driver.run(inbox))
    try:
        found = await inbox.wait_for(telemetry)
        metrics = orjson.loads(found[0][1])["metrics"]
        assert metrics == {register.metric: pytest.approx(value) for register, _, _, value in IMAGE}
    finally:
        await driver.stop()
        await asyncio.wait_for(task, 5)
        await server.shutdown()


async def test_a_refused_span_and_an_absent_device_do_not_stop_the_others() -> None:
    port = free_port()
    server = await serve_meter("127.0.0.1", port, SimulatedMeter(values=dict(KNOWN)))
    good = ModbusDevice(
        device_id="meter-ok",
        host="127.0.0.1",
        port=port,
        poll_s=0.05,
        registers=[
            ModbusRegister(metric="voltage_v", address=4, scale=0.1),
            ModbusRegister(metric="power_w", address=900, type="float32"),  # no such register
        ],
    )
    absent = ModbusDevice(
        device_id="meter-gone",
        host="127.0.0.1",
        port=free_port(),
        poll_s=0.05,
        timeout_s=0.2,
        registers=[ModbusRegister(metric="voltage_v", address=4, scale=0.1)],
    )
    metrics = Instruments()
    driver = ModbusDriver(ModbusSettings(devices=[absent, good]), metrics)
    inbox = Inbox()
    task = asyncio.create_task(driver.run(inbox))
    try:
        found = await inbox.wait_for(telemetry)
        assert found[0][0] == "cgw/v1/meter-ok/telemetry"
        assert orjson.loads(found[0][1])["metrics"] == {"voltage_v": pytest.approx(221.3)}
        await eventually(
            _async(
                lambda: metrics.driver_errors.labels(driver="modbus", reason="unreachable")._value.get() > 0
            ),
            5,
            "the absent device counted",
        )
        assert metrics.driver_errors.labels(driver="modbus", reason="exception")._value.get() > 0
        assert not any(t.startswith("cgw/v1/meter-gone/") for t, _, _ in inbox.messages)
    finally:
        await driver.stop()
        await asyncio.wait_for(task, 5)
        await server.shutdown()


async def test_a_modbus_meter_appears_in_the_gateway(tmp_path: Path, mosquitto: Any) -> None:
    port = free_port()
    server = await serve_meter("127.0.0.1", port, SimulatedMeter(values=dict(KNOWN)))
    settings = gateway_settings(tmp_path, mosquitto.url)
    settings = settings.model_copy(
        update={"modbus": ModbusSettings(devices=example_modbus_devices("127.0.0.1", port, poll_s=0.1))}
    )
    try:
        async with running(settings) as gw, api(gw) as client:

            async def shown() -> dict[str, Any] | None:
                response = await client.get("/api/v1/devices/b01-modbus-meter")
                body = response.json() if response.status_code == 200 else None
                return body if body and body["last_values"] else None

            device = await eventually(shown, 5, "the Modbus meter in the API")
            assert device["kind"] == "energy_meter" and device["online"]
            assert device["last_values"]["voltage_v"] == pytest.approx(221.3)
    finally:
        await server.shutdown()
