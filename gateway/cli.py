"""The `cgw` command: run, demo, simulate and doctor (docs/contract.md section 3).

Each command builds the settings once (YAML file, then `CGW_` environment) and passes them down;
a bad setting ends the command with one line naming it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from gateway import __version__
from gateway.clock import now_ms
from gateway.settings import MqttSettings, Settings, SettingsError, load_settings
from gateway.store.lock import DataDirUnusable

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(
    name="cgw",
    help=(
        "cgw: the community edge gateway. Collects sensor and service-terminal data over MQTT "
        "(and Modbus), validates and keeps it locally, forwards it to InfluxDB, and serves an "
        "HTTP API. Settings: --config FILE (YAML) and CGW_* environment variables; see "
        "docs/configuration.md."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# rich is imported when something is printed, not by every command: `cgw run` prints only a
# bad setting, and rich is about 2 MB of the idle gateway's memory (docs/performance.md, "Memory").
@functools.cache
def console() -> Console:
    """Standard error, for the errors a command ends with."""
    from rich.console import Console

    # soft_wrap: a line is never cut at the terminal's width, nor at 80 columns when the output is
    # not a terminal (systemd's journal, a pipe): one error, one line, as docs/operations.md promises.
    return Console(stderr=True, soft_wrap=True)


@functools.cache
def out() -> Console:
    """Standard output that a reader may close (`cgw demo | head -3`) without stopping anything.

    rich's default answer to a broken pipe is `SystemExit` from inside whatever printed, which
    in the demo is its start-up callback inside the task group: the shutdown path broke and no
    signal could stop the demo or its private broker. Here the output just goes quiet.
    """
    from rich.console import Console

    class _Output(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            # Later writes, and the interpreter's last flush, go nowhere instead of failing.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)

    return _Output(soft_wrap=True)  # long commands stay on one line, ready to copy


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML settings file; CGW_* environment variables win over it."),
]


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except SettingsError as exc:
        console().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


def _logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                datefmt="%Y-%m-%dT%H:%M:%S%z",
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%dT%H:%M:%S"
            )
        )
    logging.basicConfig(level=level.upper(), handlers=[handler])
    for noisy in ("amqtt", "transitions", "pymodbus"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop)` on a fresh loop; SIGINT/SIGTERM set `stop` for a clean drain."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        asyncio.run(runner())
    except* OSError as group:
        for exc in group.exceptions:
            console().print(f"[red]error:[/red] {exc}", highlight=False)
        # A data folder that cannot be used is a bad setting: exit 2, as for any other.
        setting = all(isinstance(exc, DataDirUnusable) for exc in group.exceptions)
        raise typer.Exit(2 if setting else 1) from None


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the gateway with the configured broker, local store, sinks and API."""
    settings = _settings(config)
    _logging(settings.log_level, settings.log_format)
    from gateway.application import Gateway
    from gateway.datafiles import DataFileError
    from gateway.profiles import ProfileError
    from gateway.registry import InventoryError

    try:
        gateway = Gateway(settings)
    except (ProfileError, InventoryError, DataFileError) as exc:
        console().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None

    async def main(stop: asyncio.Event) -> None:
        task = asyncio.create_task(gateway.run())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        gateway.stop()
        stopper.cancel()
        await task

    _run_until_signal(main)


