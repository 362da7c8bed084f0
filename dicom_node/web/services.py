"""What the API and the pages do, in one place: queries, serialisation, and admin changes.

Functions take a ``Session`` and never commit (the route does, after the call succeeds). Every
admin change is written to the audit trail (who, what, when) in the same transaction as the
change itself. ``ServiceError`` carries the HTTP status the API answers with and a sentence the
pages show as it is.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import date

from sqlalchemy import and_, func, literal, or_, select
from sqlalchemy.orm import Session, selectinload

from dicom_node import presentation
from dicom_node.app import jobs as app_jobs
from dicom_node.app import studies as app_studies
from dicom_node.app import transfers as app_transfers
from dicom_node.app.errors import Conflict, NotFound
from dicom_node.node import RUNTIME_KEYS, Node
from dicom_node.web import schemas
from storage import repo, users
from storage.models import (
    AssociationLog,
    AuditEvent,
    Destination,
    FindingReview,
    FindingRow,
    Job,
    JobState,
    ResultObject,
    Series,
    Source,
    Study,
    StudyStatus,
    ReviewDecision,
    Role,
    Transfer,
    TransferState,
    User,
    utcnow,
)

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 200
SORTS = ("suspicion", "date", "received")
STATUS_LABELS = {
    "received": "Received",
    "waiting": "Waiting",
    "processing": "Processing",
    "done": "Done",
    "not_eligible": "Not eligible",
    "not_analysed": "Not analysed",
    "failed": "Failed",
}


class ServiceError(Exception):
    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def _not_found(what: str) -> ServiceError:
    return ServiceError(404, f"{what} not found")


@contextlib.contextmanager
def app_errors():
    """The application layer's refusals as the HTTP answers: ``NotFound`` 404, ``Conflict`` 409."""
    try:
        yield
    except NotFound as exc:
        raise ServiceError(404, str(exc)) from None
    except Conflict as exc:
        raise ServiceError(409, str(exc)) from None


# --- studies -------------------------------------------------------------------------------------

@dataclass
class StudyQuery:
    status: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    modality: str | None = None
    q: str | None = None
    sort: str = "suspicion"
    page: int = 1
    page_size: int = 50

    def normalised(self) -> StudyQuery:
        if self.status and self.status not in STATUS_LABELS:
            raise ServiceError(422, f"status {self.status!r} is not one of {list(STATUS_LABELS)}")
        if self.sort not in SORTS:
            raise ServiceError(422, f"sort {self.sort!r} is not one of {list(SORTS)}")
        self.page = max(1, int(self.page or 1))
        self.page_size = min(MAX_PAGE_SIZE, max(1, int(self.page_size or 50)))
        self.modality = (self.modality or "").strip().upper() or None
        self.q = (self.q or "").strip() or None
        return self


def _da(d: date) -> str:
    return d.strftime("%Y%m%d")


def list_studies(s: Session, query: StudyQuery) -> tuple[list[Study], int]:
    """One page of studies matching ``query`` and the total count.

    Default order, most suspicious first: highest malignancy, then largest diameter, then most
    findings (studies without findings after), then newest study date.
    """
    query = query.normalised()
    where = []
    if query.status:
        where.append(Study.status == StudyStatus(query.status))
    if query.date_from:
        where.append(Study.study_date >= _da(query.date_from))
    if query.date_to:
        where.append(Study.study_date <= _da(query.date_to))
    if query.modality:
        joined = literal("\\") + func.coalesce(Study.modalities, "") + literal("\\")
        where.append(joined.contains("\\" + query.modality + "\\", autoescape=True))
    if query.q:
        where.append(or_(*(col.icontains(query.q, autoescape=True) for col in (
            Study.patient_name, Study.patient_id, Study.accession_number,
            Study.study_instance_uid, Study.study_description))))
    cond = and_(*where) if where else literal(True)
    total = s.scalar(select(func.count()).select_from(Study).where(cond)) or 0
    if query.sort == "suspicion":
        order = [Study.max_malignancy.desc().nulls_last(), Study.max_diameter_mm.desc().nulls_last(),
                 Study.findings_count.desc().nulls_last(), Study.study_date.desc().nulls_last(), Study.id.desc()]
    elif query.sort == "date":
        order = [Study.study_date.desc().nulls_last(), Study.id.desc()]
    else:
        order = [Study.created_at.desc(), Study.id.desc()]
    rows = s.scalars(select(Study).where(cond).order_by(*order)
                     .offset((query.page - 1) * query.page_size).limit(query.page_size))
    return list(rows), int(total)


