"""Routing rules: add, change, remove, reorder, move, seed; every change audited.

The one place that writes a ``RoutingRule`` row (reading them is ``routing.store``'s). Each change
writes its audit event (``rule.add``, ``rule.update``, ``rule.remove``, ``rule.reorder``,
``rule.seed``) in the same transaction; positions are 1..n without gaps after every change.
Functions take the caller's session and never commit. Refusals: ``NotFound`` (no such rule),
``Conflict`` (the name is taken), ``Invalid`` (an unknown destination, a bad order).

Seeding: at start, while the ``routing_rules`` table is empty, the ``[[rules]]`` of config.toml
are stored in their file order. Once the table holds a rule, the database is the authority and
config.toml's rules are not read again (so a rule changed in the admin pages stays changed); an
administrator who removes every rule gets the file's rules back at the next start.
"""
from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.app.errors import Conflict, Invalid
from dicom_node.routing.rules import SENDER, Rule
from dicom_node.routing.store import find_row, get_row, list_rows, rule_of
from storage import repo
from storage.models import Destination, RoutingRule


def _check_destinations(s: Session, rule: Rule) -> None:
    known = set(s.scalars(select(Destination.name)))
    unknown = [d for d in rule.destinations if d != SENDER and d not in known]
    if unknown:
        raise Invalid(f"rule {rule.name!r} names unknown destination(s) {unknown}; "
                      f"known: {sorted(known) or 'none'} (or \"sender\")")


def _renumber(s: Session, rows: list[RoutingRule]) -> None:
    for n, row in enumerate(rows, start=1):
        row.position = n
    s.flush()


def add(s: Session, actor: str, rule: Rule, position: int | None = None) -> RoutingRule:
    """Store ``rule`` at ``position`` (1-based; None or past the end: last)."""
    if find_row(s, rule.name) is not None:
        raise Conflict(f"rule {rule.name!r} already exists")
    _check_destinations(s, rule)
    rows = list_rows(s)
    row = RoutingRule(name=rule.name, enabled=rule.enabled, definition=rule.definition(), position=len(rows) + 1)
    s.add(row)
    at = len(rows) if position is None else max(0, min(len(rows), position - 1))
    rows.insert(at, row)
    _renumber(s, rows)
    repo.audit(s, actor, "rule.add", rule.name, {"position": row.position, **rule.model_dump()})
    return row


def update(s: Session, actor: str, name: str, rule: Rule) -> RoutingRule:
    row = get_row(s, name)
    if rule.name != name and find_row(s, rule.name) is not None:
        raise Conflict(f"rule {rule.name!r} already exists")
    _check_destinations(s, rule)
    before = rule_of(row).model_dump()
    row.name, row.enabled, row.definition = rule.name, rule.enabled, rule.definition()
    s.flush()
    repo.audit(s, actor, "rule.update", name, {"before": before, "after": rule.model_dump()})
    return row


def remove(s: Session, actor: str, name: str) -> None:
    row = get_row(s, name)
    before = rule_of(row).model_dump()
    s.delete(row)
    s.flush()
    _renumber(s, list_rows(s))
    repo.audit(s, actor, "rule.remove", name, before)


def reorder(s: Session, actor: str, names: list[str]) -> list[RoutingRule]:
    """Put the rules in the order of ``names`` (every stored rule, each once)."""
    rows = list_rows(s)
    by_name = {r.name: r for r in rows}
    if sorted(names) != sorted(by_name) or len(set(names)) != len(names):
        raise Invalid(f"reorder needs every rule exactly once: stored {sorted(by_name)}, got {names}")
    before = [r.name for r in rows]
    ordered = [by_name[n] for n in names]
    _renumber(s, ordered)
    repo.audit(s, actor, "rule.reorder", None, {"before": before, "after": names})
    return ordered


def move(s: Session, actor: str, name: str, position: int) -> list[RoutingRule]:
    """Move one rule to ``position`` (1-based, clamped)."""
    names = [r.name for r in list_rows(s)]
    get_row(s, name)
    names.remove(name)
    names.insert(max(0, min(len(names), position - 1)), name)
    return reorder(s, actor, names)


def seed(s: Session, rules: list[Rule], actor: str = "config") -> int:
    """Store config.toml's ``[[rules]]`` while no rule is stored; returns how many were stored.

    Destinations are not checked here (config.toml's destinations are seeded beside them; a
    missing one shows up in the decisions' notes)."""
    if not rules or s.scalar(select(func.count()).select_from(RoutingRule)):
        return 0
    for n, rule in enumerate(rules, start=1):
        s.add(RoutingRule(name=rule.name, enabled=rule.enabled, definition=rule.definition(), position=n))
    s.flush()
    repo.audit(s, actor, "rule.seed", None, {"rules": [r.name for r in rules]})
    return len(rules)
