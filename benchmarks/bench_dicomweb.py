#!/usr/bin/env python
"""DICOMweb of the node against Orthanc's DICOMweb plugin (Debian orthanc-dicomweb), same run.

Both servers hold the same content:
* 10,000 studies of one small instance each (no pixel data): PatientID ``PAT00000``..``PAT09999``,
  PatientName ``DOE^JOHN^<n>``, StudyDate spread over 2015-2024. Orthanc gets them as 10,000
  DICOM instances through its REST API; the node's index is seeded directly in its database
  (QIDO-RS answers from the index and never opens a file, so the files are not needed);
* LIDC-IDRI-0001 (133 CT instances, 70 MB; Armato et al., TCIA, doi:10.7937/K9/TCIA.2015.LO9QL9SX),
  stored in the node with STOW-RS (a ``sender`` account) and in Orthanc through its REST API.

The node runs as ``dicom-node serve`` (all stages, SQLite) and is asked with a bearer token;
Orthanc runs without authentication, ``TcpNoDelay`` on (and TCP_NODELAY=1 in its environment).
Every query is sent ``--repeat`` times over one keep-alive connection per server; the table shows
the median and 95th percentile in milliseconds and the number of results. "metadata (first)" is
one request right after the series was stored (the node builds its cache then), "metadata" the
repeated ones.

Usage: python benchmarks/bench_dicomweb.py [--studies 10000] [--repeat 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.peers import DICOMWEB_PLUGIN, LIDC_SERIES, NodeProcess, Orthanc, wait_port  # noqa: E402

SENDER = ("bench-sender", "bench-sender-pass")
READER = ("bench-rad", "bench-rad-passphrase")


def small_instance(n: int, study: str, series: str, sop: str) -> bytes:
    """A small CT-class instance without pixel data (about 600 bytes), study ``n`` of the set."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = sop, study, series
    ds.PatientID, ds.PatientName = f"PAT{n:05d}", f"DOE^JOHN^{n}"
    ds.StudyDate = date_of(n)
    ds.StudyTime = "120000"
    ds.AccessionNumber = f"ACC{n:07d}"
    ds.StudyDescription = "CT CHEST"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, 1
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def date_of(n: int) -> str:
    from datetime import date, timedelta

    return (date(2015, 1, 1) + timedelta(days=n % 3650)).strftime("%Y%m%d")


def uids(n: int) -> tuple[str, str, str]:
    root = "1.2.826.0.1.3680043.10.1013"  # a private root for the benchmark's made-up objects
    return f"{root}.1.{n}", f"{root}.2.{n}", f"{root}.3.{n}"


def seed_node_index(node: NodeProcess, count: int) -> float:
    """Insert ``count`` studies (one series, one instance each) into the node's index."""
    from sqlalchemy import insert, select

    from storage.models import Instance, Series, Study, StudyStatus, utcnow

    t0 = time.perf_counter()
    sessions = node.sessions()
    now = utcnow()
    with sessions.begin() as s:
        s.execute(insert(Study), [dict(study_instance_uid=uids(n)[0], patient_id=f"PAT{n:05d}",
                                       patient_name=f"DOE^JOHN^{n}", accession_number=f"ACC{n:07d}",
                                       study_date=date_of(n), study_description="CT CHEST", modalities="CT",
                                       status=StudyStatus.DONE, created_at=now, updated_at=now) for n in range(count)])
        ids = dict(s.execute(select(Study.study_instance_uid, Study.id)).all())
        s.execute(insert(Series), [dict(study_id=ids[uids(n)[0]], series_instance_uid=uids(n)[1], modality="CT",
                                        series_number=1, instance_count=1, last_received_at=now, dirty=False,
                                        is_result=False) for n in range(count)])
        sids = dict(s.execute(select(Series.series_instance_uid, Series.id)).all())
        s.execute(insert(Instance), [dict(series_id=sids[uids(n)[1]], sop_instance_uid=uids(n)[2],
                                          sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                          transfer_syntax_uid="1.2.840.10008.1.2.1", instance_number=1,
                                          path=f"instances/bench/{n}.dcm", size_bytes=600, sha256="0" * 64,
                                          received_at=now) for n in range(count)])
    sessions.kw["bind"].dispose()
    return time.perf_counter() - t0


def seed_orthanc(orthanc: Orthanc, count: int) -> float:
    import requests

    t0 = time.perf_counter()
    url = f"http://127.0.0.1:{orthanc.http_port}/instances"

    def upload(chunk: range) -> None:
        with requests.Session() as http:
            for n in chunk:
                r = http.post(url, data=small_instance(n, *uids(n)))
                r.raise_for_status()

    workers = 4
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(upload, [range(i, count, workers) for i in range(workers)]))
    return time.perf_counter() - t0


