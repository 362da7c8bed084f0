"""Routing rules: conditions, the rule store (SQLite and PostgreSQL), and decisions on series
received from a real DCMTK storescu by the real listener, decided by the real scheduler."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from dicom_node.app import rules as app_rules
from dicom_node.app.errors import AppError, Conflict, Invalid
from dicom_node.routing import conditions, store
from dicom_node.routing.evaluate import decide, facts_from_attributes
from dicom_node.routing.rules import Rule
from dicom_node.scheduler import schedule_once
from dicom_node.scp import Listener
from storage.models import AuditEvent, Destination, Instance, Job, RoutingDecision, Series, Source, Study, StudyStatus
from tests.peers import DATA, need_lidc
from tests.routing_helpers import derive_series, storescu


# --- conditions -------------------------------------------------------------------------------

@pytest.mark.parametrize("cond, value, ok", [
    ("CT", "CT", True), ("CT", "MR", False), ("ct", "CT", True),  # globs are case-insensitive
    ("CT_*", "CT_A", True), ("CT_*", "MR_A", False),
    ("/CHEST|LUNG/", "LUNG SCREENING", True), ("/CHEST|LUNG/", "HEAD", False),
    ("/^chest$/i", "CHEST", True), ("/^chest$/", "CHEST", False),
    (["CT", "MR"], "MR", True), (["CT", "MR"], "US", False),
    ({"min": 16}, 133, True), ({"min": 16}, 3, False), ({"min": 0.5, "max": 3}, "2.5", True),
    ({"max": 3}, 5.0, False), ({"present": True}, "X", True), ({"present": True}, None, False),
    ({"present": False}, None, True), ({"present": False}, "CHEST", False),
    ("AXIAL", ["ORIGINAL", "PRIMARY", "AXIAL"], True), ("ORIGINAL\\PRIMARY*", ["ORIGINAL", "PRIMARY", "AXIAL"], True),
    (True, True, True), (True, False, False), (3, "3", True),
    ("CT", None, False),
])
def test_condition(cond, value, ok):
    assert conditions.test("K", conditions.check(cond), value).ok is ok


@pytest.mark.parametrize("bad", ["/[unclosed/", [], {"min": "a"}, {"min": 3, "max": 1}, {"between": 1}, {"present": "yes"}])
def test_bad_condition_is_refused_with_a_sentence(bad):
    with pytest.raises(ValueError) as exc:
        Rule(name="r", match={"Modality": bad}, actions=["analyse"])
    assert "match.Modality" in str(exc.value)


def test_unknown_match_key_and_action_are_refused():
    with pytest.raises(ValueError, match="neither a DICOM keyword"):
        Rule(name="r", match={"Modalty": "CT"}, actions=["analyse"])
    with pytest.raises(ValueError):
        Rule(name="r", match={}, actions=["print"])
    with pytest.raises(ValueError, match="not among the rule's destinations"):
        Rule(name="r", actions=["analyse"], destinations=["a"], outputs={"b": ["sr"]})
    assert Rule(name="r", actions=["analyse"], destinations=[]).destinations == ["sender"]


class D:
    def __init__(self, id, name, outputs=("sr", "seg"), enabled=True):  # noqa: A002
        self.id, self.name, self.outputs, self.enabled = id, name, list(outputs), enabled


def test_decision_unites_matches_and_explains_non_matches():
    dests = [D(1, "pacs_a"), D(2, "pacs_b"), D(3, "archive", ("sr",))]
    rules = [Rule(name="chest-ct", match={"Modality": "CT", "BodyPartExamined": "/CHEST|LUNG/", "calling_ae": "CT_*"},
                  actions=["analyse"], destinations=["sender"], priority="urgent"),
             Rule(name="archive", match={"Modality": ["CT", "MR"]}, actions=["forward"], destinations=["archive"]),
             Rule(name="drop-mr", match={"Modality": "MR"}, actions=["discard"])]
    ct = decide(rules, facts_from_attributes({"Modality": "CT", "BodyPartExamined": "CHEST", "calling_ae": "CT_A"}),
                dests, return_to=["pacs_a"])
    assert ct.matched == ["chest-ct", "archive"] and ct.actions == ["analyse", "forward"]
    assert ct.result_destinations() == {1: ["sr", "seg"]}  # the sender only: never pacs_b
    assert ct.forward_destinations() == [3] and ct.priority == 10
    mr = decide(rules, facts_from_attributes({"Modality": "MR", "calling_ae": "MR_1"}), dests, return_to=None)
    assert mr.matched == ["archive", "drop-mr"] and mr.discard and not mr.analyse
    assert "BodyPartExamined is absent" in "; ".join(mr.results[0].failed)
    us = decide(rules, facts_from_attributes({"Modality": "US"}), dests)
    assert us.matched == [] and us.summary().startswith("kept, not analysed: no routing rule matched")
    assert "Modality 'US' does not match 'CT'" in us.summary()
    # No rule stored: the default (analyse, results to the sender; every destination when none named).
    default = decide([], facts_from_attributes({"Modality": "CT"}), dests, return_to=None)
    assert default.default and default.result_destinations() == {1: ["sr", "seg"], 2: ["sr", "seg"], 3: ["sr"]}


# --- the rule store -------------------------------------------------------------------------------

def test_rule_store_crud_reorder_and_audit(make_node, db_url):
    node = make_node(db_url, destinations=[{"name": "pacs_a", "ae_title": "PACS_A", "host": "127.0.0.1", "port": 104}])
    with node.sessions.begin() as s:
        app_rules.add(s, "alice", Rule(name="a", match={"Modality": "CT"}, actions=["analyse"]))
        app_rules.add(s, "alice", Rule(name="b", match={"Modality": "MR"}, actions=["discard"]))
        app_rules.add(s, "alice", Rule(name="c", actions=["forward"], destinations=["pacs_a"]), position=1)
        with pytest.raises(Conflict, match="already exists"):
            app_rules.add(s, "alice", Rule(name="a", actions=["analyse"]))
        with pytest.raises(Invalid, match="unknown destination"):
            app_rules.add(s, "alice", Rule(name="d", actions=["forward"], destinations=["nowhere"]))
    with node.sessions.begin() as s:
        assert [r.name for r in store.load_rules(s)] == ["c", "a", "b"]
        app_rules.reorder(s, "alice", ["a", "b", "c"])
        app_rules.update(s, "alice", "b", Rule(name="b", match={"Modality": ["MR", "US"]}, actions=["discard"]))
        app_rules.move(s, "alice", "c", 1)
        app_rules.remove(s, "alice", "a")
        with pytest.raises(AppError):
            app_rules.reorder(s, "alice", ["b"])
    with node.sessions() as s:
        rules = store.load_rules(s)
        assert [(r.name, r.match) for r in rules] == [("c", {}), ("b", {"Modality": ["MR", "US"]})]
        assert [row.position for row in store.list_rows(s)] == [1, 2]
        actions = [a.action for a in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert actions == ["rule.add"] * 3 + ["rule.reorder", "rule.update", "rule.reorder", "rule.remove"]


def test_rules_are_seeded_from_the_configuration_only_while_none_is_stored(make_node, db_url, tmp_path):
    from dicom_node.config import Settings
    from dicom_node.node import open_node

    config = {"rules": [{"name": "chest-ct", "match": {"Modality": "CT"}, "actions": ["analyse"]},
                        {"name": "drop-mr", "match": {"Modality": "MR"}, "actions": ["discard"]}]}
    node = make_node(db_url, **config)
    with node.sessions.begin() as s:
        assert [r.name for r in store.load_rules(s)] == ["chest-ct", "drop-mr"]
        app_rules.remove(s, "admin", "drop-mr")
    again = open_node(Settings(**{**node.settings.model_dump(), "rules": config["rules"]}))
    with again.sessions() as s:
        assert [r.name for r in store.load_rules(s)] == ["chest-ct"]  # the database wins
        assert s.scalar(select(AuditEvent.action).where(AuditEvent.action == "rule.seed")) == "rule.seed"


def test_configuration_refuses_unknown_destinations_in_rules_and_return_to():
    from dicom_node.config import Settings

    with pytest.raises(ValueError, match="unknown destination"):
        Settings(rules=[{"name": "r", "actions": ["forward"], "destinations": ["nowhere"]}])
    with pytest.raises(ValueError, match="return_to names unknown"):
        Settings(sources=[{"ae_title": "CT_A", "return_to": "pacs_x"}])


# --- decisions on received series ---------------------------------------------------------------

DESTS = [{"name": "pacs_a", "ae_title": "PACS_A", "host": "127.0.0.1", "port": 10401},
         {"name": "pacs_b", "ae_title": "PACS_B", "host": "127.0.0.1", "port": 10402}]


@pytest.fixture
def routed(make_node, db_url):
    def _start(rules=(), sources=({"ae_title": "CT_A", "return_to": "pacs_a"}, {"ae_title": "STORESCU"}),
               destinations=DESTS):
        node = make_node(db_url, completion={"quiet_seconds": 0.2}, destinations=list(destinations),
                         sources=list(sources),
                         rules=list(rules))
        scp = Listener(node)
        scp.start(0)
        started.append(scp)
        return node, scp.port
    started = []
    yield _start
    for scp in started:
        scp.stop()


def _settle(node):
    """Schedule until nothing is due (quiet_seconds is 0.2 s: wait it out first)."""
    import time

    time.sleep(0.3)
    for _ in range(10):
        if schedule_once(node, "v1") == 0:
            break


def test_chest_ct_goes_to_analysis_with_results_to_its_sender_only(routed, tmp_path):
    ct = derive_series(need_lidc(), tmp_path / "ct", body_part="CHEST")
    node, port = routed(rules=[
        {"name": "chest-ct", "match": {"Modality": "CT", "BodyPartExamined": "/CHEST|LUNG/", "calling_ae": "CT_*",
                                       "image_count": {"min": 16}, "slice_thickness_mm": {"max": 3},
                                       "eligible": True, "Manufacturer": "GE*"},
         "actions": ["analyse"], "destinations": ["sender"], "priority": "urgent"}])
    storescu(port, ct, calling_ae="CT_A")
    _settle(node)
    with node.sessions() as s:
        job = s.scalar(select(Job))
        pacs_a = s.scalar(select(Destination.id).where(Destination.name == "pacs_a"))
        assert job.routing["destinations"] == {str(pacs_a): ["sr", "seg"]} and job.priority == 10
        series = s.scalar(select(Series))
        assert series.route_analyse is True and "results to pacs_a" in series.route_summary
        decision = s.scalar(select(RoutingDecision))
        assert decision.matched == ["chest-ct"] and decision.destinations == ["pacs_a"]
        assert any("BodyPartExamined 'CHEST' matches" in p for p in decision.detail["rules"][0]["passed"])
        assert s.scalar(select(Study)).status is StudyStatus.WAITING


def test_unmatched_study_is_kept_and_shows_why(routed, tmp_path):
    dx = derive_series(DATA / "dicom-samples" / "highdicom" / "dx_image.dcm", tmp_path / "dx")
    node, port = routed(rules=[{"name": "chest-ct", "match": {"Modality": "CT"}, "actions": ["analyse"]}])
    storescu(port, dx)
    _settle(node)
    with node.sessions() as s:
        study = s.scalar(select(Study))
        assert study.status is StudyStatus.NOT_ANALYSED
        assert "no routing rule matched (chest-ct: Modality 'DX' does not match 'CT')" in study.status_reason
        assert s.scalar(select(Job)) is None
        assert s.scalar(select(Instance)) is not None  # kept


def test_discarded_mr_is_deleted_from_the_store_and_the_index(routed, tmp_path):
    mr = derive_series(need_lidc(), tmp_path / "mr", modality="MR", limit=5)
    node, port = routed(rules=[{"name": "drop-mr", "match": {"Modality": "MR"}, "actions": ["discard"]}])
    storescu(port, mr)
    with node.sessions() as s:
        files = [node.store.path(i.path) for i in s.scalars(select(Instance))]
    assert len(files) == 5 and all(f.exists() for f in files)
    _settle(node)
    with node.sessions() as s:
        assert s.scalar(select(Instance)) is None and s.scalar(select(Job)) is None
        series = s.scalar(select(Series))
        assert series.instance_count == 0 and series.route_summary.startswith("discarded [rule drop-mr]")
        audit = s.scalar(select(AuditEvent).where(AuditEvent.action == "series.discard"))
        assert audit.target == series.series_instance_uid and audit.detail["instances"] == 5
        assert s.scalar(select(Study)).status is StudyStatus.NOT_ANALYSED
    assert not any(f.exists() for f in files)


def test_default_rule_sends_results_to_return_to_or_everywhere(routed, tmp_path):
    node, port = routed()
    a = derive_series(need_lidc(), tmp_path / "a")
    b = derive_series(need_lidc(), tmp_path / "b")
    storescu(port, a, calling_ae="CT_A")
    storescu(port, b, calling_ae="STORESCU")  # a source without return_to: every destination, as before
    _settle(node)
    with node.sessions() as s:
        ids = {d.name: str(d.id) for d in s.scalars(select(Destination))}
        by_study = {j.series.study.study_instance_uid: set(j.routing["destinations"]) for j in s.scalars(select(Job))}
    from tests.routing_helpers import study_uid_of
    assert by_study[study_uid_of(a)] == {ids["pacs_a"]}
    assert by_study[study_uid_of(b)] == {ids["pacs_a"], ids["pacs_b"]}


def test_study_level_rule_waits_for_every_series_and_rule_quiet_seconds(routed, tmp_path):
    from datetime import timedelta

    from storage.models import utcnow

    node, port = routed(rules=[{"name": "ct-study", "match": {"Modality": "CT"}, "actions": ["analyse"],
                                "level": "study", "quiet_seconds": 300}])
    storescu(port, derive_series(need_lidc(), tmp_path / "ct", limit=20))
    assert schedule_once(node, "v1", now=utcnow() + timedelta(seconds=30)) == 0  # its rule wants 300 s quiet
    assert schedule_once(node, "v1", now=utcnow() + timedelta(seconds=301)) == 1
    with node.sessions() as s:
        assert s.scalar(select(Series)).route_analyse is True


def test_study_level_trigger_waits_for_every_series_of_a_two_series_study(routed, tmp_path):
    """Two CT series of one study under a ``level = "study"`` rule: the first, quiet for long,
    is not decided while the second is still arriving; once both are quiet each gets its job
    (a decision per series: docs/routing/rules.md), both with the rule's routing."""
    from datetime import timedelta

    from sqlalchemy import update

    from storage.models import utcnow
    from tests.routing_helpers import study_uid_of

    node, port = routed(rules=[{"name": "ct-study", "match": {"Modality": "CT"}, "actions": ["analyse"],
                                "level": "study", "quiet_seconds": 300}])
    first = derive_series(need_lidc(), tmp_path / "ct1")  # whole series: eligible, so each gets a job
    second = derive_series(need_lidc(), tmp_path / "ct2", study_uid=study_uid_of(first))
    storescu(port, first, second)
    t0 = utcnow()
    with node.sessions.begin() as s:  # the second series' last instance arrived 200 s after the first's
        uids = sorted(x.series_instance_uid for x in s.scalars(select(Series)))
        assert len(uids) == 2 and len({x.study_id for x in s.scalars(select(Series))}) == 1
        late = s.scalar(select(Series).where(Series.series_instance_uid == uids[1]))
        s.execute(update(Series).where(Series.id == late.id).values(last_received_at=t0 + timedelta(seconds=200)))
    assert schedule_once(node, "v1", now=t0 + timedelta(seconds=350)) == 0  # first quiet 350 s, second 150 s
    with node.sessions() as s:
        assert s.scalar(select(Job)) is None and all(x.dirty for x in s.scalars(select(Series)))
        assert s.scalar(select(Study)).status is StudyStatus.RECEIVED
    assert schedule_once(node, "v1", now=t0 + timedelta(seconds=501)) == 2
    with node.sessions() as s:
        jobs = list(s.scalars(select(Job)))
        assert sorted(j.series.series_instance_uid for j in jobs) == uids
        assert all(j.routing["rules"] == ["ct-study"] for j in jobs)
        assert s.scalar(select(Study)).status is StudyStatus.WAITING


