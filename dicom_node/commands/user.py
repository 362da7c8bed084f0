"""``dicom-node user``: web accounts (add, list, remove, passwd, logout).

``passwd`` and ``remove`` end every web session and API token of the user at once (in the same
transaction); ``logout`` does that alone, without changing the password.

Passwords are never taken from the command line (they would show in ``ps`` and the shell
history): ``--password-stdin`` reads the first line of standard input, otherwise the command
prompts twice on the terminal.
"""
from __future__ import annotations

import argparse
import sys

from dicom_node.cli import add_config_argument, settings_from_args


def register(subparsers) -> None:  # noqa: ANN001
    p = subparsers.add_parser("user", help="manage web users (admin, radiologist, sender)",
                              description="Manage the accounts that log in to the web pages and the API.")
    sub = p.add_subparsers(dest="user_command", metavar="ACTION", required=True)

    add = sub.add_parser("add", help="create a user")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=["admin", "radiologist", "sender"],
                     help="admin: everything; radiologist: worklist, studies, DICOMweb reads; "
                          "sender: DICOMweb STOW-RS only")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add_config_argument(add)

    ls = sub.add_parser("list", help="list users")
    add_config_argument(ls)

    rm = sub.add_parser("remove", help="remove a user")
    rm.add_argument("name")
    add_config_argument(rm)

    pw = sub.add_parser("passwd", help="set a user's password")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add_config_argument(pw)

    lo = sub.add_parser("logout", help="end every web session and API token of a user")
    lo.add_argument("name")
    add_config_argument(lo)

    for q in (add, ls, rm, pw, lo):
        q.set_defaults(func=run)


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise SystemExit("dicom-node user: no terminal to prompt on; pass --password-stdin and pipe the password")
    import getpass

    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Repeat password: "):
        raise SystemExit("dicom-node user: the passwords do not match")
    return first


def run(args: argparse.Namespace) -> int:
    from dicom_node.web.security import PasswordError, hash_password
    from storage import repo, users
    from storage.db import open_database

    settings = settings_from_args(args)
    settings.node.data_dir.mkdir(parents=True, exist_ok=True)
    sessions = open_database(settings.database_url)
    action = args.user_command
    try:
        if action == "list":
            with sessions() as s:
                rows = users.list_users(s)
                if not rows:
                    print("no users; create one with: dicom-node user add NAME --role admin --password-stdin")
                for u in rows:
                    print(f"{u.username}\t{u.role.value}\t{u.created_at:%Y-%m-%d %H:%M}")
            return 0
        if action == "add":
            users.check_username(args.name)
            password_hash = hash_password(_read_password(args))
            with sessions.begin() as s:
                users.add_user(s, args.name, args.role, password_hash)
                repo.audit(s, "cli", "user.add", args.name, {"role": args.role})
            print(f"user {args.name} added with role {args.role}")
            return 0
        if action == "passwd":
            password_hash = hash_password(_read_password(args))
            with sessions.begin() as s:
                users.set_password_hash(s, args.name, password_hash)
                repo.audit(s, "cli", "user.passwd", args.name)
            print(f"password of {args.name} changed; their web sessions and API tokens have ended")
            return 0
        if action == "logout":
            with sessions.begin() as s:
                user = users.get_user(s, args.name)
                if user is None:
                    raise users.UserError(f"user {args.name!r} does not exist")
                n = users.revoke_user_sessions(s, user.id)
                repo.audit(s, "cli", "user.logout", args.name, {"revoked": n})
            print(f"{n} web session(s) and API token(s) of {args.name} ended")
            return 0
        if action == "remove":
            with sessions.begin() as s:
                users.remove_user(s, args.name)
                repo.audit(s, "cli", "user.remove", args.name)
            print(f"user {args.name} removed")
            return 0
    except (users.UserError, PasswordError) as exc:
        print(f"dicom-node user {action}: {exc}", file=sys.stderr)
        return 1
    return 2
