#!/usr/bin/env python
"""How long logins hold the SQLite write lock: 16 parallel ``POST /api/token`` with random
names against a real uvicorn server, while a writer (standing in for the listener's index
write) takes the write lock every 10 ms and records how long it waited.

Before issue 11 a login kept its transaction (on SQLite: ``BEGIN IMMEDIATE``, the write lock)
open through the Argon2 check, so the writer waited behind every hash in turn; now the hash
runs with no connection held and the writer only waits for the short audit insert.

Usage: python benchmarks/bench_login_lock.py [--clients 16] [--rounds 5] [--code PATH]
``--code`` runs another checkout's code (e.g. ``--code ../main`` for the code before the fix).
Prints the HTTP status counts, login latency and the writer's lock waits (median, p99, max).
"""
from __future__ import annotations

import argparse
import secrets
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--code", type=Path, default=REPO, help="checkout whose dicom_node/storage to run")
    args = ap.parse_args()
    sys.path.insert(0, str(args.code.resolve()))

    import httpx
    import uvicorn

    from dicom_node.config import Settings
    from dicom_node.node import open_node
    from dicom_node.web.app import create_app
    from dicom_node.web.security import hash_password
    from storage import users

    tmp = Path(tempfile.mkdtemp(prefix="bench-login-"))
    db = tmp / "node.sqlite3"
    node = open_node(Settings(node={"data_dir": str(tmp / "data")}, database={"url": f"sqlite:///{db}"},
                              web={"secret_key": secrets.token_hex(16), "login_failures_per_client": 10**6}))
    with node.sessions.begin() as s:
        users.add_user(s, "admin", "admin", hash_password("admin-password-1"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(node), host="127.0.0.1", port=port, log_level="error",
                                           access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)

    statuses, latencies, waits = Counter(), [], []
    stop = threading.Event()

    def writer() -> None:
        conn = sqlite3.connect(db, timeout=120, isolation_level=None)
        while not stop.is_set():
            t0 = time.monotonic()
            conn.execute("BEGIN IMMEDIATE")
            waits.append(time.monotonic() - t0)
            conn.execute("COMMIT")
            time.sleep(0.01)
        conn.close()

    def login(barrier: threading.Barrier) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as h:
            barrier.wait()
            t0 = time.monotonic()
            try:
                r = h.post("/api/token", data={"username": f"u{secrets.token_hex(6)}", "password": secrets.token_hex(8)})
                statuses[r.status_code] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
            latencies.append(time.monotonic() - t0)

    w = threading.Thread(target=writer)
    w.start()
    t_start = time.monotonic()
    for _ in range(args.rounds):
        barrier = threading.Barrier(args.clients)
        threads = [threading.Thread(target=login, args=(barrier,)) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elapsed = time.monotonic() - t_start
    stop.set()
    w.join()
    server.should_exit = True

    waits_ms = sorted(x * 1000 for x in waits)
    p99 = waits_ms[min(len(waits_ms) - 1, int(0.99 * len(waits_ms)))]
    print(f"code: {args.code.resolve()}")
    print(f"{args.rounds} x {args.clients} parallel logins with random names in {elapsed:.1f} s: "
          f"statuses {dict(statuses)}")
    print(f"login latency: median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s")
    print(f"writer waits for the write lock ({len(waits_ms)} transactions): median {statistics.median(waits_ms):.1f} ms, "
          f"p99 {p99:.1f} ms, max {waits_ms[-1]:.1f} ms")
    return 0 if set(statuses) <= {401} else 1


if __name__ == "__main__":
    sys.exit(main())