def test_source_quiet_seconds_completes_its_series_unless_a_rule_says_otherwise(routed, tmp_path):
    """``[[sources]] quiet_seconds``: the source's quiet period replaces ``[completion]
    quiet_seconds`` (0.2 s here) for the series it sends; a matching rule's own value wins."""
    from datetime import timedelta

    from dicom_node.completion import quiet_for
    from storage.models import Source, utcnow

    assert (quiet_for(30, None, None), quiet_for(30, 60, None), quiet_for(30, 60, 5)) == (30, 60, 5)
    node, port = routed(rules=[{"name": "mr-quick", "match": {"Modality": "MR"}, "actions": ["analyse"],
                                "quiet_seconds": 5}],
                        sources=[{"ae_title": "CT_A", "quiet_seconds": 60}])
    with node.sessions() as s:
        assert s.scalar(select(Source.quiet_seconds).where(Source.ae_title == "CT_A")) == 60
    storescu(port, derive_series(need_lidc(), tmp_path / "ct", limit=20), calling_ae="CT_A")
    storescu(port, derive_series(need_lidc(), tmp_path / "mr", limit=5, modality="MR"), calling_ae="CT_A")
    t0 = utcnow()
    assert schedule_once(node, "v1", now=t0 + timedelta(seconds=30)) == 1  # the MR (rule: 5 s); the CT waits
    with node.sessions() as s:
        assert [x.modality for x in s.scalars(select(Series).where(Series.dirty.is_(True)))] == ["CT"]
    assert schedule_once(node, "v1", now=t0 + timedelta(seconds=61)) == 1  # the CT: its source's 60 s