@app.command()
def demo(
    config: ConfigOption = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the demo keeps its store and broker data [default: CGW_DATA_DIR, the file's "
            "data_dir, or ./cgw-demo-data]."
        ),
    ] = None,
    community: Annotated[
        str | None, typer.Option(help="Community name [default: CGW_COMMUNITY, the file's, or sunrise].")
    ] = None,
    buildings: Annotated[int, typer.Option(min=1, max=50, help="Residential buildings.")] = 6,
    floors: Annotated[int, typer.Option(min=1, max=60, help="Floors per building.")] = 6,
    seed: Annotated[int, typer.Option(help="Seed of the simulated community.")] = 42,
    speed: Annotated[
        float, typer.Option(min=0.1, help="Simulated time per real second (daily cycles).")
    ] = 60.0,
    interval_scale: Annotated[
        float, typer.Option(min=0.01, help="Multiply every device's publish interval (0.5: twice as often).")
    ] = 1.0,
    faults: Annotated[
        str, typer.Option(help="Faults to inject, e.g. 'disconnect=0.001,malformed=0.005'.")
    ] = "",
    broker: Annotated[str | None, typer.Option(help="Use this broker instead of a private one.")] = None,
    embedded_broker: Annotated[
        bool, typer.Option(help="Use the in-process amqtt broker even if Mosquitto is installed.")
    ] = False,
    host: Annotated[
        str | None, typer.Option(help="API address [default: CGW_API__HOST, the file's, or 127.0.0.1].")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="API port, a free one if taken [default: CGW_API__PORT, the file's, or 8080]."),
    ] = None,
    duration: Annotated[float | None, typer.Option(min=0, help="Stop after this many seconds.")] = None,
    service_days: Annotated[
        int, typer.Option(min=0, max=30, help="Days of simulated service history filled in on first start.")
    ] = 7,
) -> None:
    """Start a complete simulated community on this machine, with no outside services.

    A flag wins over the environment, the environment over the settings file, the file over the
    demo's defaults.
    """
    base = _settings(config)
    # Quiet by default: the demo's own lines (gateway.demo) and what needs attention.
    _logging("warning" if base.log_level == "info" else base.log_level, base.log_format)
    if base.log_level == "info":
        logging.getLogger("gateway.demo").setLevel(logging.INFO)
    from gateway.demo import DemoInfo, DemoOptions, chosen, run_demo
    from simulators.run import parse_faults

    try:
        fault_rates = parse_faults(faults) if faults else {}
    except ValueError as exc:
        console().print(f"[red]error:[/red] --faults: {exc}", highlight=False)
        raise typer.Exit(2) from None
    place = chosen(base, data_dir=data_dir, community=community, api_host=host, api_port=port)
    options = DemoOptions(
        data_dir=place.data_dir,
        community=place.community,
        buildings=buildings,
        floors=floors,
        seed=seed,
        speed=speed,
        interval_scale=interval_scale,
        faults=fault_rates,
        broker_url=broker,
        api_host=place.api_host,
        api_port=place.api_port,
        duration_s=duration,
        prefer_mosquitto=not embedded_broker,
        service_days=service_days,
    )

    def ready(info: DemoInfo) -> None:
        viewer, operator = info.tokens["viewer"], info.tokens["operator"]
        out().print(
            f"\n[bold green]cgw demo is running[/bold green] — community [bold]{options.community}[/bold], "
            f"{info.devices} simulated devices",
            highlight=False,
        )
        # No token in the link: a link is pasted into chats and browser histories.
        out().print(
            f"  Dashboard      {info.api_url}/dashboard/  (sign in with the operator token below)",
            highlight=False,
        )
        out().print(f"  API and docs   {info.api_url}/docs", highlight=False)
        out().print(f"  Broker         {info.broker_url} ({info.broker_kind})", highlight=False)
        out().print(f"  Data           {info.data_dir}", highlight=False)
        out().print(
            "  Tokens         " + "  ".join(f"{r}={t}" for r, t in info.tokens.items()), highlight=False
        )
        out().print("\nTry:", highlight=False)
        out().print(
            f"  curl -H 'Authorization: Bearer {viewer}' {info.api_url}/api/v1/summary", highlight=False
        )
        out().print(
            f"  curl -H 'Authorization: Bearer {viewer}' '{info.api_url}/api/v1/devices?online=true'",
            highlight=False,
        )
        out().print(
            f"  curl -N -H 'Authorization: Bearer {operator}' {info.api_url}/api/v1/stream", highlight=False
        )
        if info.service_days:
            out().print(
                f"  curl -H 'Authorization: Bearer {viewer}' {info.api_url}/api/v1/needs/hotspots"
                f"   (after the {info.service_days}-day service history is filled in, ~20 s)",
                highlight=False,
            )
            out().print(
                f"  curl -H 'Authorization: Bearer {viewer}' '{info.api_url}/api/v1/evaluation?by=provider'",
                highlight=False,
            )
            out().print(f"  curl {info.api_url}/open311/v2/services.json", highlight=False)
        port_ = info.broker_url.rsplit(":", 1)[1]
        out().print(
            f"  mosquitto_pub -p {port_} -q 1 -t cgw/v1/my-sensor/status "
            '-m \'{"state":"online","kind":"air_quality","location":{"building":"1"}}\'',
            highlight=False,
        )
        out().print(
            f"  mosquitto_pub -p {port_} -q 1 -t cgw/v1/my-sensor/telemetry "
            '-m \'{"metrics":{"pm25":88.5,"temp_c":21.4}}\'',
            highlight=False,
        )
        out().print("Stop with Ctrl-C.\n", highlight=False)

    _run_until_signal(lambda stop: run_demo(options, base, ready, stop))
    out().print(
        f"cgw demo stopped; its data stays in {options.data_dir} (the next `cgw demo` there goes on from it)",
        highlight=False,
    )


