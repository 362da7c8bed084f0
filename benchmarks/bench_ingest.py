#!/usr/bin/env python
"""Ingest throughput and CPU, side by side in one run, plus end-to-end latency.

Data: LIDC-IDRI-0001 (133 CT instances, 70 MB; Armato et al., TCIA,
doi:10.7937/K9/TCIA.2015.LO9QL9SX), sent with DCMTK ``storescu``. Every peer (senders and
receivers) runs with ``TCP_NODELAY=1`` in its environment (DCMTK reads it; Orthanc is built on
DCMTK).

1. One sender, alternating, ``--repeats`` times each, into
   a) a bare ``python -m pynetdicom storescp`` (writes files, no fsync, no index): the baseline,
   b) ``dicom-node listen`` on SQLite (fsync'ed atomic writes + index; Success only after both),
   c) ``dicom-node listen`` on PostgreSQL (a fresh database per run; skipped when no server
      answers at ``DICOM_NODE_TEST_PG``),
   d) Orthanc (its own SQLite index and file store).
   Prints the median seconds, instances/s, the receiver's CPU milliseconds per instance (user +
   system time of the receiving process, from /proc; PostgreSQL's own server processes are not
   counted) and the ratio to the baseline.
2. ``--senders N`` (default 8) concurrent senders, each sending its own copy of the series (new
   Study/Series/SOP Instance UIDs, so nothing is a duplicate), into the node (SQLite and
   PostgreSQL) and into Orthanc: seconds until all acknowledged, and the receiver's CPU.
3. Unless ``--no-e2e``: ``dicom-node serve`` with DCMTK ``storescp`` as destination; seconds from the
   last instance acknowledged to SR + SEG acknowledged by the destination.

``--before-rev REV`` adds the node at git revision REV (exported with ``git archive`` into a
temporary folder and run from there, with ``PYTHONPATH`` set to it, so its rows really run the old
code) beside this tree's, interleaved in the same repeats: before and after under the same load.
The load average is printed with each part (the machine may be shared).

``--listeners N`` adds rows for this tree's node (and the ``--before-rev`` one) with N ``listen``
processes sharing the port (``[node] listeners = N``, SO_REUSEPORT); their CPU is summed. The
other node rows run one ``listen`` process with ``listeners = 1``.

Usage: python benchmarks/bench_ingest.py [--repeats 3] [--senders 8] [--no-e2e] [--no-postgresql]
       [--no-orthanc] [--quiet-seconds 2] [--before-rev REV] [--no-bare] [--listeners N]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.peers import LIDC_SERIES, NodeProcess, Orthanc, StoreSCP, free_port, wait_port  # noqa: E402

N_INSTANCES = 133
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid) -> float:  # noqa: ANN001 - one pid or several
    """User + system CPU seconds of process ``pid`` (its threads included, children not), or
    the sum over a list of pids."""
    if isinstance(pid, (list, tuple)):
        return sum(cpu_seconds(p) for p in pid)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def send(port: int, called: str, folder: Path = LIDC_SERIES) -> float:
    t0 = time.perf_counter()
    subprocess.run(["storescu", "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port), "+sd", str(folder)],
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def send_parallel(port: int, called: str, folders: list[Path]) -> float:
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port), "+sd", str(f)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for f in folders]
    failed = [p.communicate()[1][-300:] for p in procs if p.wait() != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} sender(s) failed: {failed[0]!r}")
    return time.perf_counter() - t0


def copies(work: Path, n: int, files: int | None = None, name: str = "copies") -> list[Path]:
    """``n`` copies of the series (its first ``files`` instances) with new UIDs, made once per run."""
    from pydicom import dcmread

    def uid(old: str, k: int) -> str:
        return "2.25." + str(int(hashlib.sha256(f"{old}/{k}".encode()).hexdigest()[:30], 16))

    sources = sorted(LIDC_SERIES.iterdir())[:files]
    out = []
    for k in range(n):
        folder = work / name / str(k)
        out.append(folder)
        if folder.is_dir() and len(list(folder.iterdir())) == len(sources):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for src in sources:
            ds = dcmread(src)
            for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                setattr(ds, kw, uid(str(getattr(ds, kw)), k))
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(folder / src.name)
    return out


# --- receivers: each a context manager yielding (port, called AE, pid, count of stored instances) --

@contextlib.contextmanager
def bare(work: Path):
    out = work / "bare"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pynetdicom", "storescp", str(port), "-od", str(out), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
        yield port, "STORESCP", proc.pid, lambda: len(list(out.iterdir()))
    finally:
        proc.terminate()
        proc.wait()


def export_revision(rev: str, into: Path) -> Path:
    """The tree of git revision ``rev`` of this repository, exported into ``into`` (``git archive``)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def load_average() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


