"""Reproduce the delivery defects of issue 9 against a tree, with real peers (Orthanc, a
pynetdicom SCP without Comprehensive 3D SR), using only the API that predates the fix (the
stages driven one pass at a time; ``time.sleep`` for the quiet period), so the same script runs
on the tree before and after the change:

    cd /work/main        && PYTHONPATH=$PWD /work/main/.venv/bin/python /work/h9-delivery/benchmarks/repro_issue9_delivery.py
    cd /work/h9-delivery && PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/repro_issue9_delivery.py

It prints one line per defect: what the PACS holds (SR/SEG counts), the jobs made, and what a
destination without Comprehensive 3D SR received. LIDC-IDRI-0001 from ../shared/data.
"""
from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from sqlalchemy import select

sys.path.insert(0, str(Path.cwd()))
from dicom_node.config import Settings  # noqa: E402
from dicom_node.dispatch import dispatch_once  # noqa: E402
from dicom_node.node import open_node  # noqa: E402
from dicom_node.scheduler import schedule_once  # noqa: E402
from dicom_node.scp import Listener  # noqa: E402
from dicom_node.stages import StageHeartbeat  # noqa: E402
from dicom_node.worker import work_once  # noqa: E402
from model.finding import Finding  # noqa: E402
from storage.models import Job, Transfer  # noqa: E402
from tests.peers import LIDC_SERIES, Orthanc, free_port  # noqa: E402

QUIET = 1.0


def one_nodule(array, spacing, origin, direction):  # noqa: ARG001
    z, y, x = (s // 2 for s in array.shape)
    r = 5
    zz, yy, xx = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return [Finding(center_mm=(0.0, 0.0, 0.0), center_voxel=(float(z), float(y), float(x)), diameter_mm=7.0,
                    volume_mm3=180.0, malignancy=0.7, score=0.9, mask=zz ** 2 + yy ** 2 + xx ** 2 <= r * r,
                    mask_offset=(z - r, y - r, x - r))]


def node_with(tmp: Path, destinations: list[dict], sources: list[dict] | None = None):
    node = open_node(Settings(node={"data_dir": str(tmp / "var"), "port": 0, "host": "127.0.0.1"},
                              completion={"quiet_seconds": QUIET}, sources=sources or [{"ae_title": "SENDER"}],
                              destinations=destinations))
    beat = StageHeartbeat(node.sessions, "listen", 1.0)
    beat.start()
    scp = Listener(node)
    scp.start(0)
    return node, scp, beat


def associate(port: int, syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian), calling: str = "SENDER"):
    ae = AE(ae_title=calling)
    for cx in AllStoragePresentationContexts[:127]:
        ae.add_requested_context(cx.abstract_syntax, list(syntaxes))
    return ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")


def send(assoc, datasets) -> None:
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0


def run_all(node) -> None:
    time.sleep(QUIET + 1.5)
    schedule_once(node, "v1")
    while work_once(node, "w", one_nodule, "v1"):
        pass
    while dispatch_once(node, "d"):
        pass


def count(pacs, modality: str) -> int:
    return sum(len(pacs.rest("GET", f"/series/{s}")["Instances"]) for s in pacs.rest("GET", "/series")
               if pacs.rest("GET", f"/series/{s}")["MainDicomTags"].get("Modality") == modality)


def jobs(node) -> int:
    with node.sessions() as s:
        return len(s.scalars(select(Job)).all())


