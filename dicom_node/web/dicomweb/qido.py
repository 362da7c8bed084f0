"""QIDO-RS (PS3.18 10.6): search studies, series and instances, answered from the database index.

No file is opened for a search: every attribute returned is a column of ``studies``, ``series``
or ``instances`` (or counted from them). Matching (PS3.4 C.2.2.2):

* UIDs (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, SOPClassUID): a list, separated
  by commas or backslashes, or the parameter repeated;
* text (PatientID, AccessionNumber, StudyDescription, SeriesDescription, Modality): exact, or
  with ``*`` / ``?`` wildcards; PatientName the same, case-insensitive;
* StudyDate: a date ``YYYYMMDD`` or a range ``A-B``, ``-B``, ``A-``;
* SeriesNumber, InstanceNumber: equal; ModalitiesInStudy: any series of the study has one of the
  listed modalities.

A key may be a keyword or a tag (``00100020``). ``includefield`` (a list or ``all``) is accepted;
every attribute the index holds for the level is always returned. ``fuzzymatching`` is ignored
(answered with a ``Warning`` header), so is a key the index does not hold. ``limit`` (at most
``MAX_LIMIT``, default ``DEFAULT_LIMIT``) and ``offset`` page the results in a stable order
(studies: newest StudyDate first; series: SeriesNumber; instances: InstanceNumber).
"""
from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.orm import Session

from dicom_node.web.deps import DB
from dicom_node.web.dicomweb import dicomjson
from dicom_node.web.dicomweb.auth import Reader
from dicom_node.web.dicomweb.responses import DicomJSONResponse, DicomWebError, base_url
from storage.models import Instance, Series, Study

router = APIRouter()

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
MAX_OFFSET = 10_000_000
_RESERVED = {"limit", "offset", "includefield", "fuzzymatching"}


@dataclass(frozen=True)
class Key:
    """A matching key: its column and how it matches ("uid", "text", "pn", "date", "int", "mods")."""

    column: object
    kind: str


def _study_keys() -> dict[str, Key]:
    return {
        "0020000D": Key(Study.study_instance_uid, "uid"),
        "00100020": Key(Study.patient_id, "text"),
        "00100010": Key(Study.patient_name, "pn"),
        "00080050": Key(Study.accession_number, "text"),
        "00080020": Key(Study.study_date, "date"),
        "00081030": Key(Study.study_description, "text"),
        "00080061": Key(None, "mods"),
    }


def _series_keys() -> dict[str, Key]:
    return {
        "0020000E": Key(Series.series_instance_uid, "uid"),
        "00080060": Key(Series.modality, "text"),
        "00200011": Key(Series.series_number, "int"),
        "0008103E": Key(Series.series_description, "text"),
    }


def _instance_keys() -> dict[str, Key]:
    return {
        "00080018": Key(Instance.sop_instance_uid, "uid"),
        "00080016": Key(Instance.sop_class_uid, "uid"),
        "00200013": Key(Instance.instance_number, "int"),
    }


@dataclass
class Query:
    """A parsed QIDO-RS query string."""

    filters: list[tuple[str, list[str]]]
    limit: int
    offset: int
    limited: bool  # the client gave no limit: warn when the default cut the results
    warnings: list[str]


