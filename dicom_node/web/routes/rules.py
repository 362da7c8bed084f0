"""Routing rules (admin): list, add, change, remove, reorder, and a dry run. Changes apply to the
next series the scheduler decides, without a restart; each is audited (``dicom_node.app.rules``;
its refusals answer 404, 409 or 422)."""
from __future__ import annotations

from fastapi import APIRouter, status

from dicom_node.app import rules
from dicom_node.routing import store
from dicom_node.routing.dryrun import dry_run
from dicom_node.web import schemas
from dicom_node.web.deps import DB, AdminUser, NodeDep

router = APIRouter(prefix="/api/rules", tags=["routing rules"])


def rule_out(row) -> schemas.RuleOut:
    return schemas.RuleOut(id=row.id, position=row.position, **store.rule_of(row).model_dump())


@router.get("", response_model=list[schemas.RuleOut], summary="List rules in evaluation order")
def list_rules(s: DB, user: AdminUser) -> list[schemas.RuleOut]:
    return [rule_out(r) for r in store.list_rows(s)]


@router.post("", response_model=schemas.RuleOut, status_code=status.HTTP_201_CREATED,
             summary="Add a rule (at `position`, default last)")
def add_rule(body: schemas.RuleIn, s: DB, user: AdminUser) -> schemas.RuleOut:
    rule = schemas.Rule.model_validate(body.model_dump(exclude={"position"}))
    row = rules.add(s, user.username, rule, body.position)
    s.commit()
    return rule_out(row)


@router.post("/reorder", response_model=list[schemas.RuleOut], summary="Put every rule in a new order")
def reorder_rules(body: schemas.RuleOrder, s: DB, user: AdminUser) -> list[schemas.RuleOut]:
    rows = rules.reorder(s, user.username, body.names)
    s.commit()
    return [rule_out(r) for r in rows]


@router.post("/dry-run", response_model=schemas.DryRunOut,
             summary="What routing would decide for a stored study or pasted attributes (nothing is done)")
def dry_run_rules(body: schemas.DryRunIn, s: DB, node: NodeDep, user: AdminUser) -> schemas.DryRunOut:
    result = dry_run(node, s, study_instance_uid=body.study_instance_uid, attributes=body.attributes,
                     rules=body.rules)
    return schemas.DryRunOut.model_validate(result)


@router.get("/{name}", response_model=schemas.RuleOut, summary="One rule")
def get_rule(name: str, s: DB, user: AdminUser) -> schemas.RuleOut:
    return rule_out(store.get_row(s, name))


@router.put("/{name}", response_model=schemas.RuleOut, summary="Change a rule (and its place, with `position`)")
def update_rule(name: str, body: schemas.RuleIn, s: DB, user: AdminUser) -> schemas.RuleOut:
    rule = schemas.Rule.model_validate(body.model_dump(exclude={"position"}))
    row = rules.update(s, user.username, name, rule)
    if body.position is not None and body.position != row.position:
        rules.move(s, user.username, rule.name, body.position)
    s.commit()
    return rule_out(row)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, summary="Remove a rule")
def remove_rule(name: str, s: DB, user: AdminUser) -> None:
    rules.remove(s, user.username, name)
    s.commit()
