"""The application layer: the one owner of every state change.

Stage loops (scheduler, worker, dispatch), web routes and CLI commands are its callers; they
read what they like, but only this package writes a study's or series' status, creates,
claims, finishes, re-runs or cancels jobs and transfers, writes sources, destinations, users,
runtime settings and rules, and records the audit event of each user action beside the change (``tests/test_app_layer.py`` enforces it; ``storage.repo`` keeps
the ingest upsert and the claim queries). Functions take the caller's session and never commit.

Modules (pipeline): ``studies`` (study status and summary, series completion and routing
state, complete-now, why a series is waiting), ``jobs`` (queue, claim, done, failed, release,
re-run, cancel), ``transfers`` (results, forwards, re-send, retry, cancel, a send's outcome),
``errors`` (``AppError``: ``NotFound``, ``Conflict``, ``Invalid``).

Modules (admin): ``sources``, ``destinations``, ``users``, ``settings`` (the one typed model of
runtime settings), ``rules`` (routing rules; reading them is ``routing.store``), ``findings`` (a
reader's review), ``deletion`` (a whole study deleted by retention). Each holds the one input
model of its rows (the API, the pages and the CLI validate with it) and writes every change with
its audit record; values are checked by ``dicom_node.values``. Map and audit names:
docs/routing/application.md.
"""
