#!/usr/bin/env python
"""Backup, restore and retention timings on a node holding LIDC-IDRI-0001 ``--copies`` times.

DCMTK ``storescu`` sends LIDC-IDRI-0001 (133 CT instances, 70 MB; Armato et al., TCIA,
doi:10.7937/K9/TCIA.2015.LO9QL9SX) into ``dicom-node listen``; the copies are made unique
with new UIDs (each copy is its own study). Then, with the
listener still running:
1. ``dicom-node backup`` (seconds, MB/s), with a second copy being received at the same time
   (``--during-ingest``) or on an idle node,
2. ``dicom-node restore`` into a fresh data folder (and a fresh PostgreSQL database with
   ``--postgres URL_OF_AN_EMPTY_DB_SERVER``),
3. ``dicom-node retention --apply --max-age-days 0.00001`` deleting every study (seconds).

Usage: python benchmarks/bench_backup.py [--copies 2] [--during-ingest] [--postgres]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.peers import LIDC_SERIES, NodeProcess, pg_database, wait_for, wait_port  # noqa: E402


def copy_series(src: Path, dst: Path) -> Path:
    """A copy of the series as a new study: new Study, Series and SOP Instance UIDs (pydicom)."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    dst.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for f in sorted(src.iterdir()):
        ds = dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(dst / f.name)
    return dst


def send(port: int, folder: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1", str(port), "+sd", str(folder)],
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--during-ingest", action="store_true", help="back up while another copy is being received")
    ap.add_argument("--postgres", action="store_true", help="use PostgreSQL (tests.peers.pg_database) instead of SQLite")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-backup-"))
    try:
        copies = [copy_series(LIDC_SERIES, work / f"copy{k}") for k in range(args.copies + 1)]
        with pg_database() if args.postgres else _nothing() as url_a, pg_database() if args.postgres else _nothing() as url_b:
            node = NodeProcess(work / "a", quiet_seconds=3600, database_url=url_a or "")
            listener = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "listen", "--config", str(node.config)],
                                        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_port(node.port, timeout=120, proc=listener)
                for c in copies[:-1]:
                    print(f"ingest {c.name}: {send(node.port, c):.1f} s")
                sender = threading.Thread(target=send, args=(node.port, copies[-1]))
                if args.during_ingest:
                    sender.start()
                t0 = time.perf_counter()
                r = node.cli("backup", str(work / "bk"))
                t_backup = time.perf_counter() - t0
                if args.during_ingest:
                    sender.join()
            finally:
                listener.terminate()
                listener.wait(30)
            size = sum(p.stat().st_size for p in (work / "bk").rglob("*") if p.is_file()) / 1e6
            print(r.stdout.strip())
            print(f"backup: {t_backup:.1f} s for {size:.0f} MB ({size / t_backup:.0f} MB/s)"
                  f"{' while receiving another copy' if args.during_ingest else ''}")
            # quiet_seconds 1 and no eligible series: the scheduler marks every series complete
            # (not eligible, no job), so retention may delete them.
            fresh = NodeProcess(work / "b", quiet_seconds=1, database_url=url_b or "",
                                extra="[eligibility]\nmin_slices = 100000\n")
            t0 = time.perf_counter()
            r = fresh.cli("restore", str(work / "bk"))
            print(f"restore: {time.perf_counter() - t0:.1f} s ({r.stdout.strip().splitlines()[0]})")
            schedule = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "schedule", "--config",
                                         str(fresh.config)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for(lambda: _all_complete(fresh), timeout=300, what="the scheduler to evaluate every series")
            finally:
                schedule.terminate()
                schedule.wait(30)
            t0 = time.perf_counter()
            r = fresh.cli("retention", "--apply", "--max-age-days", "0.00001")
            print(f"retention: {time.perf_counter() - t0:.1f} s ({r.stdout.strip().splitlines()[-1]})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _all_complete(node: NodeProcess) -> bool:
    from sqlalchemy import func, select

    from storage.models import Series

    sessions = node.sessions()
    try:
        with sessions() as s:
            return s.scalar(select(func.count()).select_from(Series).where(Series.dirty.is_(True))) == 0
    finally:
        sessions.kw["bind"].dispose()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
