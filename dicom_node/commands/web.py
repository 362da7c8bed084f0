"""``dicom-node web``: run the web stage alone (worklist, admin pages, JSON API, metrics).

``dicom-node serve`` starts the same application in its own process; this command is for a
scale-out deployment where the web stage runs on its own host against the shared database.
"""
from __future__ import annotations

import argparse
import sys

from dicom_node.cli import add_config_argument, settings_from_args


def register(subparsers) -> None:  # noqa: ANN001
    p = subparsers.add_parser("web", help="run the web stage (worklist, admin, API, metrics)")
    add_config_argument(p)
    p.add_argument("--host", default=None, help="address to listen on (default: [web] host)")
    p.add_argument("--port", type=int, default=None, help="port (default: [web] port)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from dicom_node.node import open_node
    from dicom_node.tls import TLSConfigError, web_config
    from dicom_node.web.app import create_app

    settings = settings_from_args(args)
    node = open_node(settings)
    host = args.host or settings.web.host
    port = args.port or settings.web.port
    # HTTPS and trusted proxies as in ``serve`` (dicom_node.stages.run_web)
    try:
        config = web_config(create_app(node), settings.web, host=host, port=port, log_level="info", access_log=False)
    except TLSConfigError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    uvicorn.Server(config).run()
    return 0
