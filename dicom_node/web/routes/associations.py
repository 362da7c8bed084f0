"""The association log (accepted, rejected and aborted, with reasons) and the audit trail."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from dicom_node.web import schemas, services
from dicom_node.web.deps import DB, AdminUser, PageNumber

router = APIRouter(prefix="/api", tags=["logs"])


@router.get("/associations", response_model=schemas.AssociationPage, summary="Association log, newest first")
def list_associations(s: DB, user: AdminUser,
                      result: Annotated[str | None, Query(description="accepted, rejected, aborted")] = None,
                      page: PageNumber = 1,
                      page_size: Annotated[int, Query(ge=1, le=services.MAX_PAGE_SIZE)] = 50) -> schemas.AssociationPage:
    rows, total = services.list_associations(s, result, page, page_size)
    return schemas.AssociationPage(items=[services.association_out(a) for a in rows], total=total, page=page,
                                   page_size=page_size)


@router.get("/audit", response_model=schemas.AuditPage, summary="Audit trail of admin changes, newest first")
def list_audit(s: DB, user: AdminUser, page: PageNumber = 1,
               page_size: Annotated[int, Query(ge=1, le=services.MAX_PAGE_SIZE)] = 50) -> schemas.AuditPage:
    rows, total = services.list_audit(s, page, page_size)
    return schemas.AuditPage(items=[services.audit_out(a) for a in rows], total=total, page=page, page_size=page_size)
