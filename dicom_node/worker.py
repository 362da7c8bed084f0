"""work: run the model on a series and write its results.

Contract: claims one job at a time with a lease that a heartbeat thread renews; loads the series
into a volume in HU with its patient geometry; calls the Predictor; builds the TID 1500 SR and the
SEG (and key images where a destination wants them; a re-run's SR names the SR of the job it
replaces in its Predecessor Documents Sequence); writes them to the file store; then, in one
transaction, records findings and result objects, queues one transfer per destination routing
chose (``Job.routing``), and marks the job done. A worker killed mid-job leaves the lease to expire and the job is claimed
again (by this or another worker); nothing of a half-finished attempt is visible in the database.
A series that cannot be read as a volume fails at once (retrying cannot help); other errors are
retried up to the job's ``max_attempts``. Every change of a job's state (claim, done with its
transfers, failed, put back) is a call of ``dicom_node.app.jobs``.

Attempts are charged only when the job itself fails (an exception while loading, predicting or
writing results). A reclaim after an expired lease (the worker was killed, the node restarted)
is counted in ``lease_expiries`` instead, and only a job reclaimed more than ``[worker]
max_lease_expiries`` times is failed (a poison job that kills its worker every time). On
SIGTERM the running job may finish for ``[worker] stop_grace_seconds``; past that it is put back
in the queue, its attempt uncharged, and the process exits.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from dicom_node import ingest
from dicom_node.app import jobs
from dicom_node.node import Node
from dicom_node.results.sr_comprehensive import add_predecessor
from dicom_node.routing.apply import result_targets
from dicom_node.volume import VolumeError, load_series
from storage import repo
from storage.models import FindingRow, Job, JobState, ResultObject

log = logging.getLogger(__name__)

ALGORITHM_NAME = "dicom-node Res-MTNet"


def model_version(weights: Path | None) -> str:
    """A short identity of the weights the Predictor will load (``model.DEFAULT_WEIGHTS`` when
    None): changes when the weights change, and is part of every job's idempotency key."""
    from model import DEFAULT_WEIGHTS

    weights = weights or DEFAULT_WEIGHTS
    if not Path(weights).exists():
        return "resmtnet-untrained"
    return "resmtnet-" + hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:12]


class _Heartbeat(threading.Thread):
    def __init__(self, node: Node, job_id: int, worker_id: str, lease: float):
        super().__init__(daemon=True, name=f"lease-job-{job_id}")
        self.node, self.job_id, self.worker_id, self.lease = node, job_id, worker_id, lease
        self.done = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.done.wait(self.lease / 3):
            try:
                with self.node.sessions.begin() as s:
                    if not repo.renew_lease(s, Job, self.job_id, self.worker_id, self.lease):
                        self.lost = True
                        log.error("job %d: lease lost to another worker", self.job_id)
                        return
            except Exception:  # noqa: BLE001
                log.exception("job %d: lease renewal failed", self.job_id)