@app.command()
def simulate(
    broker: Annotated[str, typer.Option(help="Broker URL, mqtt://host:port.")] = "mqtt://127.0.0.1:1883",
    username: Annotated[str | None, typer.Option(help="Broker user name.")] = None,
    password: Annotated[str | None, typer.Option(help="Broker password.", envvar="CGW_SIM_PASSWORD")] = None,
    community: Annotated[str, typer.Option(help="Community name.")] = "sunrise",
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same community.")] = 42,
    buildings: Annotated[int, typer.Option(min=1, max=50)] = 6,
    floors: Annotated[int, typer.Option(min=1, max=60)] = 6,
    speed: Annotated[float, typer.Option(min=0.1, help="Simulated time per real second.")] = 1.0,
    interval_scale: Annotated[float, typer.Option(min=0.01, help="Multiply every publish interval.")] = 1.0,
    duration: Annotated[float | None, typer.Option(min=0, help="Stop after this many seconds.")] = None,
    faults: Annotated[
        str,
        typer.Option(
            help="e.g. 'disconnect=0.001,malformed=0.01,duplicate=0.01,clock_skew=0.001,burst=0.001'."
        ),
    ] = "",
    inventory: Annotated[
        Path | None, typer.Option(help="Also write the community's inventory YAML here.")
    ] = None,
    services_api: Annotated[
        str | None,
        typer.Option(
            help="Instead of devices, simulate the service loop against this gateway API "
            "(e.g. http://127.0.0.1:8080): residents' requests, providers, ratings and votes."
        ),
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="Operator token for --services-api.", envvar="CGW_SIM_TOKEN")
    ] = None,
    days: Annotated[int, typer.Option(min=1, max=30, help="Simulated days of the service loop.")] = 7,
    hotspot: Annotated[
        str,
        typer.Option(help="Injected hotspot as building:service_code ('' for none), on the last day."),
    ] = "3:facility.elevator",
    progress: Annotated[
        float, typer.Option(min=0, help="Print a progress line every this many seconds (0: never).")
    ] = 10.0,
) -> None:
    """Drive simulated devices and service terminals against any MQTT broker."""
    _logging("info")
    if services_api is not None:
        _simulate_services(broker, services_api, token, seed, days, buildings, floors, hotspot)
        return
    from simulators.community import Community, build_community
    from simulators.run import SimulationConfig, SimulationStats, parse_faults
    from simulators.run import simulate as run_simulation

    try:
        fault_rates = parse_faults(faults) if faults else {}
    except ValueError as exc:
        console().print(f"[red]error:[/red] --faults: {exc}", highlight=False)
        raise typer.Exit(2) from None
    try:
        MqttSettings(url=broker)  # the gateway's own check of a broker URL
    except ValidationError as exc:
        reason = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        console().print(f"[red]error:[/red] --broker: {reason}", highlight=False)
        raise typer.Exit(2) from None
    if inventory is not None:
        build_community(community, seed, buildings, floors).write_inventory(inventory)
    config = SimulationConfig(
        broker_url=broker,
        username=username,
        password=password,
        community=community,
        seed=seed,
        buildings=buildings,
        floors=floors,
        interval_scale=interval_scale,
        speed=speed,
        duration_s=duration,
        faults=fault_rates,
        # Against a shared broker nothing may outlive the run: a retained birth would be taken
        # for a real device by a gateway with open registration.
        retain=False,
    )

    def started(community: Community) -> None:
        until = f" for {duration:g} s" if duration is not None else "; Ctrl-C stops it"
        out().print(
            f"Simulating {len(community.devices)} devices of community {community.name!r} on {broker}{until}",
            highlight=False,
        )

    def report(stats: SimulationStats) -> None:
        out().print(stats.progress(), highlight=False)

    async def main(stop: asyncio.Event) -> None:
        stats = await run_simulation(config, stop, started, report if progress else None, progress)
        out().print(stats.summary(), highlight=False)
        if stats.devices and not stats.messages:
            # Every device publishes its birth on connecting: none means none connected.
            raise OSError(f"no device could connect to {broker}: is a broker listening there?")

    _run_until_signal(main)