def format_da(value: str | None) -> str | None:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or None


def patient_name(value: str | None) -> str | None:
    """DICOM PN ``Family^Given^Middle`` as ``Family, Given Middle``."""
    if not value:
        return None
    first = value.split("=")[0]
    parts = [p for p in first.split("^")]
    family = parts[0]
    rest = " ".join(p for p in parts[1:3] if p)
    return f"{family}, {rest}" if rest and family else (family or rest)


def patient_label(name: str | None, patient_id: str | None) -> str:
    """What the worklist and the study header both call the patient: the name, else the ID."""
    return name or patient_id or "Anonymous patient"


def study_summary(study: Study, reviews: schemas.ReviewCounts | None = None) -> schemas.StudySummary:
    return schemas.StudySummary(
        study_instance_uid=study.study_instance_uid,
        status=study.status.value,
        status_reason=study.status_reason,
        patient_name=patient_name(study.patient_name),
        patient_id=study.patient_id,
        accession_number=study.accession_number,
        study_date=format_da(study.study_date),
        study_description=study.study_description,
        modalities=[m for m in (study.modalities or "").split("\\") if m],
        findings_count=study.findings_count,
        max_diameter_mm=study.max_diameter_mm,
        max_malignancy=study.max_malignancy,
        received_at=study.created_at,
        updated_at=study.updated_at,
        reviews=reviews,
    )


def get_study(s: Session, uid: str) -> Study:
    study = s.scalar(select(Study).where(Study.study_instance_uid == uid).options(selectinload(Study.series)))
    if study is None:
        raise _not_found(f"study {uid}")
    return study


def job_out(job: Job, series: Series | None = None, study_uid: str | None = None) -> schemas.JobOut:
    return schemas.JobOut(
        id=job.id, series_instance_uid=series.series_instance_uid if series else None,
        study_instance_uid=study_uid, kind=job.kind, idempotency_key=job.idempotency_key,
        state=job.state.value, attempts=job.attempts or 0, max_attempts=job.max_attempts or 0, error=job.error,
        inference_seconds=job.inference_seconds, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at)


def transfer_out(t: Transfer, destination_name: str) -> schemas.TransferOut:
    return schemas.TransferOut(
        id=t.id, job_id=t.job_id, destination=destination_name, state=t.state.value, attempts=t.attempts or 0,
        next_attempt_at=t.next_attempt_at, error=t.error, kind=t.kind or "results", priority=t.priority or 0,
        objects=len(t.result_object_ids or []) + len(t.instance_ids or []),
        sent_objects=len(t.sent_sop_instance_uids or []), created_at=t.created_at, sent_at=t.sent_at,
        object_status=[schemas.TransferObjectOut(sop_instance_uid=uid, kind=v.get("kind"), state=v.get("state", "pending"),
                                                 reason=v.get("reason"), sent_as=v.get("sent_as"))
                       for uid, v in (t.object_status or {}).items()])


def study_findings(s: Session, study: Study) -> list[tuple[FindingRow, Series]]:
    """Findings of the latest finished job of each analysed series, in nodule-number order
    (which is most malignant first: ``dicom_node.results.common.order_findings``)."""
    latest = _latest_done_jobs([study.id])
    rows = s.execute(select(FindingRow, Series)
                     .join(latest, latest.c.job_id == FindingRow.job_id)
                     .join(Series, Series.id == latest.c.series_id)
                     .options(selectinload(FindingRow.review))
                     .order_by(Series.id, FindingRow.number))
    return [(f, se) for f, se in rows]


def _latest_done_jobs(study_ids: list[int]):
    """Subquery (series_id, job_id, study_id): the latest finished job of each series of the studies."""
    return (select(Job.series_id, func.max(Job.id).label("job_id"), Series.study_id.label("study_id"))
            .join(Series, Series.id == Job.series_id)
            .where(Series.study_id.in_(study_ids), Job.state == JobState.DONE)
            .group_by(Job.series_id, Series.study_id).subquery())


