"""The gateway's one typed settings object, built once at start-up and passed down.

Sources, lowest to highest priority: defaults, the optional YAML file (`--config`), then
environment variables with prefix `CGW_` and `__` between levels (docs/contract.md section 3).
A bad value becomes one `SettingsError` line that names the setting and what is wrong.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as _SourceError

from gateway.datafiles import line_of, parse_error_line
from gateway.durations import Duration
from gateway.limits import check_spec

# metrics: reads /metrics only (Prometheus); who reads personal data: gateway/privacy.py.
Role = Literal["viewer", "terminal", "operator", "installer", "metrics", "grid_worker"]
# e.g. "100/second;3000/minute" (gateway/limits.py); empty: no limit
RateLimit = Annotated[str, AfterValidator(check_spec)]
ENV_PREFIX = "CGW_"
ENV_NESTED = "__"


class SettingsError(Exception):
    """A setting is missing or wrong; the message is one line an installer can act on."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerSettings(_Section):
    """How to reach an MQTT broker: the community's own (`mqtt`) or the district's (`uplink`)."""

    url_optional: ClassVar[bool] = False

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: SecretStr | None = None
    client_id: str = ""  # empty: a name derived from the community
    keepalive_s: int = Field(30, ge=5, le=3600)
    tls_ca: Path | None = None
    tls_insecure: bool = False

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value and cls.url_optional:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"must start with mqtt:// or mqtts://, got {value!r}")
        if not parts.hostname:
            raise ValueError(f"has no host: {value!r}")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"has a bad port: {value!r}") from exc
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"


class MqttSettings(BrokerSettings):
    # Persistent session: what devices publish while the gateway restarts waits at the broker.
    clean_start: bool = False
    # "5": the fast driver (drivers/mqtt5.py); "3.1.1" for a broker without MQTT 5 (paho).
    protocol: Literal["5", "3.1.1"] = "5"
    max_payload_bytes: int = Field(64 * 1024, ge=256, le=16 * 1024 * 1024)


class UplinkSettings(BrokerSettings):
    """The district platform's broker (docs/uplink.md); an empty url: no uplink."""

    url_optional: ClassVar[bool] = True

    url: str = ""
    qos: Literal[1, 2] = 1
    # Telemetry sent up: a device kind ("energy_meter") or one metric of it ("air_quality.pm25").
    telemetry: list[str] = Field(default_factory=list)
    summary_interval_s: float = Field(300.0, ge=5, le=86_400, description="needs list and evaluation")
    batch_points: int = Field(2000, ge=1, le=100_000)
    max_message_bytes: int = Field(256 * 1024, ge=4096, le=16 * 1024 * 1024)
    # Commands change what happens in the community, so they are off until the installer turns
    # them on, and then only over TLS unless the installer says the plain link is theirs to trust.
    commands_over_plain_mqtt: bool = False
    commands: bool = False  # act on the district's commands (cgw/v1/down/{community}/cmd)
    # The furthest ahead a command's `expires_ms` may lie; its id is remembered that long.
    command_lifetime: Duration = timedelta(hours=1)

    @field_validator("commands")
    @classmethod
    def _commands_over_tls(cls, value: bool, info: ValidationInfo) -> bool:
        url = info.data.get("url", "")
        if (
            value
            and url
            and urlsplit(url).scheme != "mqtts"
            and not info.data.get("commands_over_plain_mqtt")
        ):
            raise ValueError(
                "the district's commands are refused over plain mqtt://: use an mqtts:// uplink, "
                "or set CGW_UPLINK__COMMANDS_OVER_PLAIN_MQTT=true for a link you trust"
            )
        return value

    @field_validator("telemetry")
    @classmethod
    def _check_selectors(cls, value: list[str]) -> list[str]:
        for selector in value:
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64})?", selector):
                raise ValueError(
                    f"{selector!r} is neither a device kind nor kind.metric (e.g. air_quality.pm25)"
                )
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.url)


class InfluxSettings(_Section):
    url: str = ""  # empty: no time-series sink
    token: SecretStr = SecretStr("")
    org: str = "cgw"
    bucket: str = "cgw"
    batch_size: int = Field(5000, ge=1, le=100_000)
    flush_interval_s: float = Field(1.0, gt=0, le=60)
    timeout_s: float = Field(10.0, gt=0, le=300)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"must be an http:// or https:// URL (or empty), got {value!r}")
        return value.rstrip("/")

    @property
    def enabled(self) -> bool:
        return bool(self.url)