def _simulate_services(
    broker: str,
    api_url: str,
    token: str | None,
    seed: int,
    days: int,
    buildings: int,
    floors: int,
    hotspot: str,
) -> None:
    from simulators.residents import Hotspot, ServiceSimConfig, ServiceSimulation

    if not token:
        console().print("[red]error:[/red] --services-api needs --token (an operator token)", highlight=False)
        raise typer.Exit(2)
    spot = None
    if hotspot:
        building, sep, code = hotspot.partition(":")
        if not sep or not building or not code:
            console().print("[red]error:[/red] --hotspot must be building:service_code", highlight=False)
            raise typer.Exit(2)
        from gateway.services.catalogue import load_catalogue

        if load_catalogue().get(code) is None:
            console().print(
                f"[red]error:[/red] --hotspot: {code!r} is not in the service catalogue", highlight=False
            )
            raise typer.Exit(2)
        spot = Hotspot(building=building, service_code=code, device_id=None)
    config = ServiceSimConfig(
        broker_url=broker,
        api_url=api_url,
        operator_token=token,
        seed=seed,
        days=days,
        buildings=buildings,
        floors=floors,
        hotspot=spot,
    )
    log = asyncio.run(ServiceSimulation(config).run())
    states = Counter(r.steps[-1][1] if r.steps else "submitted" for r in log.requests)
    out().print(
        f"{len(log.requests)} requests over {days} days ({log.duplicates_acked} re-sends recognised); "
        + ", ".join(f"{k}={v}" for k, v in sorted(states.items())),
        highlight=False,
    )


@app.command()
def doctor(
    config: ConfigOption = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="CGW_DOCTOR_TOKEN",
            help="An operator, installer or metrics token: a running gateway then tells its write "
            "rate (the SD card's wear) and its clock's jumps.",
        ),
    ] = None,
) -> None:
    """Check a deployment: settings, disk, local store, broker, time-series store, clock."""
    settings = _settings(config)
    from gateway.doctor import run_checks

    findings = run_checks(settings, token=token)
    for finding in findings:
        if finding.ok:
            mark = "[green]ok[/green]  "
        else:
            mark = "[red]FAIL[/red]" if finding.blocking else "[yellow]WARN[/yellow]"
        out().print(f"{mark} {finding.check}: {finding.detail}", highlight=False)
    if any(not f.ok and f.blocking for f in findings):
        raise typer.Exit(1)


@app.command("mqtt-auth")
def mqtt_auth(
    config: ConfigOption = None,
    inventory: Annotated[
        Path | None, typer.Option(help="The installer's inventory (default: the `inventory` setting).")
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where to write passwd, acl, credentials.csv.")
    ] = Path("mosquitto-auth"),
) -> None:
    """Per-device MQTT passwords and an ACL for Mosquitto, from the inventory."""
    settings = _settings(config)
    path = inventory or settings.inventory
    if path is None:
        console().print("[red]error:[/red] no inventory: pass --inventory FILE or set CGW_INVENTORY")
        raise typer.Exit(2)
    from gateway.credentials import GATEWAY_USER, write_files
    from gateway.profiles import load_profiles
    from gateway.registry import InventoryError, load_inventory

    profiles = load_profiles(settings.profiles_dir)
    try:
        devices = load_inventory(path, profiles)
    except InventoryError as exc:
        console().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    terminals = [d.device_id for d in devices if (p := profiles.get(d.kind)) is not None and p.terminal]
    written = write_files(out_dir, [d.device_id for d in devices], terminals=terminals)
    out().print(
        f"{written.accounts} accounts ({written.new} new) in {out_dir}/: passwd, acl, credentials.csv\n"
        f"Mosquitto: password_file {out_dir.resolve()}/passwd, acl_file {out_dir.resolve()}/acl, "
        "allow_anonymous false\n"
        f"Gateway: CGW_MQTT__USERNAME={GATEWAY_USER} and CGW_MQTT__PASSWORD from credentials.csv "
        "(keep that file secret; each device logs in with its id and its password)",
        highlight=False,
    )


