"""The service catalogue: what residents can ask for, who delivers it and how fast (YAML data).

Each service is an Open311 GeoReport v2 service definition (code, name, group, keywords,
attributes) plus the gateway's own fields: a deadline target, a stall limit, the providers able
to deliver it, and the sensor events that open a request without anyone filing it.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.datafiles import DataFileError, load_model
from gateway.durations import Duration

BUILTIN = Path(__file__).parent / "data" / "catalogue.yaml"
SERVICE_CODE = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)*")


class CatalogueError(Exception):
    """The catalogue file is wrong; the message names the file and, where known, the line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Group(_Strict):
    name_zh: str
    name_en: str
    priority: int = Field(ge=1, le=5, description="planning weight: 1 low … 5 life and safety")


class Provider(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    name_zh: str
    name_en: str
    type: Literal["property", "contractor", "social_org", "volunteer", "public"]


class AttributeValue(_Strict):
    key: str
    name: str


class Attribute(_Strict):
    """An Open311 service attribute: extra information a request must (or may) carry."""

    code: str = Field(pattern=r"^[A-Za-z0-9_]{1,64}$")
    datatype: Literal["string", "number", "datetime", "text", "singlevaluelist", "multivaluelist"]
    required: bool = False
    description: str
    datatype_description: str = ""
    values: tuple[AttributeValue, ...] = ()

    @model_validator(mode="after")
    def _values(self) -> Attribute:
        listed = self.datatype in ("singlevaluelist", "multivaluelist")
        if listed and not self.values:
            raise ValueError(f"attribute {self.code!r} is a {self.datatype} and needs values")
        if not listed and self.values:
            raise ValueError(f"attribute {self.code!r} is a {self.datatype}: values are not allowed")
        return self


class Trigger(_Strict):
    """A device event that is evidence of this need; `open_request` makes it file a request."""

    kind: str
    event: str
    open_request: bool = False


class Service(_Strict):
    service_code: str
    name_zh: str
    name_en: str
    group: str
    description: str
    keywords: tuple[str, ...] = ()
    deadline: Duration
    stall_after: Duration | None = None
    providers: tuple[str, ...] = Field(min_length=1)
    attributes: tuple[Attribute, ...] = ()
    triggers: tuple[Trigger, ...] = ()

    @model_validator(mode="after")
    def _shape(self) -> Service:
        if SERVICE_CODE.fullmatch(self.service_code) is None:
            raise ValueError(f"service_code {self.service_code!r} must be lower-case words joined by dots")
        if self.deadline <= timedelta(0):
            raise ValueError("deadline must be positive")
        codes = [a.code for a in self.attributes]
        if len(set(codes)) != len(codes):
            raise ValueError("attribute codes must be unique")
        return self

    @property
    def deadline_ms(self) -> int:
        return int(self.deadline.total_seconds() * 1000)

    def name(self, lang: str = "zh") -> str:
        return self.name_en if lang == "en" else self.name_zh


class _File(_Strict):
    groups: dict[str, Group]
    providers: tuple[Provider, ...]
    services: tuple[Service, ...]

    @model_validator(mode="after")
    def _references(self) -> _File:
        provider_ids = {p.id for p in self.providers}
        if len(provider_ids) != len(self.providers):
            raise ValueError("provider ids must be unique")
        seen: set[str] = set()
        for i, service in enumerate(self.services):
            if service.service_code in seen:
                raise ValueError(f"services.{i}: service_code {service.service_code!r} is listed twice")
            seen.add(service.service_code)
            if service.group not in self.groups:
                raise ValueError(f"services.{i}: group {service.group!r} is not one of the groups")
            for provider in service.providers:
                if provider not in provider_ids:
                    raise ValueError(f"services.{i}: provider {provider!r} is not one of the providers")
        return self


class Catalogue:
    """The loaded catalogue, with the lookups the service desk needs."""

    def __init__(self, data: _File, default_stall: timedelta) -> None:
        self.groups = data.groups
        self.providers = {p.id: p for p in data.providers}
        self.services = {s.service_code: s for s in data.services}
        self._default_stall = default_stall
        self._triggers: dict[tuple[str, str], tuple[Service, bool]] = {}
        for service in data.services:
            for trigger in service.triggers:
                self._triggers[(trigger.kind, trigger.event)] = (service, trigger.open_request)

    def get(self, service_code: str) -> Service | None:
        return self.services.get(service_code)

    def trigger(self, kind: str, event_type: str) -> tuple[Service, bool] | None:
        """The service a device event is evidence for, and whether it opens a request."""
        return self._triggers.get((kind, event_type))

    def stall_ms(self, service: Service) -> int:
        return int((service.stall_after or self._default_stall).total_seconds() * 1000)

    def priority(self, service: Service) -> int:
        return self.groups[service.group].priority

    def describe_service(self, service: Service) -> dict[str, Any]:
        return {
            "service_code": service.service_code,
            "name_zh": service.name_zh,
            "name_en": service.name_en,
            "group": service.group,
            "description": service.description,
            "keywords": list(service.keywords),
            "deadline_s": service.deadline.total_seconds(),
            "stall_after_s": self.stall_ms(service) / 1000,
            "providers": list(service.providers),
            "attributes": [a.model_dump() for a in service.attributes],
            "triggers": [t.model_dump() for t in service.triggers],
        }


def load_catalogue(path: Path | None = None, default_stall: timedelta = timedelta(hours=48)) -> Catalogue:
    """The built-in catalogue, or the installer's file when `path` is given."""
    try:
        data = load_model(path or BUILTIN, _File, "the catalogue")
    except DataFileError as exc:
        raise CatalogueError(str(exc)) from exc
    return Catalogue(data, default_stall)
