"""The ``dicom-node`` console script: the only place that builds objects from configuration.

Each sub-command lives in ``dicom_node/commands/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func=run``; ``run(args) -> int``.
Command modules import heavy packages (torch, FastAPI) inside ``run``, so ``dicom-node --help``
and the listener stay light.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ["stages", "web", "network", "admin", "user", "predict", "train", "evaluate"]
COMMANDS += ["backup", "retention"]  # operations (issue 11)
COMMANDS += ["viewer"]  # the OHIF viewer (issue 10)


def configure_logging(verbose: int = 0) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    if verbose < 2:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Migrations are routine: Alembic's "Context impl", "Will assume transactional DDL" and
    # "Running upgrade" lines only with -v.
    logging.getLogger("alembic").setLevel(logging.INFO if verbose >= 1 else logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    from dicom_node import __version__

    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description="DICOM node for lung nodule detection (Res-MTNet). Research use only; not a medical device.",
    )
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dicom_node.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"dicom_node.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="PATH", default=None,
                        help="configuration file (TOML); default: ./config.toml if present, else built-in defaults")


def settings_from_args(args):
    """Load the Settings named by ``--config`` (or ./config.toml); exits with a clear message if invalid."""
    from pathlib import Path

    from dicom_node.config import ConfigError, load_settings

    path = args.config
    if path is None and Path("config.toml").exists():
        path = "config.toml"
    try:
        return load_settings(Path(path) if path else None)
    except ConfigError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