@app.command()
def token(
    role: Annotated[
        str, typer.Option(help="viewer, terminal, operator, installer, or metrics (reads /metrics only).")
    ],
    expires: Annotated[
        str | None, typer.Option(help="A duration (90d, 12h) or a moment (2027-06-30T00:00:00+08:00).")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Who holds it: your records, and the personal-data access log.")
    ] = None,
) -> None:
    """Make an API token: prints it once, and the hashed entry for the settings file."""
    import hashlib
    import secrets
    from datetime import UTC, datetime, timedelta

    from gateway.durations import parse_duration
    from gateway.settings import TokenGrant

    moment: object = None
    if expires:
        length = parse_duration(expires)  # a timedelta for "90d"; otherwise read as a moment below
        moment = datetime.now(UTC) + length if isinstance(length, timedelta) else expires
    try:
        grant = TokenGrant.model_validate({"role": role, "expires": moment, "name": name})
    except ValidationError as exc:
        problem = exc.errors()[0]
        console().print(f"[red]error:[/red] {problem['loc'][0]}: {problem['msg']}", highlight=False)
        raise typer.Exit(2) from None
    secret = secrets.token_urlsafe(24)
    digest = hashlib.sha256(secret.encode()).hexdigest()
    entry = grant.model_dump(mode="json", exclude_none=True)
    fields = ", ".join(f"{k}: {v!r}" if k != "role" else f"{k}: {v}" for k, v in entry.items())
    out().print(f"token (shown once; give it to its holder): {secret}", highlight=False)
    out().print(f'settings file:\nauth:\n  token_hashes:\n    "{digest}": {{{fields}}}', highlight=False)


@app.command()
def household(
    register: Annotated[Path, typer.Option(help="The household register file (services.households).")],
    building: Annotated[str, typer.Option(help="The household's building.")],
    unit: Annotated[str, typer.Option(help="The household's unit.")],
    pin: Annotated[
        str | None, typer.Option(help="Its PIN (prompted, not echoed, when neither --pin nor --card).")
    ] = None,
    card: Annotated[str | None, typer.Option(help="Or its card number.")] = None,
) -> None:
    """Add a household to the register (or replace its PIN): only registered households vote."""

    from gateway.datafiles import DataFileError
    from gateway.services.households import add_household

    secret = pin or card or typer.prompt("PIN", hide_input=True, confirmation_prompt=True)
    try:
        count = add_household(register, building, unit, secret)
    except (DataFileError, ValidationError, OSError) as exc:
        console().print(f"[red]error:[/red] {str(exc).splitlines()[0]}", highlight=False)
        raise typer.Exit(2) from None
    out().print(
        f"{building}/{unit} is in {register} ({count} households; mode 0600, the secrets only hashed). "
        f"The gateway reads it from CGW_SERVICES__HOUSEHOLDS={register.resolve()} at start-up.",
        highlight=False,
    )


residents = typer.Typer(
    help="Residents' rights (docs/privacy.md): export or erase what is kept about one contact or household.",
    no_args_is_help=True,
)
app.add_typer(residents, name="residents")
ContactOption = Annotated[
    str | None, typer.Option(help="A phone number, e-mail or name, exactly as the resident gave it.")
]
HouseholdOption = Annotated[str | None, typer.Option(help="A household as building/unit, e.g. 3/2-301.")]


def _resident(contact: str | None, household: str | None) -> Any:
    from gateway.services.residents import Resident

    try:
        return Resident(contact=contact, household=household)
    except ValueError as exc:
        console().print(f"[red]error:[/red] {exc} (--contact or --household)", highlight=False)
        raise typer.Exit(2) from None


def _service_store(settings: Settings) -> sqlite3.Connection:
    """The services' file (`services.sqlite3`), opened (and migrated) as the gateway opens it."""
    from gateway.services import schema

    if not settings.services_db_path.exists():
        console().print(f"[red]error:[/red] no service store in {settings.data_dir}: check CGW_DATA_DIR")
        raise typer.Exit(1)
    return schema.connect(settings.services_db_path)


