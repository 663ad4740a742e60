"""A simulated Modbus TCP energy meter, for the demo and the Modbus driver's tests.

Register map (holding registers, also readable as input registers; 32-bit values big-endian):

| address | metric      | type    | scale |
|---------|-------------|---------|-------|
| 0–1     | energy_kwh  | uint32  | 0.01  |
| 2–3     | power_w     | float32 | 1     |
| 4       | voltage_v   | uint16  | 0.1   |
| 5       | current_a   | uint16  | 0.01  |
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from gateway.settings import ModbusDevice, ModbusRegister

METER_REGISTERS = [
    ModbusRegister(metric="energy_kwh", address=0, type="uint32", scale=0.01),
    ModbusRegister(metric="power_w", address=2, type="float32"),
    ModbusRegister(metric="voltage_v", address=4, type="uint16", scale=0.1),
    ModbusRegister(metric="current_a", address=5, type="uint16", scale=0.01),
]
REGISTER_COUNT = 16


def example_modbus_devices(
    host: str, port: int, device_id: str = "b01-modbus-meter", unit: int = 1, poll_s: float = 10.0
) -> list[ModbusDevice]:
    """The settings that read the simulated meter (copy them into the YAML file's `modbus:`)."""
    return [
        ModbusDevice(
            device_id=device_id,
            kind="energy_meter",
            host=host,
            port=port,
            unit=unit,
            poll_s=poll_s,
            registers=list(METER_REGISTERS),
        )
    ]


def encode(metrics: dict[str, float]) -> dict[int, int]:
    """Register address → 16-bit word, for the meter's current metric values."""
    words: dict[int, int] = {}
    convert = AsyncModbusTcpClient.convert_to_registers
    for register in METER_REGISTERS:
        value = metrics[register.metric] / register.scale
        dtype = getattr(AsyncModbusTcpClient.DATATYPE, register.type.upper())
        number: int | float = value if register.type == "float32" else round(value)
        for i, word in enumerate(convert(number, dtype, word_order=register.word_order)):
            words[register.address + i] = word
    return words


@dataclass
class SimulatedMeter:
    """A meter whose readings follow a daily load curve; `values` may be set directly in tests."""

    seed: int = 7
    values: dict[str, float] | None = None
    _energy: float = field(default=12_345.67, init=False)
    _last: float = field(default_factory=time.monotonic, init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def current(self) -> dict[str, float]:
        if self.values is not None:
            return self.values
        now = time.monotonic()
        hour = (time.time() / 3600) % 24
        power = (
            3000 + 12000 * (0.5 + 0.5 * math.cos((hour - 20) / 24 * 2 * math.pi)) + self._rng.gauss(0, 200)
        )
        self._energy += power * (now - self._last) / 3600 / 1000
        self._last = now
        voltage = 220 + self._rng.gauss(0, 2)
        return {
            "energy_kwh": self._energy,
            "power_w": power,
            "voltage_v": voltage,
            "current_a": power / voltage,
        }

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current_registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> None:
        # Called by the pymodbus server on every access: refresh the registers it will read.
        for reg_address, word in encode(self.current()).items():
            i = reg_address - start_address
            if 0 <= i < len(current_registers):
                current_registers[i] = word


async def serve_meter(
    host: str, port: int, meter: SimulatedMeter | None = None, unit: int = 1
) -> ModbusTcpServer:
    """Start a meter server in the background; `await server.shutdown()` stops it."""
    meter = meter or SimulatedMeter()
    device = SimDevice(
        id=unit, simdata=[SimData(0, count=REGISTER_COUNT, datatype=DataType.REGISTERS)], action=meter.action
    )
    server = ModbusTcpServer(device, address=(host, port))
    await server.serve_forever(background=True)
    return server