class OutboxSettings(_Section):
    """The durable outbox of the outbound sinks (docs/reliability.md)."""

    max_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024, description="bound of the outbox on disk")
    when_full: Literal["drop_oldest_telemetry", "block"] = "drop_oldest_telemetry"


class ApiSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Per SSE subscriber; a client that cannot keep up loses its oldest events (counted).
    stream_queue: int = Field(1000, ge=10)
    # Names the API answers to (the Host header); the bound address is added unless it is a
    # wildcard. "*.example.org" matches below it; "*" any name (not advised).
    allowed_hosts: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1", "::1"])
    # Live-stream subscribers at once, in all and per token (more get 429).
    stream_max_subscribers: int = Field(64, ge=1, le=10_000)
    stream_max_per_token: int = Field(4, ge=1, le=1000)
    # The API over TLS by uvicorn itself (PEM files); without them, plain HTTP (behind a TLS
    # reverse proxy when it leaves 127.0.0.1).
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    # Any request body longer is refused with 413 unread (an Open311 POST is a few KiB).
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)


class StoreSettings(_Section):
    raw_retention: Duration = timedelta(hours=48)
    rollup_retention: Duration = timedelta(days=90)
    batch_size: int = Field(5000, ge=1)
    dead_letter_retention: Duration = timedelta(days=7)
    # The dead-letter table's budget: past it the oldest refusals are deleted first.
    dead_letter_max_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    # The commit interval of telemetry: a small batch of it waits up to this long, gathering what
    # arrives meanwhile, before one commit (acknowledged to the broker after it). Every commit
    # writes a few whole pages to the WAL, so this sets the SD card's wear at a trickle
    # (docs/performance.md, "Write budget"); events, refusals and terminal messages never wait.
    group_commit_ms: int = Field(2000, ge=0, le=10_000)
    # Below this much free space in the data folder, the oldest raw telemetry gives way
    # (docs/reliability.md, "A full disk"), and /readyz says the local store is not ready.
    min_free_bytes: int = Field(256 * 1024 * 1024, ge=0)


class PipelineSettings(_Section):
    queue_size: int = Field(64, ge=1, description="batches held between two stages")
    batch_size: int = Field(2000, ge=1, description="messages handled as one batch")
    max_future: Duration = timedelta(minutes=10)
    max_past: Duration = timedelta(days=7)
    presence_sweep_s: float = Field(5.0, gt=0)
    # Messages per device, by receive time, over which the rest are refused (`rate_limited`)
    # before they are decoded; empty: no limit.
    device_rate_limit: RateLimit = "100/second;3000/minute"
    # Beyond it, messages per device taken anyway when their own times show a held backlog
    # (forward, and within the limit by those times); refilled over an hour.
    backlog_allowance: int = Field(20_000, ge=0, le=10_000_000)


class TokenGrant(_Section):
    """What a token may do, and until when (`cgw token` writes these)."""

    role: Role
    expires: AwareDatetime | None = None  # e.g. 2027-06-30T00:00:00+08:00; none: until removed
    name: str | None = None  # who holds it, for the installer's own records


# Tokens the documentation shows as examples: one copied as it stands is refused.
PLACEHOLDER_TOKENS = frozenset({"choose-a-long-secret"})
# Shorter plain tokens are named by `cgw doctor` (docs/configuration.md); `cgw token` makes 43.
MIN_TOKEN_LENGTH = 16
ROLES: tuple[str, ...] = Role.__args__  # type: ignore[attr-defined]