@residents.command("export")
def residents_export(
    config: ConfigOption = None,
    contact: ContactOption = None,
    household: HouseholdOption = None,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write the JSON here (default: stdout).")
    ] = None,
) -> None:
    """Everything kept about one resident, as JSON (requests, their steps and ratings, votes)."""
    import getpass
    import json

    from gateway.services import access_log
    from gateway.services import residents as rights

    settings = _settings(config)
    resident = _resident(contact, household)
    store = _service_store(settings)
    try:
        found = rights.export(store, resident)
        read = [r["id"] for r in found["requests"]]
        if resident.household is not None and (read or found["votes"]):
            read.append(f"household:{resident.household}")
        if read:  # a read that found nothing read no one's data
            access_log.record(
            store,
                access_log.Access(
                    now_ms(), f"cli:{getpass.getuser()}", "installer", "cli",
                    "cgw residents export", tuple(read),
                ),
            )  # fmt: skip
    finally:
        store.close()
    text = json.dumps({"community": settings.community, **found}, ensure_ascii=False, indent=2)
    if out_file is None:
        out().print(text, highlight=False, markup=False)
    else:
        from gateway.files import write_private

        write_private(out_file, text.encode())
        console().print(f"{len(found['requests'])} requests and {len(found['votes'])} votes in {out_file}")


@residents.command("erase")
def residents_erase(
    config: ConfigOption = None,
    contact: ContactOption = None,
    household: HouseholdOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Erase what is kept about one resident: personal data emptied, figures kept; prints a report."""
    import json

    from gateway.services import residents as rights
    from gateway.store.maintenance import forget_dead_letters

    settings = _settings(config)
    resident = _resident(contact, household)
    if not yes:
        typer.confirm("erase this resident's personal data (it cannot be undone)?", abort=True)
    store = _service_store(settings)
    try:
        report = rights.erase(store, resident, now_ms())
    finally:
        store.close()
    # Dead letters refused before they were redacted may still name the resident.
    letters = forget_dead_letters(settings.db_path, resident.words()) if settings.db_path.exists() else 0
    out().print(json.dumps({**report.as_dict(), "dead_letters_deleted": letters}, indent=2), highlight=False)


@app.command("backup")
def backup_command(
    config: ConfigOption = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to put the backup folder in.")] = Path("."),
) -> None:
    """Copy the local stores (safe while the gateway runs) into a checked backup folder."""
    settings = _settings(config)
    from gateway.backup import BackupError, backup

    try:
        made = backup(settings.data_dir, out_dir, settings.community)
    except (BackupError, OSError) as exc:
        console().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in made.files.items())
    out().print(f"backup in {made.folder} ({sizes})", highlight=False)


@app.command("restore")
def restore_command(
    folder: Annotated[Path, typer.Argument(help="A folder made by `cgw backup`.")],
    config: ConfigOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Replace stores that exist without asking.")] = False,
) -> None:
    """Replace the local stores by a backup's (stop the gateway first)."""
    settings = _settings(config)
    import httpx

    from gateway.backup import BackupError, check, restore

    host = "127.0.0.1" if settings.api.host in ("0.0.0.0", "::") else settings.api.host
    try:
        httpx.get(f"http://{host}:{settings.api.port}/healthz", timeout=1)
        console().print(
            f"[red]error:[/red] a gateway answers on {host}:{settings.api.port}: stop it first "
            "(systemctl stop cgw)",
            highlight=False,
        )
        raise typer.Exit(1)
    except httpx.HTTPError:
        pass  # nothing listens: safe to replace the files
    try:
        check(folder)
        present = [p.name for p in (settings.db_path, settings.services_db_path) if p.exists()]
        if present and not yes:
            typer.confirm(f"replace {', '.join(present)} in {settings.data_dir}?", abort=True)
        restored = restore(folder, settings.data_dir)
    except BackupError as exc:
        console().print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    out().print(f"restored {', '.join(restored)} into {settings.data_dir}", highlight=False)


@app.command()
def version() -> None:
    """Print the version."""
    out().print(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
