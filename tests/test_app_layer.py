"""The rule of the application layer (``dicom_node/app``): only it writes pipeline state.

No module of ``dicom_node`` outside ``dicom_node/app/`` constructs a ``Job``, ``Transfer`` or
``RoutingDecision``, assigns a job's or transfer's ``state``, a study's ``status`` or summary, or
a series' completion and routing fields, or writes those fields with ``update(Job | Transfer |
Study | Series).values(...)`` (a lock that only touches ``updated_at`` is no state change).
``storage`` (the ingest upsert, the claim queries) is outside ``dicom_node`` and not scanned.
The scan reads the source (AST), so the test costs nothing and names each offending line.

The admin half (``admin_violations``): no module outside ``dicom_node/app/`` writes an audit
record (``repo.audit``), a runtime setting (``repo.set_setting``), or a user, source,
destination, routing rule, setting, audit or review row (their constructors, the
``repo.ensure_*`` seeds, the ``storage.users`` writers, an ``update(...).values(...)`` of those
tables), except the few listed in ``ADMIN_EXCEPTIONS`` with their reason. On the code before the
admin half moved into ``app/`` (commit 3914589) the scan found 47 such writes in 7 modules
(``web/services.py`` 20, ``commands/admin.py`` 8, ``commands/user.py`` 8, ``routing/store.py`` 7,
``node.py`` 2, ``retention.py`` 1, ``web/login.py`` 1); now it finds none.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dicom_node"

CREATED_ONLY_BY_APP = {"Job", "Transfer", "RoutingDecision"}
UPDATED_ONLY_BY_APP = {"Job", "Transfer", "Study", "Series"}
#: Attributes of studies and series that only the application layer assigns.
FIELDS = {"state", "status_reason", "findings_count", "max_diameter_mm", "max_malignancy", "dirty",
          "complete_requested", "eligible", "eligibility_reason", "route_analyse", "route_summary",
          "discard_pending"}


#: Rows only the application layer creates or updates (the admin half).
ADMIN_MODELS = {"Source", "Destination", "User", "RoutingRule", "Setting", "AuditEvent", "FindingReview"}
#: Calls that write admin state or an audit record: module alias -> function names.
ADMIN_CALLS = {"repo": {"audit", "set_setting", "ensure_source", "ensure_destination"},
               "users": {"add_user", "set_role", "set_password_hash", "remove_user", "revoke_user_sessions"}}
#: (module, call) written outside app/ on purpose, with the reason.
ADMIN_EXCEPTIONS = {
    ("web/login.py", "repo.audit"): "login, login.failed, login.throttled, logout: the Authenticator records each "
                                    "sign-in attempt of the caller beside its own session row, in the short "
                                    "transaction after the Argon2 check (docs/hardening/web.md); not an admin change",
    ("web/dicomweb/stow.py", "repo.audit"): "stow: the DICOMweb ingest's record, written with its association log "
                                            "row, like the listener's association log; not an admin change",
}


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _targets(stmt: ast.AST):
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
    for t in targets:
        yield from (t.elts if isinstance(t, ast.Tuple) else [t])


def violations(package: Path = PACKAGE) -> list[str]:
    """Every write of pipeline state outside ``package/app``, as "path:line: what"."""
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent)
        if rel.parts[1] == "app":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id in CREATED_ONLY_BY_APP:
                    found.append(f"{rel}:{node.lineno}: creates a {node.func.id}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "values":
                model = next((c.args[0] for c in ast.walk(node.func.value) if isinstance(c, ast.Call)
                              and isinstance(c.func, ast.Name) and c.func.id == "update" and c.args
                              and _names(c.args[0]) & UPDATED_ONLY_BY_APP), None)
                written = {k.arg for k in node.keywords} & (FIELDS | {"status"})
                if model is not None and written:
                    found.append(f"{rel}:{node.lineno}: update({ast.unparse(model)}) of {', '.join(sorted(written))}")
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                for t in _targets(node):
                    if not isinstance(t, ast.Attribute) or (isinstance(t.value, ast.Name) and t.value.id == "self"):
                        continue
                    if t.attr in FIELDS or (t.attr == "status" and "StudyStatus" in _names(node.value)):
                        found.append(f"{rel}:{node.lineno}: assigns {ast.unparse(t)}")
    return found


def admin_violations(package: Path = PACKAGE, exceptions: dict | None = None) -> list[str]:
    """Every write of admin state or an audit record outside ``package/app``, as "path:line: what"."""
    exceptions = ADMIN_EXCEPTIONS if exceptions is None else exceptions
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent)
        inside = "/".join(rel.parts[1:])
        if rel.parts[1] == "app":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Name) and f.id in ADMIN_MODELS:
                found.append(f"{rel}:{node.lineno}: creates a {f.id}")
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.attr in ADMIN_CALLS.get(
                    f.value.id, ()):
                call = f"{f.value.id}.{f.attr}"
                if (inside, call) not in exceptions:
                    found.append(f"{rel}:{node.lineno}: calls {call}")
            elif isinstance(f, ast.Attribute) and f.attr == "values":
                model = next((c.args[0] for c in ast.walk(f.value) if isinstance(c, ast.Call)
                              and isinstance(c.func, ast.Name) and c.func.id == "update" and c.args
                              and _names(c.args[0]) & ADMIN_MODELS), None)
                if model is not None:
                    found.append(f"{rel}:{node.lineno}: update({ast.unparse(model)})")
    return found


def test_only_the_application_layer_writes_admin_state_and_audit_records():
    assert admin_violations() == []


def test_each_admin_exception_is_still_needed():
    """An exception whose module no longer makes that call is removed from the list."""
    for (module, call), reason in ADMIN_EXCEPTIONS.items():
        assert reason and f"{call}(" in (PACKAGE / module).read_text(), (module, call)


def test_the_admin_scan_finds_each_kind_of_write(tmp_path):
    pkg = tmp_path / "dicom_node"
    (pkg / "app").mkdir(parents=True)
    (pkg / "web").mkdir()
    (pkg / "app" / "ok.py").write_text("repo.audit(s, 'a', 'x')\ns.add(Source(ae_title='A'))\n")
    (pkg / "web" / "login.py").write_text("repo.audit(s, 'u', 'login')\n")
    (pkg / "cmd.py").write_text(
        "repo.audit(s, 'cli', 'user.passwd', name)\n"
        "repo.set_setting(s, 'node.port', 1)\n"
        "s.add(Destination(name='x'))\n"
        "users.set_password_hash(s, name, h)\n"
        "repo.ensure_source(s, 'A')\n"
        "s.execute(update(User).where(User.id == 1).values(role='admin'))\n"
        "repo.get_setting(s, 'node.port')\n")
    assert sorted(v.split(": ", 1)[1] for v in admin_violations(pkg, {("web/login.py", "repo.audit"): "why"})) == [
        "calls repo.audit", "calls repo.ensure_source", "calls repo.set_setting", "calls users.set_password_hash",
        "creates a Destination", "update(User)"]


def test_only_the_application_layer_writes_pipeline_state():
    assert violations() == []


def test_the_scan_finds_each_kind_of_write(tmp_path):
    """The scan is not vacuous: each forbidden write in a module outside app/ is reported."""
    pkg = tmp_path / "dicom_node"
    (pkg / "app").mkdir(parents=True)
    (pkg / "app" / "ok.py").write_text("job = Job(state=1)\njob.state = 2\n")
    (pkg / "stage.py").write_text(
        "t = Transfer(kind='x')\n"
        "t.state, t.error = TransferState.SENT, None\n"
        "study.status = StudyStatus.DONE\n"
        "series.dirty = True\n"
        "s.execute(update(Series).where(Series.id == 1).values(dirty=True))\n"
        "s.execute(update(Study).values(updated_at=now))\n"
        "self.state = 'fine'\n"
        "query.status = None\n")
    assert sorted(v.split(": ", 1)[1] for v in violations(pkg)) == [
        "assigns series.dirty", "assigns study.status", "assigns t.state", "creates a Transfer",
        "update(Series) of dirty"]


@pytest.mark.parametrize("module", ["scheduler.py", "worker.py", "dispatch.py", "routing/apply.py",
                                    "web/services.py", "web/routes/sources.py", "web/routes/destinations.py",
                                    "web/routes/users.py", "web/routes/settings.py", "web/routes/rules.py",
                                    "web/routes/admin_pages.py", "commands/admin.py", "commands/user.py",
                                    "commands/rules.py", "node.py"])
def test_the_stage_loops_and_services_call_the_application_layer(module):
    assert "dicom_node.app" in (PACKAGE / module).read_text()
