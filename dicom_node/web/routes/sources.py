"""Sources: calling AE titles allowed to send (the listener reads them on every association).
Changes are ``dicom_node.app.sources`` (audited); its refusals answer 404, 409 or 422."""
from __future__ import annotations

from fastapi import APIRouter, status
from sqlalchemy import select

from dicom_node.app import sources
from dicom_node.web import schemas
from dicom_node.web.deps import DB, AdminUser
from storage.models import Source

router = APIRouter(prefix="/api/sources", tags=["sources"])


@router.get("", response_model=list[schemas.SourceOut], summary="List sources")
def list_sources(s: DB, user: AdminUser) -> list[schemas.SourceOut]:
    return [sources.out(r) for r in s.scalars(select(Source).order_by(Source.ae_title))]


@router.post("", response_model=schemas.SourceOut, status_code=status.HTTP_201_CREATED,
             summary="Add a source (accepted by the listener at once)")
def add_source(body: schemas.SourceIn, s: DB, user: AdminUser) -> schemas.SourceOut:
    row = sources.add(s, user.username, body)
    s.commit()
    return sources.out(row)


@router.put("/{ae_title}", response_model=schemas.SourceOut, summary="Change a source")
def update_source(ae_title: str, body: schemas.SourceIn, s: DB, user: AdminUser) -> schemas.SourceOut:
    row = sources.update(s, user.username, ae_title, body)
    s.commit()
    return sources.out(row)


@router.delete("/{ae_title}", status_code=status.HTTP_204_NO_CONTENT, summary="Remove a source")
def remove_source(ae_title: str, s: DB, user: AdminUser) -> None:
    sources.remove(s, user.username, ae_title)
    s.commit()