def review_counts(s: Session, study_ids: list[int]) -> dict[int, schemas.ReviewCounts]:
    """Per study: findings of its latest results and how many readers accepted or rejected."""
    if not study_ids:
        return {}
    latest = _latest_done_jobs(study_ids)
    rows = s.execute(
        select(latest.c.study_id, func.count(FindingRow.id),
               func.count(FindingReview.id).filter(FindingReview.decision == ReviewDecision.ACCEPTED.value),
               func.count(FindingReview.id).filter(FindingReview.decision == ReviewDecision.REJECTED.value))
        .select_from(latest)
        .join(FindingRow, FindingRow.job_id == latest.c.job_id)
        .outerjoin(FindingReview, FindingReview.finding_id == FindingRow.id)
        .group_by(latest.c.study_id))
    return {sid: schemas.ReviewCounts(findings=n, accepted=a, rejected=r, pending=n - a - r) for sid, n, a, r in rows}


def study_summaries(s: Session, studies: list[Study]) -> list[schemas.StudySummary]:
    counts = review_counts(s, [st.id for st in studies])
    return [study_summary(st, counts.get(st.id)) for st in studies]


def review_out(r: FindingReview | None) -> schemas.ReviewOut | None:
    if r is None:
        return None
    return schemas.ReviewOut(decision=r.decision, comment=r.comment, reviewer=r.reviewer, reviewed_at=r.reviewed_at)


def finding_out(f: FindingRow, se: Series) -> schemas.FindingOut:
    """A finding as readers see it: rounded (``dicom_node.presentation``), numbered, coloured."""
    return schemas.FindingOut(
        id=f.id, number=f.number, segment_number=f.segment_number, job_id=f.job_id,
        series_instance_uid=se.series_instance_uid,
        center_mm=[presentation.round_mm(v) for v in (f.center_x_mm, f.center_y_mm, f.center_z_mm)],
        location=f.location, diameter_mm=presentation.round_mm(f.diameter_mm),
        volume_mm3=presentation.round_mm3(f.volume_mm3),
        malignancy=presentation.round_probability(f.malignancy),
        suspicion=presentation.suspicion_level(f.malignancy),
        score=presentation.round_probability(f.score), colour=presentation.nodule_colour(f.number),
        image_url=f"/api/findings/{f.id}/image?plane=axial", review=review_out(f.review))


def _study_finding(s: Session, study_uid: str, number: int) -> FindingRow:
    study = get_study(s, study_uid)
    for f, _se in study_findings(s, study):
        if f.number == number:
            return f
    raise _not_found(f"finding {number} of study {study_uid}")


def review_finding(s: Session, actor: str, study_uid: str, number: int, data: schemas.ReviewIn) -> FindingRow:
    """Record (or change) a reader's decision on nodule ``number`` of the study's latest results,
    with an audit event holding the previous decision."""
    f = _study_finding(s, study_uid, number)
    comment = (data.comment or "").strip() or None
    before = review_out(f.review)
    if f.review is None:
        f.review = FindingReview(decision=data.decision, comment=comment, reviewer=actor, reviewed_at=utcnow())
    else:
        f.review.decision, f.review.comment, f.review.reviewer = data.decision, comment, actor
        f.review.reviewed_at = utcnow()
    s.flush()
    repo.audit(s, actor, "finding.review", f"{study_uid}/{number}", {
        "finding_id": f.id, "job_id": f.job_id, "decision": data.decision, "comment": comment,
        "previous": before.decision if before else None})
    return f


def export_findings(s: Session) -> list[schemas.FindingExportRow]:
    """Every finding of the latest results of every study, with its review (follow-up of the model)."""
    latest = (select(Job.series_id, func.max(Job.id).label("job_id"))
              .where(Job.state == JobState.DONE).group_by(Job.series_id).subquery())
    rows = s.execute(select(FindingRow, Series.series_instance_uid, Study.study_instance_uid)
                     .join(latest, latest.c.job_id == FindingRow.job_id)
                     .join(Series, Series.id == latest.c.series_id)
                     .join(Study, Study.id == Series.study_id)
                     .options(selectinload(FindingRow.review))
                     .order_by(Study.id, Series.id, FindingRow.number))
    out = []
    for f, series_uid, study_uid in rows:
        r = f.review
        out.append(schemas.FindingExportRow(
            study_instance_uid=study_uid, series_instance_uid=series_uid, job_id=f.job_id, finding_number=f.number,
            center_x_mm=presentation.round_mm(f.center_x_mm), center_y_mm=presentation.round_mm(f.center_y_mm),
            center_z_mm=presentation.round_mm(f.center_z_mm), diameter_mm=presentation.round_mm(f.diameter_mm),
            volume_mm3=presentation.round_mm3(f.volume_mm3), malignancy=presentation.round_probability(f.malignancy),
            suspicion=presentation.suspicion_level(f.malignancy), score=presentation.round_probability(f.score),
            location=f.location, review=r.decision if r else "pending", review_comment=r.comment if r else None,
            reviewer=r.reviewer if r else None, reviewed_at=r.reviewed_at if r else None))
    return out


