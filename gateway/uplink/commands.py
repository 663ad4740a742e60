"""The district's commands, from `cgw/v1/down/{community}/cmd`, and the answers they get.

A command is a JSON object with an `id` (the district's, echoed in the answer) and an `action`:

- `ping`: the answer says the gateway's community, version and time;
- `transition`: a service request's lifecycle step (`service_request_id`, `to`, optionally
  `provider_id`, `note`, `merged_into`), recorded as done by `district`;
- `device_command`: a `payload` object forwarded to a device's `cmd` topic;
- `snapshot`: send the needs list and the evaluation now.

Every command gets one answer on `cgw/v1/up/{community}/reply`: `{"id", "action", "ok": true,
"result"}` or `{"id", "action", "ok": false, "error"}`. A bad command is answered with why and
changes nothing. Who may send commands is the district broker's ACL (docs/uplink.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from gateway import __version__
from gateway.registry import DeviceRegistry
from gateway.services.desk import ServiceDesk
from gateway.services.lifecycle import State, TransitionError
from gateway.services.store import DeskError
from gateway.uplink.items import public_request

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], None]


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)


class Ping(_Command):
    action: Literal["ping"]


class Transition(_Command):
    action: Literal["transition"]
    service_request_id: str = Field(min_length=1, max_length=64)
    to: State
    provider_id: str | None = Field(None, max_length=64)
    note: str = Field("", max_length=1000)
    merged_into: str | None = Field(None, max_length=64)


class DeviceCommand(_Command):
    action: Literal["device_command"]
    device_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    payload: dict[str, Any]


class Snapshot(_Command):
    action: Literal["snapshot"]


Command = Annotated[Ping | Transition | DeviceCommand | Snapshot, Field(discriminator="action")]
_COMMAND: TypeAdapter[Command] = TypeAdapter(Command)


class DistrictCommands:
    """Carries out one command at a time and says how it went."""

    def __init__(
        self,
        community: str,
        desk: ServiceDesk,
        registry: DeviceRegistry,
        publish: Publish,
        snapshot: Callable[[], Awaitable[int]],
    ) -> None:
        self._community = community
        self._desk = desk
        self._registry = registry
        self._publish = publish
        self._snapshot = snapshot

    async def handle(self, payload: bytes) -> dict[str, Any]:
        try:
            raw = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            return _refused(None, None, f"not JSON: {exc}")
        ident = raw.get("id") if isinstance(raw, dict) else None
        action = raw.get("action") if isinstance(raw, dict) else None
        try:
            command = _COMMAND.validate_python(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "command"
            return _refused(ident, action, f"{where}: {first['msg']}")
        try:
            result = await self._carry_out(command)
        except (DeskError, TransitionError, LookupError) as exc:
            return _refused(command.id, command.action, str(exc).strip("'\""))
        log.info("district command %s (%s) done", command.id, command.action)
        return {"id": command.id, "action": command.action, "ok": True, "result": result}

    async def _carry_out(self, command: Command) -> dict[str, Any]:
        if isinstance(command, Ping):
            return {"community": self._community, "version": __version__, "ts_ms": int(time.time() * 1000)}
        if isinstance(command, Transition):
            request = await self._desk.transition(
                command.service_request_id,
                command.to,
                "district",
                command.note,
                command.provider_id,
                command.merged_into,
            )
            return public_request(request)
        if isinstance(command, DeviceCommand):
            if self._registry.get(command.device_id) is None:
                raise LookupError(f"no device {command.device_id} in community {self._community}")
            self._publish(f"cgw/v1/{command.device_id}/cmd", orjson.dumps(command.payload))
            return {"device_id": command.device_id, "sent": True}
        return {"snapshots": await self._snapshot()}


def _refused(ident: Any, action: Any, error: str) -> dict[str, Any]:
    log.warning("district command %r (%r) refused: %s", ident, action, error)
    return {
        "id": ident if isinstance(ident, str) else None,
        "action": action if isinstance(action, str) else "unknown",
        "ok": False,
        "error": error,
    }


async def summaries(desk: ServiceDesk) -> list[tuple[str, dict[str, Any]]]:
    """The snapshots sent up: the ranked needs list (last 7 days) and 30 days of evaluation."""
    now = int(time.time() * 1000)
    needs = await desk.needs_list(7 * 86_400_000)
    start = now - 30 * 86_400_000
    evaluation = await desk.evaluations(start, now + 1, ("overall", "service", "provider"), "all")
    return [
        ("needs", {"key": f"needs:{now}", "ts_ms": now, "window_days": 7, "needs": needs}),
        (
            "evaluation",
            {"key": f"evaluation:{now}", "ts_ms": now, "start_ms": start, "end_ms": now, **evaluation},
        ),
    ]