def timed(http, url: str, repeat: int, headers: dict) -> tuple[list[float], int, int]:
    times, count, size = [], 0, 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = http.get(url, headers=headers)
        body = r.content
        times.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"GET {url}: {r.status_code} {body[:200]!r}")
        count, size = len(r.json()), len(body)
    return times, count, size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    if not LIDC_SERIES.is_dir():
        print(f"LIDC-IDRI-0001 not found at {LIDC_SERIES}", file=sys.stderr)
        return 2
    import pydicom
    import requests
    from dicomweb_client.api import DICOMwebClient

    lidc = sorted(LIDC_SERIES.glob("*.dcm"))
    first = pydicom.dcmread(lidc[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dicomweb-"))
    node = NodeProcess(tmp / "node", web=True, quiet_seconds=3600)
    node.cli("user", "add", SENDER[0], "--role", "sender", "--password-stdin", input=f"{SENDER[1]}\n")
    node.cli("user", "add", READER[0], "--role", "radiologist", "--password-stdin", input=f"{READER[1]}\n")
    orthanc = Orthanc(tmp / "orthanc", "DICOM_NODE", node.port, plugins=[DICOMWEB_PLUGIN],
                      config={"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "TcpNoDelay": True,
                              "ConcurrentJobs": 2},
                      env={"TCP_NODELAY": "1"})
    seeded_node = seed_node_index(node, args.studies)
    node.start(timeout=120)
    orthanc.start()
    try:
        wait_port(node.web_port, timeout=60)
        base = f"http://127.0.0.1:{node.web_port}"
        token = requests.post(f"{base}/api/token", data={"username": SENDER[0], "password": SENDER[1]}).json()
        stow = DICOMwebClient(f"{base}/dicom-web", headers={"Authorization": f"Bearer {token['access_token']}"})
        t0 = time.perf_counter()
        for i in range(0, len(lidc), 40):
            stow.store_instances([pydicom.dcmread(f) for f in lidc[i:i + 40]])
        stow_s = time.perf_counter() - t0
        seeded_orthanc = seed_orthanc(orthanc, args.studies)
        t0 = time.perf_counter()
        with requests.Session() as http:
            for f in lidc:
                http.post(f"http://127.0.0.1:{orthanc.http_port}/instances", data=f.read_bytes()).raise_for_status()
        orthanc_lidc_s = time.perf_counter() - t0
        reader = requests.post(f"{base}/api/token", data={"username": READER[0], "password": READER[1]}).json()
        auth = {"Authorization": f"Bearer {reader['access_token']}", "Accept": "application/dicom+json"}
        queries = [
            ("QIDO studies PatientID=PAT05000", "studies?PatientID=PAT05000"),
            ("QIDO studies PatientName=DOE*123*", "studies?PatientName=DOE*123*"),
            ("QIDO studies StudyDate=one month, limit=100", "studies?StudyDate=20200101-20200131&limit=100"),
            ("QIDO studies limit=100 offset=5000", "studies?limit=100&offset=5000"),
            ("QIDO studies StudyInstanceUID=1", f"studies?StudyInstanceUID={uids(4321)[0]}"),
            ("QIDO series of LIDC", f"studies/{study}/series"),
            ("QIDO instances of LIDC (133)", f"studies/{study}/series/{series}/instances"),
        ]
        metadata = f"studies/{study}/series/{series}/metadata"
        rows = []
        with requests.Session() as node_http, requests.Session() as orthanc_http:
            targets = {"node": (node_http, f"{base}/dicom-web/", auth),
                       "orthanc": (orthanc_http, f"http://127.0.0.1:{orthanc.http_port}/dicom-web/",
                                   {"Accept": "application/dicom+json"})}
            for name, (http, root, headers) in targets.items():
                t, n, size = timed(http, root + metadata, 1, headers)
                rows.append(("WADO-RS series metadata (first)", name, t, n, size))
            for label, path in queries + [("WADO-RS series metadata (133)", metadata)]:
                for name, (http, root, headers) in targets.items():
                    timed(http, root + path, 2, headers)  # warm-up
                    t, n, size = timed(http, root + path, args.repeat, headers)
                    rows.append((label, name, t, n, size))
        print(f"seeded: node index {args.studies} studies in {seeded_node:.1f} s (direct insert); Orthanc "
              f"{args.studies} instances in {seeded_orthanc:.1f} s (REST)")
        print(f"LIDC-IDRI-0001 (133 instances): node STOW-RS {stow_s:.1f} s; Orthanc REST {orthanc_lidc_s:.1f} s")
        print(f"{'query':48} {'server':8} {'median ms':>10} {'p95 ms':>8} {'results':>8} {'bytes':>10}")
        for label, name, t, n, size in rows:
            p95 = sorted(t)[max(0, int(round(0.95 * len(t))) - 1)]
            print(f"{label:48} {name:8} {statistics.median(t):10.1f} {p95:8.1f} {n:8d} {size:10d}")
    finally:
        node.stop()
        orthanc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