EXPORT_COLUMNS = list(schemas.FindingExportRow.model_fields)


def export_csv(rows: list[schemas.FindingExportRow]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=EXPORT_COLUMNS, lineterminator="\r\n")
    w.writeheader()
    for row in rows:
        d = row.model_dump()
        d["reviewed_at"] = row.reviewed_at.isoformat() if row.reviewed_at else ""
        w.writerow({k: ("" if v is None else _csv_safe(v)) for k, v in d.items()})
    return buf.getvalue()


def _csv_safe(value):
    """Free text that a spreadsheet would run as a formula is quoted with a leading apostrophe."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def study_detail(s: Session, uid: str, node: Node | None = None) -> schemas.StudyDetail:
    """The study with its series (and, given ``node``, why each undecided series is waiting),
    findings, result objects, jobs and transfers."""
    study = get_study(s, uid)
    summary = study_summary(study)
    series = sorted(study.series, key=lambda x: (x.is_result, x.series_number or 0, x.id))
    series_ids = [x.id for x in series]
    by_id = {x.id: x for x in series}
    jobs = list(s.scalars(select(Job).where(Job.series_id.in_(series_ids)).order_by(Job.id.desc()))) if series_ids else []
    job_ids = [j.id for j in jobs]
    results = list(s.scalars(select(ResultObject).where(ResultObject.job_id.in_(job_ids))
                             .order_by(ResultObject.job_id.desc(), ResultObject.kind))) if job_ids else []
    mine = or_(Transfer.job_id.in_(job_ids), Transfer.series_id.in_(series_ids))  # results, forwarded originals
    transfers = list(s.execute(select(Transfer, Destination.name).join(Destination, Destination.id == Transfer.destination_id)
                               .where(mine).order_by(Transfer.id.desc()))) if series_ids else []
    findings = [finding_out(f, se) for f, se in study_findings(s, study)]
    summary.reviews = review_counts(s, [study.id]).get(study.id)
    return schemas.StudyDetail(
        **summary.model_dump(),
        series=[schemas.SeriesOut(
            series_instance_uid=x.series_instance_uid, modality=x.modality, series_number=x.series_number,
            series_description=x.series_description, instance_count=x.instance_count or 0,
            eligible=x.eligible, eligibility_reason=x.eligibility_reason, is_result=bool(x.is_result),
            route_summary=x.route_summary,
            waiting_reason=app_studies.waiting_reason(node, s, x, utcnow()) if node is not None else None)
            for x in series],
        findings=findings,
        results=[schemas.ResultOut(id=r.id, job_id=r.job_id, kind=r.kind, sop_instance_uid=r.sop_instance_uid,
                                   series_instance_uid=r.series_instance_uid,
                                   download_url=f"/api/results/{r.id}/file") for r in results],
        jobs=[job_out(j, by_id.get(j.series_id), uid) for j in jobs],
        transfers=[transfer_out(t, name) for t, name in transfers],
    )


# --- sources --------------------------------------------------------------------------------------

def source_out(row: Source) -> schemas.SourceOut:
    return schemas.SourceOut(id=row.id, ae_title=row.ae_title, host=row.host, description=row.description,
                             enabled=bool(row.enabled), return_to=list(row.return_to or []))


def list_sources(s: Session) -> list[Source]:
    return list(s.scalars(select(Source).order_by(Source.ae_title)))


def _source(s: Session, ae_title: str) -> Source:
    row = s.scalar(select(Source).where(Source.ae_title == ae_title))
    if row is None:
        raise _not_found(f"source {ae_title!r}")
    return row


def _check_return_to(s: Session, data: schemas.SourceIn) -> None:
    known = set(s.scalars(select(Destination.name)))
    unknown = [n for n in data.return_to if n not in known]
    if unknown:
        raise ServiceError(422, f"return_to names unknown destination(s) {unknown}; known: {sorted(known) or 'none'}")


def add_source(s: Session, actor: str, data: schemas.SourceIn) -> Source:
    if s.scalar(select(Source).where(Source.ae_title == data.ae_title)) is not None:
        raise ServiceError(409, f"source {data.ae_title!r} already exists")
    _check_return_to(s, data)
    row = Source(**data.model_dump())
    s.add(row)
    s.flush()
    repo.audit(s, actor, "source.add", data.ae_title, data.model_dump())
    return row


def update_source(s: Session, actor: str, ae_title: str, data: schemas.SourceIn) -> Source:
    row = _source(s, ae_title)
    if data.ae_title != ae_title and s.scalar(select(Source).where(Source.ae_title == data.ae_title)) is not None:
        raise ServiceError(409, f"source {data.ae_title!r} already exists")
    _check_return_to(s, data)
    before = source_out(row).model_dump(exclude={"id"})
    for k, v in data.model_dump().items():
        setattr(row, k, v)
    s.flush()
    repo.audit(s, actor, "source.update", ae_title, {"before": before, "after": data.model_dump()})
    return row


def remove_source(s: Session, actor: str, ae_title: str) -> None:
    row = _source(s, ae_title)
    s.delete(row)
    s.flush()
    repo.audit(s, actor, "source.remove", ae_title)


# --- destinations -----------------------------------------------------------------------------------

def destination_out(row: Destination) -> schemas.DestinationOut:
    return schemas.DestinationOut(id=row.id, name=row.name, ae_title=row.ae_title, host=row.host, port=row.port,
                                  outputs=list(row.outputs or []), enabled=bool(row.enabled), tls=bool(row.tls))


def list_destinations(s: Session) -> list[Destination]:
    return list(s.scalars(select(Destination).order_by(Destination.name)))


def get_destination(s: Session, name: str) -> Destination:
    row = s.scalar(select(Destination).where(Destination.name == name))
    if row is None:
        raise _not_found(f"destination {name!r}")
    return row


def add_destination(s: Session, actor: str, data: schemas.DestinationIn) -> Destination:
    if s.scalar(select(Destination).where(Destination.name == data.name)) is not None:
        raise ServiceError(409, f"destination {data.name!r} already exists")
    row = Destination(**data.model_dump())
    s.add(row)
    s.flush()
    repo.audit(s, actor, "destination.add", data.name, data.model_dump())
    return row


def update_destination(s: Session, actor: str, name: str, data: schemas.DestinationIn) -> Destination:
    row = get_destination(s, name)
    if data.name != name and s.scalar(select(Destination).where(Destination.name == data.name)) is not None:
        raise ServiceError(409, f"destination {data.name!r} already exists")
    before = destination_out(row).model_dump(exclude={"id"})
    for k, v in data.model_dump().items():
        setattr(row, k, v)
    s.flush()
    repo.audit(s, actor, "destination.update", name, {"before": before, "after": data.model_dump()})
    return row


def remove_destination(s: Session, actor: str, name: str) -> None:
    row = get_destination(s, name)
    s.delete(row)
    s.flush()
    repo.audit(s, actor, "destination.remove", name)


def echo_destination(node: Node, name: str, actor: str) -> schemas.EchoResult:
    """Test a destination through its kind (C-ECHO for "dicom", a QIDO-RS probe for "dicomweb")
    with the node's current AE title; the session is not held meanwhile."""
    from dicom_node import destinations

    with node.sessions() as s:
        target = destinations.Target.of(get_destination(s, name))
        calling = node.effective("node.ae_title", s)
    ctx = destinations.Context(calling_ae=calling, timeout=5.0, tls=node.settings.tls)
    outcome = destinations.kind_of(target).echo(target, ctx)
    log.info("echo of destination %s (%s, %s) by %s: %s", name, target.kind, target.describe(), actor,
             outcome.message)
    with node.sessions.begin() as s:
        repo.audit(s, actor, "destination.echo", name, {"ok": outcome.ok, "message": outcome.message})
    return schemas.EchoResult(ok=outcome.ok, kind=outcome.kind.value, message=outcome.message)


