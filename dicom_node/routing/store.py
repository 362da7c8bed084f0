"""Routing rules in the database, the read side: list, find, load (every decision re-reads them,
so a change applies without a restart). Every change -- add, update, remove, reorder, seed, each
audited -- is the application layer's (``dicom_node.app.rules``). Functions never commit."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.app.errors import NotFound
from dicom_node.routing.rules import Rule
from storage.models import RoutingRule


def rule_of(row: RoutingRule) -> Rule:
    return Rule.model_validate({**(row.definition or {}), "name": row.name, "enabled": bool(row.enabled)})


def list_rows(s: Session) -> list[RoutingRule]:
    return list(s.scalars(select(RoutingRule).order_by(RoutingRule.position, RoutingRule.id)))


def load_rules(s: Session) -> list[Rule]:
    """The stored rules in evaluation order (read at every decision: no restart needed)."""
    return [rule_of(r) for r in list_rows(s)]


def find_row(s: Session, name: str) -> RoutingRule | None:
    return s.scalar(select(RoutingRule).where(RoutingRule.name == name))


def get_row(s: Session, name: str) -> RoutingRule:
    row = find_row(s, name)
    if row is None:
        raise NotFound(f"rule {name!r} not found")
    return row
