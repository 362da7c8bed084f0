"""Dry run: what routing would decide, for a stored study or a pasted attribute set; nothing is
written, queued or deleted.

For a stored study every received (non-result) series is decided as the scheduler would, with
its recorded eligibility; for pasted attributes (DICOM keywords and the association/derived keys,
e.g. ``{"Modality": "CT", "calling_ae": "CT_A", "image_count": 120, "eligible": true}``) the
keys given are all that is known (an attribute not given is absent). ``rules``: evaluate these
instead of the stored ones (to try a rule before saving it).
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.app.errors import Invalid, NotFound
from dicom_node.routing import store
from dicom_node.routing.apply import decide_series, return_to
from dicom_node.routing.evaluate import decide, facts_from_attributes
from dicom_node.routing.rules import Rule
from storage.models import Destination, Series, Study


def dry_run(node, s: Session, *, study_instance_uid: str | None = None, attributes: dict[str, Any] | None = None,
            rules: list[Rule] | None = None) -> dict:
    """``{"source": "study"|"attributes", "rules": [names evaluated], "series": [decision, ...]}``;
    each decision as ``Decision.as_dict`` (matched rules, each rule's failed and passed
    conditions, actions, destinations with outputs, summary), plus the series' identity."""
    if (study_instance_uid is None) == (attributes is None):
        raise Invalid("give either study_instance_uid or attributes")
    evaluated = store.load_rules(s) if rules is None else rules
    names = [r.name for r in evaluated if r.enabled] or ["default"]
    if attributes is not None:
        facts = facts_from_attributes(attributes)
        destinations = list(s.scalars(select(Destination).order_by(Destination.name)))
        decision = decide(evaluated, facts, destinations, return_to(s, attributes.get("calling_ae")))
        decision.facts = facts.known()
        return {"source": "attributes", "rules": names, "series": [decision.as_dict()]}
    study = s.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
    if study is None:
        raise NotFound(f"study {study_instance_uid} not found")
    out = []
    for series in sorted((x for x in study.series if not x.is_result), key=lambda x: (x.series_number or 0, x.id)):
        decision = decide_series(node, s, series, rules=evaluated)
        out.append({"series_instance_uid": series.series_instance_uid, "modality": series.modality,
                    "series_number": series.series_number, "instance_count": series.instance_count,
                    **decision.as_dict()})
    return {"source": "study", "study_instance_uid": study_instance_uid, "rules": names, "series": out}


__all__ = ["dry_run"]
