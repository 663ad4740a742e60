"""Every request and response model of the API, in one place: they are the OpenAPI document's
schemas, so a model's class name is its component name and must be unique here (the Open311
request is `Open311RequestOut`, the operators' `RequestOut`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from gateway.care.checks import Outcome
from gateway.care.households import Purpose
from gateway.care.visits import Kind
from gateway.models import Severity, Source
from gateway.services.evaluation import By, Period
from gateway.services.intake import Choice
from gateway.services.lifecycle import Open311Status, State
from gateway.text import clean

# What people type: control characters replaced, so every output (XML, CSV, JSON) carries it.
Text = Annotated[str, AfterValidator(clean)]


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong, in one sentence")


# OpenAPI responses shared by the routes: refusals by the token check (gateway/api/auth.py).
AUTH: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing, unknown or expired token"},
    403: {"model": ErrorBody, "description": "The token's role may not do this"},
}
TOO_MANY: dict[int | str, dict[str, Any]] = {
    429: {
        "model": ErrorBody,
        "description": "Too many writes with this token; Retry-After says when to retry",
    }
}


class Health(BaseModel):
    status: Literal["ok"]


class Check(BaseModel):
    ok: bool
    detail: str | None = Field(None, description="What it talks to and why not: only with a token")


class Ready(BaseModel):
    ready: bool
    checks: dict[str, Check]


class DeviceOut(BaseModel):
    device_id: str
    kind: str
    source: Source
    building: str | None
    floor: int | None
    unit: str | None
    fw: str | None
    battery: float | None
    rssi: float | None
    online: bool
    first_seen_ms: int | None
    last_seen_ms: int | None
    presence_ms: int | None = Field(description="When presence last changed (epoch ms)")
    last_ts_ms: int | None = Field(description="Time of the newest reading (epoch ms)")
    last_seq: int | None
    last_values: dict[str, float]
    active_alarms: list[str] = Field(default_factory=list, description="Alarm rules raised now")


class DeviceList(BaseModel):
    total: int
    online: int
    items: list[DeviceOut]


class RawPoint(BaseModel):
    ts_ms: int
    value: float
    seq: int | None


class AggregatePoint(BaseModel):
    ts_ms: int = Field(description="Start of the bucket (epoch ms)")
    avg: float
    min: float
    max: float
    count: int


class Telemetry(BaseModel):
    device_id: str
    start_ms: int
    end_ms: int
    step_ms: int | None = Field(description="Bucket width; null for raw points")
    source: Literal["raw", "rollup_1m+raw"] = Field(
        description="raw: raw telemetry only; rollup_1m+raw: minute roll-ups before raw retention"
    )
    truncated: bool = Field(description="True when a series hit the point limit")
    series: dict[str, list[AggregatePoint] | list[RawPoint]]


class EventOut(BaseModel):
    id: int
    ts_ms: int
    device_id: str
    kind: str
    building: str | None
    type: str
    severity: Severity
    source: str
    message: str
    data: dict[str, Any]
    alarm: bool
    acked: bool
    acked_ms: int | None = None
    acked_by: str | None = None
    ack_note: str | None = None


class EventList(BaseModel):
    items: list[EventOut]


class AckIn(BaseModel):
    note: Text = Field("", max_length=1000, description="Why, or what was done")


class DeadLetterOut(BaseModel):
    id: int
    received_ms: int
    topic: str
    device_id: str | None
    channel: str | None
    reason_code: str
    reason: str
    payload: str = Field(
        description="What is kept of the refused payload: redacted of personal data, at most 256 bytes"
        " (docs/privacy.md; invalid UTF-8 replaced)"
    )
    payload_bytes: int = Field(description="Bytes kept (at most 256; an oversize reason names the size sent)")


class DeadLetterList(BaseModel):
    items: list[DeadLetterOut]


class MetricOut(BaseModel):
    unit: str
    type: Literal["gauge", "counter"]
    min: float | None
    max: float | None
    description: str = ""


class ProfileOut(BaseModel):
    kind: str
    description: str
    heartbeat_timeout_s: float
    strict: bool
    metrics: dict[str, MetricOut]
    rules: list[dict[str, Any]]
    commands: dict[str, str] = Field(description="what the district may ask devices of this kind to do")


class Summary(BaseModel):
    community: str
    devices: int
    online: int
    by_kind: dict[str, dict[str, int]]
    by_building: dict[str, dict[str, int]]
    open_alarms: int
    stream_subscribers: int


# The access log of personal-data reads (routes/access.py)


class AccessOut(BaseModel):
    id: int
    ts_ms: int
    who: str = Field(
        description="The token's name (cgw token --name), else the first 8 hex digits of its digest"
    )
    role: str
    token_id: str
    endpoint: str = Field(description='The route read, e.g. "GET /api/v1/requests/{ticket}"')
    records: list[str] = Field(description="The tickets (or households) whose personal data was read")
    count: int


class AccessList(BaseModel):
    items: list[AccessOut]


# Evaluation (routes/evaluation.py)


class Figures(BaseModel):
    key: str = Field(description="The service code, group or provider id (or 'all')")
    period_start_ms: int
    period_end_ms: int
    requests: int
    valid: int = Field(description="Requests not rejected and not merged as duplicates")
    completed: int
    completion_rate: float | None
    on_time: int
    on_time_rate: float | None
    ratings: int
    satisfaction_mean: float | None
    satisfaction_rate: float | None = Field(description="Share of ratings of 4 and 5")
    complaints: int
    complaints_resolved: int
    complaint_resolution_rate: float | None
    median_hours_to_complete: float | None
    p90_hours_to_complete: float | None
    assessments: int
    assessment_mean: float | None


class Evaluation(BaseModel):
    start_ms: int
    end_ms: int
    by: By
    period: Period
    rows: list[Figures]


# Needs and plans (routes/needs.py)


class Hotspot(BaseModel):
    service_group: str
    building: str | None
    count: int
    expected: float
    ratio: float
    p_value: float
    score: float
    sources: dict[str, int]
    services: dict[str, int]
    peak_start_ms: int
    peak_count: int
    why: str = Field(description="Why this cell is a hotspot, in words")


class Hotspots(BaseModel):
    window_start_ms: int
    window_end_ms: int
    baseline_start_ms: int
    method: str
    items: list[Hotspot]


class Heatmap(BaseModel):
    start_ms: int
    end_ms: int
    buildings: dict[str, dict[str, int]] = Field(description="building → service group → need signals")


class Need(BaseModel):
    rank: int
    need_id: str
    service_code: str
    service_group: str
    building: str | None
    requests: list[str]
    households: int
    sensor_signals: int
    oldest_ms: int
    overdue: int
    priority: int
    score: float
    why: str


class NeedsList(BaseModel):
    items: list[Need]


class ProposalIn(BaseModel):
    title: Text = Field(min_length=1, max_length=200)
    description: Text = Field("", max_length=4000)
    need_ids: list[Annotated[str, Field(max_length=200)]] = Field(default_factory=list, max_length=100)
    closes: datetime | None = Field(None, description="When voting closes (optional)")


class Proposal(BaseModel):
    id: str
    title: str
    description: str
    needs: list[str]
    created_ms: int
    created_by: str
    closes_ms: int | None
    closed_ms: int | None
    filed_ms: int | None
    open: bool
    votes: dict[str, int]
    households_voted: int
    result: Literal["open", "passed", "rejected"]
    approval: float | None


class ProposalList(BaseModel):
    items: list[Proposal]


class VoteIn(BaseModel):
    building: str = Field(min_length=1, max_length=32)
    unit: str = Field(min_length=1, max_length=32)
    choice: Choice
    vote_id: str | None = Field(None, max_length=128, description="The terminal's id for this vote")
    pin: str | None = Field(None, max_length=64, description="The household's PIN (household register)")
    card: str | None = Field(None, max_length=64, description="Or the household's card number")


class VoteResult(BaseModel):
    status: Literal["accepted", "duplicate"]
    proposal: Proposal


class CloseIn(BaseModel):
    file: bool = Field(False, description="Also file it in the plan for the street office")


# Service requests (routes/requests.py)


class RequestOut(BaseModel):
    id: str
    service_code: str
    service_group: str
    state: State
    status: str = Field(description="Open311 status: open or closed")
    source: str
    device_id: str | None
    description: str
    building: str | None
    floor: int | None
    unit: str | None
    household: str | None
    address: str | None
    address_id: str | None
    lat: float | None
    long: float | None
    media_url: str | None
    attributes: dict[str, Any]
    requested_ms: int
    updated_ms: int
    expected_ms: int
    state_since_ms: int
    provider_id: str | None
    status_notes: str | None
    merged_into: str | None
    completed_ms: int | None
    overdue: bool


class StepOut(BaseModel):
    ts_ms: int
    from_state: str | None
    to_state: str
    actor: str
    note: str
    provider_id: str | None


class RatingOut(BaseModel):
    ts_ms: int
    score: int
    comment: str
    rater: str


class RequestDetail(RequestOut):
    history: list[StepOut]
    rating: RatingOut | None


class RequestList(BaseModel):
    items: list[RequestOut]


class TransitionIn(BaseModel):
    to: State = Field(description="The lifecycle stage to move to")
    note: Text = Field("", max_length=2000, description="Why (kept in the audit trail and as status_notes)")
    provider_id: str | None = Field(None, max_length=64, description="When assigning: who delivers")
    merged_into: str | None = Field(
        None, max_length=128, description="When merging: the request it duplicates"
    )
    ts: datetime | None = Field(None, description="When it happened, if not now (recording past work)")


class RatingIn(BaseModel):
    score: int = Field(ge=1, le=5)
    comment: Text = Field("", max_length=2000)
    ts: datetime | None = None
    rating_code: str | None = Field(
        None,
        max_length=32,
        description="The request's rating code (the kiosk's receipt); not needed by the token that filed it",
    )


class RatingResult(BaseModel):
    status: str = Field(description="accepted, or duplicate (the first rating stands)")
    request: RequestOut


class AssessmentIn(BaseModel):
    provider_id: str = Field(max_length=64)
    score: int = Field(ge=1, le=5)
    assessor: Text = Field(min_length=1, max_length=200, description="Who assessed (a third party)")
    comment: Text = Field("", max_length=2000)
    service_code: str | None = Field(None, max_length=128)
    service_request_id: str | None = Field(None, max_length=128)
    ts: datetime | None = None


class AssessmentOut(BaseModel):
    id: int
    ts_ms: int
    assessor: str
    provider_id: str
    service_code: str | None
    service_request_id: str | None
    score: int
    comment: str


class ProviderOut(BaseModel):
    id: str
    name_zh: str
    name_en: str
    type: str
    services: list[str]
    workload: dict[str, int] = Field(description="Active requests by stage, plus active and overdue totals")


# Open311 GeoReport v2 (routes/open311.py): the spec's field names


class Open311Error(BaseModel):
    code: int
    description: str


class ServiceOut(BaseModel):
    service_code: str
    service_name: str
    description: str
    metadata: bool
    type: Literal["realtime", "batch", "blackbox"]
    keywords: str
    group: str


class ValueOut(BaseModel):
    key: str
    name: str


class AttributeOut(BaseModel):
    variable: bool
    code: str
    datatype: str
    required: bool
    datatype_description: str | None
    order: int
    description: str
    values: list[ValueOut]


class DefinitionOut(BaseModel):
    service_code: str
    attributes: list[AttributeOut]


class Open311RequestOut(BaseModel):
    service_request_id: str
    status: Open311Status
    status_notes: str | None
    service_name: str
    service_code: str
    description: str
    agency_responsible: str | None
    service_notice: str | None
    requested_datetime: str
    updated_datetime: str
    expected_datetime: str | None
    address: str | None
    address_id: str | None
    zipcode: str | None
    lat: float | None
    long: float | None
    media_url: str | None
    extended_attributes: dict[str, Any] | None = Field(
        None, description="The gateway's lifecycle (extension; with extensions=true)"
    )


class PostedOut(BaseModel):
    service_request_id: str
    service_notice: str | None
    account_id: str | None


class TokenOut(BaseModel):
    service_request_id: str | None
    token: str


class DiscoveryEndpoint(BaseModel):
    specification: str
    url: str
    changeset: str
    type: str
    formats: list[str]


class DiscoveryOut(BaseModel):
    changeset: str
    contact: str
    key_service: str
    endpoints: list[DiscoveryEndpoint]


# Precision care (routes/care.py)


class CareGridOut(BaseModel):
    id: str
    name: str
    buildings: list[str]
    workers: list[str]


class CareGridList(BaseModel):
    items: list[CareGridOut]


class CareNeedsIn(BaseModel):
    elderly: bool = False
    living_alone: bool = False
    mobility: bool = False
    chronic_illness: bool = False
    disability: bool = False
    infants: bool = False


class CareConsentIn(BaseModel):
    purpose: Purpose
    granted: bool


class CareVisitIn(BaseModel):
    id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$", description="The phone's own id for this visit")
    building: str = Field(min_length=1, max_length=32)
    unit: str = Field(min_length=1, max_length=32)
    kind: Kind = "visit"
    at: datetime = Field(description="When the visit took place (the phone's time)")
    note: Text = Field("", max_length=2000)
    answers: dict[str, Annotated[str, Field(max_length=500)]] = Field(default_factory=dict, max_length=50)
    needs: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=20, description="Service codes of the catalogue"
    )


class CareVisitBatch(BaseModel):
    visits: list[CareVisitIn] = Field(min_length=1, max_length=200)


class CareVisitResult(BaseModel):
    id: str
    status: Literal["accepted", "duplicate", "refused"]
    error: str | None = None


class CareVisitResults(BaseModel):
    items: list[CareVisitResult]


class CheckAckIn(BaseModel):
    at: datetime | None = Field(
        None, description="When it was acknowledged (the phone's time); now if absent"
    )


class CheckCloseIn(BaseModel):
    outcome: Outcome
    note: Text = Field("", max_length=2000)
    at: datetime | None = None


class CareCheckinIn(BaseModel):
    building: str = Field(min_length=1, max_length=32)
    unit: str = Field(min_length=1, max_length=32)
    at: datetime | None = None
