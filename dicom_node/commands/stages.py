"""``dicom-node serve`` (all stages) and ``listen|schedule|work|dispatch`` (one stage each).

Exit codes: 0 stopped on request (SIGTERM/SIGINT); 2 invalid configuration; 75 (``serve``)
another ``serve`` holds the data directory; 78 a port is taken (or cannot be bound) or a stage
cannot run for a configuration reason: restarting will not help until the cause is removed.
``dicom-node status`` prints the node's health (the ``/healthz`` checks) and exits 0 when ok.
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


STATUS_HELP = "show disk, database and stage health (as /healthz); exit 0 when ok, 1 otherwise"


def register(sub: argparse._SubParsersAction) -> None:
    for name, text in HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        add_config_argument(p)
        if name == "serve":
            p.add_argument("--no-web", action="store_true", help="do not start the web stage")
        p.set_defaults(func=run, stage=name)
    p = sub.add_parser("status", help=STATUS_HELP, description=STATUS_HELP)
    add_config_argument(p)
    p.add_argument("--json", action="store_true", help="print the /healthz JSON object")
    p.set_defaults(func=run_status)


def run_status(args) -> int:
    import json

    from dicom_node.health import check_health
    from dicom_node.node import open_node

    body = check_health(open_node(settings_from_args(args), seed=False))
    if args.json:
        print(json.dumps(body, indent=2))
        return 0 if body["status"] == "ok" else 1
    disk = body["disk"]
    if "free_bytes" in disk:
        print(f"disk      {disk['status']:6} {disk['free_bytes'] / 2**30:.1f} GiB free "
              f"(watermark {disk['min_free_bytes'] / 2**20:.0f} MiB)")
    print(f"database  {body['database']}")
    for stage, st in body.get("stages", {}).items():
        age = f"last heartbeat {st['age_seconds']:.0f} s ago, {st['processes']} process(es)" if "age_seconds" in st else ""
        print(f"{stage:9} {st['status']:6} {age}{'' if st['required'] else ' (not required)'}".rstrip())
    for line in body.get("problems", []):
        print(f"problem: {line}", file=sys.stderr)
    return 0 if body["status"] == "ok" else 1


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
