"""Runtime settings: the values an administrator changes while the node runs (the node's AE
title and port, unknown callers, completion, eligibility). Stored in the ``settings`` table, they
override config.toml and the stages re-read them (``Node.effective``): no restart.

``RuntimeSettings`` is the one typed model of them: the API (``PATCH /api/settings``), the admin
page and the CLI (``dicom-node setting set``) all validate through it, so every key of
``node.RUNTIME_KEYS`` is settable from each, with the same limits and the same sentence on a
refusal. ``update`` is the one writer, audited as ``settings.update`` in the same transaction.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.orm import Session

from dicom_node.app.errors import Invalid, validate
from dicom_node.node import RUNTIME_KEYS, Node
from dicom_node.values import check_ae_title
from storage import repo


class RuntimeSettings(BaseModel):
    """Settings changed at run time (dotted keys, e.g. ``node.ae_title``); they override
    config.toml and need no restart. Units: seconds, millimetres, slices."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    node_ae_title: str | None = Field(None, alias="node.ae_title")
    node_port: int | None = Field(None, alias="node.port", ge=1, le=65535)
    node_unknown_callers: Literal["reject", "accept"] | None = Field(None, alias="node.unknown_callers")
    completion_quiet_seconds: float | None = Field(None, alias="completion.quiet_seconds", gt=0, le=86400)
    eligibility_min_slices: int | None = Field(None, alias="eligibility.min_slices", ge=1, le=10000)
    eligibility_max_slice_spacing_mm: float | None = Field(None, alias="eligibility.max_slice_spacing_mm", gt=0, le=50)
    eligibility_max_slice_thickness_mm: float | None = Field(None, alias="eligibility.max_slice_thickness_mm",
                                                             gt=0, le=50)

    @field_validator("node_ae_title")
    @classmethod
    def _ae(cls, v):
        return None if v is None else check_ae_title(v)

    def changes(self) -> dict:
        """Only the keys that were given, by their dotted name."""
        return {k: v for k, v in self.model_dump(by_alias=True, exclude_unset=True).items() if v is not None}


def parse(values: dict) -> RuntimeSettings:
    """``values`` (dotted key -> value, text as typed on the CLI or a form) validated; ``Invalid``
    names an unknown key or the bad value."""
    unknown = [k for k in values if k not in RUNTIME_KEYS]
    if unknown:
        raise Invalid(f"unknown setting(s) {unknown}; choose from {', '.join(RUNTIME_KEYS)}")
    return validate(RuntimeSettings, values)


def current(node: Node, s: Session) -> dict:
    """Every runtime setting's effective value (database override, else config.toml)."""
    return {key: node.effective(key, s) for key in RUNTIME_KEYS}


def update(node: Node, s: Session, actor: str, data: RuntimeSettings) -> dict:
    """Store the given settings; audited as ``settings.update`` (target: the keys, detail: each
    key's value before and after). Returns every effective setting afterwards."""
    changes = data.changes()
    if not changes:
        raise Invalid("no setting given")
    before = current(node, s)
    for key, value in changes.items():
        repo.set_setting(s, key, value)
    s.flush()
    repo.audit(s, actor, "settings.update", ",".join(sorted(changes)),
               {k: {"before": before.get(k), "after": v} for k, v in changes.items()})
    return current(node, s)
