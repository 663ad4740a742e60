"""Routine happenings make a few log lines an hour, not one each (a clock the test moves)."""

from __future__ import annotations

import logging

import pytest

from gateway.logsummary import INTERVAL_S, LogSummary


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_five_thousand_newcomers_in_an_hour_are_a_few_lines(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = logging.getLogger("test.newcomers")
    summary = LogSummary(log, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.newcomers"):
        for i in range(5000):  # a building's devices arriving over an hour
            clock.now = i * 3600 / 5000
            summary.note("registered unknown devices as generic", f"dev-{i}")
            if i % 7 == 0:
                summary.flush()  # the owner's periodic tick
        clock.now = 3600
        summary.flush_all()  # shutdown tells the rest
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) <= 1 + 3600 / INTERVAL_S + 1
    assert lines[0] == ("registered unknown devices as generic: dev-0 (more are counted, told every 10 min)")
    told = sum(int(line.split(": ")[1].split()[0]) for line in lines[1:])
    assert told == 4999  # every one counted, none lost
    assert "(e.g. dev-1, dev-2, dev-3)" in lines[1]


def test_a_quiet_kind_says_nothing_more() -> None:
    clock = Clock()
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    log = logging.getLogger("test.quiet")
    log.addHandler(Collect())
    log.setLevel(logging.INFO)
    summary = LogSummary(log, clock=clock)
    summary.note("refused votes", "t-1: duplicate")
    clock.now = 10 * INTERVAL_S
    summary.flush()
    summary.flush_all()
    assert records == ["refused votes: t-1: duplicate (more are counted, told every 10 min)"]
