"""Administration from the command line: sources, destinations, the node's AE title and runtime
settings, jobs and transfers. Every change goes through the application layer
(``dicom_node.app``), validated by the same models as the API and audited as user "cli" under the
same action names; a refusal is one line and exit status 1 (not found) or 2. Changes are written
to the database and take effect at once in a running node (no restart)."""
from __future__ import annotations

import argparse
import json
import sys

from dicom_node.cli import add_config_argument, settings_from_args
from dicom_node.commands import refused


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("source", help="calling AE titles allowed to send to the node")
    ss = p.add_subparsers(dest="action", required=True)
    a = ss.add_parser("add", help="allow a calling AE title (an existing source of that AE title is replaced by these values)")
    a.add_argument("ae_title")
    a.add_argument("--host", help="only from this host (IP address as seen by the node)")
    a.add_argument("--description")
    a.add_argument("--return-to", default="", metavar="NAMES",
                   help='comma-separated destination names that "sender" means for this source (routing)')
    a.add_argument("--quiet-seconds", type=float, metavar="S",
                   help="seconds without a new instance before a series from this source is complete "
                        "(default: [completion] quiet_seconds)")
    a.add_argument("--disabled", action="store_true", help="store it disabled (the listener refuses it)")
    r = ss.add_parser("remove", help="remove a source")
    r.add_argument("ae_title")
    ss.add_parser("list", help="list sources")
    for x in ss.choices.values():
        add_config_argument(x)
    p.set_defaults(func=run_source)

    p = sub.add_parser("destination", help="where results are sent")
    ss = p.add_subparsers(dest="action", required=True)
    a = ss.add_parser("add", help="add a destination (an existing one of that name is replaced by these values)",
                      description="kind dicom (default): NAME AE@HOST:PORT; kind dicomweb: NAME --kind dicomweb "
                                  "--url http://pacs:8042/dicom-web")
    a.add_argument("name")
    a.add_argument("peer", metavar="AE@HOST:PORT", nargs="?", help="kind dicom: where C-STORE sends")
    a.add_argument("--kind", choices=["dicom", "dicomweb"], default="dicom",
                   help="dicom: C-STORE; dicomweb: STOW-RS to --url (default: %(default)s)")
    a.add_argument("--url", help="kind dicomweb: the DICOMweb base URL")
    a.add_argument("--disabled", action="store_true", help="store it disabled (nothing is sent to it)")
    a.add_argument("--outputs", default="sr,seg", help="comma-separated: sr, seg, sc (default: %(default)s)")
    a.add_argument("--tls", action="store_true",
                   help="send over DICOM TLS, with the [tls] client certificate and CA of the config")
    r = ss.add_parser("remove", help="remove a destination")
    r.add_argument("name")
    e = ss.add_parser("echo", help="test a destination (C-ECHO; a QIDO-RS probe for a DICOMweb one)")
    e.add_argument("name")
    ss.add_parser("list", help="list destinations")
    for x in ss.choices.values():
        add_config_argument(x)
    p.set_defaults(func=run_destination)

    p = sub.add_parser("complete", help="complete now: evaluate a study's series at the next scheduler pass, "
                                        "without waiting for open associations or the quiet period")
    p.add_argument("study_uid")
    p.add_argument("--series", dest="series_uid", help="only this Series Instance UID")
    add_config_argument(p)
    p.set_defaults(func=run_complete)

    p = sub.add_parser("setting", help="show or change runtime settings (AE title, port, completion, eligibility)")
    ss = p.add_subparsers(dest="action", required=True)
    g = ss.add_parser("list", help="show effective settings")
    s_ = ss.add_parser("set", help="change a setting, e.g. node.ae_title NEW_AE")
    s_.add_argument("key")
    s_.add_argument("value")
    for x in (g, s_):
        add_config_argument(x)
    p.set_defaults(func=run_setting)

    p = sub.add_parser("jobs", help="list jobs and transfers; re-run or cancel a job, retry or cancel a transfer")
    add_config_argument(p)
    p.add_argument("--limit", type=int, default=20)
    act = p.add_mutually_exclusive_group()
    act.add_argument("--rerun", type=int, metavar="JOB_ID", help="queue a new job for the series of this job")
    act.add_argument("--cancel", type=int, metavar="JOB_ID", help="cancel a pending job")
    act.add_argument("--retry-transfer", type=int, metavar="TRANSFER_ID", help="send a failed transfer again now")
    act.add_argument("--cancel-transfer", type=int, metavar="TRANSFER_ID", help="cancel a pending or failed transfer")
    p.set_defaults(func=run_jobs)


def _node(args):
    from dicom_node.node import open_node

    return open_node(settings_from_args(args), seed=False)


def run_source(args) -> int:
    from sqlalchemy import select

    from dicom_node.app import sources
    from dicom_node.app.errors import AppError
    from storage.models import Source

    node = _node(args)
    try:
        with node.sessions.begin() as s:
            if args.action == "add":
                data = _model(sources.SourceIn, ae_title=args.ae_title, host=args.host, description=args.description,
                              return_to=args.return_to, quiet_seconds=args.quiet_seconds, enabled=not args.disabled)
                _row, added = sources.put(s, "cli", data)
                print(f"source {data.ae_title} {'added' if added else 'updated'}")
            elif args.action == "remove":
                sources.remove(s, "cli", args.ae_title)
                print(f"source {args.ae_title} removed")
            else:
                for row in s.scalars(select(Source).order_by(Source.ae_title)):
                    back = ",".join(row.return_to or []) or "*"
                    quiet = "default" if row.quiet_seconds is None else f"{row.quiet_seconds:g}s"
                    print(f"{row.ae_title:16}  host={row.host or '*':15}  return_to={back:12}  quiet={quiet:8}  "
                          f"{'enabled' if row.enabled else 'disabled'}  {row.description or ''}")
    except AppError as exc:
        return refused(exc)
    return 0


