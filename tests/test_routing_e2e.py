"""Routing end to end with real peers: two Orthanc PACS, DCMTK storescu, ``dicom-node serve``.

The model is not under test here: the node runs with the test-only fake predictor
(tests/fake_predictor, released at once, no findings), so each analysed series yields a real
negative TID 1500 SR, sent with C-STORE like any result. The rules API is a real FastAPI app on
the node's database (the running node reads the rules from there at every decision).
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import select

from storage.models import Instance, Study, Transfer, TransferState
from tests.peers import DATA, REPO, NodeProcess, Orthanc, free_port, need_lidc, wait_for
from tests.routing_helpers import derive_series, storescu, study_uid_of

pytestmark = pytest.mark.slow
FAKE = Path(__file__).parent / "fake_predictor"
ADMIN = ("admin", "admin-password-1")


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    folder = tmp_path / "fake"
    folder.mkdir()
    (folder / "release").write_text("")  # the fake predictor returns at once
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_PREDICTOR_DIR", str(folder))


PACS = (("pacs_a", "PACS_A"), ("pacs_b", "PACS_B"))


def start_node_and_pacs(tmp_path, extra: str) -> tuple[NodeProcess, Orthanc, Orthanc]:
    """The node (destinations pacs_a, pacs_b) and the two Orthanc PACS it sends to, started."""
    ports = {name: free_port() for name, _ in PACS}
    dests = "".join(f'\n[[destinations]]\nname = "{n}"\nae_title = "{ae}"\nhost = "127.0.0.1"\n'
                    f'port = {ports[n]}\noutputs = ["sr", "seg"]\n' for n, ae in PACS)
    node = NodeProcess(tmp_path / "node", sources=(), extra=extra + dests)
    a, b = (Orthanc(tmp_path / n, node_ae="DICOM_NODE", node_port=node.port, ae_title=ae, dicom_port=ports[n])
            for n, ae in PACS)
    started = []
    try:
        for p in (a, b):
            started.append(p.start())
        node.start(timeout=120)
    except BaseException:
        for p in started:
            p.stop()
        raise
    return node, a, b


def modalities_of(pacs: Orthanc, study_uid: str) -> dict[str, int]:
    """Modality -> instance count of the study in ``pacs`` ({} when it does not hold the study)."""
    found = pacs.rest("POST", "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
    out: dict[str, int] = {}
    for study in found:
        for sid in pacs.rest("GET", f"/studies/{study}")["Series"]:
            series = pacs.rest("GET", f"/series/{sid}")
            mod = series["MainDicomTags"].get("Modality")
            out[mod] = out.get(mod, 0) + len(series["Instances"])
    return out


def api_client(node: NodeProcess):
    """A real FastAPI app on the running node's database, with an admin account."""
    from fastapi.testclient import TestClient

    from dicom_node.config import load_settings
    from dicom_node.node import open_node
    from dicom_node.web.app import create_app
    from tests.web.webtools import create_accounts

    web_node = open_node(load_settings(node.config), seed=False)
    create_accounts(web_node)
    client = TestClient(create_app(web_node))
    token = client.post("/api/token", data={"username": ADMIN[0], "password": ADMIN[1]}).json()["access_token"]
    client.headers["Authorization"] = f"Bearer {token}"
    return client


def all_transfers_over(node: NodeProcess):
    with node.sessions()() as s:
        states = [t.state for t in s.scalars(select(Transfer))]
    return states and all(x in (TransferState.SENT, TransferState.FAILED) for x in states) and states


