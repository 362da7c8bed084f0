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


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class PendingWrite:
    """Bytes written to a temporary file, not yet durable or visible under their name."""

    def __init__(self, relpath: str, target: Path, tmp: Path, size: int, sha256: str):
        self.relpath, self.target, self.tmp, self.size, self.sha256 = relpath, target, tmp, size, sha256

    def commit(self) -> None:
        """fsync the file, rename it into place, fsync the folder; raises StoreError."""
        try:
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.tmp, self.target)
            dir_fd = os.open(self.target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self.abort()
            raise StoreError(exc.errno, f"cannot write {self.relpath}: {exc.strerror or exc}") from exc

    def abort(self) -> None:
        _unlink(self.tmp)


class FileStore:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._made: set[Path] = set()  # folders known to exist (saves a mkdir per instance)

    def instance_relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        return f"instances/{safe_uid(study_uid)}/{safe_uid(series_uid)}/{safe_uid(sop_uid)}.dcm"

    def result_relpath(self, job_id: int, kind: str, sop_uid: str) -> str:
        return f"results/{int(job_id)}/{kind}-{safe_uid(sop_uid)}.dcm"

    def path(self, relpath: str) -> Path:
        """The absolute path of ``relpath``; refuses anything that would leave the store."""
        joined = os.path.normpath(os.path.join(self.root, relpath))
        if not joined.startswith(str(self.root) + os.sep):
            raise ValueError(f"path {relpath!r} is outside the file store {self.root}")
        return Path(joined)

    def write_atomic(self, relpath: str, chunks: list[bytes] | bytes) -> tuple[int, str]:
        """Write ``chunks`` to ``relpath`` durably; returns (size in bytes, sha256 hex)."""
        pending = self.begin_write(relpath, chunks)
        pending.commit()
        return pending.size, pending.sha256

    def begin_write(self, relpath: str, chunks: list[bytes] | bytes) -> PendingWrite:
        """Write the bytes to a temporary file beside ``relpath``; ``commit()`` makes them durable
        and visible (fsync, rename, fsync folder), ``abort()`` removes them. Lets a caller index
        the file in the database while the fsync runs, and commit both only when both succeeded."""
        target = self.path(relpath)
        if isinstance(chunks, (bytes, bytearray, memoryview)):
            chunks = [bytes(chunks)]
        digest = hashlib.sha256()
        size = 0
        tmp = None
        try:
            if target.parent not in self._made:
                target.parent.mkdir(parents=True, exist_ok=True)
                self._made.add(target.parent)
            try:
                fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
            except FileNotFoundError:  # removed behind our back (e.g. results of a re-run)
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            if tmp is not None:
                _unlink(tmp)
            raise StoreError(exc.errno, f"cannot write {relpath}: {exc.strerror or exc}") from exc
        return PendingWrite(relpath, target, Path(tmp), size, digest.hexdigest())

    def read_bytes(self, relpath: str) -> bytes:
        return self.path(relpath).read_bytes()