# --- transfers ---------------------------------------------------------------------------------------

def list_transfers(s: Session, state: str | None, page: int, page_size: int) -> tuple[list[tuple[Transfer, str]], int]:
    cond = literal(True)
    if state:
        try:
            cond = Transfer.state == TransferState(state)
        except ValueError:
            raise ServiceError(422, f"state {state!r} is not one of {[x.value for x in TransferState]}") from None
    total = s.scalar(select(func.count()).select_from(Transfer).where(cond)) or 0
    rows = s.execute(select(Transfer, Destination.name).join(Destination, Destination.id == Transfer.destination_id)
                     .where(cond).order_by(Transfer.id.desc()).offset((page - 1) * page_size).limit(page_size))
    return [(t, n) for t, n in rows], int(total)


def _transfer(s: Session, transfer_id: int) -> Transfer:
    row = s.get(Transfer, transfer_id)
    if row is None:
        raise _not_found(f"transfer {transfer_id}")
    return row


def retry_transfer(s: Session, actor: str, transfer_id: int) -> Transfer:
    """A failed or cancelled transfer goes back to pending, due now (``app.transfers.retry``)."""
    with app_errors():
        return app_transfers.retry(s, actor, transfer_id)


def cancel_transfer(s: Session, actor: str, transfer_id: int) -> Transfer:
    """``app.transfers.cancel``."""
    with app_errors():
        return app_transfers.cancel(s, actor, transfer_id)


