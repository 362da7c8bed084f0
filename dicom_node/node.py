"""Composition: what every stage needs, built once from ``Settings`` by the CLI.

``Node`` carries the settings, the session factory and the file store; stages receive it (or
parts of it) as arguments. ``effective(...)`` reads a runtime setting: a value changed in the
admin UI/API/CLI (stored in the ``settings`` table) wins over ``config.toml``, and is re-read
on every use, so changes take effect without a restart.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Settings
from storage import repo
from storage.db import open_database
from storage.filestore import FileStore

log = logging.getLogger(__name__)

#: Runtime-changeable settings: key -> (section, field) in Settings. Their one typed model (limits,
#: validation) is ``dicom_node.app.settings.RuntimeSettings``, used by the API, the pages and the CLI.
RUNTIME_KEYS = {
    "node.ae_title": ("node", "ae_title"),
    "node.port": ("node", "port"),
    "node.unknown_callers": ("node", "unknown_callers"),
    "completion.quiet_seconds": ("completion", "quiet_seconds"),
    "eligibility.min_slices": ("eligibility", "min_slices"),
    "eligibility.max_slice_spacing_mm": ("eligibility", "max_slice_spacing_mm"),
    "eligibility.max_slice_thickness_mm": ("eligibility", "max_slice_thickness_mm"),
}


@dataclass
class Node:
    settings: Settings
    sessions: sessionmaker[Session]
    store: FileStore

    def effective(self, key: str, session: Session | None = None):
        """The current value of a runtime setting (database override, else config.toml)."""
        section, name = RUNTIME_KEYS[key]
        default = getattr(getattr(self.settings, section), name)
        if session is not None:
            value = repo.get_setting(session, key, default)
        else:
            with self.sessions() as s:
                value = repo.get_setting(s, key, default)
        # JSON columns on SQLite have numeric affinity (30.0 reads back as 30): restore the type.
        if isinstance(default, (int, float)) and not isinstance(default, bool) and value is not None:
            value = type(default)(value)
        return value


def open_node(settings: Settings, *, seed: bool = True) -> Node:
    """Create the data folder, open (and migrate) the database, seed sources, destinations and
    (while none is stored) routing rules."""
    settings.node.data_dir.mkdir(parents=True, exist_ok=True)
    sessions = open_database(settings.database_url)
    node = Node(settings=settings, sessions=sessions, store=FileStore(settings.node.data_dir))
    if seed:
        from dicom_node.app import destinations, rules, sources

        with sessions.begin() as s:
            sources.seed(s, settings.sources)
            destinations.seed(s, settings.destinations)
            if rules.seed(s, settings.rules):  # only while no rule is stored (see app.rules)
                log.info("routing: %d rule(s) seeded from the configuration", len(settings.rules))
    return node
