"""Settings: YAML file, CGW_ environment with __ between levels, one clear line per bad value."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.settings import SettingsError, load_settings


def test_defaults_follow_the_contract() -> None:
    s = load_settings(env={})
    assert (s.api.host, s.api.port) == ("127.0.0.1", 8080)
    assert s.registration == "open"
    assert s.mqtt.url == "mqtt://127.0.0.1:1883"
    assert not s.influx.enabled


def test_environment_names_from_the_contract() -> None:
    env = {
        "CGW_COMMUNITY": "sunrise",
        "CGW_DATA_DIR": "/tmp/x",
        "CGW_MQTT__URL": "mqtts://broker.local:8883",
        "CGW_MQTT__USERNAME": "gw",
        "CGW_MQTT__PASSWORD": "secret",
        "CGW_INFLUX__URL": "http://influx:8086",
        "CGW_INFLUX__TOKEN": "tok",
        "CGW_INFLUX__ORG": "city",
        "CGW_INFLUX__BUCKET": "community",
        "CGW_API__HOST": "0.0.0.0",
        "CGW_API__PORT": "9090",
        "CGW_REGISTRATION": "closed",
        "CGW_AUTH__TOKENS": '{"abc":"operator"}',
    }
    s = load_settings(env=env)
    assert s.community == "sunrise" and s.data_dir == Path("/tmp/x")
    assert s.mqtt.tls and s.mqtt.port == 8883 and s.mqtt.username == "gw"
    assert s.mqtt.password is not None and s.mqtt.password.get_secret_value() == "secret"
    assert s.influx.enabled and s.influx.org == "city" and s.influx.bucket == "community"
    assert (s.api.host, s.api.port, s.registration) == ("0.0.0.0", 9090, "closed")
    assert [grant.role for grant in s.auth.digests().values()] == ["operator"]
    assert "secret" not in repr(s)  # secrets never show in logs or tracebacks


def test_environment_wins_over_yaml(tmp_path: Path) -> None:
    conf = tmp_path / "cgw.yaml"
    conf.write_text("community: fromfile\napi:\n  port: 9000\nmqtt:\n  url: mqtt://a:1883\n")
    s = load_settings(conf, env={"CGW_API__PORT": "9100"})
    assert s.community == "fromfile" and s.api.port == 9100 and s.mqtt.host == "a"


def test_cli_override_wins_over_environment() -> None:
    s = load_settings(env={"CGW_COMMUNITY": "env"}, community="flag")
    assert s.community == "flag"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CGW_MQTT__URL": "http://x"}, "CGW_MQTT__URL"),
        ({"CGW_API__PORT": "99999"}, "CGW_API__PORT"),
        ({"CGW_API__PORT": "eighty"}, "CGW_API__PORT"),
        ({"CGW_REGISTRATION": "maybe"}, "CGW_REGISTRATION"),
        ({"CGW_INFLUX__URL": "influx:8086"}, "CGW_INFLUX__URL"),
        ({"CGW_COMMUNITY": "has space"}, "CGW_COMMUNITY"),
        ({"CGW_AUTH__TOKENS": '{"t":"superuser"}'}, "CGW_AUTH__TOKENS"),
        ({"CGW_UPLINK__URL": "tcp://district:1883"}, "CGW_UPLINK__URL"),
        ({"CGW_UPLINK__TELEMETRY": '["air quality"]'}, "CGW_UPLINK__TELEMETRY"),
        ({"CGW_UPLINK__QOS": "0"}, "CGW_UPLINK__QOS"),
    ],
)
def test_bad_value_is_one_line_naming_the_setting(env: dict[str, str], expected: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env=env)
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_yaml_errors_name_the_file_and_line(tmp_path: Path) -> None:
    conf = tmp_path / "bad.yaml"
    conf.write_text("community: a\napi: [unclosed\n")
    with pytest.raises(SettingsError, match=r"bad\.yaml line \d+"):
        load_settings(conf, env={})
    conf.write_text("- a list\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(conf, env={})
    conf.write_text("mqtt:\n  urll: mqtt://x\n")
    with pytest.raises(SettingsError, match=r"mqtt\.urll"):
        load_settings(conf, env={})
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml", env={})


def test_a_misspelt_setting_in_the_file_names_the_file_the_line_and_the_nearest_name(tmp_path: Path) -> None:
    conf = tmp_path / "cgw.yaml"
    conf.write_text("community: sunrise\nmqtt:\n  url: mqtt://a:1883\n  keepalive: 30\n")
    with pytest.raises(SettingsError) as info:
        load_settings(conf, env={})
    assert str(info.value) == (
        f"--config {conf} line 4: mqtt.keepalive: no such setting; did you mean mqtt.keepalive_s?"
    )
    conf.write_text("community: sunrise\ndata_dirr: /srv/cgw\n")
    with pytest.raises(SettingsError, match=r"line 2: data_dirr: no such setting; did you mean data_dir\?$"):
        load_settings(conf, env={})
    conf.write_text("api:\n  port: 99999\n")  # a bad value in the file: the file's line, not CGW_...
    with pytest.raises(SettingsError, match=r"cgw\.yaml line 2: api\.port: Input should be less than"):
        load_settings(conf, env={})
    # The same value from the environment is named as the environment variable.
    with pytest.raises(SettingsError, match=r"^setting CGW_API__PORT \(api\.port\)"):
        load_settings(conf, env={"CGW_API__PORT": "99999"})


def test_error_lines_are_not_wrapped_when_the_output_is_not_a_terminal(tmp_path: Path) -> None:
    conf = tmp_path / ("a-settings-file-with-a-rather-long-name-" * 2 + ".yaml")
    conf.write_text("community: sunrise\nmqtt:\n  keepalive: 30\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "doctor", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "40"},  # a narrow terminal's setting: ignored for a pipe
    )
    assert result.returncode == 2
    assert (
        result.stderr
        == f"error: --config {conf} line 3: mqtt.keepalive: no such setting; did you mean mqtt.keepalive_s?\n"
    )


def test_loading_does_not_change_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CGW_COMMUNITY", "kept")
    load_settings(env={"CGW_COMMUNITY": "other"}, community="flag")
    import os

    assert os.environ["CGW_COMMUNITY"] == "kept"


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "CGW_COMMUNITY",
                "CGW_API__PORT",
                "CGW_MQTT__URL",
                "CGW_REGISTRATION",
                "CGW_INFLUX__URL",
                "CGW_STORE__RAW_RETENTION",
                "CGW_PIPELINE__BATCH_SIZE",
                "CGW_AUTH__TOKENS",
                "CGW_MQTT__KEEPALIVE_S",
            ]
        ),
        st.text(max_size=40).filter(lambda t: "\x00" not in t),
        max_size=4,
    )
)
def test_any_environment_either_loads_or_fails_with_one_line(env: dict[str, str]) -> None:
    try:
        load_settings(env=env)
    except SettingsError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("setting CGW_")


_yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
_sections = st.sampled_from(
    ["community", "mqtt", "influx", "api", "store", "pipeline", "auth", "outbox", "services", "registration"]
)
_keys = st.sampled_from(
    ["url", "port", "token", "tokens", "token_hashes", "write_rate_limit", "device_rate_limit",
     "max_bytes", "when_full", "raw_retention", "batch_size", "keepalive_s", "expires", "role"]
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(_sections, st.dictionaries(_keys, _yaml_values, max_size=3) | _yaml_values, max_size=4)
    | _yaml_values
)
@example({"\n": None})  # a key with a line break once made a two-line error
def test_any_settings_file_either_loads_or_fails_with_one_line(document: object) -> None:
    folder = Path(tempfile.mkdtemp())
    path = folder / "cgw.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    try:
        load_settings(path, env={})
    except SettingsError as exc:
        assert "\n" not in str(exc) and str(exc)


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    env = {**os.environ, "CGW_LOG_FORMAT": "json", "CGW_MQTT__URL": "mqtt://127.0.0.1:1",
           "CGW_DATA_DIR": str(tmp_path), "CGW_API__PORT": "0"}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run"], env=env, stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    stderr = process.stderr
    lines: list[str] = []
    said = threading.Event()

    def read() -> None:
        with stderr:  # closed at its end, as the process exits
            for line in stderr:
                lines.append(line)
                if "cannot connect" in line:
                    said.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        said.wait(30)  # it starts, fails to reach the broker, says so
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        reader.join(10)
    err = "".join(lines)
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["logger"] == "drivers.mqtt5" and "cannot connect" in r["message"] for r in records)


@pytest.mark.parametrize(
    ("value", "fault"),
    [
        ('{"my-real-secret-token-123": "admin"}', "role 'admin' is not one of viewer, terminal, operator"),
        (
            '{"my-real-secret-token-123": {"role": "operator", "expires": "tomorrow"}}',
            "expires 'tomorrow' is not",
        ),
        ('{"my-real-secret-token-123": {"role": "boss"}}', "role 'boss' is not one of"),
        ('{"my-real-secret-token-123": {"role": "viewer", "expiry": "x"}}', "no such field 'expiry'"),
        ('{"my-real-secret-token-123": 7}', "give a role or {role, expires, name}"),
    ],
)
def test_a_bad_token_entry_names_the_setting_and_the_fault_and_hides_the_token(
    tmp_path: Path, value: str, fault: str
) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env={"CGW_AUTH__TOKENS": value})
    message = str(info.value)
    assert message.startswith("setting CGW_AUTH__TOKENS (auth.tokens): token 'my-r…': ") and fault in message
    assert "secret" not in message and "\n" not in message and "more)" not in message
    conf = tmp_path / "cgw.yaml"
    document = {"community": "a", "auth": {"tokens": json.loads(value)}}
    conf.write_text(yaml.safe_dump(document, sort_keys=False))
    with pytest.raises(SettingsError) as info:
        load_settings(conf, env={})
    message = str(info.value)
    assert message.startswith(f"--config {conf} line 3: auth.tokens: token 'my-r…': ") and fault in message
    assert "secret" not in message
    # A short token shows less of itself: a quarter at most.
    with pytest.raises(SettingsError, match=r"token '…': role 'admin'"):
        load_settings(env={"CGW_AUTH__TOKENS": '{"tok": "admin"}'})


def test_the_documentations_placeholder_token_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"CGW_AUTH__TOKENS .*placeholder: choose your own"):
        load_settings(env={"CGW_AUTH__TOKENS": '{"choose-a-long-secret": "operator"}'})


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("CGW_REGISTRATON", "CGW_REGISTRATION"),
        ("CGW_COMUNITY", "CGW_COMMUNITY"),
        ("CGW_API_PORT", "CGW_API__PORT"),
        ("CGW_MQT__URL", "CGW_MQTT__URL"),
        ("CGW_API__PROT", "CGW_API__PORT"),
        ("cgw_log_levl", "CGW_LOG_LEVEL"),
    ],
)
def test_a_misspelt_environment_variable_is_refused_with_the_nearest_name(name: str, meant: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env={name: "9"})
    assert str(info.value).startswith(f"setting {name}") and f"no such setting; did you mean {meant}?" in str(
        info.value
    )


def test_the_variables_the_product_reads_that_are_not_settings_are_accepted() -> None:
    names = ("CGW_DOCTOR_TOKEN", "CGW_SIM_TOKEN", "CGW_SIM_PASSWORD", "CGW_TEST_ARTIFACTS")
    assert load_settings(env=dict.fromkeys(names, "x")).community == "community"
