"""``dicom-node retention [--dry-run | --apply]``: show or apply what ``[retention]`` deletes.

``--dry-run`` (the default) lists the studies a pass would delete now, with the reason, and
the studies protected by pending work; ``--apply`` deletes them (files and index rows, each
audited) as the schedule stage does every ``[retention] interval_seconds``.
``--max-age-days`` and ``--min-free-disk-percent`` override the configuration for this run.
"""
from __future__ import annotations

import argparse
import sys

from dicom_node.cli import add_config_argument, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retention", help="list (default) or delete the studies [retention] removes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="only list what would be deleted (default)")
    mode.add_argument("--apply", action="store_true", help="delete it now")
    p.add_argument("--max-age-days", type=float, default=None, help="override [retention] max_age_days (0: off)")
    p.add_argument("--min-free-disk-percent", type=float, default=None,
                   help="override [retention] min_free_disk_percent (0: off)")
    add_config_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from dicom_node.config import RetentionSection
    from dicom_node.node import open_node
    from dicom_node.retention import Policy, disk_figures, protected, run_once, study_usage

    settings = settings_from_args(args)
    section = settings.retention.model_dump()
    for key in ("max_age_days", "min_free_disk_percent"):
        if getattr(args, key) is not None:
            section[key] = getattr(args, key)
    try:
        policy = Policy.from_settings(RetentionSection(**section))
    except ValueError as exc:
        print(f"dicom-node retention: {exc}", file=sys.stderr)
        return 2
    if not policy.enabled:
        print("retention is off ([retention] max_age_days = 0 and min_free_disk_percent = 0)")
        return 0
    node = open_node(settings, seed=False)
    disk = disk_figures(settings.node.data_dir)
    print(f"disk: {disk['free_bytes'] / 2**30:.1f} GiB free of {disk['total_bytes'] / 2**30:.1f} GiB "
          f"({disk['free_percent']:.1f}% free); policy: max_age_days={policy.max_age_days:g}, "
          f"min_free_disk_percent={policy.min_free_disk_percent:g}")
    candidates, report = run_once(node, policy, apply=args.apply)
    verb = "deleted" if args.apply else "would delete"
    rows = report.deleted if args.apply else candidates
    for c in rows:
        print(f"{verb} study {c.usage.study_instance_uid}: {c.reason}, {c.usage.instances} instance(s), "
              f"{c.usage.bytes / 2**20:.1f} MiB, last instance {c.usage.last_received_at:%Y-%m-%d %H:%M} UTC")
    for uid, why in report.skipped:
        print(f"kept study {uid}: {why}")
    if not args.apply:
        with node.sessions() as s:
            uids = {u.study_id: u.study_instance_uid for u in study_usage(s)}
            for sid, why in sorted(protected(s).items()):
                print(f"kept study {uids.get(sid, sid)}: {why} (pending work is never deleted)")
            s.rollback()
    if report.paused:
        print(f"nothing deleted: {report.paused}")
    n = len(rows)
    print(f"{n} stud{'y' if n == 1 else 'ies'} {verb}" + (f", {report.freed_bytes / 2**20:.1f} MiB freed" if args.apply else ""))
    return 0