def parse_query(request: Request, allowed: dict[str, Key]) -> Query:
    params = request.query_params
    warnings: list[str] = []

    def number(name: str, default: int, high: int) -> int:
        raw = params.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise DicomWebError(400, f"{name} must be a whole number, not {raw[:20]!r}") from None
        if not 0 <= value <= high:
            raise DicomWebError(400, f"{name} must be between 0 and {high}, not {value}")
        return value

    limit = number("limit", DEFAULT_LIMIT, MAX_LIMIT)
    offset = number("offset", 0, MAX_OFFSET)
    if "fuzzymatching" in params:
        warnings.append("fuzzymatching is not supported; matching is exact or by wildcard")
    filters: list[tuple[str, list[str]]] = []
    ignored = []
    for name in dict.fromkeys(params.keys()):
        if name in _RESERVED:
            continue
        key = dicomjson.tag_key(name)
        if key is None:
            raise DicomWebError(400, f"unknown query parameter {name[:64]!r}: not a DICOM keyword or tag")
        values = [v for raw in params.getlist(name) for v in raw.replace("\\", ",").split(",")]
        values = [v.strip() for v in values if v.strip()]
        if key not in allowed:
            ignored.append(dicomjson.keyword(key))
            continue
        if values:
            filters.append((key, values))
    if ignored:
        warnings.append(f"not matched (not in the node's index): {', '.join(sorted(set(ignored)))}")
    return Query(filters, limit, offset, limited="limit" not in params, warnings=warnings)


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _match(tag: str, key: Key, values: list[str]):
    col = key.column
    if key.kind == "uid":
        return col.in_(values)
    if key.kind == "mods":
        return exists().where(Series.study_id == Study.id, Series.modality.in_(values))
    if key.kind == "int":
        try:
            return col.in_([int(v) for v in values])
        except ValueError:
            raise DicomWebError(400, f"{dicomjson.keyword(tag)} must be a number") from None
    if key.kind == "date":
        conds = []
        for v in values:
            v = v.replace(".", "")
            lo, sep, hi = v.partition("-")
            for part in (lo, hi):
                if part and not (len(part) == 8 and part.isdigit()):
                    raise DicomWebError(400, f"StudyDate must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD, not {v[:20]!r}")
            if not sep:
                conds.append(col == lo)
            else:
                parts = [c for c in ((col >= lo) if lo else None, (col <= hi) if hi else None) if c is not None]
                conds.append(and_(*parts) if parts else col.is_not(None))
        return or_(*conds)
    conds = []
    for v in values:
        if key.kind == "pn":
            if "*" in v or "?" in v:
                conds.append(func.lower(col).like(_like(v.lower()), escape="\\"))
            else:
                conds.append(func.lower(col) == v.lower())
        elif "*" in v or "?" in v:
            conds.append(col.like(_like(v), escape="\\"))
        else:
            conds.append(col == v)
    return or_(*conds)


# --- the attributes returned ------------------------------------------------------------------

def _modalities(s: Session, study_ids: list[int]) -> dict[int, list[str]]:
    out: dict[int, set[str]] = {}
    if study_ids:
        for sid, mod in s.execute(select(Series.study_id, Series.modality).where(Series.study_id.in_(study_ids))
                                  .distinct()):
            if mod:
                out.setdefault(sid, set()).add(mod)
    return {k: sorted(v) for k, v in out.items()}


def study_attributes(study: Study, n_series: int, n_instances: int, modalities: list[str], base: str) -> dict:
    return dicomjson.dataset({
        "SpecificCharacterSet": "ISO_IR 192",
        "StudyDate": study.study_date, "StudyTime": None, "AccessionNumber": study.accession_number,
        "ModalitiesInStudy": "\\".join(modalities) or None, "ReferringPhysicianName": None,
        "StudyDescription": study.study_description,
        "PatientName": study.patient_name, "PatientID": study.patient_id, "PatientBirthDate": None,
        "PatientSex": None, "StudyInstanceUID": study.study_instance_uid, "StudyID": None,
        "NumberOfStudyRelatedSeries": n_series, "NumberOfStudyRelatedInstances": n_instances,
        "RetrieveURL": f"{base}/studies/{study.study_instance_uid}",
    })


def series_attributes(series: Series, study: Study, base: str) -> dict:
    return dicomjson.dataset({
        "SpecificCharacterSet": "ISO_IR 192",
        "Modality": series.modality, "SeriesDescription": series.series_description,
        "StudyInstanceUID": study.study_instance_uid, "SeriesInstanceUID": series.series_instance_uid,
        "SeriesNumber": series.series_number, "NumberOfSeriesRelatedInstances": series.instance_count,
        "PatientName": study.patient_name, "PatientID": study.patient_id, "StudyDate": study.study_date,
        "AccessionNumber": study.accession_number, "StudyDescription": study.study_description,
        "RetrieveURL": f"{base}/studies/{study.study_instance_uid}/series/{series.series_instance_uid}",
    })


def instance_attributes(inst: Instance, series: Series, study: Study, base: str) -> dict:
    url = f"{base}/studies/{study.study_instance_uid}/series/{series.series_instance_uid}/instances/{inst.sop_instance_uid}"
    return dicomjson.dataset({
        "SpecificCharacterSet": "ISO_IR 192",
        "SOPClassUID": inst.sop_class_uid, "SOPInstanceUID": inst.sop_instance_uid,
        "InstanceNumber": inst.instance_number, "AvailableTransferSyntaxUID": inst.transfer_syntax_uid,
        "Modality": series.modality, "SeriesInstanceUID": series.series_instance_uid,
        "SeriesNumber": series.series_number, "StudyInstanceUID": study.study_instance_uid,
        "PatientName": study.patient_name, "PatientID": study.patient_id, "StudyDate": study.study_date,
        "AccessionNumber": study.accession_number,
        "RetrieveURL": url,
    })


