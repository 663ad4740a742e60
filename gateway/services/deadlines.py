"""Process control and retention: the services' periodic task.

Every `services.check_interval_s` it raises an alarm for each request past its deadline or
stalled in one state (each once: gateway/services/requests.py's `due_alarms`), pseudonymises
closed requests past `privacy.personal_data_retention`, deletes the access log's entries past
`privacy.access_log_retention`, and tells the refusals counted meanwhile. On start it first
hands on the service records an earlier run kept but did not forward.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from gateway.clock import ClockJump
from gateway.models import DeviceEvent
from gateway.services import access_log, requests, residents
from gateway.services.context import ServiceContext
from gateway.services.desk import DeskOutput
from gateway.settings import PrivacySettings

log = logging.getLogger(__name__)

DESK_DEVICE = "service-desk"


class Deadlines:
    def __init__(
        self,
        services: ServiceContext,
        deliver: Callable[[DeskOutput], Awaitable[None]],
        privacy: PrivacySettings | None = None,
        interval_s: float = 60.0,
    ) -> None:
        self._db = services.db
        self._catalogue = services.catalogue
        self._instruments = services.instruments
        self._refusals = services.refusals
        self._clock = services.clock
        self._jumps: deque[ClockJump] = deque()  # the clock's jumps whose deadlines are not moved yet
        self._clock.on_jump(self._jumps.append)
        self._deliver = deliver
        self._privacy = privacy or PrivacySettings()
        self._interval_s = interval_s

    async def run(self) -> None:
        await self._deliver(DeskOutput())  # what an earlier run kept: handed on by the relay
        while True:
            await asyncio.sleep(self._interval_s)
            self._clock.check()  # a jump since the last look moves the deadlines first
            await self.check(self._clock.now_ms())
            await self.keep_to_retention(self._clock.retention_ms())
            self._refusals.flush()

    async def check(self, now: int) -> DeskOutput:
        """Alarms for the requests that became overdue or stalled, delivered (after the
        deadlines of open requests moved with any jump of the clock since the last check)."""
        while self._jumps:
            jump = self._jumps.popleft()
            moved = await self._db.call(requests.shift_deadlines, jump.by_ms, jump.from_ms, jump.before_ms)
            if moved:
                log.info("moved %d deadlines of open requests with the clock's jump", moved)
        out = DeskOutput()
        for alarm_type, request, due_ms in await self._db.call(requests.due_alarms, self._catalogue, now):
            what = "is past its deadline" if alarm_type == "request_overdue" else "has not moved on"
            event = DeviceEvent(
                device_id=request["device_id"] or DESK_DEVICE,
                kind="service_request",
                ts_ms=due_ms,
                type=alarm_type,
                severity="warning",
                message=f"{request['id']} ({request['service_code']}) {what} ({request['state']})",
                data={
                    "service_request_id": request["id"],
                    "service_code": request["service_code"],
                    "state": request["state"],
                    "provider_id": request["provider_id"],
                    "expected_ms": request["expected_ms"],
                },
                source="service_desk",
                building=request["building"],
            )
            out.events.append(event)
            self._instruments.service_alarms.labels(type=alarm_type).inc()
        await self._deliver(out)
        return out

    async def keep_to_retention(self, now: int) -> None:
        """Pseudonymise what is past `privacy.personal_data_retention`, and delete the access
        log's entries past `privacy.access_log_retention`."""
        personal_ms = int(self._privacy.personal_data_retention.total_seconds() * 1000)
        done = await self._db.call(residents.pseudonymise_closed, now - personal_ms, now)
        if done:
            log.info("pseudonymised %d closed requests past privacy.personal_data_retention", done)
        keep_ms = int(self._privacy.access_log_retention.total_seconds() * 1000)
        await self._db.call(access_log.prune, now - keep_ms)