def test_forward_sends_only_what_is_new_and_discard_waits_for_the_forward(routed, tmp_path):
    from datetime import timedelta

    from dicom_node.dispatch import dispatch_once
    from storage.models import Transfer, TransferState, utcnow
    from tests.peers import StoreSCP

    scp = StoreSCP(tmp_path / "archive", ae_title="ARCHIVE").start()
    try:
        archive = {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": scp.port}
        node, port = routed(rules=[{"name": "archive-then-drop", "match": {"Modality": "MR"},
                                    "actions": ["forward", "discard"], "destinations": ["archive"]}],
                            destinations=DESTS + [archive])
        mr = derive_series(need_lidc(), tmp_path / "mr", modality="MR", limit=8)
        files = sorted(mr.iterdir())
        storescu(port, *files[:5])
        _settle(node)
        with node.sessions() as s:
            [t] = s.scalars(select(Transfer)).all()
            assert t.kind == "originals" and len(t.instance_ids) == 5
            assert s.scalar(select(Series)).discard_pending is True  # kept until forwarded
        storescu(port, *files[3:])  # 3 new instances, 2 resent identically
        _settle(node)
        with node.sessions() as s:
            sizes = sorted(len(t.instance_ids) for t in s.scalars(select(Transfer)))
        assert sizes == [3, 5]  # only the new ones are forwarded again
        while dispatch_once(node, "test-dispatcher"):
            pass
        with node.sessions() as s:
            assert {t.state for t in s.scalars(select(Transfer))} == {TransferState.SENT}
        assert len(scp.files()) == 8
        schedule_once(node, "v1", now=utcnow() + timedelta(seconds=60))  # sweeps the pending discard
        with node.sessions() as s:
            assert s.scalar(select(Instance)) is None
            assert s.scalar(select(Series)).discard_pending is False
    finally:
        scp.stop()


def test_urgent_jobs_and_transfers_are_claimed_before_routine_ones(make_node, db_url):
    from storage import repo
    from storage.models import JobState, Transfer, TransferState

    node = make_node(db_url, destinations=DESTS)
    with node.sessions.begin() as s:
        study = Study(study_instance_uid="1.2.3")
        series = Series(study=study, series_instance_uid="1.2.3.1", instance_count=0)
        s.add_all([study, series])
        s.flush()
        dest = s.scalar(select(Destination.id))
        s.add_all([Job(series=series, idempotency_key=f"k{n}", state=JobState.PENDING, priority=p)
                   for n, p in enumerate([0, 0, 10])])
        s.add_all([Transfer(destination_id=dest, kind="originals", series_id=series.id, instance_ids=[],
                            result_object_ids=[], sent_sop_instance_uids=[], state=TransferState.PENDING, priority=p)
                   for p in (0, 10, 0)])
    order_jobs, order_transfers = [], []
    for _ in range(3):
        with node.sessions.begin() as s:
            order_jobs.append(repo.claim_job(s, "w", 60).idempotency_key)
            order_transfers.append(repo.claim_transfer(s, "d", 60).priority)
    assert order_jobs == ["k2", "k0", "k1"]  # urgent first, then the oldest
    assert order_transfers == [10, 0, 0]