def _respond(items: list[dict], q: Query, more: bool) -> DicomJSONResponse:
    warnings = list(q.warnings)
    if more and q.limited:
        warnings.append(f"more than {q.limit} results; ask with limit and offset for the next ones")
    headers = {"Warning": ", ".join(f'299 dicom-node "{w}"' for w in warnings)} if warnings else None
    return DicomJSONResponse(items, headers=headers)


def _where(stmt, q: Query, keys: dict[str, Key]):
    for key, values in q.filters:
        stmt = stmt.where(_match(key, keys[key], values))
    return stmt


def search_studies(s: Session, request: Request, study_uid: str | None = None) -> DicomJSONResponse:
    keys = _study_keys()
    q = parse_query(request, keys)
    n_series = select(func.count(Series.id)).where(Series.study_id == Study.id).correlate(Study).scalar_subquery()
    n_inst = (select(func.coalesce(func.sum(Series.instance_count), 0)).where(Series.study_id == Study.id)
              .correlate(Study).scalar_subquery())
    stmt = select(Study, n_series, n_inst)
    if study_uid is not None:
        stmt = stmt.where(Study.study_instance_uid == study_uid)
    stmt = _where(stmt, q, keys)
    stmt = stmt.order_by(Study.study_date.desc(), Study.id.desc()).offset(q.offset).limit(q.limit + 1)
    rows = s.execute(stmt).all()
    more = len(rows) > q.limit
    rows = rows[:q.limit]
    mods = _modalities(s, [r[0].id for r in rows])
    base = base_url(request)
    return _respond([study_attributes(st, ns or 0, int(ni or 0), mods.get(st.id, []), base) for st, ns, ni in rows],
                    q, more)


def search_series(s: Session, request: Request, study_uid: str | None = None) -> DicomJSONResponse:
    keys = {**_series_keys(), **_study_keys()}
    q = parse_query(request, keys)
    stmt = select(Series, Study).join(Study, Series.study_id == Study.id)
    if study_uid is not None:
        stmt = stmt.where(Study.study_instance_uid == study_uid)
    stmt = _where(stmt, q, keys)
    stmt = stmt.order_by(Study.id, Series.series_number, Series.id).offset(q.offset).limit(q.limit + 1)
    rows = s.execute(stmt).all()
    more = len(rows) > q.limit
    base = base_url(request)
    return _respond([series_attributes(se, st, base) for se, st in rows[:q.limit]], q, more)


def search_instances(s: Session, request: Request, study_uid: str | None = None,
                     series_uid: str | None = None) -> DicomJSONResponse:
    keys = {**_instance_keys(), **_series_keys(), **_study_keys()}
    q = parse_query(request, keys)
    stmt = (select(Instance, Series, Study).join(Series, Instance.series_id == Series.id)
            .join(Study, Series.study_id == Study.id))
    if study_uid is not None:
        stmt = stmt.where(Study.study_instance_uid == study_uid)
    if series_uid is not None:
        stmt = stmt.where(Series.series_instance_uid == series_uid)
    stmt = _where(stmt, q, keys)
    stmt = (stmt.order_by(Study.id, Series.series_number, Series.id, Instance.instance_number, Instance.id)
            .offset(q.offset).limit(q.limit + 1))
    rows = s.execute(stmt).all()
    more = len(rows) > q.limit
    base = base_url(request)
    return _respond([instance_attributes(i, se, st, base) for i, se, st in rows[:q.limit]], q, more)


@router.get("/studies", summary="QIDO-RS: search for studies")
def studies(request: Request, s: DB, user: Reader):
    return search_studies(s, request)


@router.get("/series", summary="QIDO-RS: search for series (all studies)")
def all_series(request: Request, s: DB, user: Reader):
    return search_series(s, request)


@router.get("/instances", summary="QIDO-RS: search for instances (all studies)")
def all_instances(request: Request, s: DB, user: Reader):
    return search_instances(s, request)


@router.get("/studies/{study}/series", summary="QIDO-RS: search for a study's series")
def study_series(study: str, request: Request, s: DB, user: Reader):
    return search_series(s, request, study)


@router.get("/studies/{study}/instances", summary="QIDO-RS: search for a study's instances")
def study_instances(study: str, request: Request, s: DB, user: Reader):
    return search_instances(s, request, study)


@router.get("/studies/{study}/series/{series}/instances", summary="QIDO-RS: search for a series' instances")
def series_instances(study: str, series: str, request: Request, s: DB, user: Reader):
    return search_instances(s, request, study, series)
