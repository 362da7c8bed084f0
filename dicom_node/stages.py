"""Running the stages: each in its own process, supervised by ``dicom-node serve``.

``serve`` starts listen, schedule, work, dispatch (and web when enabled) as child processes
of one process group, restarts a stage that dies, and on SIGTERM or Ctrl-C asks every stage to
stop, waits for them, and exits. The same stages run alone with ``dicom-node listen|schedule|
work|dispatch|web`` for scale-out: any number of each on any number of hosts sharing one
PostgreSQL database and one file store. The listener process never imports torch.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time

from dicom_node.config import Settings

log = logging.getLogger(__name__)

STAGES = ("listen", "schedule", "work", "dispatch", "web")


def worker_identity(stage: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{stage}"


def make_predictor(settings: Settings):
    """Load the Predictor once (imports torch)."""
    from model.inference import Predictor

    return Predictor(settings.model.weights, threshold=settings.model.threshold, device=settings.model.device)


def run_stage(name: str, settings: Settings, stop: threading.Event) -> None:
    """Run one stage in this process until ``stop`` is set."""
    from dicom_node.node import open_node

    node = open_node(settings, seed=(name == "listen"))
    if name == "listen":
        from dicom_node.scp import run_listener

        run_listener(node, stop)
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
    else:
        raise ValueError(f"unknown stage {name!r}; choose from {STAGES}")


def run_web(node, stop: threading.Event) -> None:
    """Serve the web application (HTTPS with ``[web] certificate``) until ``stop`` is set."""
    import uvicorn

    from dicom_node.tls import TLSConfigError, web_config
    from dicom_node.web.app import create_app

    try:
        config = web_config(create_app(node), node.settings.web, log_level="warning", access_log=False)
    except TLSConfigError as exc:
        log.error("cannot start the web over HTTPS: %s", exc)
        raise SystemExit(2) from None
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # the stage's own handler sets ``stop``
    threading.Thread(target=lambda: (stop.wait(), setattr(server, "should_exit", True)), daemon=True).start()
    log.info("web on %s://%s:%d%s", "https" if config.ssl else "http", node.settings.web.host, node.settings.web.port,
             f" (proxy headers from {', '.join(node.settings.web.trusted_proxies)})" if node.settings.web.trusted_proxies else "")
    server.run()


def install_stop_handlers(stop: threading.Event) -> None:
    def _handler(signum, _frame):  # noqa: ANN001
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


def stage_process_main(name: str, settings: Settings, verbose: int) -> None:
    """Entry point of a stage's child process."""
    from dicom_node.cli import configure_logging

    configure_logging(verbose)
    stop = threading.Event()
    install_stop_handlers(stop)
    run_stage(name, settings, stop)


def supervise(settings: Settings, stages: list[str], verbose: int = 0, restart_delay: float = 2.0) -> int:
    """Run ``stages`` as child processes until SIGTERM/SIGINT; restart any that dies."""
    from dicom_node.node import open_node

    open_node(settings)  # migrate and seed once, before the stages race to do it
    ctx = mp.get_context("spawn")
    stop = threading.Event()
    install_stop_handlers(stop)
    procs: dict[str, mp.Process] = {}

    def start(name: str) -> None:
        p = ctx.Process(target=stage_process_main, args=(name, settings, verbose), name=f"dicom-node-{name}")
        p.start()
        procs[name] = p
        log.info("stage %s started (pid %d)", name, p.pid)

    for name in stages:
        start(name)
    failures = {name: 0 for name in stages}
    started = {name: time.monotonic() for name in stages}
    while not stop.wait(0.5):
        for name, p in list(procs.items()):
            if not p.is_alive():
                # Back off on a stage that keeps dying (e.g. missing weights): 2, 4, 8 ... 60 s.
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
    deadline = time.monotonic() + 30
    for p in procs.values():
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            log.warning("stage %s did not stop in time: killing", p.name)
            p.kill()
            p.join()
    log.info("stopped")
    return 0
