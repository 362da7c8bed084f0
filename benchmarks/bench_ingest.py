#!/usr/bin/env python
"""Ingest throughput and end-to-end latency, each against a baseline in the same run.

1. DCMTK ``storescu`` sends LIDC-IDRI-0001 (133 CT instances, 70 MB; Armato et al., TCIA,
   doi:10.7937/K9/TCIA.2015.LO9QL9SX) to
   a) a bare ``python -m pynetdicom storescp`` (writes files, no fsync, no index): the baseline,
   b) the node's listener (``dicom-node listen``: fsync'ed atomic writes + database index,
      Success only after both),
   alternating, ``--repeats`` times each; prints the median seconds and the ratio (target <= 1.25).
2. With ``--e2e`` (default on): ``dicom-node serve`` with DCMTK ``storescp`` as destination;
   prints seconds from the last instance acknowledged to SR + SEG acknowledged by the
   destination (quiet period included, reported separately).

Usage: python benchmarks/bench_ingest.py [--repeats 5] [--no-e2e] [--quiet-seconds 2]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.peers import LIDC_SERIES, NodeProcess, StoreSCP, free_port, wait_port  # noqa: E402


def send(port: int, called: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["storescu", "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port), "+sd", str(LIDC_SERIES)],
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def bench_bare(work: Path) -> float:
    out = work / "bare"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pynetdicom", "storescp", str(port), "-od", str(out), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
        seconds = send(port, "STORESCP")
        assert len(list(out.iterdir())) == 133, "bare storescp did not store all instances"
        return seconds
    finally:
        proc.terminate()
        proc.wait()


def bench_node(work: Path) -> float:
    folder = work / "node"
    shutil.rmtree(folder, ignore_errors=True)
    node = NodeProcess(folder)
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "listen", "--config", str(node.config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        wait_port(node.port, proc=proc)
        return send(node.port, "DICOM_NODE")
    finally:
        proc.terminate()
        proc.wait()


def bench_e2e(work: Path, quiet: float) -> tuple[float, float]:
    from sqlalchemy import select

    from storage.models import Transfer, TransferState

    peer = StoreSCP(work / "pacs").start()
    node = NodeProcess(work / "e2e", quiet_seconds=quiet,
                       destinations=[{"name": "pacs", "ae_title": "STORESCP", "port": peer.port}])
    node.start(timeout=120)
    try:
        send(node.port, "DICOM_NODE")
        t_last = time.perf_counter()
        sessions = node.sessions()
        while True:
            with sessions() as s:
                t = s.scalar(select(Transfer))
                if t is not None and t.state is TransferState.SENT:
                    break
                if t is not None and t.state is TransferState.FAILED:
                    raise RuntimeError(f"transfer failed: {t.error}")
            if time.perf_counter() - t_last > 600:
                raise TimeoutError("no result within 600 s")
            time.sleep(0.2)
        return time.perf_counter() - t_last, quiet
    finally:
        node.stop()
        peer.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--quiet-seconds", type=float, default=2.0)
    args = ap.parse_args()
    if not LIDC_SERIES.is_dir():
        print(f"LIDC-IDRI-0001 not found at {LIDC_SERIES}: nothing to benchmark", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        bare, node = [], []
        for _ in range(args.repeats):
            bare.append(bench_bare(work))
            node.append(bench_node(work))
        b, n = statistics.median(bare), statistics.median(node)
        print(f"ingest LIDC-IDRI-0001 (133 instances, 70 MB) with DCMTK storescu, median of {args.repeats}:")
        print(f"  bare pynetdicom storescp : {b:6.2f} s  ({133 / b:5.1f} instances/s)  runs {[round(x, 2) for x in bare]}")
        print(f"  dicom-node listen        : {n:6.2f} s  ({133 / n:5.1f} instances/s)  runs {[round(x, 2) for x in node]}")
        print(f"  ratio node / bare        : {n / b:6.2f}  (target <= 1.25) {'OK' if n / b <= 1.25 else 'MISSED'}")
        if not args.no_e2e:
            total, quiet = bench_e2e(work, args.quiet_seconds)
            print(f"end to end: last instance acknowledged -> SR + SEG acknowledged by DCMTK storescp: {total:.1f} s "
                  f"(of which quiet period {quiet:.1f} s, processing + sending {total - quiet:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
