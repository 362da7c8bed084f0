"""Destinations: where results and forwarded originals go (``dicom_node.destinations`` kinds:
"dicom" C-STORE to ae_title@host:port, "dicomweb" STOW-RS to ``url``).

The one place that creates, changes or removes a ``Destination`` row, each change audited in the
same transaction (``destination.add``, ``destination.update``, ``destination.remove``), and that
audits an echo (``destination.echo``). ``DestinationIn`` is the one model of a destination for
the API, the admin page and the CLI; its target is checked by ``values.check_destination_target``,
as ``[[destinations]]`` in config.toml is. Kind options (``Destination.options``: auth header,
SR fallback) are config.toml's and are kept by an update. Functions never commit.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy.orm import Session

from dicom_node.app.registry import Registry
from dicom_node.values import check_destination_target, check_outputs
from storage import repo
from storage.models import Destination


class DestinationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: Literal["dicom", "dicomweb"] = Field("dicom", description='"dicom" (C-STORE to ae_title@host:port) or '
                                               '"dicomweb" (STOW-RS to url)')
    ae_title: str = Field("", description="kind dicom: the peer's AE title")
    host: str = Field("", max_length=255, description="kind dicom: the peer's host")
    port: int = Field(0, ge=0, le=65535, description="kind dicom: the peer's port (1-65535)")
    url: str | None = Field(None, description="kind dicomweb: the DICOMweb base URL, e.g. http://pacs:8042/dicom-web")
    outputs: list[str] = ["sr", "seg"]
    enabled: bool = True
    tls: bool = Field(False, description="DICOM TLS (PS3.15 Annex B) with the node's [tls] client identity and trust")

    _outputs = field_validator("outputs")(check_outputs)

    @field_validator("url", mode="before")
    @classmethod
    def _blank_url(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _target(self) -> DestinationIn:
        self.ae_title, self.host, self.port, self.url = check_destination_target(
            self.name, self.kind, self.ae_title, self.host, self.port, self.url)
        return self


class DestinationOut(BaseModel):
    """A stored destination as the API shows it (not re-validated: a row written under older
    rules still lists)."""

    id: int
    name: str
    kind: str = "dicom"
    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str | None = None
    outputs: list[str] = []
    enabled: bool = True
    tls: bool = False


def out(row: Destination) -> DestinationOut:
    return DestinationOut(id=row.id, name=row.name, kind=row.kind or "dicom", ae_title=row.ae_title or "",
                          host=row.host or "", port=row.port or 0, url=row.url, outputs=list(row.outputs or []),
                          enabled=bool(row.enabled), tls=bool(row.tls))


_rows = Registry(Destination, "name", "destination", out)
find, get, add, update, put, remove = _rows.find, _rows.get, _rows.add, _rows.update, _rows.put, _rows.remove


def record_echo(s: Session, actor: str, name: str, ok: bool, message: str) -> None:
    """Audit an echo (C-ECHO, or a QIDO-RS probe for DICOMweb) of destination ``name``."""
    repo.audit(s, actor, "destination.echo", name, {"ok": ok, "message": message})


def seed(s: Session, entries) -> None:  # noqa: ANN001 - config.DestinationEntry
    """config.toml's ``[[destinations]]`` that the database does not hold yet (the database wins)."""
    for dst in entries:
        repo.ensure_destination(s, dst.name, dst.ae_title, dst.host, dst.port, dst.outputs, dst.tls,
                                kind=dst.kind, url=dst.url, options=dst.options)
