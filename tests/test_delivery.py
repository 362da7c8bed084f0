"""Completion, exactly-once results and delivery, with real peers (issue 9).

The node's stages run in this process, driven one pass at a time with the current time passed
in (``schedule_once(now=...)``), so nothing sleeps for a quiet period: the real listener
(pynetdicom SCP, with its stage heartbeat), the scheduler, the worker (with a stand-in
predictor: one nodule with a mask, so SR and SEG are written; the model is not under test
here) and the dispatcher, against real Orthanc (DICOM and DICOMweb), DCMTK storescu and a
pynetdicom SCP that refuses Comprehensive 3D SR.
"""
from __future__ import annotations

import io
import subprocess
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from sqlalchemy import select

from dicom_node.dispatch import dispatch_once
from dicom_node.scheduler import schedule_once
from dicom_node.scp import Listener
from dicom_node.stages import StageHeartbeat
from dicom_node.worker import work_once
from model.finding import Finding
from storage.models import AssociationLog, Job, JobState, ResultObject, Series, Study, Transfer, TransferState, utcnow
from tests.peers import DICOMWEB_PLUGIN, Orthanc, free_port, need, need_lidc, wait_for

pytestmark = pytest.mark.slow

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
QUIET = 2.0


def one_nodule(array, spacing, origin, direction):  # noqa: ARG001
    """A stand-in predictor: one 5-voxel-radius nodule with its mask at the volume's centre."""
    z, y, x = (s // 2 for s in array.shape)
    r = 5
    zz, yy, xx = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    mask = zz ** 2 + yy ** 2 + xx ** 2 <= r * r
    centre = np.asarray(origin) + np.asarray(direction).reshape(3, 3) @ (np.asarray([x, y, z]) * np.asarray(spacing))
    return [Finding(center_mm=tuple(float(v) for v in centre), center_voxel=(float(z), float(y), float(x)),
                    diameter_mm=7.0, volume_mm3=180.0, malignancy=0.7, score=0.9, mask=mask,
                    mask_offset=(z - r, y - r, x - r))]


def lidc_files():
    return sorted(need_lidc().iterdir(), key=lambda p: float(dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


class Harness:
    """A node on ``db_url`` with its listener (and heartbeat) running in this process."""

    def __init__(self, make_node, db_url, destinations, **overrides):
        self.node = make_node(db_url, completion={"quiet_seconds": QUIET, **overrides.pop("completion", {})},
                              destinations=destinations,
                              dispatch={"timeout_seconds": 20, "max_attempts": 2, "backoff_base_seconds": 0.1},
                              **overrides)
        self.beat = StageHeartbeat(self.node.sessions, "listen", 1.0)
        self.beat.start()
        self.scp = Listener(self.node)
        self.scp.start(0)

    def stop(self):
        self.scp.stop()
        self.beat.finish()

    def later(self, seconds: float = QUIET + 1):
        return utcnow() + timedelta(seconds=seconds)

    def run(self, now=None) -> int:
        """One scheduler pass at ``now`` (default: past the quiet period), then every job and transfer."""
        evaluated = schedule_once(self.node, "v1", now=now or self.later())
        while work_once(self.node, "w1", one_nodule, "v1"):
            pass
        while dispatch_once(self.node, "d1"):
            pass
        return evaluated

    def jobs(self) -> list[Job]:
        with self.node.sessions() as s:
            return s.scalars(select(Job).order_by(Job.id)).all()

    def transfers(self) -> list[Transfer]:
        with self.node.sessions() as s:
            return s.scalars(select(Transfer).order_by(Transfer.id)).all()

    def associate(self, syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian)):
        ae = AE(ae_title="STORESCU")
        for cx in AllStoragePresentationContexts[:127]:
            ae.add_requested_context(cx.abstract_syntax, list(syntaxes))
        assoc = ae.associate("127.0.0.1", self.scp.port, ae_title="DICOM_NODE")
        assert assoc.is_established
        return assoc

    def storescu(self, *paths, options=()):
        r = subprocess.run([need("storescu"), *options, "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1",
                            str(self.scp.port), *map(str, paths)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        self.wait_released()

    def wait_released(self):
        """Until the listener has recorded the end of every association (it does so just after
        the sender's release, in its own thread)."""
        def released():
            with self.node.sessions() as s:
                return s.scalar(select(AssociationLog.id).where(AssociationLog.direction == "in",
                                                                AssociationLog.ended_at.is_(None))) is None
        wait_for(released, timeout=30, interval=0.1, what="the association's end recorded")


def send_all(assoc, paths):
    for p in paths:
        status = assoc.send_c_store(dcmread(p))
        assert status.Status == 0x0000, (p.name, status)


@pytest.fixture
def orthanc(tmp_path):
    if not Path(DICOMWEB_PLUGIN).exists():
        pytest.skip(f"{DICOMWEB_PLUGIN} not found (Debian package orthanc-dicomweb)")
    pacs = Orthanc(tmp_path / "orthanc", node_ae="DICOM_NODE", node_port=free_port(), plugins=[DICOMWEB_PLUGIN],
                   config={"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}).start()
    yield pacs
    pacs.stop()


def dicomweb_url(pacs) -> str:
    return f"http://127.0.0.1:{pacs.http_port}/dicom-web"


def pacs_objects(pacs, modality: str) -> list[str]:
    """SOP Instance UIDs of every instance of ``modality`` in Orthanc."""
    out = []
    for sid in pacs.rest("GET", "/series"):
        info = pacs.rest("GET", f"/series/{sid}")
        if info["MainDicomTags"].get("Modality") == modality:
            out += [pacs.rest("GET", f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in info["Instances"]]
    return sorted(out)


def pacs_file(pacs, sop_uid: str):
    [oid] = pacs.rest("POST", "/tools/lookup", sop_uid.encode())
    return dcmread(io.BytesIO(pacs.rest("GET", f"/instances/{oid['ID']}/file")))


def orthanc_destination(pacs) -> dict:
    return {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}


# --- completion ---------------------------------------------------------------------------------

def test_paused_association_gives_one_job_and_the_pacs_one_sr_and_one_seg(make_node, db_url, orthanc):
    h = Harness(make_node, db_url, [orthanc_destination(orthanc)])
    try:
        files = lidc_files()
        assoc = h.associate()
        send_all(assoc, files[:20])
        # The sender pauses: long past the quiet period, the association is still open.
        assert h.run(now=h.later(QUIET + 10)) == 0
        assert h.jobs() == []
        with h.node.sessions() as s:
            assert s.scalar(select(Study)).status.value == "received"
        send_all(assoc, files[20:])
        assoc.release()
        h.wait_released()
        assert h.run() == 1
        [job] = h.jobs()
        assert job.state is JobState.DONE
        [t] = h.transfers()
        assert t.state is TransferState.SENT, t.error
        assert len(pacs_objects(orthanc, "SR")) == 1 and len(pacs_objects(orthanc, "SEG")) == 1
        assert sorted(v["kind"] for v in t.object_status.values()) == ["seg", "sr"]
        assert all(v["state"] == "sent" for v in t.object_status.values())
        assert h.run() == 0 and len(h.jobs()) == 1
    finally:
        h.stop()


def test_open_association_holds_only_up_to_the_cap_and_not_after_its_listener_died(make_node, tmp_path):
    h = Harness(make_node, f"sqlite:///{tmp_path / 'n.sqlite3'}", [], completion={"max_open_seconds": 60})
    try:
        files = lidc_files()
        assoc = h.associate()
        send_all(assoc, files[:20])
        assert schedule_once(h.node, "v1", now=h.later(10)) == 0  # held: open association, live listener
        assert schedule_once(h.node, "v1", now=h.later(61)) == 1  # past max_open_seconds: complete
        with h.node.sessions.begin() as s:
            s.scalar(select(Series).where(Series.is_result.is_(False))).dirty = True
        assert schedule_once(h.node, "v1", now=h.later(10)) == 0  # held again within the cap
        h.beat.finish()  # the listener "crashes": its heartbeat row is gone
        assert schedule_once(h.node, "v1", now=h.later(10)) == 1
        assoc.release()
    finally:
        h.scp.stop()


def test_complete_now_evaluates_a_held_series(make_node, tmp_path):
    from dicom_node.app.studies import request_complete

    h = Harness(make_node, f"sqlite:///{tmp_path / 'n.sqlite3'}", [])
    try:
        assoc = h.associate()
        send_all(assoc, lidc_files())
        assert schedule_once(h.node, "v1", now=h.later(10)) == 0
        with h.node.sessions.begin() as s:
            study_uid = s.scalar(select(Study.study_instance_uid))
            request_complete(s, "admin", study_uid)
        assert schedule_once(h.node, "v1", now=utcnow()) == 1  # neither quiet nor released
        assert len(h.jobs()) == 1
        assoc.release()
    finally:
        h.stop()


# --- exactly once -------------------------------------------------------------------------------

def test_resend_in_other_transfer_syntaxes_changes_nothing_and_one_more_slice_reruns(make_node, db_url, orthanc,
                                                                                      tmp_path):
    h = Harness(make_node, db_url, [orthanc_destination(orthanc)])
    try:
        files = lidc_files()
        first, last = files[:-1], files[-1]
        h.storescu(*first)
        assert h.run() == 1
        [job] = h.jobs()
        [sr_uid] = pacs_objects(orthanc, "SR")
        [seg_uid] = pacs_objects(orthanc, "SEG")
        # The same study in JPEG 2000 lossless (pydicom + pylibjpeg-openjpeg): other bytes, same pixels.
        j2k = tmp_path / "j2k"
        j2k.mkdir()
        for p in first:
            ds = dcmread(p)
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)  # same instance, other bytes
            ds.save_as(j2k / p.name, enforce_file_format=True)
        assoc = h.associate([JPEG2000Lossless])
        send_all(assoc, sorted(j2k.iterdir()))
        assoc.release()
        h.wait_released()
        with h.node.sessions() as s:
            insts = s.scalar(select(Series).where(Series.is_result.is_(False))).instances
            assert {i.transfer_syntax_uid for i in insts} == {JPEG2000Lossless}, [(i.sop_instance_uid[-8:], i.transfer_syntax_uid, i.instance_number) for i in insts if i.transfer_syntax_uid != JPEG2000Lossless] + [len(insts)]
        assert h.run() == 1  # re-evaluated ...
        assert len(h.jobs()) == 1  # ... and no new job
        # And in implicit VR little endian.
        implicit = tmp_path / "implicit"
        implicit.mkdir()
        for p in first:
            ds = dcmread(p)
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            ds.save_as(implicit / p.name, implicit_vr=True, little_endian=True, enforce_file_format=True)
        h.storescu(*sorted(implicit.iterdir()), options=["-xi"])
        with h.node.sessions() as s:
            assert {i.transfer_syntax_uid for i in s.scalar(select(Series).where(Series.is_result.is_(False))).instances} == {ImplicitVRLittleEndian}
        h.run()
        assert len(h.jobs()) == 1
        assert pacs_objects(orthanc, "SR") == [sr_uid] and pacs_objects(orthanc, "SEG") == [seg_uid]
        # One more slice: a re-run whose SR names the one it replaces.
        h.storescu(last)
        assert h.run() == 1
        jobs = h.jobs()
        assert len(jobs) == 2 and jobs[1].replaces_job_id == job.id and jobs[1].state is JobState.DONE
        new_sr = [u for u in pacs_objects(orthanc, "SR") if u != sr_uid]
        assert len(new_sr) == 1
        pred = pacs_file(orthanc, new_sr[0]).PredecessorDocumentsSequence[0]
        assert pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sr_uid
        with h.node.sessions() as s:  # the worklist's study row reports the current (re-run) job
            study = s.scalar(select(Study))
            assert study.status.value == "done"
            current = s.scalar(select(ResultObject).where(ResultObject.job_id == jobs[1].id,
                                                          ResultObject.kind == "sr"))
            assert current.sop_instance_uid == new_sr[0]
    finally:
        h.stop()


def test_late_arrival_policy_ignore_keeps_the_results(make_node, tmp_path):
    h = Harness(make_node, f"sqlite:///{tmp_path / 'n.sqlite3'}", [], completion={"late": "ignore"})
    try:
        files = lidc_files()
        h.storescu(*files[:-1])
        assert h.run() == 1
        h.storescu(files[-1])
        assert h.run() == 1
        assert len(h.jobs()) == 1
        with h.node.sessions() as s:
            assert "late arrival ignored" in s.scalar(select(Series).where(Series.is_result.is_(False))).eligibility_reason
    finally:
        h.stop()


# --- delivery -----------------------------------------------------------------------------------

def recording_scp(port: int, ae_title: str, syntaxes):
    """A pynetdicom Storage SCP on ``port`` that records the datasets it receives, in arrival
    order. ``syntaxes(abstract_syntax)`` gives the transfer syntaxes it accepts for a storage SOP
    class, or None to refuse that class."""
    ae = AE(ae_title=ae_title)
    for cx in AllStoragePresentationContexts:
        accepted = syntaxes(cx.abstract_syntax)
        if accepted:
            ae.add_supported_context(cx.abstract_syntax, accepted)
    received = []

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return server, received


def no_3d_sr_scp(port: int):
    """A Storage SCP that supports every storage SOP class but Comprehensive 3D SR."""
    return recording_scp(port, "NO3DSR", lambda uid: None if uid == COMPREHENSIVE_3D_SR else ALL_TRANSFER_SYNTAXES)


@pytest.mark.parametrize("fallback", ["comprehensive", "fail"])
def test_destination_without_3d_sr_gets_the_seg_and_a_comprehensive_sr(make_node, tmp_path, fallback):
    port = free_port()
    server, received = no_3d_sr_scp(port)
    dest = {"name": "no3d", "ae_title": "NO3DSR", "host": "127.0.0.1", "port": port, "sr_fallback": fallback}
    h = Harness(make_node, f"sqlite:///{tmp_path / 'n.sqlite3'}", [dest])
    try:
        h.storescu(*lidc_files())
        assert h.run() == 1
        [t] = h.transfers()
        kinds = [str(ds.SOPClassUID) for ds in received]
        status = {v["kind"]: v for v in t.object_status.values()}
        assert status["seg"]["state"] == "sent"
        if fallback == "comprehensive":
            assert kinds == [SEGMENTATION, COMPREHENSIVE_SR]  # SEG first, then the SR that references it
            sr = received[1]
            assert t.state is TransferState.SENT, t.error
            assert status["sr"]["state"] == "sent" and status["sr"]["sent_as"] == str(sr.SOPInstanceUID)

            def value_types(items):
                for it in items:
                    yield it.ValueType
                    yield from value_types(it.get("ContentSequence", []))

            types = set(value_types(sr.ContentSequence))
            assert "SCOORD3D" not in types and "SCOORD" in types
        else:
            assert kinds == [SEGMENTATION]
            assert t.state is TransferState.FAILED and "Comprehensive 3D SR" in t.error
            assert status["sr"]["state"] == "failed" and "Comprehensive 3D SR" in status["sr"]["reason"]
    finally:
        h.stop()
        server.shutdown()


def test_dicomweb_stow_rs_into_orthanc_with_its_echo(make_node, tmp_path, orthanc):
    from dicom_node import destinations
    from storage.models import Destination

    dest = {"name": "web", "kind": "dicomweb", "url": dicomweb_url(orthanc)}
    h = Harness(make_node, f"sqlite:///{tmp_path / 'n.sqlite3'}",
                [dest, {"name": "wrong", "kind": "dicomweb", "url": dicomweb_url(orthanc) + "/nothing-here"}])
    try:
        ctx = destinations.Context(calling_ae="DICOM_NODE", timeout=10)
        with h.node.sessions.begin() as s:
            good, bad = (s.scalar(select(Destination).where(Destination.name == n)) for n in ("web", "wrong"))
            assert destinations.echo(good, ctx).ok
            assert not destinations.echo(bad, ctx).ok
            bad.enabled = False
        h.storescu(*lidc_files())
        assert h.run() == 1
        [t] = h.transfers()
        assert t.state is TransferState.SENT, t.error
        assert len(pacs_objects(orthanc, "SR")) == 1 and len(pacs_objects(orthanc, "SEG")) == 1
        assert sorted(t.sent_sop_instance_uids) == sorted(pacs_objects(orthanc, "SR") + pacs_objects(orthanc, "SEG"))
    finally:
        h.stop()


def test_forwarded_originals_are_transcoded_for_a_peer_that_takes_other_syntaxes(make_node, tmp_path):
    """Originals stored in JPEG 2000 lossless go to a peer that takes only Explicit VR Little
    Endian, decoded, with their SOP Instance UIDs and pixel values unchanged."""
    from dicom_node.app.transfers import queue_forwards
    from dicom_node.routing.evaluate import Decision
    from storage.models import Destination, utcnow

    port = free_port()
    server, received = recording_scp(port, "PLAINONLY", lambda uid: [ExplicitVRLittleEndian])
    dest = {"name": "plain", "ae_title": "PLAINONLY", "host": "127.0.0.1", "port": port}
    h = Harness(make_node, f"sqlite:///{tmp_path / 'n.sqlite3'}", [dest])
    try:
        j2k = tmp_path / "j2k"
        j2k.mkdir()
        originals = {}
        for p in lidc_files()[:3]:
            ds = dcmread(p)
            originals[str(ds.SOPInstanceUID)] = ds.pixel_array.copy()
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)
            ds.save_as(j2k / p.name, enforce_file_format=True)
        assoc = h.associate([JPEG2000Lossless])
        send_all(assoc, sorted(j2k.iterdir()))
        assoc.release()
        h.wait_released()
        with h.node.sessions.begin() as s:
            target = s.scalar(select(Destination))
            forward = Decision(results=[], forward=True, outputs={target.id: ["originals"]}, names={target.id: target.name})
            queue_forwards(s, s.scalar(select(Series).where(Series.is_result.is_(False))), forward, utcnow())
        while dispatch_once(h.node, "d1"):
            pass
        [t] = h.transfers()
        assert t.state is TransferState.SENT, t.error
        assert {v["kind"] for v in t.object_status.values()} == {"original"}
        assert {str(ds.SOPInstanceUID) for ds in received} == set(originals)
        for ds in received:
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert np.array_equal(ds.pixel_array, originals[str(ds.SOPInstanceUID)])
    finally:
        h.stop()
        server.shutdown()
