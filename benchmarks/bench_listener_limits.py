#!/usr/bin/env python
"""The listener under issue 11's hostile input (defects 3 and 4), default ``[node]`` limits.

1. ``rq-flood``: 5 sockets each declare a 200 MiB A-ASSOCIATE-RQ and send all of it; prints the
   listener's peak RSS growth and its RSS afterwards (MiB).
2. ``bomb``: DCMTK ``storescu -xd`` sends a 1 MiB-ish deflated CT instance that inflates to 1 GiB;
   prints the C-STORE status and the peak RSS growth (MiB).
3. ``drips``: 11 sockets send an association request one byte per second; prints the seconds
   until a real ``echoscu`` is accepted (tried every 2 s, up to ``--drip-wait``).

The listener runs alone in a child process (``tests.test_scp_limits.ChildListener``).
Usage: python benchmarks/bench_listener_limits.py [--only rq-flood,bomb,drips] [--drip-wait 60]
"""
from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_scp_limits import MiB, ChildListener, Drip, rq_header, write_big_instance  # noqa: E402


def listener(folder: Path) -> ChildListener:
    folder.mkdir(parents=True, exist_ok=True)
    return ChildListener(folder)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def rq_flood(tmp: Path) -> None:
    scp = listener(tmp / "flood")
    try:
        before = scp.peak_rss()

        def one():
            try:
                with socket.create_connection(("127.0.0.1", scp.port)) as s:
                    s.sendall(rq_header(200 * MiB))
                    chunk = bytes(MiB)
                    for _ in range(200):
                        s.sendall(chunk)
                    time.sleep(2)
            except OSError:
                pass

        threads = [threading.Thread(target=one) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(2)
        print(f"rq-flood: peak RSS +{(scp.peak_rss() - before) / MiB:.0f} MiB, "
              f"RSS after {rss(scp.proc.pid) / MiB:.0f} MiB (5 x 200 MiB declared and sent)")
    finally:
        scp.stop()


def bomb(tmp: Path) -> None:
    path = tmp / "bomb.dcm"
    write_big_instance(path, 1024 * MiB, deflated=True)
    scp = listener(tmp / "bomb")
    try:
        before = scp.peak_rss()
        t0 = time.monotonic()
        r = subprocess.run(["storescu", "-v", "-xd", "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1",
                            str(scp.port), str(path)], capture_output=True, text=True, timeout=600)
        status = re.findall(r"Received Store Response \(([^)]*)\)", r.stderr)
        print(f"bomb: {path.stat().st_size / MiB:.1f} MiB deflated -> 1024 MiB: status {status}, "
              f"peak RSS +{(scp.peak_rss() - before) / MiB:.0f} MiB, {time.monotonic() - t0:.1f} s")
    finally:
        scp.stop()


def drips(tmp: Path, wait: float) -> None:
    scp = listener(tmp / "drips")
    slow = [Drip(scp.port) for _ in range(11)]
    for d in slow:
        d.start()
    try:
        time.sleep(2)
        t0 = time.monotonic()
        while time.monotonic() - t0 < wait:
            r = subprocess.run(["echoscu", "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1", str(scp.port)],
                               capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                print(f"drips: echoscu accepted after {time.monotonic() - t0:.1f} s with 11 drip sockets")
                return
            time.sleep(2)
        print(f"drips: echoscu still refused after {wait:.0f} s with 11 drip sockets")
    finally:
        for d in slow:
            d.close()
        scp.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="rq-flood,bomb,drips")
    ap.add_argument("--drip-wait", type=float, default=60.0)
    args = ap.parse_args()
    chosen = args.only.split(",")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "rq-flood" in chosen:
            rq_flood(tmp)
        if "bomb" in chosen:
            bomb(tmp)
        if "drips" in chosen:
            drips(tmp, args.drip_wait)


if __name__ == "__main__":
    main()
