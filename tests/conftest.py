"""Shared fixtures: real Mosquitto and VictoriaMetrics processes (tests/services.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.devices import Publisher
from tests.services import MosquittoProcess, VictoriaMetricsProcess

P = TypeVar("P", MosquittoProcess, VictoriaMetricsProcess)


def _running(process: P) -> Iterator[P]:
    process.start()
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A fresh broker per test: tests may stop, kill and restart it."""
    yield from _running(MosquittoProcess(tmp_path / "mosquitto"))


@pytest.fixture
def publisher(mosquitto: MosquittoProcess) -> Iterator[Publisher]:
    """A device-side publisher on the test's broker, closed after the test."""
    pub = Publisher(mosquitto.port)
    try:
        yield pub
    finally:
        pub.close()


@pytest.fixture
def district_mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A second broker: the district platform's, which the uplink forwards to."""
    yield from _running(MosquittoProcess(tmp_path / "district"))


@pytest.fixture(scope="session")
def victoria(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetricsProcess]:
    """One VictoriaMetrics for the session; tests keep apart by device ids and measurements.

    Tests that stop it use `victoria_private` instead.
    """
    yield from _running(VictoriaMetricsProcess(tmp_path_factory.mktemp("victoria")))


@pytest.fixture
def victoria_private(tmp_path: Path) -> Iterator[VictoriaMetricsProcess]:
    """A VictoriaMetrics of this test's own, which it may stop and restart."""
    yield from _running(VictoriaMetricsProcess(tmp_path / "victoria"))