def test_rules_route_analyse_forward_discard_and_keep_with_reasons(tmp_path, fake_model):
    ct = derive_series(need_lidc(), tmp_path / "ct", body_part="CHEST")
    mr = derive_series(need_lidc(), tmp_path / "mr", modality="MR", limit=5)
    dx = derive_series(DATA / "dicom-samples" / "highdicom" / "dx_image.dcm", tmp_path / "dx")
    dx2 = derive_series(DATA / "dicom-samples" / "highdicom" / "dx_image.dcm", tmp_path / "dx2")
    rules = textwrap.dedent('''
            [[sources]]
            ae_title = "PACS_A"
            return_to = "pacs_a"
            [[sources]]
            ae_title = "STORESCU"

            [[rules]]
            name = "chest-ct"
            match = { Modality = "CT", BodyPartExamined = "/CHEST|LUNG/", calling_ae = "PACS_*" }
            actions = ["analyse"]
            destinations = ["sender"]

            [[rules]]
            name = "archive-ct"
            match = { Modality = "CT" }
            actions = ["forward"]
            destinations = ["pacs_b"]

            [[rules]]
            name = "drop-mr"
            match = { Modality = "MR" }
            actions = ["discard"]
            ''')
    node, a, b = start_node_and_pacs(tmp_path, rules)
    try:
        assert node.cli("rules", "list").stdout.count("\n") == 3
        study = a.upload(ct)
        a.rest("POST", "/modalities/node/store", {"Resources": [study], "Synchronous": True})
        storescu(node.port, mr)
        storescu(node.port, dx)
        ct_uid, mr_uid, dx_uid = study_uid_of(ct), study_uid_of(mr), study_uid_of(dx)

        # The CT: analysed, its SR back to PACS A (its sender) only; the originals forwarded to PACS B.
        wait_for(lambda: "SR" in modalities_of(a, ct_uid), timeout=600, interval=1, what="the SR in PACS A")
        wait_for(lambda: modalities_of(b, ct_uid).get("CT") == 133, timeout=300, interval=1,
                 what="the 133 originals in PACS B")
        wait_for(lambda: all_transfers_over(node), timeout=120, what="every transfer over")
        assert modalities_of(a, ct_uid) == {"CT": 133, "SR": 1}
        assert modalities_of(b, ct_uid) == {"CT": 133}  # forwarded originals, no results
        api = api_client(node)
        detail = api.get(f"/api/studies/{ct_uid}").json()
        assert detail["status"] == "done"
        [ct_series] = [x for x in detail["series"] if not x["is_result"]]
        assert ct_series["route_summary"].startswith("analyse (ct-nodules), results to pacs_a (sr+seg); "
                                                     "originals forwarded to pacs_b [rules chest-ct, archive-ct]")
        # The MR: discarded, nothing of it stored; the study says so.
        mr_study = wait_for(lambda: (d := api.get(f"/api/studies/{mr_uid}").json())["status"] == "not_analysed" and d,
                            timeout=60, what="the MR decided")
        assert "discarded [rule drop-mr]" in mr_study["status_reason"]
        with node.sessions()() as s:
            mr_row = s.scalar(select(Study).where(Study.study_instance_uid == mr_uid))
            assert s.scalar(select(Instance).where(Instance.series_id.in_([x.id for x in mr_row.series]))) is None
        assert not any(modalities_of(p, mr_uid) for p in (a, b))
        # The DX matches no rule: kept, shown with the reason on the worklist.
        worklist = api.get("/api/studies", params={"status": "not_analysed"}).json()["items"]
        [dx_item] = [x for x in worklist if x["study_instance_uid"] == dx_uid]
        assert dx_item["status_reason"].startswith("DX series")
        assert "no routing rule matched (chest-ct: Modality 'DX' does not match 'CT'" in dx_item["status_reason"]
        with node.sessions()() as s:
            assert s.scalar(select(Instance).where(Instance.sop_instance_uid.is_not(None)).join(Instance.series)
                            .where(Instance.series.has(study_id=s.scalar(
                                select(Study.id).where(Study.study_instance_uid == dx_uid))))) is not None

        # Change a rule through the API: the next DX is discarded, without a restart.
        rule = api.get("/api/rules/drop-mr").json()
        r = api.put("/api/rules/drop-mr", json={**{k: rule[k] for k in ("name", "actions", "destinations")},
                                                "match": {"Modality": ["MR", "DX"]}})
        assert r.status_code == 200, r.text
        storescu(node.port, dx2)
        dx2_study = wait_for(lambda: (d := api.get(f"/api/studies/{study_uid_of(dx2)}").json()).get("status")
                             == "not_analysed" and d, timeout=60, what="the second DX decided")
        assert "discarded [rule drop-mr]" in dx2_study["status_reason"]

        # Dry run through the API: a match and a non-match, explained.
        dry = api.post("/api/rules/dry-run", json={"study_instance_uid": ct_uid}).json()
        assert dry["series"][0]["matched"] == ["chest-ct", "archive-ct"]
        assert dry["series"][0]["destinations"] == {"pacs_a": ["sr", "seg"], "pacs_b": ["originals"]}
        dry = api.post("/api/rules/dry-run", json={"attributes": {"Modality": "US", "calling_ae": "PACS_A"}}).json()
        [us] = dry["series"]
        assert us["matched"] == [] and us["actions"] == []
        chest = next(r for r in us["rules"] if r["name"] == "chest-ct")
        assert "Modality 'US' does not match 'CT'" in chest["failed"]
        assert "BodyPartExamined is absent, wanted '/CHEST|LUNG/'" in chest["failed"]
        assert "calling_ae 'PACS_A' matches 'PACS_*'" in chest["passed"]
        assert api.post("/api/rules/dry-run", json={}).status_code == 422
        api.close()
    finally:
        for p in (node, a, b):
            p.stop()


def test_studies_from_two_sources_go_back_each_to_its_own_pacs(tmp_path, fake_model):
    sources = textwrap.dedent('''
            [[sources]]
            ae_title = "PACS_A"
            return_to = "pacs_a"
            [[sources]]
            ae_title = "PACS_B"
            return_to = ["pacs_b"]
            ''')
    node, a, b = start_node_and_pacs(tmp_path, sources)  # no [[rules]]: the default rule
    try:
        study_a = derive_series(need_lidc(), tmp_path / "study_a")
        study_b = derive_series(need_lidc(), tmp_path / "study_b")
        for pacs, folder in ((a, study_a), (b, study_b)):
            sid = pacs.upload(folder)
            pacs.rest("POST", "/modalities/node/store", {"Resources": [sid], "Synchronous": True})
        uid_a, uid_b = study_uid_of(study_a), study_uid_of(study_b)
        wait_for(lambda: "SR" in modalities_of(a, uid_a), timeout=600, interval=1, what="A's SR in PACS A")
        wait_for(lambda: "SR" in modalities_of(b, uid_b), timeout=600, interval=1, what="B's SR in PACS B")
        wait_for(lambda: all_transfers_over(node), timeout=120, what="every transfer over")
        assert modalities_of(a, uid_a) == {"CT": 133, "SR": 1}
        assert modalities_of(b, uid_b) == {"CT": 133, "SR": 1}
        assert modalities_of(a, uid_b) == {} and modalities_of(b, uid_a) == {}  # no orphan study anywhere
        assert len(a.rest("GET", "/studies")) == 1 and len(b.rest("GET", "/studies")) == 1
    finally:
        for p in (node, a, b):
            p.stop()
