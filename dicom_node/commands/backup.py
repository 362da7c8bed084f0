"""``dicom-node backup DEST`` and ``dicom-node restore SRC [--force]`` (see ``dicom_node.backup``).

``backup`` may run while the node runs (SQLite: the sqlite3 online backup API; PostgreSQL:
``pg_dump``, which must be on PATH); exit status 0 when complete, 1 when a file the database
references was missing, 2 when nothing could be backed up. ``restore`` needs the node stopped,
an empty data folder and database (or ``--force``, which moves the old contents aside).
"""
from __future__ import annotations

import argparse
import sys

from dicom_node.cli import add_config_argument, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backup", help="back up the database and the file store (safe while the node runs)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dest", metavar="DEST", help="a new (or empty) folder outside the data folder")
    add_config_argument(p)
    p.set_defaults(func=run_backup)

    p = sub.add_parser("restore", help="restore a backup made with 'dicom-node backup' (node stopped)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="a folder written by 'dicom-node backup'")
    p.add_argument("--force", action="store_true",
                   help="restore even if the data folder or database is not empty (old contents are moved to "
                        "DATA_DIR/pre-restore-<time>/, a PostgreSQL database is overwritten)")
    add_config_argument(p)
    p.set_defaults(func=run_restore)


def _bar(desc: str):
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="file", file=sys.stderr, disable=not sys.stderr.isatty())

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return bar, update


def run_backup(args) -> int:
    from dicom_node.backup import BackupError, backup

    settings = settings_from_args(args)
    bar, update = _bar("backup")
    try:
        report = backup(settings.database_url, settings.node.data_dir, args.dest, progress=update)
    except BackupError as exc:
        bar.close()
        print(f"dicom-node backup: {exc}", file=sys.stderr)
        return 2
    bar.close()
    print(f"backup in {report.dest}: {report.database} database, {report.instances} instance(s), "
          f"{report.results} result object(s), {report.other_files} other file(s), {report.bytes / 2**20:.1f} MiB; "
          f"every instance checked against its sha256")
    if report.replaced:
        print(f"{len(report.replaced)} instance(s) were replaced by a resend during the backup; the backup keeps "
              "the new files and restore re-evaluates their series", file=sys.stderr)
    if report.missing:
        print(f"dicom-node backup: INCOMPLETE: {len(report.missing)} file(s) referenced by the database were missing "
              f"(listed in {report.dest}/manifest.json), e.g. {report.missing[0]}", file=sys.stderr)
        return 1
    return 0


def run_restore(args) -> int:
    from dicom_node.backup import BackupError, restore

    settings = settings_from_args(args)
    bar, update = _bar("restore")
    try:
        report = restore(args.src, settings.database_url, settings.node.data_dir, force=args.force, progress=update)
    except BackupError as exc:
        bar.close()
        print(f"dicom-node restore: {exc}", file=sys.stderr)
        return 2
    bar.close()
    print(f"restored {report.files} file(s) ({report.bytes / 2**20:.1f} MiB) and the {report.database} database "
          f"into {report.data_dir}; every file checked against the manifest's sha256")
    if report.moved_aside:
        print(f"the previous contents are in {report.moved_aside} (delete it once the restored node is verified)")
    if report.missing:
        print(f"warning: {len(report.missing)} file(s) were already missing when the backup was made", file=sys.stderr)
    return 0
