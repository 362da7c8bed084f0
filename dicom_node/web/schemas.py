"""Request and response bodies of the JSON API (pydantic); the pages validate forms with them too.

Validators refuse bad values with a sentence that names the value (``dicom_node.values``: AE
titles by pynetdicom's rules). Sources, destinations and runtime settings are the application
layer's models (``dicom_node.app``), re-exported here.
"""
from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dicom_node.app import destinations as app_destinations
from dicom_node.app import settings as app_settings
from dicom_node.app import sources as app_sources
from dicom_node.routing.rules import Rule


class Token(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    role: str


class Message(BaseModel):
    detail: str


# --- studies --------------------------------------------------------------------------------------

class StudySummary(BaseModel):
    study_instance_uid: str
    status: str
    status_reason: str | None = None
    patient_name: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    study_date: str | None = Field(None, description="YYYY-MM-DD")
    study_description: str | None = None
    modalities: list[str] = []
    findings_count: int | None = None
    max_diameter_mm: float | None = None
    max_malignancy: float | None = Field(None, ge=0, le=1)
    received_at: datetime | None = None
    updated_at: datetime | None = None
    reviews: ReviewCounts | None = Field(None, description="readers' decisions on the findings of the latest results")


class StudyPage(BaseModel):
    items: list[StudySummary]
    total: int
    page: int
    page_size: int


class SeriesOut(BaseModel):
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    instance_count: int
    eligible: bool | None
    eligibility_reason: str | None
    is_result: bool
    route_summary: str | None = Field(None, description="the latest routing decision: what happens, and why")
    waiting_reason: str | None = Field(None, description="why a series not decided yet is waiting (an open "
                                       "association, its quiet period), times in UTC")


class ReviewCounts(BaseModel):
    findings: int
    accepted: int
    rejected: int
    pending: int


class ReviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["accepted", "rejected"] = Field(description="the reader's decision on the finding")
    comment: str | None = Field(None, max_length=2000, description="optional free text")


class ReviewOut(BaseModel):
    decision: str
    comment: str | None = None
    reviewer: str
    reviewed_at: datetime


class FindingOut(BaseModel):
    id: int
    number: int = Field(description="nodule number: SR tracking identifier 'Nodule <n>', the table and the images")
    segment_number: int | None = Field(None, description="its segment in the SEG (None: no mask)")
    job_id: int
    series_instance_uid: str
    center_mm: list[float] = Field(description="LPS (x, y, z) millimetres, rounded to 0.1 mm")
    location: str | None
    diameter_mm: float = Field(description="mm, rounded to 0.1 mm")
    volume_mm3: float = Field(description="mm3, rounded to 1 mm3")
    malignancy: float = Field(description="probability in [0, 1], two decimals")
    suspicion: str = Field(description="low, intermediate or high (cut-offs in dicom_node.presentation)")
    score: float = Field(description="detection score in [0, 1], two decimals")
    colour: str = Field(description="#rrggbb, the SEG segment's recommended display colour")
    image_url: str
    review: ReviewOut | None = None


class FindingExportRow(BaseModel):
    study_instance_uid: str
    series_instance_uid: str
    job_id: int
    finding_number: int
    center_x_mm: float
    center_y_mm: float
    center_z_mm: float
    diameter_mm: float
    volume_mm3: float
    malignancy: float
    suspicion: str
    score: float
    location: str | None
    review: str = Field(description="accepted, rejected or pending")
    review_comment: str | None
    reviewer: str | None
    reviewed_at: datetime | None


class ResultOut(BaseModel):
    id: int
    job_id: int
    kind: str
    sop_instance_uid: str
    series_instance_uid: str
    download_url: str


class JobOut(BaseModel):
    id: int
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    kind: str
    idempotency_key: str
    state: str
    attempts: int
    max_attempts: int
    error: str | None
    inference_seconds: float | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class TransferObjectOut(BaseModel):
    """The delivery status of one object of a transfer (``transfers.object_status``)."""

    sop_instance_uid: str
    kind: str | None = None  # "sr", "seg", "sc" or "original"
    state: str  # "pending", "sent" or "failed"
    reason: str | None = None
    sent_as: str | None = None  # the SOP Instance UID sent in its place (Comprehensive SR fallback)


class TransferOut(BaseModel):
    id: int
    job_id: int | None
    destination: str
    kind: str = Field("results", description='"results" (a job\'s SR/SEG/key images) or "originals" (forwarded)')
    priority: int = Field(0, description="higher first (urgent 10, routine 0)")
    state: str
    attempts: int
    next_attempt_at: datetime | None
    error: str | None
    objects: int
    sent_objects: int
    created_at: datetime | None
    sent_at: datetime | None
    object_status: list[TransferObjectOut] = []


class StudyDetail(StudySummary):
    series: list[SeriesOut]
    findings: list[FindingOut]
    results: list[ResultOut]
    jobs: list[JobOut]
    transfers: list[TransferOut]


# --- sources, destinations ---------------------------------------------------------------------

# The one model of each (``dicom_node.app``): the API, the admin pages and the CLI validate alike.
SourceIn, SourceOut = app_sources.SourceIn, app_sources.SourceOut
DestinationIn, DestinationOut = app_destinations.DestinationIn, app_destinations.DestinationOut


class EchoResult(BaseModel):
    ok: bool
    kind: str
    message: str


# --- queues, log --------------------------------------------------------------------------------

class ResendIn(BaseModel):
    destinations: list[str] | None = Field(None, description="destination names; default: every enabled one")


class AssociationOut(BaseModel):
    id: int
    started_at: datetime | None
    ended_at: datetime | None
    direction: str
    peer_host: str | None
    peer_port: int | None
    calling_ae: str | None
    called_ae: str | None
    result: str
    reason: str | None
    instances: int
    duration_s: float | None


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str | None
    detail: dict | None


class Page(BaseModel):
    total: int
    page: int
    page_size: int


class TransferPage(Page):
    items: list[TransferOut]


class JobPage(Page):
    items: list[JobOut]


class AssociationPage(Page):
    items: list[AssociationOut]


class AuditPage(Page):
    items: list[AuditOut]


# --- users, settings ----------------------------------------------------------------------------

class UserOut(BaseModel):
    username: str
    role: str
    created_at: datetime | None


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str
    role: Literal["admin", "radiologist", "sender"]
    password: str = Field(min_length=8)


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["admin", "radiologist", "sender"] | None = None
    password: str | None = Field(None, min_length=8)


RuntimeSettings = app_settings.RuntimeSettings


# --- routing rules ------------------------------------------------------------------------------

class RuleIn(Rule):
    """A routing rule as the configuration contract has it (``[[rules]]``), for the API."""

    position: int | None = Field(None, ge=1, description="1-based place in the evaluation order; default: last")


class RuleOut(Rule):
    id: int
    position: int


class RuleOrder(BaseModel):
    model_config = ConfigDict(extra="forbid")

    names: list[str] = Field(description="every rule's name, in the new evaluation order")


class DryRunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    study_instance_uid: str | None = Field(None, description="a stored study: decide each of its series")
    attributes: dict | None = Field(None, description='pasted facts, e.g. {"Modality": "CT", "calling_ae": "CT_A"}')
    rules: list[Rule] | None = Field(None, description="evaluate these instead of the stored rules (unsaved)")


class RuleResultOut(BaseModel):
    name: str
    matched: bool
    failed: list[str]
    passed: list[str]
    actions: list[str]
    destinations: list[str]


class DecisionOut(BaseModel):
    series_instance_uid: str | None = None
    modality: str | None = None
    series_number: int | None = None
    instance_count: int | None = None
    matched: list[str]
    default: bool
    actions: list[str]
    destinations: dict[str, list[str]] = Field(description="destination name -> outputs (sr, seg, sc, originals)")
    priority: int
    level: str
    quiet_seconds: float | None
    late_arrivals: str
    notes: list[str]
    summary: str
    facts: dict
    rules: list[RuleResultOut]


class DryRunOut(BaseModel):
    source: Literal["study", "attributes"]
    study_instance_uid: str | None = None
    rules: list[str] = Field(description="the rules evaluated, in order (\"default\" when none is stored)")
    series: list[DecisionOut]
