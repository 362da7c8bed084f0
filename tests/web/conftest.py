"""Fixtures for the web tests: one node per database backend for the whole session.

The API tests run on SQLite and on PostgreSQL. PostgreSQL: the server at ``DICOM_NODE_TEST_PG``
(default ``postgresql://postgres@127.0.0.1:5432/postgres``); a fresh database is created for the
session and dropped at the end; when no server answers those variants are skipped with a
message. Between tests every table is emptied except the two fixture accounts (and their sessions), which is much
faster than migrating a database per test.
"""
from __future__ import annotations

import pytest
from sqlalchemy import delete, select

from tests.peers import pg_database
from webtools import ADMIN, RAD, build_node, create_accounts


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def web_db_url(request, tmp_path_factory):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('web-sqlite') / 'node.sqlite3'}"
        return
    with pg_database("dicomnode_web") as url:
        yield url


def clean_tables(node) -> None:
    from storage.models import Base, User, WebSession

    keep = [ADMIN[0], RAD[0]]
    with node.sessions.begin() as s:
        for table in reversed(Base.metadata.sorted_tables):
            if table.name == "users":
                s.execute(delete(User).where(User.username.not_in(keep)))
            elif table.name == "web_sessions":  # the session-wide tokens of the two accounts stay valid
                s.execute(delete(WebSession).where(
                    WebSession.user_id.not_in(select(User.id).where(User.username.in_(keep)))))
            else:
                s.execute(table.delete())


@pytest.fixture(scope="session")
def web_node(web_db_url, tmp_path_factory):
    node = build_node(web_db_url, tmp_path_factory.mktemp("web-data"))
    create_accounts(node)
    yield node
    node.sessions.kw["bind"].dispose()


@pytest.fixture(scope="session")
def client(web_node):
    from fastapi.testclient import TestClient

    from dicom_node.web.app import create_app

    with TestClient(create_app(web_node)) as c:
        yield c


def get_token(client, user: tuple[str, str]) -> str:
    r = client.post("/api/token", data={"username": user[0], "password": user[1]})
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


@pytest.fixture(scope="session")
def admin_h(client):
    return {"Authorization": f"Bearer {get_token(client, ADMIN)}"}


@pytest.fixture(scope="session")
def rad_h(client):
    return {"Authorization": f"Bearer {get_token(client, RAD)}"}


@pytest.fixture
def node(web_node):
    clean_tables(web_node)
    yield web_node