def hidden(token: str) -> str:
    """A token as a message may show it: a quarter of it at most, four characters at most."""
    return repr(token[: min(4, len(token) // 4)] + "…")


def _grant(shown: str, grant: Any) -> Role | TokenGrant:
    if isinstance(grant, TokenGrant):  # built in code (tests, `cgw demo`): already checked
        return grant
    if isinstance(grant, str):
        if grant not in ROLES:
            raise ValueError(f"token {shown}: role {grant[:32]!r} is not one of {', '.join(ROLES)}")
        return grant  # type: ignore[return-value]
    if not isinstance(grant, Mapping):
        raise ValueError(f"token {shown}: give a role or {{role, expires, name}}, not {type(grant).__name__}")
    try:
        return TokenGrant.model_validate(grant)
    except ValidationError as exc:
        fault = exc.errors()[0]
        field = ".".join(map(str, fault["loc"])) or "grant"
        if fault["type"] == "extra_forbidden":
            reason = f"no such field {field!r} (valid: {', '.join(TokenGrant.model_fields)})"
        elif field == "role":
            reason = f"role {str(grant.get('role'))[:32]!r} is not one of {', '.join(ROLES)}"
        elif field == "expires":
            given = str(grant.get("expires"))[:40]
            reason = (
                f"expires {given!r} is not a date and time with its offset (e.g. 2027-06-30T00:00:00+08:00)"
            )
        else:
            reason = f"{field}: {fault['msg']}"
        raise ValueError(f"token {shown}: {reason}") from None


class AuthSettings(_Section):
    # Plain tokens (e.g. from CGW_AUTH__TOKENS='{"tok":"operator"}') and sha256 hex digests
    # (for the YAML file), each with a role or a grant. All are held only as digests after start-up.
    tokens: dict[str, Role | TokenGrant] = Field(default_factory=dict)
    token_hashes: dict[str, Role | TokenGrant] = Field(default_factory=dict)
    # API writes per token over which the rest are refused (429); empty: no limit.
    write_rate_limit: RateLimit = "20/second;600/minute"

    @field_validator("tokens", "token_hashes", mode="before")
    @classmethod
    def _grants(cls, value: Any, info: ValidationInfo) -> Any:
        # Each entry checked here, so a fault is one sentence about that entry that never shows
        # a token: the library's own message would print the token in its location.
        if not isinstance(value, Mapping):
            return value
        secret = info.field_name == "tokens"
        out: dict[str, Role | TokenGrant] = {}
        for key, grant in value.items():
            key = str(key)
            shown = hidden(key) if secret else f"{key[:12]!r}..."
            if secret and key in PLACEHOLDER_TOKENS:
                raise ValueError(f"token {shown} is the documentation's placeholder: choose your own")
            if not secret and (len(key) != 64 or any(c not in "0123456789abcdefABCDEF" for c in key)):
                raise ValueError(f"{shown} is not a SHA-256 hex digest (64 hex digits; see `cgw token`)")
            out[key] = _grant(shown, grant)
        return out

    def digests(self) -> dict[str, TokenGrant]:
        def grant(value: Role | TokenGrant) -> TokenGrant:
            return value if isinstance(value, TokenGrant) else TokenGrant(role=value)

        out = {k.lower(): grant(v) for k, v in self.token_hashes.items()}
        for token, value in self.tokens.items():
            out[hashlib.sha256(token.encode()).hexdigest()] = grant(value)
        return out


class ServicesSettings(_Section):
    catalogue: Path | None = None  # the installer's service catalogue; empty: the built-in one
    stall_after: Duration = timedelta(hours=48)  # default time in one stage before work is "stalled"
    check_interval_s: float = Field(60.0, gt=0, le=3600, description="how often deadlines are checked")
    # The household register (gateway/services/households.py): a vote counts only for a household
    # in it, proved by its PIN or card. Empty: no register, so no vote counts.
    households: Path | None = None
    # Open311 clients as shipped read requests without a key; true lets them, in the redacted view.
    open311_keyless_reads: bool = False


class PrivacySettings(_Section):
    """Residents' personal data (docs/privacy.md): how long what is kept, and its reads' log."""

    # Every read of personal data is logged (gateway/services/access_log.py); kept this long.
    access_log_retention: Duration = timedelta(days=180)
    # A device's unit is logged once per token and device in this long: the dashboard polls the
    # device list, and an entry per poll would cost the SD card a commit every few seconds.
    device_read_window: Duration = timedelta(hours=1)
    # A closed request keeps its residents' personal data this long, then it is pseudonymised
    # (the figures stay; gateway/services/residents.py); so do the households of votes on
    # proposals closed this long ago.
    personal_data_retention: Duration = timedelta(days=365)


class CareGrid(_Section):
    """A grid (网格): a few buildings and the grid workers who look after them first."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    name: str = Field("", max_length=100)
    buildings: list[str] = Field(min_length=1)
    # The names of the workers' API tokens (`cgw token --name`, role grid_worker).
    workers: list[str] = Field(default_factory=list)


class CareSettings(_Section):
    """Precision care (docs/care.md): the welfare rules over a consenting household's own meters,
    door and check-ins, and the welfare checks they raise for the grid's workers."""

    # The community's local time decides what is morning and night; China keeps one zone, no DST.
    utc_offset_hours: float = Field(8.0, ge=-12, le=14)
    # A household's rhythm is learnt from its own last days at home (days it was away left out).
    baseline_days: int = Field(21, ge=7, le=120)
    min_baseline_days: int = Field(7, ge=3, le=120)  # before this, the rules stay quiet ("learning")
    # A quiet span at home, awake, fires when it is longer than the household's own longest quiet
    # begun at that time of day in its baseline, plus `quiet_margin`, kept within min_quiet and
    # max_quiet (so a fall is found within about max_quiet), and when the activity its baseline
    # expected in the span (a sum of its per-half-hour rates) reaches `surprise`: night-time
    # quiet, and the hours it is usually idle, expect little and never fire (docs/care.md).
    surprise: float = Field(4.0, gt=0, le=30)
    quiet_margin: Duration = timedelta(minutes=45)
    min_quiet: Duration = timedelta(minutes=45)
    max_quiet: Duration = timedelta(minutes=100)
    # No first activity by the household's median waking time plus this: a "not up" check.
    morning_margin: Duration = timedelta(minutes=95)
    day_start_hour: int = Field(4, ge=0, le=11)  # a household's day (and its waking) begins here
    # A flat's energy meter counts as someone's activity when its mean power over a reading's
    # interval is this far above the flat's floor (fridge, router): a kettle, a cooker, a washer.
    energy_step_w: float = Field(150.0, gt=0, le=10_000)
    evaluate_every: Duration = timedelta(minutes=5)  # how often the rules look at every household
    ack_within: Duration = timedelta(minutes=20)  # a grid worker's acknowledgement, else escalation
    escalate_to: str = Field("care-centre", min_length=1, max_length=64)  # the catalogue's provider
    # The catalogue's service a welfare check is filed as (a request the service loop follows).
    check_service: str = "elderly.home_visit"
    grids: list[CareGrid] = Field(default_factory=list)


class ModbusRegister(_Section):
    metric: str
    address: int = Field(ge=0, le=65535)
    table: Literal["holding", "input"] = "holding"
    type: Literal["uint16", "int16", "uint32", "int32", "float32"] = "uint16"
    scale: float = 1.0
    word_order: Literal["big", "little"] = "big"


class ModbusDevice(_Section):
    device_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    kind: str = "energy_meter"
    host: str = "127.0.0.1"
    port: int = Field(502, ge=1, le=65535)
    unit: int = Field(1, ge=0, le=247)
    poll_s: float = Field(10.0, gt=0)
    timeout_s: float = Field(3.0, gt=0)
    registers: list[ModbusRegister] = Field(min_length=1)


class ModbusSettings(_Section):
    devices: list[ModbusDevice] = Field(default_factory=list)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED,
        extra="forbid",
        case_sensitive=False,
    )

    community: str = Field("community", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    data_dir: Path = Path("./data")
    registration: Literal["open", "closed"] = "open"
    # Under `open`: how many devices may register themselves (past it: `registration_full`),
    # and how long one may stay silent before it is forgotten.
    registration_max_devices: int = Field(1000, ge=0, le=1_000_000)
    registration_idle: Duration = timedelta(days=30)
    inventory: Path | None = None  # installer's YAML inventory; wins over birth messages
    profiles_dir: Path | None = None  # extra or overriding device profiles
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # text for people at a terminal; json (one object per line) for journald, Loki, Elasticsearch
    log_format: Literal["text", "json"] = "text"
    mqtt: MqttSettings = MqttSettings()
    influx: InfluxSettings = InfluxSettings()
    uplink: UplinkSettings = UplinkSettings()
    outbox: OutboxSettings = OutboxSettings()
    api: ApiSettings = ApiSettings()
    store: StoreSettings = StoreSettings()
    pipeline: PipelineSettings = PipelineSettings()
    auth: AuthSettings = AuthSettings()
    modbus: ModbusSettings = ModbusSettings()
    services: ServicesSettings = ServicesSettings()
    privacy: PrivacySettings = PrivacySettings()
    care: CareSettings = CareSettings()

    @field_validator("data_dir", "inventory", "profiles_dir")
    @classmethod
    def _home(cls, value: Path | None) -> Path | None:
        # `~/...` in a settings file means the user's home, as it does in a shell.
        return value.expanduser() if value is not None else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init carries the YAML file's content; the environment wins over it.
        return (env_settings, init_settings)

    @property
    def mqtt_client_id(self) -> str:
        return self.mqtt.client_id or f"cgw-{self.community}"

    @property
    def uplink_client_id(self) -> str:
        return self.uplink.client_id or f"cgw-up-{self.community}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "cgw.sqlite3"

    @property
    def services_db_path(self) -> Path:
        return self.data_dir / "services.sqlite3"

    @property
    def care_db_path(self) -> Path:
        return self.data_dir / "care.sqlite3"


def _env_name(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + ENV_NESTED.join(_shown(part).upper() for part in loc)


def _shown(part: int | str) -> str:
    """A key as an error line can show it: one line, whatever the file's key holds."""
    text = str(part)
    return text if text.isprintable() else repr(text)


def _line_of(path: Path, loc: tuple[int | str, ...]) -> int | None:
    """The line of the YAML file where the key (or list item) at `loc` is written, if it is."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return line_of(node, loc)


def _nearest(loc: tuple[int | str, ...]) -> str:
    """`; did you mean ...?` with the closest valid name at that level, or the valid names."""
    model: type[BaseModel] = Settings
    for part in loc[:-1]:
        field_info = model.model_fields.get(str(part))
        annotation = field_info.annotation if field_info is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    names = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    prefix = ".".join(map(str, loc[:-1]))
    if close:
        return f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    return f" (valid here: {', '.join(names)})"


# `CGW_` variables the product reads that are not settings: the CLI's own options
# (gateway/cli.py) and the test suite's artifacts folder (tests/test_dashboard.py).
NOT_SETTINGS = frozenset({"CGW_DOCTOR_TOKEN", "CGW_SIM_TOKEN", "CGW_SIM_PASSWORD", "CGW_TEST_ARTIFACTS"})


def _setting_names() -> list[str]:
    """Every environment name a setting answers to, sections' fields included."""
    names = []
    for name, info in Settings.model_fields.items():
        names.append(_env_name((name,)))
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            names += [_env_name((name, sub)) for sub in info.annotation.model_fields]
    return names


def _check_names(environ: Mapping[str, str]) -> None:
    """Refuse a `CGW_` variable no setting reads: pydantic-settings would pass over it silently."""
    for key in sorted(environ):
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NOT_SETTINGS:
            continue
        top = upper.removeprefix(ENV_PREFIX).split(ENV_NESTED, 1)[0].lower()
        if top in Settings.model_fields:
            continue  # a section's misspelt field is refused by the section itself
        close = difflib.get_close_matches(upper, _setting_names() + sorted(NOT_SETTINGS), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else " (docs/configuration.md lists the settings)"
        raise SettingsError(f"setting {_shown(key)}: no such setting{hint}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"--config {path}: cannot read the file ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise SettingsError(f"--config {path}{parse_error_line(exc)}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"--config {path}: must be a mapping of settings, not {type(data).__name__}")
    return data


def load_settings(
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings from the YAML file, the environment and explicit overrides.

    `env` defaults to the process environment; tests pass their own mapping. Overrides (from
    CLI flags) win over everything.
    """
    file_values = _read_yaml(config) if config is not None else {}
    environ = dict(os.environ if env is None else env)
    _check_names(environ)
    for key, value in overrides.items():
        if value is not None:
            file_values[key] = value
            environ.pop(ENV_PREFIX + key.upper(), None)  # a CLI flag beats the environment
    saved = os.environ.copy()
    try:
        # pydantic-settings reads os.environ; give it exactly the mapping meant for this build.
        os.environ.clear()
        os.environ.update(environ)
        return Settings(**file_values)
    except ValidationError as exc:
        errors = exc.errors()
        loc = tuple(errors[0]["loc"])
        msg = str(errors[0]["msg"]).removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        name = ".".join(map(_shown, loc))
        line = _line_of(config, loc) if config is not None and _env_name(loc) not in environ else None
        if line is None:
            if errors[0]["type"] == "extra_forbidden":
                close = difflib.get_close_matches(_env_name(loc), _setting_names(), n=1, cutoff=0.6)
                msg = "no such setting" + (f"; did you mean {close[0]}?" if close else _nearest(loc))
            raise SettingsError(f"setting {_env_name(loc)} ({name}): {msg}{more}") from exc
        if errors[0]["type"] == "extra_forbidden":
            msg = "no such setting" + _nearest(loc)
        raise SettingsError(f"--config {config} line {line}: {name}: {msg}{more}") from exc
    except _SourceError as exc:
        # A structured value (dict/list) in the environment that is not valid JSON.
        field_name = str(exc).split('"')[1] if '"' in str(exc) else "?"
        names = sorted(k for k in environ if k.upper().startswith(ENV_PREFIX + field_name.upper()))
        which = " / ".join(names) or _env_name((field_name,))
        raise SettingsError(f"setting {which}: not valid JSON (structured values are JSON)") from exc
    finally:
        os.environ.clear()
        os.environ.update(saved)
