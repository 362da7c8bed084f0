"""The file store: DICOM files under sanitised UID paths, written atomically.

Layout under ``root`` (the node's data directory):
  ``instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``  as received
  ``results/<job id>/<kind>-<SOPInstanceUID>.dcm``                          written by the worker
Every write goes to a temporary file in the target folder, is fsync'ed, renamed into place and
the folder fsync'ed, so a crash leaves either the old file or the new one, never half a file.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class StoreError(OSError):
    """Raised when a file cannot be written (disk full, permissions)."""


def safe_uid(uid: str) -> str:
    """``uid`` if it is a valid DICOM UID (digits and dots, at most 64 characters), else a
    hash-based name, so that no received value can escape the store or collide with another."""
    uid = (uid or "").strip().rstrip("\x00")
    if uid and len(uid) <= 64 and _UID_RE.match(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


class FileStore:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def instance_relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        return f"instances/{safe_uid(study_uid)}/{safe_uid(series_uid)}/{safe_uid(sop_uid)}.dcm"

    def result_relpath(self, job_id: int, kind: str, sop_uid: str) -> str:
        return f"results/{int(job_id)}/{kind}-{safe_uid(sop_uid)}.dcm"

    def path(self, relpath: str) -> Path:
        p = (self.root / relpath).resolve()
        if self.root not in p.parents:
            raise ValueError(f"path {relpath!r} is outside the file store {self.root}")
        return p

    def write_atomic(self, relpath: str, chunks: list[bytes] | bytes) -> tuple[int, str]:
        """Write ``chunks`` to ``relpath`` durably; returns (size in bytes, sha256 hex)."""
        target = self.path(relpath)
        if isinstance(chunks, (bytes, bytearray, memoryview)):
            chunks = [bytes(chunks)]
        digest = hashlib.sha256()
        size = 0
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    for chunk in chunks:
                        fh.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StoreError(exc.errno, f"cannot write {relpath}: {exc.strerror or exc}") from exc
        return size, digest.hexdigest()

    def read_bytes(self, relpath: str) -> bytes:
        return self.path(relpath).read_bytes()
