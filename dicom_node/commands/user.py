"""``dicom-node user``: web accounts (add, list, remove, passwd, logout).

``passwd`` and ``remove`` end every web session and API token of the user at once (in the same
transaction); ``logout`` does that alone, without changing the password. Every change is
``dicom_node.app.users``, audited as the API's (``user.add``, ``user.update``, ``user.remove``,
``logout.all``); a refusal is one line, exit status 1 (no such user) or 2.

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
    from dicom_node.app import users as app_users
    from dicom_node.app.errors import AppError
    from dicom_node.commands import refused
    from storage import users
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
            with sessions() as s:  # refuse a bad or taken name before asking for a password
                app_users.check_new(s, args.name)
            password_hash = app_users.hash_password(_read_password(args))  # no transaction held meanwhile
            with sessions.begin() as s:
                app_users.add(s, "cli", args.name, args.role, password_hash)
            print(f"user {args.name} added with role {args.role}")
            return 0
        if action == "passwd":
            with sessions() as s:
                app_users.get(s, args.name)
            password_hash = app_users.hash_password(_read_password(args))
            with sessions.begin() as s:
                app_users.update(s, "cli", args.name, password_hash=password_hash)
            print(f"password of {args.name} changed; their web sessions and API tokens have ended")
            return 0
        if action == "logout":
            with sessions.begin() as s:
                n = app_users.logout_all(s, "cli", args.name)
            print(f"{n} web session(s) and API token(s) of {args.name} ended")
            return 0
        if action == "remove":
            with sessions.begin() as s:
                app_users.remove(s, "cli", args.name)
            print(f"user {args.name} removed")
            return 0
    except AppError as exc:
        return refused(exc)
    return 2