# --- jobs ----------------------------------------------------------------------------------------------

def list_jobs(s: Session, state: str | None, page: int, page_size: int) -> tuple[list[schemas.JobOut], int]:
    cond = literal(True)
    if state:
        try:
            cond = Job.state == JobState(state)
        except ValueError:
            raise ServiceError(422, f"state {state!r} is not one of {[x.value for x in JobState]}") from None
    total = s.scalar(select(func.count()).select_from(Job).where(cond)) or 0
    rows = s.execute(select(Job, Series, Study.study_instance_uid).join(Series, Series.id == Job.series_id)
                     .join(Study, Study.id == Series.study_id)
                     .where(cond).order_by(Job.id.desc()).offset((page - 1) * page_size).limit(page_size))
    return [job_out(j, se, uid) for j, se, uid in rows], int(total)


def rerun_job(s: Session, actor: str, job_id: int) -> Job:
    """A new pending job for the same series, keyed ``<original key>:rerun:<n>`` (``app.jobs.rerun``)."""
    with app_errors():
        return app_jobs.rerun(s, actor, job_id)


def cancel_job(s: Session, actor: str, job_id: int) -> Job:
    """A pending job is cancelled (``app.jobs.cancel``)."""
    with app_errors():
        return app_jobs.cancel(s, actor, job_id)


def resend_job(s: Session, actor: str, job_id: int, destination_names: list[str] | None) -> list[Transfer]:
    """New pending transfers of the job's result objects, one per destination (``app.transfers.resend``)."""
    with app_errors():
        return app_transfers.resend(s, actor, job_id, destination_names)


def complete_now(s: Session, actor: str, study_uid: str, series_uid: str | None = None) -> list[str]:
    """"Complete now" (``app.studies.request_complete``): the Series Instance UIDs marked."""
    with app_errors():
        return app_studies.request_complete(s, actor, study_uid, series_uid)


def latest_done_job_ids(s: Session, study: Study) -> list[int]:
    return [j for (j,) in s.execute(
        select(func.max(Job.id)).join(Series, Series.id == Job.series_id)
        .where(Series.study_id == study.id, Job.state == JobState.DONE).group_by(Job.series_id))]


def latest_job_ids(s: Session, study: Study) -> list[int]:
    return [j for (j,) in s.execute(
        select(func.max(Job.id)).join(Series, Series.id == Job.series_id)
        .where(Series.study_id == study.id).group_by(Job.series_id))]


# --- associations, audit --------------------------------------------------------------------------

def association_out(a: AssociationLog) -> schemas.AssociationOut:
    return schemas.AssociationOut(
        id=a.id, started_at=a.started_at, ended_at=a.ended_at, direction=a.direction, peer_host=a.peer_host,
        peer_port=a.peer_port, calling_ae=a.calling_ae, called_ae=a.called_ae, result=a.result.value,
        reason=a.reason, instances=a.instances or 0, duration_s=a.duration_s)


