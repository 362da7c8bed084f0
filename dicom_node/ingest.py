"""The store step shared by every way in (C-STORE in ``dicom_node.scp``, STOW-RS in
``dicom_node.web.dicomweb.stow``): persist the bytes as received, durably, then index them.

Contract: ``store_instance`` reads the header only (never the pixel data), refuses what the
index cannot hold (``storage.limits``: over-long values, a SOP Instance UID that differs from the
one announced), writes the bytes to the file store (temp file, fsync, rename) *before* the index
transaction begins (so the SQLite write lock is never held across an fsync and the index never
names a file that is not durable), then indexes the instance (``repo.index_instance``: the same
rows, the same "series dirty, study reopened" the scheduler waits on). It returns the outcome or
raises ``Refused`` with a named PS3.4 status: refusals of the content itself are permanent
(0xA900, 0xC000: the same bytes will never be accepted); only a failure of the disk or the
database is transient (0xA700: the sender retries).

Logs name UIDs, the source and attribute keywords, never a value: patient attributes are
among them.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from sqlalchemy.exc import DataError, IntegrityError

from dicom_node import part10
from storage import limits, redact, repo
from storage.filestore import StoreError

log = logging.getLogger(__name__)

# C-STORE response statuses (PS3.4 Annex B.2.3), named; STOW-RS reports them as FailureReason.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
#: An instance over ``max_dataset_bytes``: "Error: cannot understand" class, a permanent failure
#: (resending the same instance cannot succeed).
DATASET_TOO_LARGE = CANNOT_UNDERSTAND

#: Our own results (SR, SEG, key images) are stored when sent back to us but never analysed.
RESULT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.11.1",  # GSPS
}

HEADER_TAGS = list(part10.HEADER_KEYWORDS)  # the one list: part10 reads these from raw bytes


class Refused(Exception):
    """The instance was not stored. ``status``: the named PS3.4 status; ``reason``: a sentence
    without patient values; ``limit``: True when a limit of the index refused a value (counted
    in the association audit)."""

    def __init__(self, status: int, reason: str, *, sop_instance_uid: str | None = None,
                 sop_class_uid: str | None = None, limit: bool = False):
        super().__init__(reason)
        self.status, self.reason, self.limit = status, reason, limit
        self.sop_instance_uid, self.sop_class_uid = sop_instance_uid, sop_class_uid

    @property
    def transient(self) -> bool:
        return self.status == OUT_OF_RESOURCES


@dataclass(frozen=True)
class Stored:
    """An instance durably stored and indexed: ``outcome`` is "new", "duplicate" or "replaced"."""

    meta: repo.InstanceMeta
    outcome: str
    relpath: str


def text(value) -> str | None:  # noqa: ANN001
    """A header value as indexed: multi-values backslash-joined, padding and NULs removed."""
    if value is None:
        return None
    if isinstance(value, MultiValue):
        value = "\\".join(str(v) for v in value)
    return limits.clean_text(str(value))


def _int(value) -> int | None:  # noqa: ANN001
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def uid(value) -> str:  # noqa: ANN001
    """A UID attribute as indexed: padding removed (a missing one raises AttributeError upstream)."""
    return limits.clean_text(str(value)) or ""


def uid_for_log(value: str | None) -> str:
    """A UID for a log line, cut to 64 characters plus its length when longer (garbage)."""
    if value is None:
        return "(none)"
    return value if len(value) <= 64 else f"{value[:64]}... ({len(value)} characters)"


def db_error(exc: BaseException) -> str:
    """A database error for a log line: its class and the driver's first line, no parameters."""
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return redact.scrub(f"{type(orig).__name__}: {first}")


def read_meta(data: bytes, transfer_syntax: str | None, source: str | None, *,
              dataset=None) -> repo.InstanceMeta:  # noqa: ANN001 - bytes-like
    """The indexed attributes of a Part 10 byte string (header only; pixel data is not read).

    ``transfer_syntax``: the one negotiated (C-STORE); None takes the file meta's (STOW-RS).
    ``dataset``: the encoded dataset alone (``data`` without its file meta), when the caller has
    it (C-STORE): its header elements are then found by ``part10.header_elements`` without
    pydicom's reader (a third of the cost), and ``data`` is read with ``dcmread`` only when that
    declines. Raises ``Refused`` (CANNOT_UNDERSTAND) when the bytes are not a readable DICOM header.
    """
    try:
        raw = None
        if dataset is not None and transfer_syntax is not None:
            raw = part10.header_elements(dataset, transfer_syntax)
        if raw is not None:
            header = part10.Header(raw)
        else:
            header = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=HEADER_TAGS)
        if transfer_syntax is None:
            transfer_syntax = uid(header.file_meta.TransferSyntaxUID)
        sop_class = uid(header.SOPClassUID)
        return repo.InstanceMeta(
            study_instance_uid=uid(header.StudyInstanceUID),
            series_instance_uid=uid(header.SeriesInstanceUID),
            sop_instance_uid=uid(header.SOPInstanceUID),
            sop_class_uid=sop_class,
            transfer_syntax_uid=str(transfer_syntax),
            modality=text(header.get("Modality")),
            instance_number=_int(header.get("InstanceNumber")),
            series_number=_int(header.get("SeriesNumber")),
            series_description=text(header.get("SeriesDescription")),
            patient_name=text(header.get("PatientName")),
            patient_id=text(header.get("PatientID")),
            accession_number=text(header.get("AccessionNumber")),
            study_date=text(header.get("StudyDate")),
            study_description=text(header.get("StudyDescription")),
            is_result=sop_class in RESULT_SOP_CLASSES,
        )
    except (InvalidDicomError, AttributeError, ValueError, EOFError, OSError, KeyError, TypeError) as exc:
        # The exception text may quote a value (a patient name): its kind only.
        raise Refused(CANNOT_UNDERSTAND, f"not a readable DICOM dataset ({type(exc).__name__})") from None


