"""The transfer queue: results waiting for, or failed on the way to, a destination."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from dicom_node.web import schemas, services
from dicom_node.web.deps import DB, AdminUser, PageNumber, RowId

router = APIRouter(prefix="/api/transfers", tags=["queues"])


@router.get("", response_model=schemas.TransferPage, summary="List transfers, newest first")
def list_transfers(s: DB, user: AdminUser,
                   state: Annotated[str | None, Query(description="pending, sending, sent, failed, cancelled")] = None,
                   page: PageNumber = 1,
                   page_size: Annotated[int, Query(ge=1, le=services.MAX_PAGE_SIZE)] = 50) -> schemas.TransferPage:
    rows, total = services.list_transfers(s, state, page, page_size)
    return schemas.TransferPage(items=[services.transfer_out(t, n) for t, n in rows], total=total, page=page,
                                page_size=page_size)


def _one(s, transfer_id: int) -> schemas.TransferOut:
    from storage.models import Destination, Transfer

    t = s.get(Transfer, transfer_id)
    return services.transfer_out(t, s.get(Destination, t.destination_id).name)


@router.post("/{transfer_id}/retry", response_model=schemas.TransferOut, summary="Retry a failed or cancelled transfer now")
def retry(transfer_id: RowId, s: DB, user: AdminUser) -> schemas.TransferOut:
    services.retry_transfer(s, user.username, transfer_id)
    s.commit()
    return _one(s, transfer_id)


@router.post("/{transfer_id}/cancel", response_model=schemas.TransferOut, summary="Cancel a pending or failed transfer")
def cancel(transfer_id: RowId, s: DB, user: AdminUser) -> schemas.TransferOut:
    services.cancel_transfer(s, user.username, transfer_id)
    s.commit()
    return _one(s, transfer_id)
