"""Running the stages: each in its own process, supervised by ``dicom-node serve``.

``serve`` takes an exclusive lock on ``data_dir/serve.lock`` (held for its life; a second
``serve`` on the same data directory is refused with one line), checks that its ports are
free (waiting up to 10 s for them), then starts listen, schedule, work, dispatch (and web when
enabled) as child processes.
With ``[node] listeners = N`` it starts N listener processes on the one port (SO_REUSEPORT).
It restarts a stage that crashes (back-off 2, 4, 8 ... 60 s) but stops with exit code 78 when
a stage cannot run for a configuration reason (its port is taken). On SIGTERM or Ctrl-C it asks
every stage to stop and waits for them: the worker up to ``[worker] stop_grace_seconds`` (a
running inference finishes) plus a margin, the others 30 s.

Stages die with their supervisor: each child sets the Linux parent-death signal (SIGTERM) as
its first act and checks that its parent is still the supervisor that started it, and a
watchdog thread notices when the parent process changes; either way the stage stops as on
SIGTERM and exits hard after a grace period. So ``kill -9`` of ``serve`` leaves no stage
running, and nothing is acknowledged after the supervisor is gone.

The same stages run alone with ``dicom-node listen|schedule|work|dispatch|web`` for scale-out:
any number of each on any number of hosts sharing one PostgreSQL database and one file store.
Standalone stages do not take the data-directory lock (several run against one shared store);
two listeners (or webs) on one host and port are refused by the port itself, unless
``[node] listeners`` is above 1 (then the listeners share it). The listener
process never imports torch.

Every stage process writes a heartbeat row (``stage_heartbeats``) every
``[node] heartbeat_seconds``; ``/healthz`` reads them.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, update

from dicom_node.config import Settings

log = logging.getLogger(__name__)

STAGES = ("listen", "schedule", "work", "dispatch", "web")

#: Exit code of ``serve`` or a stage that cannot run for a configuration reason (a port taken,
#: not ours to bind): not restarted. (sysexits EX_CONFIG.)
EXIT_CONFIG = 78
#: Exit code of a ``serve`` refused because another one holds the data directory (EX_TEMPFAIL).
EXIT_LOCKED = 75
#: Exit code of a stage that outlived its supervisor and did not stop within its grace period.
EXIT_ORPHANED = 70

_BIND_ERRNOS = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)
_PR_SET_PDEATHSIG = 1
#: How long the supervisor waits for a stage other than the worker after SIGTERM (seconds).
STOP_TIMEOUT_SECONDS = 30.0
#: How long an orphaned stage other than the worker may take to stop before it exits hard (s).
ORPHAN_GRACE_SECONDS = 15.0
#: How long ``serve`` waits for a taken port to be freed before it gives up (s): the stages of
#: a ``serve`` killed a moment ago may still be closing theirs.
PORT_WAIT_SECONDS = 10.0


class StageConfigError(Exception):
    """A stage cannot run for a configuration reason (e.g. its port is taken); restarting it
    cannot help. ``str()`` is the one line to show the operator."""


def stage_of(process_name: str) -> str:
    """The stage a supervised process runs: ``listen.2`` (the second listener) runs ``listen``."""
    return process_name.split(".", 1)[0]


def process_names(stages: list[str], settings: Settings) -> list[str]:
    """The processes ``serve`` starts for ``stages``: ``[node] listeners`` of the listener
    (``listen``, ``listen.2``, ...), one of each other stage."""
    names = []
    for name in stages:
        if name == "listen":
            names += ["listen"] + [f"listen.{i}" for i in range(2, settings.node.listeners + 1)]
        else:
            names.append(name)
    return names


def worker_identity(stage: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{stage}"


def process_identity() -> str:
    """``host:pid`` of this process (the heartbeat identity)."""
    return f"{socket.gethostname()}:{os.getpid()}"


# --- ports ------------------------------------------------------------------------------------

def bind_error_message(host: str, port: int, exc: OSError) -> str:
    """The one line an operator needs when binding ``host:port`` failed with ``exc``."""
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use by another process"
    if exc.errno == errno.EACCES:
        return f"permission denied binding port {port} on {host} (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot bind port {port} on {host}: {host} is not an address of this host"
    return f"cannot bind port {port} on {host}: {exc.strerror or exc}"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (SO_REUSEADDR, as the servers set it).

    Raises ``StageConfigError`` with a one-line reason when the port cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # socket says TCP; without it every response waits on Nagle and delayed ACKs (about 40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise StageConfigError(bind_error_message(host, port, exc)) from None
    return sock


def check_port_free(host: str, port: int, wait: float = 0.0) -> None:
    """Raise ``StageConfigError`` unless ``host:port`` can be bound (0: any port, always).

    ``wait``: keep trying this long (seconds) first, e.g. while the stages of a ``serve`` that
    was just killed close their ports.
    """
    if not port:
        return
    deadline = time.monotonic() + wait
    while True:
        try:
            bind_socket(host, port).close()
            return
        except StageConfigError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


# --- the data-directory lock ------------------------------------------------------------------

class DataDirLock:
    """An exclusive ``flock`` on ``data_dir/serve.lock``, held while the object lives.

    The kernel drops the lock when the holding process dies, however it dies, so a killed
    ``serve`` never leaves a stale lock. The file holds the holder's pid (for the message).
    """

    NAME = "serve.lock"

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``StageConfigError`` naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StageConfigError(f"another dicom-node serve (pid {holder}) is already running on data "
                                   f"directory {self.path.parent}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


# --- dying with the supervisor ------------------------------------------------------------------

def set_parent_death_signal(expected_parent: int, sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (prctl PR_SET_PDEATHSIG).

    The parent may have died before the call: then the signal never comes, so check that the
    parent is still ``expected_parent`` and stop at once if not. A no-op off Linux (the
    watchdog still works there).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != expected_parent:
        os._exit(EXIT_ORPHANED)


class ParentWatchdog(threading.Thread):
    """Notices that the supervisor is gone (this process was re-parented) and stops the stage:
    sets ``stop``, then exits the process hard if it has not ended ``grace`` seconds later."""

    def __init__(self, expected_parent: int, stop: threading.Event, grace: float, interval: float = 1.0):
        super().__init__(daemon=True, name="parent-watchdog")
        self.expected_parent, self.stop, self.grace, self.interval = expected_parent, stop, grace, interval

    def run(self) -> None:
        while os.getppid() == self.expected_parent:
            time.sleep(self.interval)
        log.warning("supervisor (pid %d) is gone: stopping this stage (at most %.0f s)",
                    self.expected_parent, self.grace)
        self.stop.set()
        time.sleep(self.grace)
        log.error("stage did not stop within %.0f s of losing its supervisor: exiting", self.grace)
        logging.shutdown()
        os._exit(EXIT_ORPHANED)


# --- heartbeats ---------------------------------------------------------------------------------

class StageHeartbeat(threading.Thread):
    """Writes this process's ``stage_heartbeats`` row every ``interval`` seconds until stopped;
    deletes it on a clean stop. Rows not seen for an hour (killed processes) are pruned."""

    PRUNE_AFTER = timedelta(hours=1)

    def __init__(self, sessions, stage: str, interval: float):
        super().__init__(daemon=True, name=f"heartbeat-{stage}")
        self.sessions, self.stage, self.interval = sessions, stage, interval
        self.identity = process_identity()
        self.done = threading.Event()

    def beat(self) -> None:
        from storage.models import StageHeartbeat as Row
        from storage.models import utcnow

        now = utcnow()
        with self.sessions.begin() as s:
            res = s.execute(update(Row).where(Row.stage == self.stage, Row.identity == self.identity)
                            .values(last_seen=now).execution_options(synchronize_session=False))
            if res.rowcount == 0:
                s.add(Row(stage=self.stage, identity=self.identity, started_at=now, last_seen=now))
                s.execute(delete(Row).where(Row.last_seen < now - self.PRUNE_AFTER)
                          .execution_options(synchronize_session=False))

    def run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - the database may be restarting
                log.warning("stage %s: heartbeat not recorded: %s", self.stage, type(exc).__name__)
            if self.done.wait(self.interval):
                return

    def finish(self) -> None:
        from storage.models import StageHeartbeat as Row

        self.done.set()
        self.join(self.interval + 5)
        try:
            with self.sessions.begin() as s:
                s.execute(delete(Row).where(Row.stage == self.stage, Row.identity == self.identity)
                          .execution_options(synchronize_session=False))
        except Exception as exc:  # noqa: BLE001
            log.warning("stage %s: heartbeat row not removed: %s", self.stage, type(exc).__name__)


# --- one stage ----------------------------------------------------------------------------------

def make_predictor(settings: Settings):
    """Load the Predictor once (imports torch)."""
    from model.inference import Predictor

    m = settings.model
    return Predictor(m.weights, threshold=m.threshold, device=m.device, threads=m.threads, runtime=m.runtime)


def run_stage(name: str, settings: Settings, stop: threading.Event) -> None:
    """Run one stage in this process until ``stop`` is set.

    Raises ``StageConfigError`` when the stage cannot run for a configuration reason.
    """
    from dicom_node.node import open_node

    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose from {STAGES}")
    node = open_node(settings, seed=(name == "listen"))
    beat = StageHeartbeat(node.sessions, name, settings.node.heartbeat_seconds)
    beat.start()
    try:
        _run(name, node, settings, stop)
    finally:
        beat.finish()


def _run(name: str, node, settings: Settings, stop: threading.Event) -> None:
    if name == "listen":
        from dicom_node.scp import run_listener

        try:
            run_listener(node, stop)
        except OSError as exc:
            if exc.errno not in _BIND_ERRNOS:
                raise
            raise StageConfigError(bind_error_message(settings.node.host, node.effective("node.port"), exc)) from None
    elif name == "schedule":
        from dicom_node.scheduler import run_scheduler
        from dicom_node.worker import model_version

        run_scheduler(node, stop, model_version(settings.model.weights))
    elif name == "work":
        from dicom_node.worker import model_version, run_worker

        run_worker(node, stop, worker_identity(name), lambda: make_predictor(settings),
                   model_version(settings.model.weights))
    elif name == "dispatch":
        from dicom_node.dispatch import run_dispatcher

        run_dispatcher(node, stop, worker_identity(name))
    elif name == "web":
        run_web(node, stop)


def run_web(node, stop: threading.Event) -> None:
    """Serve the web application (HTTPS with ``[web] certificate``) until ``stop`` is set."""
    import uvicorn

    from dicom_node.tls import TLSConfigError, web_config
    from dicom_node.web.app import create_app

    host, port = node.settings.web.host, node.settings.web.port
    try:
        config = web_config(create_app(node), node.settings.web, log_level="warning", access_log=False)
    except TLSConfigError as exc:
        log.error("cannot start the web over HTTPS: %s", exc)
        raise SystemExit(2) from None
    sock = bind_socket(host, port)  # our own bind: a taken port is one clear line, not uvicorn's exit
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # the stage's own handler sets ``stop``
    threading.Thread(target=lambda: (stop.wait(), setattr(server, "should_exit", True)), daemon=True).start()
    log.info("web on %s://%s:%d%s", "https" if config.ssl else "http", host, sock.getsockname()[1],
             f" (proxy headers from {', '.join(node.settings.web.trusted_proxies)})" if node.settings.web.trusted_proxies else "")
    server.run(sockets=[sock])


def install_stop_handlers(stop: threading.Event) -> None:
    def _handler(signum, _frame):  # noqa: ANN001
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


def orphan_grace(name: str, settings: Settings) -> float:
    """Seconds a stage may take to stop once its supervisor is gone (the worker: its stop grace)."""
    return settings.worker.stop_grace_seconds + 10.0 if name == "work" else ORPHAN_GRACE_SECONDS


def stage_process_main(name: str, settings: Settings, verbose: int, supervisor_pid: int, reasons=None) -> None:  # noqa: ANN001
    """Entry point of a stage's child process. ``reasons``: the supervisor's queue for the
    one-line reason a stage cannot run (the supervisor logs each distinct reason once: the
    listener processes of ``[node] listeners`` all meet the same taken port)."""
    set_parent_death_signal(supervisor_pid)  # first: die with the supervisor
    stop = threading.Event()
    install_stop_handlers(stop)
    from dicom_node.cli import configure_logging

    configure_logging(verbose)
    ParentWatchdog(supervisor_pid, stop, orphan_grace(name, settings)).start()
    try:
        run_stage(stage_of(name), settings, stop)
    except StageConfigError as exc:
        if reasons is None:
            log.error("stage %s cannot run: %s", name, exc)
        else:
            reasons.put((name, str(exc)))
            reasons.close()
            reasons.join_thread()  # delivered before this process exits
        logging.shutdown()
        sys.exit(EXIT_CONFIG)


# --- the supervisor -----------------------------------------------------------------------------

def _log_reasons(reasons) -> None:  # noqa: ANN001 - a multiprocessing Queue
    """Log each distinct reason the stages sent once (waiting up to 2 s for the first)."""
    import queue

    seen: set[str] = set()
    wait = 2.0
    while True:
        try:
            name, reason = reasons.get(timeout=wait)
        except queue.Empty:
            return
        wait = 0.2
        if reason not in seen:
            seen.add(reason)
            log.error("stage %s cannot run: %s", name, reason)


def stop_timeout(name: str, settings: Settings) -> float:
    """How long the supervisor waits for stage ``name`` after SIGTERM before killing it (s)."""
    return settings.worker.stop_grace_seconds + 15.0 if name == "work" else STOP_TIMEOUT_SECONDS


def supervise(settings: Settings, stages: list[str], verbose: int = 0, restart_delay: float = 2.0) -> int:
    """Run ``stages`` as child processes until SIGTERM/SIGINT; restart any that crashes.

    Returns the exit code: 0 after a requested stop, ``EXIT_LOCKED`` when another ``serve``
    holds the data directory, ``EXIT_CONFIG`` when a port is taken or a stage exited for a
    configuration reason.
    """
    from dicom_node.node import open_node

    lock = DataDirLock(settings.node.data_dir)
    try:
        lock.acquire()
    except StageConfigError as exc:
        log.error("%s", exc)
        return EXIT_LOCKED
    try:
        return _supervise(settings, stages, verbose, restart_delay, open_node)
    finally:
        lock.release()


def _supervise(settings: Settings, stages: list[str], verbose: int, restart_delay: float, open_node) -> int:
    stop = threading.Event()
    install_stop_handlers(stop)
    node = open_node(settings)  # migrate and seed once, before the stages race to do it
    try:
        if "listen" in stages:
            check_port_free(settings.node.host, int(node.effective("node.port")), PORT_WAIT_SECONDS)
        if "web" in stages:
            check_port_free(settings.web.host, settings.web.port, PORT_WAIT_SECONDS)
    except StageConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    if stop.is_set():  # SIGTERM while migrating
        return 0
    node.sessions.kw["bind"].dispose()  # the children open their own connections
    ctx = mp.get_context("spawn")
    procs: dict[str, mp.Process] = {}
    me = os.getpid()
    reasons = ctx.Queue()  # (stage, one-line reason) from stages that cannot run

    def start(name: str) -> None:
        p = ctx.Process(target=stage_process_main, args=(name, settings, verbose, me, reasons),
                        name=f"dicom-node-{name}")
        p.start()
        procs[name] = p
        log.info("stage %s started (pid %d)", name, p.pid)

    names = process_names(stages, settings)
    for name in names:
        start(name)
    failures = {name: 0 for name in names}
    started = {name: time.monotonic() for name in names}
    code = 0
    while code == 0 and not stop.wait(0.5):
        for name, p in list(procs.items()):
            if p.is_alive():
                continue
            if p.exitcode == EXIT_CONFIG:
                _log_reasons(reasons)
                log.error("stage %s cannot run (configuration, see above): stopping", name)
                code = EXIT_CONFIG
                break
            # Back off on a stage that keeps crashing (e.g. missing weights): 2, 4, 8 ... 60 s.
            failures[name] = 0 if time.monotonic() - started[name] > 300 else failures[name] + 1
            delay = min(60.0, restart_delay * 2 ** max(0, failures[name] - 1))
            log.error("stage %s exited with code %s; restarting in %.0f s", name, p.exitcode, delay)
            if stop.wait(delay):
                break
            start(name)
            started[name] = time.monotonic()
    log.info("stopping stages")
    for p in procs.values():
        if p.is_alive():
            p.terminate()
    t0 = time.monotonic()
    for name, p in procs.items():
        p.join(max(0.1, t0 + stop_timeout(name, settings) - time.monotonic()))
        if p.is_alive():
            log.warning("stage %s did not stop in time: killing", name)
            p.kill()
            p.join()
    log.info("stopped")
    return code
