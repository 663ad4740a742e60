"""The district's commands, from `cgw/v1/down/{community}/cmd`, and the answers they get.

Off unless the installer sets `uplink.commands`, and refused over plain MQTT unless they also set
`uplink.commands_over_plain_mqtt` (gateway/settings.py). A command is a JSON object with an `id`
(the district's, echoed in the answer), an `expires_ms` (epoch ms; at most
`uplink.command_lifetime` ahead) and an `action`:

- `ping`: the answer says the gateway's community, version and time;
- `transition`: a service request's lifecycle step (`service_request_id`, `to`, optionally
  `provider_id`, `note`, `merged_into`), recorded as done by `district`;
- `device_command`: `command` (one the device's profile lists under `commands`) and `args`
  (an object), sent to the device's `cmd` topic as `{"id", "command", "args", "expires_ms"}`;
- `snapshot`: send the needs list and the evaluation now.

Every command gets one answer on `cgw/v1/up/{community}/reply`: `{"id", "action", "ok": true,
"result"}` or `{"id", "action", "ok": false, "error"}`. A bad or expired command is answered
with why and changes nothing. A command is carried out once: a repeated id gets the first answer
again, with `"duplicate": true` (gateway/store/commands.py). Each command, carried out or
refused, is an event of source `district` (type `district_command`) in the local store, on the
live stream, in `GET /api/v1/events?source=district` and on the uplink's `commands` stream. Who
may send commands is the district broker's ACL (docs/uplink.md).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from gateway import __version__, privacy
from gateway.clock import ClockWatch, now_ms
from gateway.models import DISTRICT, DeviceEvent
from gateway.profiles import ProfileSet
from gateway.registry import DeviceRegistry
from gateway.services import ratings, requests
from gateway.services.actions import Actions
from gateway.services.catalogue import Catalogue
from gateway.services.evaluation import SPAN_MS
from gateway.services.lifecycle import State, TransitionError
from gateway.services.needs import RECENT_MS
from gateway.services.refusals import DeskError
from gateway.services.requests import Move
from gateway.sqlite import SqliteThread
from gateway.store import commands as ledger
from gateway.store.writer import StoreWriter
from gateway.text import clean

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], None]
Record = Callable[[DeviceEvent], Awaitable[None]]
MAX_ARGS_BYTES = 4096  # a device's command is a setting or two, not a firmware image
COMMAND_EVENT = "district_command"


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    expires_ms: int = Field(gt=0)


class Ping(_Command):
    action: Literal["ping"]


class Transition(_Command):
    action: Literal["transition"]
    service_request_id: str = Field(min_length=1, max_length=64)
    to: State
    provider_id: str | None = Field(None, max_length=64)
    note: Annotated[str, AfterValidator(clean)] = Field("", max_length=1000)
    merged_into: str | None = Field(None, max_length=64)


class DeviceCommand(_Command):
    action: Literal["device_command"]
    device_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    command: str = Field(pattern=r"^[a-z0-9_]{1,64}$")
    args: dict[str, Any] = Field(default_factory=dict)


class Snapshot(_Command):
    action: Literal["snapshot"]


Command = Annotated[Ping | Transition | DeviceCommand | Snapshot, Field(discriminator="action")]
_COMMAND: TypeAdapter[Command] = TypeAdapter(Command)


class Refused(Exception):
    """The command is not carried out; the message says why."""


class DistrictCommands:
    """Carries out one command at a time, once, says how it went and records it."""

    def __init__(
        self,
        community: str,
        actions: Actions,
        registry: DeviceRegistry,
        profiles: ProfileSet,
        publish: Publish,
        snapshot: Callable[[], Awaitable[int]],
        store: StoreWriter,
        record: Record,
        lifetime_ms: int,
        clock: ClockWatch | None = None,
    ) -> None:
        self._community = community
        self._actions = actions
        self._registry = registry
        self._profiles = profiles
        self._publish = publish
        self._snapshot = snapshot
        self._store = store
        self._record = record
        self._lifetime_ms = lifetime_ms
        self._last_event_ms = 0
        self._clock = clock or ClockWatch()

    async def handle(self, payload: bytes) -> dict[str, Any]:
        now = self._clock.now_ms()
        try:
            raw = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raw = None
            reply = _refused(None, None, f"not JSON: {exc}")
        else:
            reply = await self._answer(raw, now)
        target = raw.get("device_id") if isinstance(raw, dict) else None
        await self._record(self._event(reply, target if isinstance(target, str) else None, now))
        return reply

    async def _answer(self, raw: Any, now: int) -> dict[str, Any]:
        ident = raw.get("id") if isinstance(raw, dict) else None
        action = raw.get("action") if isinstance(raw, dict) else None
        try:
            command = _COMMAND.validate_python(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "command"
            return _refused(ident, action, f"{where}: {first['msg']}")
        try:
            self._check_expiry(command, now)
            if isinstance(command, DeviceCommand):
                self._check_allowed(command)
        except Refused as exc:
            return _refused(command.id, command.action, str(exc))
        earlier = await self._store.call(ledger.claim, command.id, command.action, now, command.expires_ms)
        if earlier is not None:
            log.info("district command %s (%s) repeated: not carried out again", command.id, command.action)
            unknown = "outcome unknown: the gateway stopped while carrying it out; not carried out again"
            return {**(earlier or _refused(command.id, command.action, unknown)), "duplicate": True}
        try:
            reply = {
                "id": command.id,
                "action": command.action,
                "ok": True,
                "result": await self._carry_out(command),
            }
            log.info("district command %s (%s) done", command.id, command.action)
        except (DeskError, TransitionError, LookupError, RuntimeError) as exc:
            reply = _refused(command.id, command.action, str(exc).strip("'\""))
        await self._store.call(ledger.settle, command.id, reply)
        await self._store.call(ledger.forget, self._clock.retention_ms() - self._lifetime_ms)
        return reply

    def _check_expiry(self, command: Command, now: int) -> None:
        if command.expires_ms <= now:
            raise Refused(f"expired {now - command.expires_ms} ms ago (expires_ms {command.expires_ms})")
        # While the gateway's clock is not set its time is behind (gateway/clock.py): a command
        # ahead of it is more likely right than too far ahead.
        if command.expires_ms > now + self._lifetime_ms and self._clock.is_set:
            raise Refused(
                f"expires_ms is more than {self._lifetime_ms // 1000} s ahead "
                "(uplink.command_lifetime on the gateway)"
            )

    def _check_allowed(self, command: DeviceCommand) -> None:
        device = self._registry.get(command.device_id)
        if device is None:
            raise Refused(f"no device {command.device_id} in community {self._community}")
        profile = self._profiles.get(device.kind)
        allowed = profile.commands if profile is not None else {}
        if command.command not in allowed:
            names = ", ".join(sorted(allowed)) or "none"
            raise Refused(
                f"command {command.command!r} is not one that profile {device.kind} allows (allowed: {names})"
            )
        if len(orjson.dumps(command.args)) > MAX_ARGS_BYTES:
            raise Refused(f"args longer than {MAX_ARGS_BYTES} bytes")

    async def _carry_out(self, command: Command) -> dict[str, Any]:
        if isinstance(command, Ping):
            return {"community": self._community, "version": __version__, "ts_ms": self._clock.now_ms()}
        if isinstance(command, Transition):
            request = await self._actions.transition(
                Move(
                    command.service_request_id,
                    command.to,
                    DISTRICT,
                    command.note,
                    command.provider_id,
                    command.merged_into,
                )
            )
            return privacy.uplink_request(request)
        if isinstance(command, DeviceCommand):
            message = {
                "id": command.id,
                "command": command.command,
                "args": command.args,
                "expires_ms": command.expires_ms,
            }
            self._publish(f"cgw/v1/{command.device_id}/cmd", orjson.dumps(message))
            return {"device_id": command.device_id, "command": command.command, "sent": True}
        return {"snapshots": await self._snapshot()}

    def _event(self, reply: dict[str, Any], target: str | None, now: int) -> DeviceEvent:
        """The command as an event: on the device it was for, or on the district's own name."""
        # One event per command, and an event's id is made of its time: never two in one ms.
        ts = self._last_event_ms = max(now, self._last_event_ms + 1)
        device = self._registry.get(target) if target else None
        ok = bool(reply.get("ok"))
        outcome = "done" if ok else f"refused: {reply.get('error')}"
        if reply.get("duplicate"):
            outcome = "repeated, not carried out again"
        return DeviceEvent(
            device_id=device.device_id if device is not None else DISTRICT,
            kind=device.kind if device is not None else DISTRICT,
            ts_ms=ts,
            type=COMMAND_EVENT,
            severity="info",
            message=f"district command {reply.get('id')} ({reply.get('action')}) {outcome}"[:500],
            data={**{k: v for k, v in reply.items() if k != "result"}, "device_id": target},
            source=DISTRICT,
            building=device.building if device is not None else None,
        )


def _refused(ident: Any, action: Any, error: str) -> dict[str, Any]:
    log.warning("district command %r (%r) refused: %s", ident, action, error)
    return {
        "id": ident if isinstance(ident, str) else None,
        "action": action if isinstance(action, str) else "unknown",
        "ok": False,
        "error": error,
    }


async def summaries(services: SqliteThread, catalogue: Catalogue) -> list[tuple[str, dict[str, Any]]]:
    """The snapshots sent up: the ranked needs list (last 7 days) and 30 days of evaluation."""
    now = now_ms()
    needs = await services.call(requests.needs_list, catalogue, now, RECENT_MS)
    start = now - SPAN_MS
    evaluation = await services.call(
        ratings.evaluations, start, now + 1, ("overall", "service", "provider"), "all"
    )
    return [
        ("needs", {"key": f"needs:{now}", "ts_ms": now, "window_days": 7, "needs": needs}),
        (
            "evaluation",
            {"key": f"evaluation:{now}", "ts_ms": now, "start_ms": start, "end_ms": now, **evaluation},
        ),
    ]
