"""The rule of the application layer (``dicom_node/app``): only it writes pipeline state.

No module of ``dicom_node`` outside ``dicom_node/app/`` constructs a ``Job``, ``Transfer`` or
``RoutingDecision``, assigns a job's or transfer's ``state``, a study's ``status`` or summary, or
a series' completion and routing fields, or writes those fields with ``update(Job | Transfer |
Study | Series).values(...)`` (a lock that only touches ``updated_at`` is no state change).
``storage`` (the ingest upsert, the claim queries) is outside ``dicom_node`` and not scanned.
The scan reads the source (AST), so the test costs nothing and names each offending line.
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
                                    "web/services.py"])
def test_the_stage_loops_and_services_call_the_application_layer(module):
    assert "dicom_node.app" in (PACKAGE / module).read_text()
