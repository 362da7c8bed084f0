"""The dispatcher against real peers: DCMTK storescp and pynetdicom SCPs that misbehave."""
from __future__ import annotations

import shutil
import time
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from sqlalchemy import select

from dicom_node.dispatch import backoff_seconds, dispatch_once
from storage.models import (Destination, Job, JobState, ResultObject, Series, Study, Transfer, TransferState, utcnow)
from tests.peers import DATA, StoreSCP, free_port

SAMPLES = DATA / "dicom-samples" / "dcmqi" / "ct-3slice"


def sample_files() -> list[Path]:
    if not SAMPLES.is_dir():
        pytest.skip(f"{SAMPLES} not found (shared data absent)")
    return sorted(SAMPLES.glob("*.dcm"))


@pytest.fixture
def node(make_node, db_url):
    return make_node(db_url, dispatch={"backoff_base_seconds": 0.5, "backoff_max_seconds": 1, "max_attempts": 5,
                                       "timeout_seconds": 5})


def queue_transfer(node, port: int, ae_title: str = "STORESCP", name: str = "pacs") -> int:
    """A finished job with the sample files as its result objects, and one transfer to a destination."""
    with node.sessions.begin() as s:
        study = Study(study_instance_uid=f"1.2.3.{free_port()}")
        series = Series(series_instance_uid=f"1.2.3.4.{free_port()}", study=study)
        job = Job(series=series, idempotency_key=f"k-{name}-{port}-{time.monotonic_ns()}", state=JobState.DONE)
        dest = s.scalar(select(Destination).where(Destination.name == name))
        if dest is None:
            dest = Destination(name=name, ae_title=ae_title, host="127.0.0.1", port=port, outputs=["sr", "seg"])
        s.add_all([study, series, job, dest])
        s.flush()
        ids = []
        for f in sample_files():
            ds = dcmread(f, stop_before_pixels=True)
            existing = s.scalar(select(ResultObject).where(ResultObject.sop_instance_uid == ds.SOPInstanceUID))
            if existing is not None:  # a second destination for the same results
                ids.append(existing.id)
                continue
            rel = f"results/{job.id}/{f.name}"
            node.store.path(rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, node.store.path(rel))
            obj = ResultObject(job=job, kind="sr", sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                               series_instance_uid=ds.SeriesInstanceUID, path=rel)
            s.add(obj)
            s.flush()
            ids.append(obj.id)
        t = Transfer(job=job, destination=dest, result_object_ids=ids, sent_sop_instance_uids=[],
                     state=TransferState.PENDING)
        s.add(t)
        s.flush()
        return t.id


def transfer(node, tid: int) -> Transfer:
    with node.sessions() as s:
        return s.get(Transfer, tid)


def make_due(node, tid: int) -> None:
    with node.sessions.begin() as s:
        s.get(Transfer, tid).next_attempt_at = utcnow() - timedelta(seconds=1)


def pynetdicom_scp(port: int, *, require_called: str | None = None, store_status: int = 0x0000,
                   abort_after: int | None = None):
    ae = AE(ae_title="PYSCP")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    if require_called:
        ae.ae_title = require_called
        ae.require_called_aet = True
    received = []

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        if abort_after is not None and len(received) > abort_after:
            event.assoc.abort()  # the peer disappears mid-association
            return 0x0000
        return store_status

    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return server, received


def test_destination_down_then_up_is_delivered_once_up(node, tmp_path):
    port = free_port()
    tid = queue_transfer(node, port)
    assert dispatch_once(node, "d1")
    t = transfer(node, tid)
    assert t.state is TransferState.PENDING and t.attempts == 1 and "could not connect" in t.error
    assert t.next_attempt_at > utcnow()
    assert not dispatch_once(node, "d1")  # backing off: nothing due
    peer = StoreSCP(tmp_path / "pacs", port=port).start()
    try:
        time.sleep(0.6)
        assert dispatch_once(node, "d1")
        t = transfer(node, tid)
        assert t.state is TransferState.SENT and t.error is None
        received = {dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in peer.files()}
        assert received == set(t.sent_sop_instance_uids) and len(received) == len(sample_files())
    finally:
        peer.stop()


def test_association_rejected_is_a_permanent_failure(node):
    port = free_port()
    server, _ = pynetdicom_scp(port, require_called="SOMEONE_ELSE")
    try:
        tid = queue_transfer(node, port, ae_title="STORESCP")
        dispatch_once(node, "d1")
        t = transfer(node, tid)
        assert t.state is TransferState.FAILED and "rejected" in t.error and t.attempts == 1
    finally:
        server.shutdown()


def test_refused_status_is_permanent_and_nothing_is_marked_sent(node):
    port = free_port()
    server, received = pynetdicom_scp(port, store_status=0xA900)
    try:
        tid = queue_transfer(node, port)
        dispatch_once(node, "d1")
        t = transfer(node, tid)
        assert received, "the peer saw the C-STORE"
        assert t.state is TransferState.FAILED and "0xA900" in t.error
        assert t.sent_sop_instance_uids == []
    finally:
        server.shutdown()


def test_peer_that_disappears_mid_association_gets_the_rest_on_retry(node):
    port = free_port()
    server, received = pynetdicom_scp(port, abort_after=1)
    try:
        tid = queue_transfer(node, port)
        dispatch_once(node, "d1")
        t = transfer(node, tid)
        assert t.state is TransferState.PENDING
        assert len(t.sent_sop_instance_uids) == 1  # only what the peer acknowledged
    finally:
        server.shutdown()
    server, received = pynetdicom_scp(port)
    try:
        make_due(node, tid)
        dispatch_once(node, "d1")
        t = transfer(node, tid)
        assert t.state is TransferState.SENT
        assert len(received) == len(sample_files()) - 1  # the acknowledged one was not sent again
    finally:
        server.shutdown()


def test_down_destination_does_not_block_the_others(node, tmp_path):
    down = queue_transfer(node, free_port(), name="down")
    peer = StoreSCP(tmp_path / "up").start()
    try:
        up = queue_transfer(node, peer.port, name="up")
        dispatch_once(node, "d1")
        dispatch_once(node, "d1")
        assert transfer(node, up).state is TransferState.SENT
        assert transfer(node, down).state is TransferState.PENDING
    finally:
        peer.stop()


def test_transient_failures_stop_after_max_attempts(node):
    tid = queue_transfer(node, free_port())
    for _ in range(5):
        make_due(node, tid)
        dispatch_once(node, "d1")
    t = transfer(node, tid)
    assert t.state is TransferState.FAILED and "gave up after 5 attempts" in t.error


def test_backoff_is_exponential_and_capped():
    assert [backoff_seconds(a, 5, 600) for a in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert backoff_seconds(20, 5, 600) == 600