def list_associations(s: Session, result: str | None, page: int, page_size: int) -> tuple[list[AssociationLog], int]:
    cond = literal(True)
    if result:
        from storage.models import AssociationResult

        try:
            cond = AssociationLog.result == AssociationResult(result)
        except ValueError:
            raise ServiceError(422, f"result {result!r} is not one of {[x.value for x in AssociationResult]}") from None
    total = s.scalar(select(func.count()).select_from(AssociationLog).where(cond)) or 0
    rows = s.scalars(select(AssociationLog).where(cond).order_by(AssociationLog.id.desc())
                     .offset((page - 1) * page_size).limit(page_size))
    return list(rows), int(total)


def audit_out(a: AuditEvent) -> schemas.AuditOut:
    return schemas.AuditOut(id=a.id, at=a.at, actor=a.actor, action=a.action, target=a.target, detail=a.detail)


def list_audit(s: Session, page: int, page_size: int) -> tuple[list[AuditEvent], int]:
    total = s.scalar(select(func.count()).select_from(AuditEvent)) or 0
    rows = s.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).offset((page - 1) * page_size).limit(page_size))
    return list(rows), int(total)


# --- users ---------------------------------------------------------------------------------------------

def user_out(u: User) -> schemas.UserOut:
    return schemas.UserOut(username=u.username, role=u.role.value, created_at=u.created_at)


def create_user(s: Session, actor: str, data: schemas.UserIn) -> User:
    from dicom_node.web.security import hash_password

    try:
        users.check_username(data.username)
        if users.get_user(s, data.username) is not None:
            raise ServiceError(409, f"user {data.username!r} already exists")
        row = users.add_user(s, data.username, data.role, hash_password(data.password))
    except (users.UserError, ValueError) as exc:
        if isinstance(exc, ServiceError):
            raise
        raise ServiceError(422, str(exc)) from None
    repo.audit(s, actor, "user.add", data.username, {"role": data.role})
    return row


def update_user(s: Session, actor: str, username: str, data: schemas.UserUpdate) -> User:
    from dicom_node.web.security import hash_password

    if users.get_user(s, username) is None:
        raise _not_found(f"user {username!r}")
    try:
        if data.role is not None:
            users.set_role(s, username, data.role)
        if data.password is not None:
            users.set_password_hash(s, username, hash_password(data.password))
    except (users.UserError, ValueError) as exc:
        raise ServiceError(409 if "last admin" in str(exc) else 422, str(exc)) from None
    detail = {}
    if data.role is not None:
        detail["role"] = data.role
    if data.password is not None:
        detail["password"] = "changed"
    repo.audit(s, actor, "user.update", username, detail)
    return users.get_user(s, username)


def delete_user(s: Session, actor: str, username: str) -> None:
    if users.get_user(s, username) is None:
        raise _not_found(f"user {username!r}")
    try:
        users.remove_user(s, username)
    except users.UserError as exc:
        raise ServiceError(409, str(exc)) from None
    repo.audit(s, actor, "user.remove", username)


# --- runtime settings -----------------------------------------------------------------------------------

def runtime_settings(node: Node, s: Session) -> dict:
    return {key: node.effective(key, s) for key in RUNTIME_KEYS}


def update_settings(node: Node, s: Session, actor: str, data: schemas.RuntimeSettings) -> dict:
    changes = data.changes()
    if not changes:
        raise ServiceError(422, "no setting given")
    before = runtime_settings(node, s)
    for key, value in changes.items():
        repo.set_setting(s, key, value)
    s.flush()
    repo.audit(s, actor, "settings.update", ",".join(sorted(changes)),
               {k: {"before": before.get(k), "after": v} for k, v in changes.items()})
    return runtime_settings(node, s)


def status_counts(s: Session) -> dict[str, int]:
    counts = repo.count_by(s, Study.status)
    return {k: counts.get(k, 0) for k in STATUS_LABELS}


def suspicion_level(malignancy: float | None) -> str:
    """``presentation.suspicion_level``, or ``"none"`` for a study without findings."""
    return "none" if malignancy is None else presentation.suspicion_level(malignancy)


def visible_transfer_error(role: Role, error: str | None) -> str | None:
    """Delivery errors concern the administrator; a radiologist sees none (the state says enough)."""
    return error if role is Role.ADMIN else None