def main() -> None:
    logging.disable(logging.WARNING)
    files = sorted(LIDC_SERIES.iterdir(), key=lambda p: float(dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    datasets = [dcmread(p) for p in files]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1 and 2: a sender that pauses mid-study; then the study resent in JPEG 2000 lossless.
        pacs = Orthanc(tmp / "orthanc", node_ae="DICOM_NODE", node_port=free_port()).start()
        node, scp, beat = node_with(tmp / "a", [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                                 "port": pacs.dicom_port}])
        try:
            assoc = associate(scp.port)
            send(assoc, datasets[:20])
            run_all(node)  # the sender pauses longer than the quiet period
            send(assoc, datasets[20:])
            assoc.release()
            time.sleep(0.5)
            run_all(node)
            print(f"defect 1 (pause mid-association): jobs={jobs(node)} PACS SR={count(pacs, 'SR')} "
                  f"SEG={count(pacs, 'SEG')}  (fixed: 1 job, 1 SR, 1 SEG)")
            j2k = []
            for ds in datasets:
                c = dcmread(files[datasets.index(ds)])
                c.compress(JPEG2000Lossless, generate_instance_uid=False)
                j2k.append(c)
            assoc = associate(scp.port, [JPEG2000Lossless])
            send(assoc, j2k)
            assoc.release()
            time.sleep(0.5)
            before = jobs(node)
            run_all(node)
            print(f"defect 2 (resent in JPEG 2000 lossless): new jobs={jobs(node) - before} PACS SR={count(pacs, 'SR')} "
                  f"SEG={count(pacs, 'SEG')}  (fixed: 0 new jobs, SR/SEG unchanged)")
        finally:
            scp.stop()
            beat.finish()
            pacs.stop()
        # 3: two sources, each naming its own PACS (``return_to``; a tree that predates it ignores
        # the key): the study from CT_A must not surface in PACS B.
        received = {"PACS_A": [], "PACS_B": []}
        servers = {}
        for name in received:
            rae = AE(ae_title=name)
            for cx in AllStoragePresentationContexts:
                rae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
            servers[name] = (free_port(), rae)
            servers[name] = (servers[name][0], rae.start_server(("127.0.0.1", servers[name][0]), block=False, evt_handlers=[
                (evt.EVT_C_STORE, lambda e, n=name: (received[n].append(str(e.dataset.Modality)), 0)[1])]))
        node, scp, beat = node_with(
            tmp / "c", [{"name": n.lower(), "ae_title": n, "host": "127.0.0.1", "port": port} for n, (port, _) in servers.items()],
            sources=[{"ae_title": "CT_A", "return_to": "pacs_a"}, {"ae_title": "CT_B", "return_to": "pacs_b"}])
        try:
            assoc = associate(scp.port, calling="CT_A")
            send(assoc, datasets)
            assoc.release()
            time.sleep(0.5)
            run_all(node)
            print(f"defect 3 (study from CT_A, two PACS): PACS A got {sorted(received['PACS_A'])}, PACS B got "
                  f"{sorted(received['PACS_B'])}  (fixed: PACS A gets SEG and SR, PACS B nothing)")
        finally:
            scp.stop()
            beat.finish()
            for _, srv in servers.values():
                srv.shutdown()
        # 4: a destination without Comprehensive 3D SR.
        port = free_port()
        ae = AE(ae_title="NO3DSR")
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax != "1.2.840.10008.5.1.4.1.1.88.34":
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        got = []
        server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, lambda e: (got.append(str(e.dataset.SOPClassUID)), 0)[1])])
        node, scp, beat = node_with(tmp / "b", [{"name": "no3d", "ae_title": "NO3DSR", "host": "127.0.0.1",
                                                 "port": port}])
        try:
            assoc = associate(scp.port)
            send(assoc, datasets)
            assoc.release()
            time.sleep(0.5)
            run_all(node)
            with node.sessions() as s:
                t = s.scalar(select(Transfer))
            names = {"1.2.840.10008.5.1.4.1.1.66.4": "SEG", "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR"}
            print(f"defect 4 (destination without 3D SR): received={[names.get(u, u) for u in got]} "
                  f"transfer={t.state.value} ({(t.error or '')[:90]})  (fixed: SEG and a Comprehensive SR, sent)")
        finally:
            scp.stop()
            beat.finish()
            server.shutdown()


if __name__ == "__main__":
    main()
