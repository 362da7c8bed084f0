"""Routing rules from the command line: list, show, add, remove, move, dry-run. Changes are
made by ``dicom_node.app.rules`` (audited, actor "cli") and apply to the next series the running node
decides, without a restart."""
from __future__ import annotations

import argparse
import json
import sys

from dicom_node.cli import add_config_argument, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rules", help="routing rules: what is analysed, forwarded, discarded, and where results go")
    ss = p.add_subparsers(dest="action", required=True)
    ss.add_parser("list", help="the rules in evaluation order")
    sh = ss.add_parser("show", help="one rule as JSON")
    sh.add_argument("name")
    a = ss.add_parser("add", help="add a rule (or replace it with --replace)",
                      description='e.g. dicom-node rules add chest-ct --match Modality=CT '
                                  '--match "BodyPartExamined=/CHEST|LUNG/" --actions analyse --destinations sender; '
                                  'or --json \'{"name": ..., "match": {...}, "actions": [...]}\'')
    a.add_argument("name", nargs="?")
    a.add_argument("--json", help="the whole rule as a JSON object (the fields of [[rules]])")
    a.add_argument("--match", action="append", default=[], metavar="KEY=CONDITION",
                   help="a condition; CONDITION is a glob, a /regex/, or JSON (a list, {\"min\": 1}, true, 3)")
    a.add_argument("--actions", default="analyse", help="comma-separated: analyse, forward, discard (default: %(default)s)")
    a.add_argument("--destinations", default="sender", help="comma-separated names, or sender (default: %(default)s)")
    a.add_argument("--level", choices=["series", "study"], default="series")
    a.add_argument("--priority", choices=["urgent", "routine"], default="routine")
    a.add_argument("--quiet-seconds", type=float)
    a.add_argument("--position", type=int, help="1-based place in the order (default: last)")
    a.add_argument("--replace", action="store_true", help="replace an existing rule of that name")
    r = ss.add_parser("remove", help="remove a rule")
    r.add_argument("name")
    m = ss.add_parser("move", help="move a rule to another place in the order")
    m.add_argument("name")
    m.add_argument("position", type=int)
    d = ss.add_parser("dry-run", help="what the rules would decide, without doing it")
    g = d.add_mutually_exclusive_group(required=True)
    g.add_argument("--study", metavar="STUDY_INSTANCE_UID", help="a stored study")
    g.add_argument("--attributes", metavar="JSON", help='pasted facts, e.g. \'{"Modality": "CT", "calling_ae": "CT_A"}\'')
    d.add_argument("--json", dest="as_json", action="store_true", help="print the whole result as JSON")
    for x in ss.choices.values():
        add_config_argument(x)
    p.set_defaults(func=run)


def _condition(text: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if not isinstance(value, str) else text


def _rule_from_args(args):
    from dicom_node.routing.rules import Rule

    if args.json:
        data = json.loads(args.json)
        if args.name:
            data.setdefault("name", args.name)
        return Rule.model_validate(data)
    match = {}
    for item in args.match:
        key, sep, cond = item.partition("=")
        if not sep:
            raise ValueError(f"--match {item!r}: write KEY=CONDITION, e.g. Modality=CT")
        match[key.strip()] = _condition(cond.strip())
    return Rule.model_validate({
        "name": args.name, "match": match, "actions": [x.strip() for x in args.actions.split(",") if x.strip()],
        "destinations": [x.strip() for x in args.destinations.split(",") if x.strip()], "level": args.level,
        "priority": args.priority, "quiet_seconds": args.quiet_seconds})


def _line(row, rule) -> str:
    match = ", ".join(f"{k}={json.dumps(v)}" for k, v in rule.match.items()) or "(every series)"
    return (f"{row.position:3}  {rule.name:20}  {'enabled ' if rule.enabled else 'disabled'}  match {match}  "
            f"-> {'+'.join(rule.actions)}"
            f"{' to ' + ', '.join(rule.destinations) if set(rule.actions) - {'discard'} else ''}"
            f"{'  level=study' if rule.level == 'study' else ''}{'  urgent' if rule.priority == 'urgent' else ''}")


def run(args) -> int:
    from pydantic import ValidationError

    from dicom_node.app import rules
    from dicom_node.app.errors import AppError
    from dicom_node.commands import refused
    from dicom_node.node import open_node
    from dicom_node.routing import store
    from dicom_node.routing.dryrun import dry_run

    # Seeded like ``serve`` (sources, destinations, and [[rules]] while none is stored), so what
    # this command lists and dry-runs is what the node decides with.
    node = open_node(settings_from_args(args))
    try:
        with node.sessions.begin() as s:
            if args.action == "list":
                rows = store.list_rows(s)
                for row in rows:
                    print(_line(row, store.rule_of(row)))
                if not rows:
                    print("no rule: eligible series are analysed, results to the sender (return_to, or every destination)")
            elif args.action == "show":
                row = store.get_row(s, args.name)
                print(json.dumps({"position": row.position, **store.rule_of(row).model_dump()}, indent=2))
            elif args.action == "add":
                rule = _rule_from_args(args)
                if store.find_row(s, rule.name) is not None and args.replace:
                    row = rules.update(s, "cli", rule.name, rule)
                    if args.position:
                        rules.move(s, "cli", rule.name, args.position)
                else:
                    row = rules.add(s, "cli", rule, args.position)
                print(_line(row, rule))
            elif args.action == "remove":
                rules.remove(s, "cli", args.name)
                print(f"rule {args.name} removed")
            elif args.action == "move":
                for row in rules.move(s, "cli", args.name, args.position):
                    print(_line(row, store.rule_of(row)))
            else:
                attrs = json.loads(args.attributes) if args.attributes else None
                if attrs is not None and not isinstance(attrs, dict):
                    raise ValueError("--attributes must be a JSON object")
                result = dry_run(node, s, study_instance_uid=args.study, attributes=attrs)
                if args.as_json:
                    print(json.dumps(result, indent=2, default=str))
                else:
                    print("rules evaluated: " + ", ".join(result["rules"]))
                    for d in result["series"]:
                        head = (f"{d.get('modality') or '?'} series {d.get('series_number') or ''} "
                                f"{d.get('series_instance_uid')}" if d.get("series_instance_uid") else "attributes")
                        print(f"{head}: {d['summary']}")
                        for r in d["rules"]:
                            why = "; ".join(r["failed"]) if r["failed"] else "all conditions met"
                            print(f"  {'MATCH' if r['matched'] else 'no   '}  {r['name']}: {why}")
    except AppError as exc:
        return refused(exc)
    except ValidationError as exc:
        e = exc.errors()[0]
        print(f"dicom-node: invalid rule: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}", file=sys.stderr)
        return 2
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    return 0
