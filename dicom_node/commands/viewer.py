"""``dicom-node viewer install|status``: the OHIF viewer the web stage serves under ``/viewer/``
(``dicom_node.web.viewer_install``; ``make viewer`` runs the install)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers) -> None:  # noqa: ANN001
    p = subparsers.add_parser("viewer", help="install the OHIF viewer or report what is installed")
    p.add_argument("action", choices=["install", "status"])
    p.add_argument("--dir", type=Path, default=None, help="install folder (default: dicom_node/web/viewer_dist)")
    p.add_argument("--force", action="store_true", help="reinstall even when the pinned version is there")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicom_node.web import viewer_install as vi

    if args.action == "install":
        try:
            vi.install(args.dir, force=args.force)
        except vi.ViewerInstallError as exc:
            print(f"dicom-node: {exc}", file=sys.stderr)
            return 1
        return 0
    marker = vi.installed(args.dir)
    if marker is None:
        print(vi.missing_message(args.dir))
        return 1
    print(json.dumps({"dir": str(args.dir or vi.viewer_dir()), **marker}))
    return 0
