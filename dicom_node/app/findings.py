"""A reader's decision on a finding (accepted / rejected, with a comment), audited as
``finding.review`` with the previous decision, in the same transaction. The caller finds the
finding (``web.views.studies``); this module writes. Functions never commit."""
from __future__ import annotations

from sqlalchemy.orm import Session

from storage import repo
from storage.models import FindingReview, FindingRow, utcnow


def review(s: Session, actor: str, finding: FindingRow, target: str, decision: str, comment: str | None) -> FindingRow:
    """Record (or change) ``actor``'s ``decision`` on ``finding``; ``target`` names it in the audit
    trail ("<study uid>/<number>")."""
    comment = (comment or "").strip() or None
    before = finding.review.decision if finding.review is not None else None
    if finding.review is None:
        finding.review = FindingReview(decision=decision, comment=comment, reviewer=actor, reviewed_at=utcnow())
    else:
        finding.review.decision, finding.review.comment, finding.review.reviewer = decision, comment, actor
        finding.review.reviewed_at = utcnow()
    s.flush()
    repo.audit(s, actor, "finding.review", target, {
        "finding_id": finding.id, "job_id": finding.job_id, "decision": decision, "comment": comment,
        "previous": before})
    return finding
