"""Sources: calling AE titles allowed to send (the listener reads them on every association)."""
from __future__ import annotations

from fastapi import APIRouter, status

from dicom_node.web import schemas, services
from dicom_node.web.deps import DB, AdminUser

router = APIRouter(prefix="/api/sources", tags=["sources"])


@router.get("", response_model=list[schemas.SourceOut], summary="List sources")
def list_sources(s: DB, user: AdminUser) -> list[schemas.SourceOut]:
    return [services.source_out(r) for r in services.list_sources(s)]


@router.post("", response_model=schemas.SourceOut, status_code=status.HTTP_201_CREATED,
             summary="Add a source (accepted by the listener at once)")
def add_source(body: schemas.SourceIn, s: DB, user: AdminUser) -> schemas.SourceOut:
    row = services.add_source(s, user.username, body)
    s.commit()
    return services.source_out(row)


@router.put("/{ae_title}", response_model=schemas.SourceOut, summary="Change a source")
def update_source(ae_title: str, body: schemas.SourceIn, s: DB, user: AdminUser) -> schemas.SourceOut:
    row = services.update_source(s, user.username, ae_title, body)
    s.commit()
    return services.source_out(row)


@router.delete("/{ae_title}", status_code=status.HTTP_204_NO_CONTENT, summary="Remove a source")
def remove_source(ae_title: str, s: DB, user: AdminUser) -> None:
    services.remove_source(s, user.username, ae_title)
    s.commit()
