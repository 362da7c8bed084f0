"""``dicom-node serve`` (all stages) and ``listen|schedule|work|dispatch`` (one stage each).

Exit codes: 0 stopped on request (SIGTERM/SIGINT); 2 invalid configuration; 75 (``serve``)
another ``serve`` holds the data directory; 78 a port is taken (or cannot be bound) or a stage
cannot run for a configuration reason: restarting will not help until the cause is removed.
"""
from __future__ import annotations

import argparse
import sys
import threading

from dicom_node.cli import add_config_argument, settings_from_args

HELP = {
    "serve": "run every stage (listener, scheduler, worker, dispatcher, web) until SIGTERM/Ctrl-C",
    "listen": "run only the DICOM listener (Storage and Verification SCP)",
    "schedule": "run only the scheduler (completion, eligibility, jobs)",
    "work": "run only a model worker",
    "dispatch": "run only the dispatcher (C-STORE of results to destinations)",
}


def register(sub: argparse._SubParsersAction) -> None:
    for name, text in HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        add_config_argument(p)
        if name == "serve":
            p.add_argument("--no-web", action="store_true", help="do not start the web stage")
        p.set_defaults(func=run, stage=name)


def run(args) -> int:
    settings = settings_from_args(args)
    if args.stage == "serve":
        from dicom_node.stages import supervise

        stages = ["listen", "schedule", "work", "dispatch"]
        if settings.web.enabled and not args.no_web:
            stages.append("web")
        return supervise(settings, stages, args.verbose)
    from dicom_node.stages import EXIT_CONFIG, StageConfigError, install_stop_handlers, run_stage

    stop = threading.Event()
    install_stop_handlers(stop)
    try:
        run_stage(args.stage, settings, stop)
    except StageConfigError as exc:
        print(f"dicom-node {args.stage}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0