def _encode(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class _GracefulStop(threading.Thread):
    """Once ``stop`` is set, lets the running job finish for ``grace`` seconds; past that, puts
    the job back in the queue without charging its attempt and exits the process.

    The worker holds ``finishing()`` while it commits a job's outcome, so a job is never both
    released and recorded done or failed.
    """

    def __init__(self, node: Node, stop: threading.Event, worker_id: str, grace: float):
        super().__init__(daemon=True, name="stop-grace")
        self.node, self.stop, self.worker_id, self.grace = node, stop, worker_id, grace
        self._lock = threading.Lock()
        self.exited = threading.Event()  # set by the worker loop when it returns
        self._job: tuple[int, _Heartbeat] | None = None

    def begin(self, job_id: int, beat: _Heartbeat) -> None:
        with self._lock:
            self._job = (job_id, beat)

    @contextlib.contextmanager
    def finishing(self):
        """Held while the outcome of the current job is committed; the job is over afterwards."""
        with self._lock:
            try:
                yield
            finally:
                self._job = None

    def end(self) -> None:
        with self.finishing():
            pass

    def run(self) -> None:
        self.stop.wait()
        current = self._job
        if current is not None:
            log.info("stop requested: letting job %d finish (at most %.0f s)", current[0], self.grace)
        if self.exited.wait(self.grace):  # the loop ended in time (also covers a job claimed late)
            return
        with self._lock:
            if self._job is None:
                return
            job_id, beat = self._job
            beat.done.set()
            try:
                with self.node.sessions.begin() as s:
                    released = jobs.release(s, job_id, self.worker_id,
                                            f"worker stopped after {self.grace:.0f} s grace; requeued, uncharged")
                if released:
                    log.warning("job %d still running %.0f s after the stop request: back in the queue, attempt "
                                "not charged", job_id, self.grace)
            except Exception:  # noqa: BLE001 - the lease will expire instead (not charged either)
                log.exception("job %d could not be put back in the queue; its lease will expire", job_id)
            logging.shutdown()
            os._exit(0)


def work_once(node: Node, worker_id: str, predictor: Callable, weights_version: str,
              guard: _GracefulStop | None = None) -> bool:
    """Claim and process one job. Returns False when there was nothing to do."""
    lease = node.settings.worker.lease_seconds
    max_expiries = node.settings.worker.max_lease_expiries
    with node.sessions() as s:  # a read: an idle poll takes no write lock
        if not repo.job_claimable(s):
            return False
    with node.sessions.begin() as s:
        job, runnable = jobs.claim(s, worker_id, lease, max_expiries)
        if job is None:
            return False
        if not runnable:  # reclaimed after an expired lease too often: failed (the worker keeps dying on it)
            return True
        job_id, attempts, max_attempts = job.id, job.attempts, job.max_attempts
        uid_seed = job.idempotency_key
        series = job.series
        series_uid = series.series_instance_uid
        paths = [node.store.path(i.path) for i in series.instances]
    log.info("job %d: series %s, %d instances (attempt %d/%d)", job_id, series_uid, len(paths), attempts, max_attempts)
    beat = _Heartbeat(node, job_id, worker_id, lease)
    beat.start()
    if guard is not None:
        guard.begin(job_id, beat)
    finishing = guard.finishing if guard is not None else contextlib.nullcontext
    try:
        _process(node, job_id, paths, predictor, weights_version, beat, uid_seed, finishing)
    except VolumeError as exc:
        with finishing():
            _finish_failed(node, job_id, f"series cannot be analysed: {exc}", retry=False)
    except Exception as exc:  # noqa: BLE001
        log.exception("job %d failed", job_id)
        with finishing():
            _finish_failed(node, job_id, f"{type(exc).__name__}: {exc}", retry=attempts < max_attempts)
    finally:
        beat.done.set()
        if guard is not None:
            guard.end()
    return True


def _process(node: Node, job_id: int, paths: list[Path], predictor: Callable, weights_version: str,
             beat: _Heartbeat, uid_seed: str, finishing=contextlib.nullcontext) -> None:
    """Load, predict, write result files, then commit findings, result objects and transfers.

    ``uid_seed`` (the job's idempotency key) makes a re-run after a crash produce the same
    SOP Instance UIDs, so a destination never receives two copies of one result.
    """
    from dicom_node.results import build_results

    t0 = time.monotonic()
    volume = load_series(paths)
    t1 = time.monotonic()
    findings = predictor(volume.array, volume.spacing, volume.origin, volume.direction)
    t2 = time.monotonic()
    with node.sessions() as s:
        want_sc = any("sc" in outputs for _, outputs in result_targets(s, s.get(Job, job_id)))
        predecessor = _predecessor_sr(s, job_id)
    results = build_results(volume, findings, algorithm_name=ALGORITHM_NAME, algorithm_version=weights_version,
                            want_key_images=want_sc, uid_seed=uid_seed)
    if predecessor is not None:  # a re-run after late arrivals: name the SR this one replaces
        add_predecessor(results.sr, str(results.sr.StudyInstanceUID), *predecessor)
    objects = [("sr", results.sr)] + ([("seg", results.seg)] if results.seg is not None else [])
    objects += [("sc", ds) for ds in results.key_images]
    shutil.rmtree(node.store.path(f"results/{job_id}"), ignore_errors=True)  # leftovers of a killed attempt
    written = []
    for kind, ds in objects:
        rel = node.store.result_relpath(job_id, kind, ds.SOPInstanceUID)
        data = _encode(ds)
        size, sha = node.store.write_atomic(rel, data)
        written.append((kind, ds, rel, ingest.read_meta(data, None, None), size, sha))
    t3 = time.monotonic()
    if beat.lost:
        raise RuntimeError("lease lost while processing; another worker owns the job now")
    with finishing(), node.sessions.begin() as s:
        job = s.get(Job, job_id)
        if job.claimed_by != beat.worker_id or job.state is not JobState.RUNNING:
            raise RuntimeError("job was taken over by another worker")
        study = job.series.study
        for n, f in enumerate(findings, start=1):
            s.add(FindingRow(job=job, study_id=study.id, number=results.numbers[n - 1], tracking_uid=results.tracking_uids[n - 1],
                             segment_number=results.segment_numbers[n - 1],
                             center_x_mm=float(f.center_mm[0]), center_y_mm=float(f.center_mm[1]),
                             center_z_mm=float(f.center_mm[2]), center_voxel=[float(v) for v in f.center_voxel],
                             diameter_mm=float(f.diameter_mm), volume_mm3=float(f.volume_mm3),
                             malignancy=float(f.malignancy), score=float(f.score),
                             location=side_of(f.center_mm)))
        rows = {}
        for kind, ds, rel, _meta, _size, _sha in written:
            row = ResultObject(job=job, kind=kind, sop_class_uid=str(ds.SOPClassUID),
                               sop_instance_uid=str(ds.SOPInstanceUID),
                               series_instance_uid=str(ds.SeriesInstanceUID), path=rel)
            s.add(row)
            rows[kind] = rows.get(kind, []) + [row]
        s.flush()
        for _kind, _ds, rel, meta, size, sha in written:
            # Indexed like a received instance (its own result series of the study, never
            # analysed), so DICOMweb (QIDO-RS, WADO-RS) and the viewer find the results.
            repo.index_instance(s, meta, rel, size, sha, None, None)
        jobs.finish_done(s, job, rows, inference_seconds=round(t2 - t1, 3))  # results queued to routed destinations
    log.info("job %d done: %d finding(s); load %.1f s, model %.1f s, results %.1f s",
             job_id, len(findings), t1 - t0, t2 - t1, t3 - t2)
    _prerender(node, job_id, volume, written, findings, results)


def _prerender(node: Node, job_id: int, volume, written, findings, results) -> None:
    """Render the study page's centre views now, while the volume is in memory (after the commit:
    the results are not held back by it, and a failure here only costs the web a slower first page)."""
    from dicom_node import render

    t0 = time.monotonic()
    try:  # never fails the job: it is committed already
        seg_rel = next((w[2] for w in written if w[0] == "seg"), None)
        nodules = [render.Nodule(number=results.numbers[i], segment_number=results.segment_numbers[i],
                                 center_mm=tuple(float(v) for v in f.center_mm), diameter_mm=float(f.diameter_mm))
                   for i, f in enumerate(findings)]
        count = render.prerender(node.store, job_id, volume, node.store.path(seg_rel) if seg_rel else None, nodules)
    except Exception as exc:  # noqa: BLE001 - the web renders on request instead
        log.warning("job %d: pre-rendering the key images failed: %s", job_id, exc)
        return
    log.info("job %d: %d key image(s) pre-rendered in %.1f s", job_id, count, time.monotonic() - t0)


def _predecessor_sr(s, job_id: int) -> tuple[str, str, str] | None:
    """(Series Instance UID, SOP Class UID, SOP Instance UID) of the SR of the job that job
    ``job_id`` replaces (``jobs.replaces_job_id``), or None."""
    job = s.get(Job, job_id)
    if job is None or job.replaces_job_id is None:
        return None
    sr = s.scalar(select(ResultObject).where(ResultObject.job_id == job.replaces_job_id, ResultObject.kind == "sr")
                  .limit(1))
    return None if sr is None else (sr.series_instance_uid, sr.sop_class_uid, sr.sop_instance_uid)


def side_of(center_mm) -> str:
    """The patient's side from the LPS x coordinate (+x is the patient's left); the lobe is not known."""
    return "left lung" if float(center_mm[0]) > 0 else "right lung"


def _finish_failed(node: Node, job_id: int, error: str, *, retry: bool) -> None:
    with node.sessions.begin() as s:
        jobs.finish_failed(s, job_id, error, retry=retry)


def run_worker(node: Node, stop: threading.Event, worker_id: str, predictor_factory: Callable[[], Callable],
               weights_version: str) -> None:
    """Load the model once, then process jobs until ``stop`` is set."""
    predictor = predictor_factory()
    log.info("worker %s ready (model %s)", worker_id, weights_version)
    guard = _GracefulStop(node, stop, worker_id, node.settings.worker.stop_grace_seconds)
    guard.start()
    try:
        while not stop.is_set():
            try:
                busy = work_once(node, worker_id, predictor, weights_version, guard)
            except Exception:  # noqa: BLE001 - the database may be restarting
                log.exception("worker pass failed")
                busy = False
            if not busy:
                stop.wait(node.settings.worker.poll_seconds)
    finally:
        guard.exited.set()
