"""Sources: the calling AE titles allowed to send (the listener reads them on every association).

The one place that creates, changes or removes a ``Source`` row, each change audited in the same
transaction (``source.add``, ``source.update``, ``source.remove``; ``source.seed`` is not
written: config.toml's sources are seeded as they are). ``SourceIn`` is the one model of a
source for the API, the admin page and the CLI. Functions take the caller's session, never commit.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.app.errors import Invalid
from dicom_node.app.registry import Registry
from dicom_node.values import check_ae_title
from storage import repo
from storage.models import Destination, Source


def _blank_to_none(v):
    if isinstance(v, str):
        return v.strip() or None
    return v


class SourceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ae_title: str = Field(description="calling AE title (pynetdicom's AE rules: 1-16 ASCII characters)")
    host: str | None = Field(None, max_length=255, description="only accept this caller from this host")
    description: str | None = Field(None, max_length=255)
    enabled: bool = True
    return_to: list[str] = Field([], description='destination names that "sender" means for this source; '
                                                 "empty: every destination")
    quiet_seconds: float | None = Field(None, ge=0, le=86400, description="seconds without a new instance before "
                                        "a series from this source is complete; null: [completion] quiet_seconds")

    _ae = field_validator("ae_title")(check_ae_title)
    _host = field_validator("host", "description", "quiet_seconds", mode="before")(_blank_to_none)

    @field_validator("return_to", mode="before")
    @classmethod
    def _names(cls, v):
        if isinstance(v, str):
            v = v.split(",")
        return list(dict.fromkeys(x.strip() for x in (v or []) if isinstance(x, str) and x.strip()))


class SourceOut(BaseModel):
    """A stored source as the API shows it (not re-validated: a row written under older rules
    still lists)."""

    id: int
    ae_title: str
    host: str | None = None
    description: str | None = None
    enabled: bool = True
    return_to: list[str] = []
    quiet_seconds: float | None = None


def out(row: Source) -> SourceOut:
    return SourceOut(id=row.id, ae_title=row.ae_title, host=row.host, description=row.description,
                     enabled=bool(row.enabled), return_to=list(row.return_to or []), quiet_seconds=row.quiet_seconds)


def _check_return_to(s: Session, data: SourceIn) -> None:
    known = set(s.scalars(select(Destination.name)))
    unknown = [n for n in data.return_to if n not in known]
    if unknown:
        raise Invalid(f"return_to names unknown destination(s) {unknown}; known: {sorted(known) or 'none'}")


_rows = Registry(Source, "ae_title", "source", out, _check_return_to)
find, get, add, update, put, remove = _rows.find, _rows.get, _rows.add, _rows.update, _rows.put, _rows.remove


def seed(s: Session, entries) -> None:  # noqa: ANN001 - config.SourceEntry
    """config.toml's ``[[sources]]`` that the database does not hold yet (the database wins)."""
    for src in entries:
        repo.ensure_source(s, src.ae_title, src.host, src.description, src.return_to, src.quiet_seconds)
