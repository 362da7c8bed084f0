"""Shared fixtures: databases (SQLite and, when a server answers, PostgreSQL), a node in-process.

PostgreSQL: tests use the server at ``DICOM_NODE_TEST_PG`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``), creating a fresh database per test and
dropping it after; when no server answers they are skipped with a message saying so.
"""
from __future__ import annotations

import pytest

from tests.peers import pg_database

@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database URL (dropped after the test)."""
    with pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """Each test using this runs twice: on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.sqlite3'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def make_node(tmp_path):
    """Build a ``Node`` on a database URL with settings overrides (nested dicts)."""
    from dicom_node.config import Settings
    from dicom_node.node import open_node

    def _make(database_url: str = "", **overrides):
        data = {"node": {"data_dir": str(tmp_path / "var"), "port": 0, "host": "127.0.0.1"},
                "database": {"url": database_url}, "sources": [{"ae_title": "STORESCU"}, {"ae_title": "NODETEST"}]}
        for key, value in overrides.items():
            if isinstance(value, dict):
                data.setdefault(key, {}).update(value)
            else:
                data[key] = value
        return open_node(Settings(**data))

    return _make


@pytest.fixture
def strict_pydicom():
    """pydicom raises on invalid values while reading and writing (restored afterwards)."""
    from pydicom import config as pydicom_config

    settings = pydicom_config.settings
    old = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = pydicom_config.RAISE
    settings.writing_validation_mode = pydicom_config.RAISE
    yield
    settings.reading_validation_mode, settings.writing_validation_mode = old
