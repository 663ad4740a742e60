"""Decode stage and topics: every refusal is a reason code, never a crash."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.models import Rejected
from gateway.pipeline.decode import TimeWindow, decode_object, parse_timestamp
from gateway.topics import TopicError, device_topic, parse

MAX_FUTURE_MS, MAX_PAST_MS = 600_000, 7 * 86_400_000  # plain ints: the window's future may be None
WINDOW = TimeWindow(max_future_ms=MAX_FUTURE_MS, max_past_ms=MAX_PAST_MS)
NOW = 1_795_000_000_000


def code(exc: BaseException) -> str:
    return str(exc).split(":", 1)[0]


def test_topics_follow_the_contract() -> None:
    assert parse("cgw/v1/b03-f02-aq/telemetry") == ("b03-f02-aq", "telemetry")
    assert device_topic("x", "ack") == "cgw/v1/x/ack"
    for bad in [
        "cgw/v1/a/b/telemetry",
        "cgw/v1//telemetry",
        "cgw/v1/a/ack",
        "cgw/v2/a/status",
        "cgw/v1/a+b/status",
        "cgw/v1/" + "x" * 65 + "/status",
        "cgw/v1/#/event",
        "cgw/v1/a",
    ]:
        with pytest.raises(TopicError) as info:
            parse(bad)
        assert code(info.value) == "bad_topic"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "bad_json"),
        (b"\xff\xfe{}", "bad_json"),
        (b'{"a": NaN}', "bad_json"),
        (b'{"a": Infinity}', "bad_json"),
        (b"[1,2]", "schema"),
        (b'"text"', "schema"),
        (b"[" * 5000 + b"]" * 5000, "bad_json"),
        (b'{"a":"' + b"x" * 70_000 + b'"}', "oversize"),
    ],
)
def test_bad_payloads_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        decode_object(payload, 64 * 1024)
    assert code(info.value) == reason


def test_timestamps() -> None:
    assert parse_timestamp(None, NOW, WINDOW) == NOW
    assert parse_timestamp(NOW - 5, NOW, WINDOW) == NOW - 5
    assert parse_timestamp("2026-11-18T09:20:00Z", 1_794_993_600_000, WINDOW) == 1_794_993_600_000
    iso = "2026-11-18T09:20:00+08:00"
    expected = int(datetime.fromisoformat(iso).timestamp() * 1000)
    assert parse_timestamp(iso, expected, WINDOW) == expected
    for bad in [True, 1.5, "yesterday", "2026-11-18T09:20:00", NOW + 3_600_000, NOW - 30 * 86_400_000, [1]]:
        with pytest.raises(Rejected) as info:
            parse_timestamp(bad, NOW, WINDOW)
        assert code(info.value) == "bad_timestamp"


@given(st.binary(max_size=2048))
def test_any_bytes_decode_or_are_refused(payload: bytes) -> None:
    try:
        value = decode_object(payload, 1024)
    except Rejected as exc:
        assert code(exc) in {"bad_json", "schema", "oversize"}
    else:
        assert isinstance(value, dict)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=10), json_values, max_size=6), st.booleans())
def test_any_json_object_decodes_to_what_was_sent(obj: dict[str, object], ascii_only: bool) -> None:
    # Encoded by the standard library, not by the library the decoder wraps.
    payload = json.dumps(obj, ensure_ascii=ascii_only).encode()
    assert decode_object(payload, 64 * 1024) == obj


PAST, FUTURE = NOW - MAX_PAST_MS, NOW + MAX_FUTURE_MS


@given(
    st.integers(PAST - 86_400_000, FUTURE + 86_400_000)
    | st.sampled_from([PAST - 1, PAST, FUTURE, FUTURE + 1])
)
def test_an_epoch_ms_is_taken_as_is_inside_the_window_and_refused_outside(ts: int) -> None:
    if PAST <= ts <= FUTURE:
        assert parse_timestamp(ts, NOW, WINDOW) == ts
    else:
        with pytest.raises(Rejected, match=r"^bad_timestamp: "):
            parse_timestamp(ts, NOW, WINDOW)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@given(
    st.integers(PAST - 86_400_000, FUTURE + 86_400_000),
    st.integers(-14 * 60, 14 * 60).map(lambda minutes: timezone(timedelta(minutes=minutes))),
    st.booleans(),
)
def test_an_rfc3339_time_with_any_offset_is_the_same_instant(ms: int, zone: timezone, zulu: bool) -> None:
    moment = (EPOCH + timedelta(milliseconds=ms)).astimezone(UTC if zulu else zone)
    text = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z" if zulu else "+00:00")
    if PAST <= ms <= FUTURE:
        assert parse_timestamp(text, NOW, WINDOW) == ms, text
    else:
        with pytest.raises(Rejected, match=r"^bad_timestamp: "):
            parse_timestamp(text, NOW, WINDOW)


@given(st.one_of(st.integers(), st.text(max_size=50), st.floats(), st.booleans(), st.none()))
def test_any_ts_is_accepted_within_the_window_or_refused(ts: object) -> None:
    try:
        value = parse_timestamp(ts, NOW, WINDOW)
    except Rejected as exc:
        assert code(exc) == "bad_timestamp"
    else:
        assert NOW - MAX_PAST_MS <= value <= NOW + MAX_FUTURE_MS
        assert not isinstance(value, float) or math.isfinite(value)
