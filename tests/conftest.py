"""Shared fixtures: real Mosquitto and VictoriaMetrics processes (tests/services.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import MosquittoProcess, VictoriaMetricsProcess


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A fresh broker per test: tests may stop, kill and restart it."""
    broker = MosquittoProcess(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture(scope="session")
def victoria(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetricsProcess]:
    """One VictoriaMetrics for the session; tests keep apart by device ids and measurements.

    Tests that stop it use `victoria_private` instead.
    """
    server = VictoriaMetricsProcess(tmp_path_factory.mktemp("victoria"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def victoria_private(tmp_path: Path) -> Iterator[VictoriaMetricsProcess]:
    """A VictoriaMetrics of this test's own, which it may stop and restart."""
    server = VictoriaMetricsProcess(tmp_path / "victoria")
    server.start()
    try:
        yield server
    finally:
        server.kill()