#: ``--listeners``: listener processes sharing the port (``[node] listeners``); 1 by default.
LISTENERS = 1


@contextlib.contextmanager
def node_listener(work: Path, database_url: str = "", code: Path = REPO):
    """``dicom-node listen`` run from the tree at ``code`` (this one, or an exported revision);
    ``LISTENERS`` of them on one port when above 1 (the code must know ``[node] listeners``)."""
    folder = work / "node"
    shutil.rmtree(folder, ignore_errors=True)
    node = NodeProcess(folder, database_url=database_url)
    # Always explicit: the default is "auto" (the usable cores) since session 8, 1 before.
    node.config.write_text(node.config.read_text().replace("[node]\n", f"[node]\nlisteners = {LISTENERS}\n", 1))
    env = {**os.environ, "PYTHONPATH": str(code)}
    argv = [sys.executable, "-m", "dicom_node.cli", "listen", "--config", str(node.config)]
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=code, env=env)]
    sessions = None
    try:
        wait_port(node.port, timeout=120, proc=procs[0])  # the first migrates; then the others
        for _ in range(LISTENERS - 1):
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=code, env=env))
        for p in procs[1:]:
            _wait_bound(p)
        sessions = node.sessions()

        def count() -> int:
            from sqlalchemy import func, select

            from storage.models import Instance

            with sessions() as s:
                return s.scalar(select(func.count(Instance.id)))

        yield node.port, "DICOM_NODE", [p.pid for p in procs], count
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        if sessions is not None:
            sessions.kw["bind"].dispose()


def _wait_bound(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``proc`` listens on a TCP socket (from /proc: its socket inodes in /proc/net/tcp)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"listener exited with {proc.returncode}")
        inodes = set()
        for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:] + Path("/proc/net/tcp6").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # LISTEN
                return
        time.sleep(0.2)
    raise TimeoutError("listener did not bind")


@contextlib.contextmanager
def node_postgresql(work: Path, code: Path = REPO):
    from tests.peers import pg_database

    with pg_database("dicomnode_bench") as url, node_listener(work, url, code) as target:
        yield target


def listeners(receiver, n: int):
    """``receiver`` (a node of this tree) with ``n`` listener processes on its port."""

    @contextlib.contextmanager
    def run(work: Path):
        global LISTENERS
        LISTENERS = n
        try:
            with receiver(work) as target:
                yield target
        finally:
            LISTENERS = 1

    run.__name__ = f"{receiver.__name__}x{n}"
    return run


def at(receiver, code: Path):
    """``receiver`` (a node) running the code exported at ``code``."""

    @contextlib.contextmanager
    def run(work: Path):
        with receiver(work, code=code) as target:
            yield target

    run.__name__ = f"{receiver.__name__}@{code.name}"
    return run


@contextlib.contextmanager
def orthanc(work: Path):
    folder = work / "orthanc"
    shutil.rmtree(folder, ignore_errors=True)
    peer = Orthanc(folder, "DICOM_NODE", free_port()).start()
    try:
        yield peer.dicom_port, peer.ae_title, peer.proc.pid, lambda: peer.rest("GET", "/statistics")["CountInstances"]
    finally:
        peer.stop()


def measure(receiver, work: Path, folders: list[Path] | None = None) -> tuple[float, float]:
    """(seconds, receiver CPU seconds) for one send (or ``folders`` sent in parallel)."""
    with receiver(work) as (port, called, pid, count):
        cpu0 = cpu_seconds(pid)
        seconds = send(port, called) if folders is None else send_parallel(port, called, folders)
        cpu = cpu_seconds(pid) - cpu0
        expected = N_INSTANCES * (1 if folders is None else len(folders))
        stored = count()
        if stored != expected:
            raise RuntimeError(f"{receiver.__name__} stored {stored} of {expected} instances")
        return seconds, cpu


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