def store_instance(node, data: bytes, *, transfer_syntax: str | None, source: str | None,  # noqa: ANN001
                   association_id: int | None, cache: repo.IndexCache | None = None,
                   expected_sop_instance_uid: str | None = None,
                   expected_study_instance_uid: str | None = None, dataset=None) -> Stored:
    """Persist ``data`` (a Part 10 byte string, as received) and index it; see the module doc.

    ``node``: a ``dicom_node.node.Node`` (its file store and session factory). ``source``: the
    calling AE title (C-STORE) or None (STOW-RS; the request is audited by its caller).
    ``expected_sop_instance_uid``: the UID the C-STORE request announced; ``expected_study_instance_uid``:
    the study of a STOW-RS request to ``/studies/{uid}``. ``dataset``: ``data`` without its file
    meta, when the caller has it (see ``read_meta``). Raises ``Refused``.
    """
    try:
        meta = read_meta(data, transfer_syntax, source, dataset=dataset)
    except Refused as exc:
        log.error("instance %s from %s cannot be understood: %s", uid_for_log(expected_sop_instance_uid), source,
                  exc.reason)
        raise
    try:
        limits.check(meta)
    except limits.ValueRefused as exc:
        log.error("instance %s from %s refused: %s", uid_for_log(meta.sop_instance_uid), source, exc)
        raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc), sop_instance_uid=meta.sop_instance_uid,
                      sop_class_uid=meta.sop_class_uid, limit=True) from None
    if expected_sop_instance_uid is not None and meta.sop_instance_uid != expected_sop_instance_uid:
        log.error("SOP Instance UID %s in the dataset differs from %s in the command",
                  uid_for_log(meta.sop_instance_uid), uid_for_log(expected_sop_instance_uid))
        raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Instance UID differs from the one in the request",
                      sop_instance_uid=meta.sop_instance_uid, sop_class_uid=meta.sop_class_uid)
    if expected_study_instance_uid is not None and meta.study_instance_uid != expected_study_instance_uid:
        log.error("instance %s belongs to study %s, not to %s named in the request",
                  uid_for_log(meta.sop_instance_uid), uid_for_log(meta.study_instance_uid),
                  uid_for_log(expected_study_instance_uid))
        raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS, "Study Instance UID differs from the one in the request",
                      sop_instance_uid=meta.sop_instance_uid, sop_class_uid=meta.sop_class_uid)
    store = node.store
    relpath = store.instance_relpath(meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid)
    refused = dict(sop_instance_uid=meta.sop_instance_uid, sop_class_uid=meta.sop_class_uid)
    try:
        pending = store.begin_write(relpath, data)
        pending.commit()  # durable before the index transaction: no lock held across the fsync
    except StoreError as exc:
        log.error("cannot store %s: %s", meta.sop_instance_uid, exc)
        raise Refused(OUT_OF_RESOURCES, "cannot write the file store", **refused) from None
    cache = cache if cache is not None else repo.IndexCache()
    for attempt in (1, 2):
        try:
            with node.sessions.begin_connection() as conn:
                outcome = repo.index_instance(conn, meta, relpath, pending.size, pending.sha256, source,
                                              association_id, cache)
            break
        except IntegrityError as exc:
            known = bool(cache.studies or cache.series)
            cache.clear()  # rows cached in a rolled-back transaction, or removed meanwhile
            if attempt == 1 and known:
                continue  # look the study and series up again
            log.error("cannot index %s: %s", meta.sop_instance_uid, db_error(exc))
            raise Refused(OUT_OF_RESOURCES, "cannot index the instance", **refused) from None
        except DataError as exc:
            cache.clear()
            # The database refuses a value as such (it would refuse it on every retry).
            log.error("instance %s from %s refused by the database: %s", meta.sop_instance_uid, source,
                      db_error(exc))
            raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS, "a value the database refuses", **refused) from None
        except Exception as exc:  # noqa: BLE001 - database down: the sender must retry
            cache.clear()
            # The sender retries; the retry rewrites the file and indexes it.
            log.error("cannot index %s: %s", meta.sop_instance_uid, db_error(exc))
            raise Refused(OUT_OF_RESOURCES, "database unavailable", **refused) from None
    log.debug("stored %s (%s) from %s", meta.sop_instance_uid, outcome, source)
    return Stored(meta=meta, outcome=outcome, relpath=relpath)
