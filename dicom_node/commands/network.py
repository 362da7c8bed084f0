"""``dicom-node echo AE@HOST:PORT`` and ``dicom-node send PATH... AE@HOST:PORT``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicom_node.cli import add_config_argument, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("echo", help="C-ECHO a peer", description="Verify a DICOM peer with C-ECHO.")
    p.add_argument("peer", metavar="AE@HOST:PORT")
    p.add_argument("--calling-ae", default=None, help="our AE title (default: [node] ae_title of the config)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default: %(default)s)")
    p.add_argument("--tls", action="store_true", help="DICOM TLS with the [tls] certificates of the config")
    add_config_argument(p)
    p.set_defaults(func=run_echo)

    p = sub.add_parser("send", help="C-STORE files or folders to a peer",
                       description="Send DICOM files (folders are searched recursively) with C-STORE.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("peer", metavar="AE@HOST:PORT")
    p.add_argument("--calling-ae", default=None, help="our AE title (default: [node] ae_title of the config)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default: %(default)s)")
    p.add_argument("--tls", action="store_true", help="DICOM TLS with the [tls] certificates of the config")
    add_config_argument(p)
    p.set_defaults(func=run_send)


def _peer(text: str) -> tuple[str, str, int]:
    from dicom_node.scu import parse_peer

    try:
        return parse_peer(text)
    except ValueError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_echo(args) -> int:
    from dicom_node.scu import echo

    ae, host, port = _peer(args.peer)
    outcome = echo(ae, host, port, calling_ae=_calling_ae(args), timeout=args.timeout, tls=_tls(args))
    print(outcome.message, file=sys.stdout if outcome.ok else sys.stderr)
    return 0 if outcome.ok else 1


def _calling_ae(args) -> str:
    return args.calling_ae or settings_from_args(args).node.ae_title


def _tls(args):
    """The [tls] settings with --tls, else None (plain TCP)."""
    return settings_from_args(args).tls if getattr(args, "tls", False) else None


def collect_files(paths: list[str]) -> list[Path]:
    """Files named, and every file under folders named (hidden files skipped), sorted."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{raw} does not exist")
    return files


def run_send(args) -> int:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from dicom_node.scu import store

    ae, host, port = _peer(args.peer)
    try:
        files = collect_files(args.paths)
    except FileNotFoundError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    dicom_files = []
    for f in files:
        try:
            dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            dicom_files.append(f)
        except (InvalidDicomError, OSError, ValueError):
            print(f"skipping {f}: not a DICOM file", file=sys.stderr)
    if not dicom_files:
        print("dicom-node: no DICOM files to send", file=sys.stderr)
        return 2
    from tqdm import tqdm

    # A progress bar (one step per C-STORE response) on stderr, only when it is a terminal.
    with tqdm(total=len(dicom_files), desc="send", unit="file", file=sys.stderr,
              disable=not sys.stderr.isatty()) as bar:
        outcome = store(dicom_files, ae, host, port, calling_ae=_calling_ae(args), timeout=args.timeout,
                        tls=_tls(args), on_response=lambda _uid: bar.update())
    print(f"{len(outcome.acknowledged)}/{len(dicom_files)} stored: {outcome.message}",
          file=sys.stdout if outcome.ok else sys.stderr)
    return 0 if outcome.ok else 1