def postgresql_available() -> bool:
    try:
        import psycopg

        from tests.peers import PG_ADMIN_URL

        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
        return True
    except Exception:  # noqa: BLE001
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--senders", type=int, default=8, help="concurrent senders in part 2 (0: skip)")
    ap.add_argument("--senders-repeats", type=int, default=1, help="repeats of part 2 (median)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end measurement (it runs the model)")
    ap.add_argument("--no-postgresql", action="store_true")
    ap.add_argument("--no-orthanc", action="store_true")
    ap.add_argument("--quiet-seconds", type=float, default=2.0)
    ap.add_argument("--before-rev", metavar="REV", help="also run the node at git revision REV (see above)")
    ap.add_argument("--no-bare", action="store_true", help="skip bare pynetdicom (ratios are then to the first row)")
    ap.add_argument("--no-sqlite", action="store_true", help="skip the node on SQLite")
    ap.add_argument("--listeners", type=int, default=1,
                    help="listener processes per node, sharing the port ([node] listeners)")
    args = ap.parse_args()
    if not LIDC_SERIES.is_dir():
        print(f"LIDC-IDRI-0001 not found at {LIDC_SERIES}: nothing to benchmark", file=sys.stderr)
        return 0
    os.environ["TCP_NODELAY"] = "1"  # inherited by every sender and receiver started below
    tmp = tempfile.TemporaryDirectory(prefix="bench-ingest-")
    old = None
    if args.before_rev:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.before_rev], check=True,
                             capture_output=True, text=True).stdout.strip()
        old = export_revision(args.before_rev, Path(tmp.name) / f"rev-{rev}")
    nodes = [] if args.no_sqlite else [("SQLite", node_listener)]
    if not args.no_postgresql:
        if postgresql_available():
            nodes.append(("PostgreSQL", node_postgresql))
        else:
            print("PostgreSQL not reachable: its rows are skipped", file=sys.stderr)
    receivers = [] if args.no_bare else [("bare pynetdicom storescp", bare)]
    for db, receiver in nodes:
        if old is not None:
            receivers.append((f"dicom-node {old.name[4:]}, {db}", at(receiver, old)))
        receivers.append((f"dicom-node listen, {db}", receiver))
        if args.listeners > 1:
            if old is not None:
                receivers.append((f"dicom-node {old.name[4:]} x{args.listeners}, {db}",
                                  listeners(at(receiver, old), args.listeners)))
            receivers.append((f"dicom-node listen x{args.listeners}, {db}", listeners(receiver, args.listeners)))
    if not args.no_orthanc:
        if shutil.which("Orthanc") or shutil.which("orthanc"):
            receivers.append(("Orthanc", orthanc))
        else:
            print("Orthanc not installed: its rows are skipped", file=sys.stderr)
    with tmp:
        work = Path(tmp.name)
        print(f"start: {load_average()}")
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in receivers}
        for _ in range(args.repeats):
            for name, receiver in receivers:
                runs[name].append(measure(receiver, work))
        print(f"one sender: LIDC-IDRI-0001 ({N_INSTANCES} instances, 70 MB) with DCMTK storescu, TCP_NODELAY=1, "
              f"median of {args.repeats} ({load_average()} at the end):")
        base = statistics.median(s for s, _ in runs[receivers[0][0]])
        of = "bare" if not args.no_bare else "first"
        for name, _ in receivers:
            sec = statistics.median(s for s, _ in runs[name])
            cpu_ms = statistics.median(c for _, c in runs[name]) * 1000 / N_INSTANCES
            print(f"  {name:32s}: {sec:6.2f} s ({N_INSTANCES / sec:5.1f} instances/s)  CPU {cpu_ms:5.1f} ms/instance  "
                  f"x{sec / base:4.2f} of {of}  runs {[round(s, 2) for s, _ in runs[name]]}")
        if args.senders > 0:
            folders = copies(work, args.senders)
            total = N_INSTANCES * args.senders
            print(f"{args.senders} concurrent senders, each its own copy of the series ({total} instances), "
                  f"median of {args.senders_repeats}:")
            parallel = [(name, receiver) for name, receiver in receivers if receiver is not bare]
            par_runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in parallel}
            for _ in range(args.senders_repeats):
                for name, receiver in parallel:
                    par_runs[name].append(measure(receiver, work, folders))
            results = {}
            for name, _ in parallel:
                sec = results[name] = statistics.median(s for s, _ in par_runs[name])
                cpu = statistics.median(c for _, c in par_runs[name])
                print(f"  {name:32s}: {sec:6.2f} s ({total / sec:5.1f} instances/s)  "
                      f"CPU {cpu * 1000 / total:5.1f} ms/instance  runs {[round(s, 2) for s, _ in par_runs[name]]}")
            print(f"  ({load_average()} at the end)")
            if "Orthanc" in results:
                for name, sec in results.items():
                    if name != "Orthanc":
                        print(f"  {name} / Orthanc: x{sec / results['Orthanc']:4.2f}")
        if not args.no_e2e:
            total, quiet = bench_e2e(work, args.quiet_seconds)
            print(f"end to end: last instance acknowledged -> SR + SEG acknowledged by DCMTK storescp: {total:.1f} s "
                  f"(of which quiet period {quiet:.1f} s, processing + sending {total - quiet:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
