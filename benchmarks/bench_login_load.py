#!/usr/bin/env python
"""Ingest under login load, and many concurrent senders (issue 11, defect 2).

The node runs as its stages ``dicom-node listen`` and ``dicom-node web`` (separate processes,
one database: SQLite by default, or ``--database-url``). Data: LIDC-IDRI-0001 (133 CT
instances; ../shared/data, see tests/peers.py), each sender its own copy (new UIDs).

1. Unloaded: 4 DCMTK ``storescu`` senders at once; seconds until all acknowledged.
2. Loaded: the same while 16 clients hammer ``POST /api/token`` with random user names (each
   login is refused with 401 after an Argon2 check; 429 when a rate limit answers). Passes when
   every instance is stored, no HTTP 500 was answered, and the ingest took at most 1.5 x the
   unloaded run.
3. 40 concurrent senders (``--instances-per-sender`` each, default 20): every sender served
   and every instance stored. The config sets ``[node] max_associations = 64`` and
   ``max_associations_per_peer = 64`` (all senders come from loopback) when this version of
   dicom-node knows the keys (pynetdicom's default is 10 associations).

Usage: python benchmarks/bench_login_load.py [--database-url URL] [--clients 16] [--senders 4]
       [--many 40] [--instances-per-sender 20]
Exit status 0 when every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_ingest import N_INSTANCES, copies  # noqa: E402
from tests.peers import LIDC_SERIES, NodeProcess, wait_port  # noqa: E402


#: Listener limits this benchmark needs, when this version of dicom-node has them: 40 senders
#: from one host (loopback) must all be served.
LISTENER_LIMITS = {"max_associations": 64, "max_associations_per_peer": 64}


def listener_limits() -> dict[str, int]:
    """The keys of ``LISTENER_LIMITS`` that ``[node]`` knows (older versions reject unknown keys)."""
    from dicom_node.config import NodeSection

    return {k: v for k, v in LISTENER_LIMITS.items() if k in NodeSection.model_fields}


class Node:
    """``listen`` + ``web`` stages on one fresh data directory."""

    def __init__(self, folder: Path, database_url: str, limits: dict[str, int]):
        shutil.rmtree(folder, ignore_errors=True)
        self.proc = NodeProcess(folder, database_url=database_url, web=True, quiet_seconds=3600)
        if limits:
            text = self.proc.config.read_text()
            keys = "".join(f"{k} = {v}\n" for k, v in limits.items())
            self.proc.config.write_text(text.replace("[node]\n", f"[node]\n{keys}", 1))
        self.procs: list[subprocess.Popen] = []
        self.log = open(folder / "node.log", "w")

    def __enter__(self) -> Node:
        for stage in ("listen", "web"):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", stage, "--config", str(self.proc.config)],
                stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
            if stage == "listen":  # the listener migrates the database first
                wait_port(self.proc.port, timeout=120, proc=self.procs[-1])
        wait_port(self.proc.web_port, timeout=120, proc=self.procs[-1])
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.log.close()

    def stored(self) -> int:
        from sqlalchemy import func, select

        from storage.models import Instance

        sessions = self.proc.sessions()
        try:
            with sessions() as s:
                return s.scalar(select(func.count(Instance.id)))
        finally:
            sessions.kw["bind"].dispose()

    def log_text(self) -> str:
        return (self.proc.folder / "node.log").read_text(errors="replace")


def send_all(port: int, folders: list[Path]) -> tuple[float, list[str]]:
    """Send each folder with its own storescu at once; (seconds, failures)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1", str(port), "+sd",
                               str(f)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for f in folders]
    failures = []
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode != 0 or "Store Failed" in err or "Refused" in err:
            failures.append(err.strip().splitlines()[-1][:200] if err.strip() else f"exit {p.returncode}")
    return time.perf_counter() - t0, failures


def hammer_logins(web_port: int, clients: int, stop: threading.Event) -> collections.Counter:
    codes: collections.Counter = collections.Counter()
    lock = threading.Lock()
    url = f"http://127.0.0.1:{web_port}/api/token"

    def client() -> None:
        rnd = random.Random()
        while not stop.is_set():
            name = "".join(rnd.choices(string.ascii_lowercase, k=12))
            body = urllib.parse.urlencode({"username": name, "password": "wrong-password-123"}).encode()
            req = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    code = resp.status
            except urllib.error.HTTPError as exc:
                code = exc.code
            except OSError as exc:
                code = f"error {type(exc).__name__}"
            with lock:
                codes[code] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    hammer_logins.threads = threads
    return codes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--database-url", default="", help="empty: SQLite in the data directory")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--many", type=int, default=40, help="concurrent senders in part 3 (0: skip)")
    ap.add_argument("--instances-per-sender", type=int, default=20, help="instances each of the --many senders sends")
    args = ap.parse_args()
    if not LIDC_SERIES.is_dir():
        print(f"LIDC-IDRI-0001 not found at {LIDC_SERIES}: nothing to benchmark", file=sys.stderr)
        return 0
    os.environ["TCP_NODELAY"] = "1"
    max_assoc = listener_limits()
    if "max_associations" not in max_assoc:
        print("note: this dicom-node has no [node] max_associations; the listener keeps pynetdicom's 10")
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-login-") as tmp:
        work = Path(tmp)
        folders = copies(work, max(args.senders, 1))[: args.senders]
        expected = N_INSTANCES * args.senders

        with Node(work / "unloaded", args.database_url, max_assoc) as node:
            unloaded, failures = send_all(node.proc.port, folders)
            stored = node.stored()
        print(f"unloaded: {args.senders} senders x {N_INSTANCES} instances: {unloaded:.1f} s, "
              f"stored {stored}/{expected}, failed senders {len(failures)}")
        ok &= stored == expected and not failures

        with Node(work / "loaded", args.database_url, max_assoc) as node:
            stop = threading.Event()
            codes = hammer_logins(node.proc.web_port, args.clients, stop)
            time.sleep(1.0)
            loaded, failures = send_all(node.proc.port, folders)
            stop.set()
            for t in hammer_logins.threads:
                t.join(60)
            stored = node.stored()
            locked = node.log_text().count("database is locked")
        ratio = loaded / unloaded
        print(f"loaded ({args.clients} clients on POST /api/token): {loaded:.1f} s (x{ratio:.2f} of unloaded, "
              f"target <= 1.5), stored {stored}/{expected}, failed senders {len(failures)}")
        print(f"  HTTP answers: {dict(sorted(codes.items(), key=str))}; 'database is locked' in the log: {locked}")
        ok &= stored == expected and not failures and codes.get(500, 0) == 0 and ratio <= 1.5 and locked == 0
        if failures:
            print(f"  first failure: {failures[0]}")

        if args.many > 0:
            many = copies(work, args.many, files=args.instances_per_sender, name="many")
            per_sender = len(list(many[0].iterdir()))
            expected = args.many * per_sender
            with Node(work / "many-node", args.database_url, max_assoc) as node:
                seconds, failures = send_all(node.proc.port, many)
                stored = node.stored()
            print(f"{args.many} concurrent senders x {per_sender} instances: {seconds:.1f} s, stored {stored}/{expected}, "
                  f"senders not served {len(failures)}" + (f" (first: {failures[0]})" if failures else ""))
            ok &= stored == expected and not failures
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
