"""Destinations: peers that receive the results (C-STORE, or DICOMweb STOW-RS), with an echo
test. Changes are ``dicom_node.app.destinations`` (audited); refusals answer 404, 409 or 422."""
from __future__ import annotations

from fastapi import APIRouter, status
from sqlalchemy import select

from dicom_node.app import destinations
from dicom_node.web import schemas, services
from dicom_node.web.deps import DB, AdminUser, NodeDep
from storage.models import Destination

router = APIRouter(prefix="/api/destinations", tags=["destinations"])


@router.get("", response_model=list[schemas.DestinationOut], summary="List destinations")
def list_destinations(s: DB, user: AdminUser) -> list[schemas.DestinationOut]:
    return [destinations.out(r) for r in s.scalars(select(Destination).order_by(Destination.name))]


@router.post("", response_model=schemas.DestinationOut, status_code=status.HTTP_201_CREATED, summary="Add a destination")
def add_destination(body: schemas.DestinationIn, s: DB, user: AdminUser) -> schemas.DestinationOut:
    row = destinations.add(s, user.username, body)
    s.commit()
    return destinations.out(row)


@router.put("/{name}", response_model=schemas.DestinationOut, summary="Change a destination")
def update_destination(name: str, body: schemas.DestinationIn, s: DB, user: AdminUser) -> schemas.DestinationOut:
    row = destinations.update(s, user.username, name, body)
    s.commit()
    return destinations.out(row)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, summary="Remove a destination")
def remove_destination(name: str, s: DB, user: AdminUser) -> None:
    destinations.remove(s, user.username, name)
    s.commit()


@router.post("/{name}/echo", response_model=schemas.EchoResult,
             summary="C-ECHO the destination with the node's AE title (ok false with the reason on failure)")
def echo(name: str, node: NodeDep, user: AdminUser) -> schemas.EchoResult:
    return services.echo_destination(node, name, user.username)
