"""Administration from the command line: sources, destinations, the node's AE title and runtime
settings, jobs and transfers. Job, transfer and completion changes go through the application
layer (``dicom_node.app``), audited as user "cli". Changes are written to the database and take effect at once in a
running node (no restart)."""
from __future__ import annotations

import argparse
import json
import sys

from dicom_node.cli import add_config_argument, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("source", help="calling AE titles allowed to send to the node")
    ss = p.add_subparsers(dest="action", required=True)
    a = ss.add_parser("add", help="allow a calling AE title")
    a.add_argument("ae_title")
    a.add_argument("--host", help="only from this host (IP address as seen by the node)")
    a.add_argument("--description")
    a.add_argument("--return-to", default="", metavar="NAMES",
                   help='comma-separated destination names that "sender" means for this source (routing)')
    r = ss.add_parser("remove", help="remove a source")
    r.add_argument("ae_title")
    ss.add_parser("list", help="list sources")
    for x in ss.choices.values():
        add_config_argument(x)
    p.set_defaults(func=run_source)

    p = sub.add_parser("destination", help="where results are sent")
    ss = p.add_subparsers(dest="action", required=True)
    a = ss.add_parser("add", help="add or update a destination")
    a.add_argument("name")
    a.add_argument("peer", metavar="AE@HOST:PORT")
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

    from dicom_node.config import check_ae_title
    from storage import repo
    from storage.models import Destination, Source

    node = _node(args)
    with node.sessions.begin() as s:
        if args.action == "add":
            try:
                ae = check_ae_title(args.ae_title)
            except ValueError as exc:
                print(f"dicom-node: {exc}", file=sys.stderr)
                return 2
            return_to = [n.strip() for n in args.return_to.split(",") if n.strip()]
            known = set(s.scalars(select(Destination.name)))
            if [n for n in return_to if n not in known]:
                print(f"dicom-node: --return-to names unknown destination(s) {[n for n in return_to if n not in known]}; "
                      f"known: {sorted(known) or 'none'}", file=sys.stderr)
                return 2
            row = repo.ensure_source(s, ae)
            row.host, row.description, row.enabled, row.return_to = args.host, args.description, True, return_to
            repo.audit(s, "cli", "source.add", ae, {"host": args.host, "return_to": return_to})
            print(f"source {ae} added")
        elif args.action == "remove":
            row = s.scalar(select(Source).where(Source.ae_title == args.ae_title))
            if row is None:
                print(f"dicom-node: no source {args.ae_title!r}", file=sys.stderr)
                return 1
            s.delete(row)
            repo.audit(s, "cli", "source.remove", args.ae_title)
            print(f"source {args.ae_title} removed")
        else:
            for row in s.scalars(select(Source).order_by(Source.ae_title)):
                back = ",".join(row.return_to or []) or "*"
                print(f"{row.ae_title:16}  host={row.host or '*':15}  return_to={back:12}  "
                      f"{'enabled' if row.enabled else 'disabled'}  {row.description or ''}")
    return 0


def run_destination(args) -> int:
    from sqlalchemy import select

    from dicom_node.config import DestinationEntry
    from dicom_node.scu import echo, parse_peer
    from storage import repo
    from storage.models import Destination

    node = _node(args)
    with node.sessions.begin() as s:
        if args.action == "add":
            try:
                ae, host, port = parse_peer(args.peer)
                entry = DestinationEntry(name=args.name, ae_title=ae, host=host, port=port,
                                         outputs=[o.strip() for o in args.outputs.split(",") if o.strip()],
                                         tls=args.tls)
            except ValueError as exc:
                print(f"dicom-node: {exc}", file=sys.stderr)
                return 2
            row = repo.ensure_destination(s, entry.name, entry.ae_title, entry.host, entry.port, entry.outputs)
            row.ae_title, row.host, row.port, row.outputs, row.enabled = entry.ae_title, entry.host, entry.port, entry.outputs, True
            row.tls = entry.tls
            repo.audit(s, "cli", "destination.add", entry.name, entry.model_dump())
            print(f"destination {entry.name} -> {ae}@{host}:{port} ({', '.join(entry.outputs)}){' over TLS' if entry.tls else ''}")
            return 0
        if args.action == "list":
            for d in s.scalars(select(Destination).order_by(Destination.name)):
                print(f"{d.name:16}  {d.ae_title}@{d.host}:{d.port}  outputs={','.join(d.outputs)}  {'enabled' if d.enabled else 'disabled'}"
                      f"{'  tls' if d.tls else ''}")
            return 0
        row = s.scalar(select(Destination).where(Destination.name == args.name))
        if row is None:
            print(f"dicom-node: no destination {args.name!r}", file=sys.stderr)
            return 1
        if args.action == "remove":
            s.delete(row)
            repo.audit(s, "cli", "destination.remove", args.name)
            print(f"destination {args.name} removed")
            return 0
        from dicom_node import destinations

        target = destinations.Target.of(row)
    ctx = destinations.Context(calling_ae=node.effective("node.ae_title"), timeout=10.0, tls=node.settings.tls)
    outcome = destinations.kind_of(target).echo(target, ctx)  # C-ECHO, or a QIDO-RS probe for dicomweb
    print(outcome.message, file=sys.stdout if outcome.ok else sys.stderr)
    return 0 if outcome.ok else 1


def run_complete(args) -> int:
    from dicom_node.app.studies import request_complete

    node = _node(args)
    try:
        with node.sessions.begin() as s:
            uids = request_complete(s, "cli", args.study_uid, args.series_uid)
    except LookupError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    print(f"complete now: {len(uids)} series of study {args.study_uid}")
    return 0


def run_setting(args) -> int:
    from pydantic import TypeAdapter, ValidationError

    from dicom_node.config import Settings
    from dicom_node.node import RUNTIME_KEYS
    from storage import repo

    node = _node(args)
    if args.action == "list":
        for key in RUNTIME_KEYS:
            print(f"{key} = {json.dumps(node.effective(key))}")
        return 0
    if args.key not in RUNTIME_KEYS:
        print(f"dicom-node: unknown setting {args.key!r}; choose from {', '.join(RUNTIME_KEYS)}", file=sys.stderr)
        return 2
    section, name = RUNTIME_KEYS[args.key]
    section_model = type(getattr(Settings(), section))
    try:
        value = section_model.model_validate({**getattr(node.settings, section).model_dump(), name: args.value})
        value = getattr(value, name)
        TypeAdapter(type(value)).validate_python(value)
    except ValidationError as exc:
        print(f"dicom-node: invalid value {args.value!r} for {args.key}: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    with node.sessions.begin() as s:
        repo.set_setting(s, args.key, value)
        repo.audit(s, "cli", "setting.set", args.key, {"value": value})
    print(f"{args.key} = {json.dumps(value)}")
    return 0


def run_jobs(args) -> int:
    from sqlalchemy import select

    from dicom_node.app import jobs, transfers
    from dicom_node.app.errors import Conflict, NotFound
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
        except (NotFound, Conflict) as exc:
            print(f"dicom-node: {exc}", file=sys.stderr)
            return 1
        print(message)
        return 0
    with node.sessions() as s:
        for j in s.scalars(select(Job).order_by(Job.id.desc()).limit(args.limit)):
            print(f"job {j.id:5}  {j.state.value:9}  series {j.series.series_instance_uid}  attempts {j.attempts}  {j.error or ''}")
        for t in s.scalars(select(Transfer).order_by(Transfer.id.desc()).limit(args.limit)):
            print(f"transfer {t.id:5}  {t.state.value:9}  -> {t.destination.name}  attempts {t.attempts}  {t.error or ''}")
    return 0
