"""Storage usage: ``GET /api/storage`` (JSON) and the admin page ``/admin/storage`` (admin role).

Both show the same figures (``dicom_node.retention.storage_usage``): studies, instances and
indexed bytes, the data folder's disk (total, used, free, in bytes and percent), the largest
studies, the ``[retention]`` policy and what a retention pass would delete next. Study UIDs
only, no patient data.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from dicom_node.retention import Policy, storage_usage
from dicom_node.web.deps import AdminUser, NodeDep, PageAdmin
from dicom_node.web.templating import render

router = APIRouter(tags=["operations"])


class DiskOut(BaseModel):
    path: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    free_percent: float


class RetentionCandidateOut(BaseModel):
    study_instance_uid: str
    reason: str  # "age" or "disk"
    instances: int
    bytes: int
    last_received_at: str
    age_days: float


class RetentionOut(BaseModel):
    enabled: bool
    max_age_days: float
    min_free_disk_percent: float
    interval_seconds: float
    paused_by_backup: bool
    protected_studies: int
    next: list[RetentionCandidateOut]
    next_total: int
    next_bytes: int


class StudyStorageOut(BaseModel):
    study_instance_uid: str
    status: str
    instances: int
    bytes: int
    last_received_at: str
    age_days: float
    protected: str | None  # why retention keeps it (pending work), or null


class StorageOut(BaseModel):
    studies: int
    instances: int
    instance_bytes: int
    disk: DiskOut
    retention: RetentionOut
    largest: list[StudyStorageOut]


def _usage(node, limit: int) -> dict:
    return storage_usage(node, Policy.from_settings(node.settings.retention), limit=limit)


@router.get("/api/storage", response_model=StorageOut,
            summary="Storage usage: bytes per study, totals, free disk, and what retention would delete next")
def get_storage(node: NodeDep, user: AdminUser,
                limit: Annotated[int, Query(ge=1, le=500, description="studies listed per section")] = 20) -> dict:
    return _usage(node, limit)


@router.get("/admin/storage", include_in_schema=False)
def storage_page(request: Request, node: NodeDep, user: PageAdmin):
    return render(request, "admin/storage.html", {"user": user, "nav": "storage", "title": "Storage",
                                                  "usage": _usage(node, 50)})