def _model(model, **values):  # noqa: ANN001 - a pydantic model class of dicom_node.app
    """``model`` validated from the command's values (the API's model); a refusal as ``app.errors.Invalid``."""
    from dicom_node.app.errors import validate

    return validate(model, values)


def _destination_in(args):  # noqa: ANN001
    from dicom_node.app.destinations import DestinationIn
    from dicom_node.app.errors import Invalid
    from dicom_node.values import parse_peer

    values = {"name": args.name, "kind": args.kind, "url": args.url, "tls": args.tls, "enabled": not args.disabled,
              "outputs": [o.strip() for o in args.outputs.split(",") if o.strip()]}
    if args.kind == "dicom":
        if not args.peer:
            raise Invalid(f"destination {args.name!r}: kind dicom needs AE@HOST:PORT")
        try:
            values["ae_title"], values["host"], values["port"] = parse_peer(args.peer)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
    elif args.peer:
        raise Invalid(f"destination {args.name!r}: kind dicomweb takes --url, not {args.peer!r}")
    return _model(DestinationIn, **values)


def _where(d) -> str:  # noqa: ANN001 - a Destination row or DestinationIn
    return d.url if d.kind == "dicomweb" else f"{d.ae_title}@{d.host}:{d.port}"


def run_destination(args) -> int:
    from sqlalchemy import select

    from dicom_node import destinations as kinds
    from dicom_node.app import destinations
    from dicom_node.app.errors import AppError
    from storage.models import Destination

    node = _node(args)
    try:
        with node.sessions.begin() as s:
            if args.action == "add":
                data = _destination_in(args)
                _row, added = destinations.put(s, "cli", data)
                print(f"destination {data.name} {'added' if added else 'updated'}: {data.kind} -> {_where(data)} "
                      f"({', '.join(data.outputs)}){' over TLS' if data.tls else ''}")
                return 0
            if args.action == "list":
                for d in s.scalars(select(Destination).order_by(Destination.name)):
                    print(f"{d.name:16}  {d.kind or 'dicom':8}  {_where(d)}  outputs={','.join(d.outputs)}  "
                          f"{'enabled' if d.enabled else 'disabled'}{'  tls' if d.tls else ''}")
                return 0
            if args.action == "remove":
                destinations.remove(s, "cli", args.name)
                print(f"destination {args.name} removed")
                return 0
            target = kinds.Target.of(destinations.get(s, args.name))
    except AppError as exc:
        return refused(exc)
    ctx = kinds.Context(calling_ae=node.effective("node.ae_title"), timeout=10.0, tls=node.settings.tls)
    outcome = kinds.kind_of(target).echo(target, ctx)  # C-ECHO, or a QIDO-RS probe for dicomweb
    with node.sessions.begin() as s:
        destinations.record_echo(s, "cli", args.name, outcome.ok, outcome.message)
    print(outcome.message, file=sys.stdout if outcome.ok else sys.stderr)
    return 0 if outcome.ok else 1


def run_complete(args) -> int:
    from dicom_node.app.errors import AppError
    from dicom_node.app.studies import request_complete

    node = _node(args)
    try:
        with node.sessions.begin() as s:
            uids = request_complete(s, "cli", args.study_uid, args.series_uid)
    except AppError as exc:
        return refused(exc)
    print(f"complete now: {len(uids)} series of study {args.study_uid}")
    return 0


def run_setting(args) -> int:
    from dicom_node.app import settings
    from dicom_node.app.errors import AppError
    from dicom_node.node import RUNTIME_KEYS

    node = _node(args)
    if args.action == "list":
        for key in RUNTIME_KEYS:
            print(f"{key} = {json.dumps(node.effective(key))}")
        return 0
    try:
        data = settings.parse({args.key: args.value})  # the API's model: same limits, same sentence
        with node.sessions.begin() as s:
            settings.update(node, s, "cli", data)
    except AppError as exc:
        return refused(exc)
    print(f"{args.key} = {json.dumps(data.changes()[args.key])}")
    return 0


def run_jobs(args) -> int:
    from sqlalchemy import select

    from dicom_node.app import jobs, transfers
    from dicom_node.app.errors import AppError
    from storage.models import Job, Transfer

    node = _node(args)
    actions = {"rerun": (jobs.rerun, "job {id} queued: a re-run of job {arg}"),
               "cancel": (jobs.cancel, "job {id} cancelled"),
               "retry_transfer": (transfers.retry, "transfer {id} pending again"),
               "cancel_transfer": (transfers.cancel, "transfer {id} cancelled")}
    for name, (action, said) in actions.items():
        arg = getattr(args, name, None)
        if arg is None:
            continue
        try:
            with node.sessions.begin() as s:
                row = action(s, "cli", arg)
                message = said.format(id=row.id, arg=arg)
        except AppError as exc:
            return refused(exc)
        print(message)
        return 0
    with node.sessions() as s:
        for j in s.scalars(select(Job).order_by(Job.id.desc()).limit(args.limit)):
            print(f"job {j.id:5}  {j.state.value:9}  series {j.series.series_instance_uid}  attempts {j.attempts}  {j.error or ''}")
        for t in s.scalars(select(Transfer).order_by(Transfer.id.desc()).limit(args.limit)):
            print(f"transfer {t.id:5}  {t.state.value:9}  -> {t.destination.name}  attempts {t.attempts}  {t.error or ''}")
    return 0
