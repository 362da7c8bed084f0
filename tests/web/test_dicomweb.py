"""DICOMweb of the node, through ``dicomweb-client`` as a real client against a live uvicorn
server (SQLite and PostgreSQL): the real LIDC-IDRI-0001 CT stored with STOW-RS by a ``sender``
account, processed by the real worker (a stand-in predictor that reports the reference nodule
with a spherical mask, so the real SR and SEG are written), then searched and retrieved."""
from __future__ import annotations

import io
import json
import urllib.error
import urllib.request

import numpy as np
import pydicom
import pytest
from sqlalchemy import func, select

from tests.peers import free_port
from webtools import ADMIN, LIDC_NODULE_MM, LIDC_SERIES, RAD, WebServer

dicomweb_client = pytest.importorskip("dicomweb_client")

SENDER = ("stow-sender", "sender-password-1")
LIDC_PATIENT = "LIDC-IDRI-0001"
LIDC_DATE = "20000101"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _need_lidc():
    if not LIDC_SERIES.is_dir():
        pytest.skip(f"LIDC-IDRI-0001 not found at {LIDC_SERIES} (shared data absent)")
    return sorted(LIDC_SERIES.glob("*.dcm"))


def _token(base: str, user: tuple[str, str]) -> str:
    data = f"username={user[0]}&password={user[1]}".encode()
    req = urllib.request.Request(f"{base}/api/token", data=data, method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["access_token"]


def _client(base: str, token: str | None):
    from dicomweb_client.api import DICOMwebClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    return DICOMwebClient(url=f"{base}/dicom-web", headers=headers)


def _predictor(array, spacing, origin, direction):  # noqa: ANN001
    """The reference nodule of LIDC-IDRI-0001 as a 12 mm sphere (the worker's real SR/SEG path)."""
    from dicom_node.volume import Volume
    from model.finding import Finding

    vol = Volume(array=array, spacing=spacing, origin=origin, direction=np.asarray(direction), datasets=[])
    zyx = vol.lps_to_voxel(LIDC_NODULE_MM)
    radius_mm = 6.0
    half = [int(np.ceil(radius_mm / s)) for s in spacing]
    lo = [int(round(c)) - h for c, h in zip(zyx, half)]
    grid = np.indices([2 * h + 1 for h in half]).astype(np.float64)
    dist2 = sum(((g + lo_i - c) * s) ** 2 for g, lo_i, c, s in zip(grid, lo, zyx, spacing))
    mask = dist2 <= radius_mm ** 2
    return [Finding(center_mm=tuple(LIDC_NODULE_MM), center_voxel=tuple(float(v) for v in zyx), diameter_mm=12.0,
                    volume_mm3=float(mask.sum() * np.prod(spacing)), malignancy=0.8, score=0.9, mask=mask,
                    mask_offset=tuple(lo))]


@pytest.fixture(scope="module")
def served(web_node):
    """A live server; LIDC-IDRI-0001 stored with STOW-RS by a sender and processed by the worker."""
    from conftest import clean_tables

    from dicom_node.scheduler import schedule_once
    from dicom_node.web.app import create_app
    from dicom_node.web.security import hash_password
    from dicom_node.worker import work_once
    from storage import repo, users

    files = _need_lidc()
    clean_tables(web_node)
    with web_node.sessions.begin() as s:
        if users.get_user(s, SENDER[0]) is None:
            users.add_user(s, SENDER[0], "sender", hash_password(SENDER[1]))
        repo.set_setting(s, "completion.quiet_seconds", 0.1)
    app = create_app(web_node)
    with WebServer(app, free_port()) as server:
        base = f"http://127.0.0.1:{server.port}"
        sender = _client(base, _token(base, SENDER))
        datasets = [pydicom.dcmread(f) for f in files]
        for i in range(0, len(datasets), 40):
            response = sender.store_instances(datasets[i:i + 40])
            assert "FailedSOPSequence" not in response, response
            assert len(response.ReferencedSOPSequence) == len(datasets[i:i + 40])
        import time

        time.sleep(0.3)
        assert schedule_once(web_node, "test-model") == 1
        assert work_once(web_node, "test-worker", _predictor, "test-model")
        yield {"base": base, "app": app, "node": web_node, "files": files, "datasets": datasets,
               "study": str(datasets[0].StudyInstanceUID), "series": str(datasets[0].SeriesInstanceUID)}
    with web_node.sessions.begin() as s:
        repo.set_setting(s, "completion.quiet_seconds", 10.0)


@pytest.fixture(scope="module")
def rad(served):
    return _client(served["base"], _token(served["base"], RAD))


def test_stow_stored_every_instance_durably_and_indexed_once(served):
    from storage.models import Instance, Series

    node = served["node"]
    with node.sessions() as s:
        ct = s.scalar(select(Series).where(Series.series_instance_uid == served["series"]))
        assert ct.instance_count == 133 and not ct.is_result
        paths = s.scalars(select(Instance.path).where(Instance.series_id == ct.id)).all()
        assert len(paths) == 133
    with urllib.request.urlopen(f"{served['base']}/metrics", timeout=30) as r:
        assert "dicom_node_instances_received_total 133.0" in r.read().decode()  # not the SR and SEG
    original = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f.read_bytes() for f in served["files"][:3]}
    for p in paths:
        data = node.store.path(p).read_bytes()
        uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
        if uid in original:
            assert pydicom.dcmread(io.BytesIO(data)).PixelData == pydicom.dcmread(io.BytesIO(original[uid])).PixelData


def test_search_studies_by_patient_id_and_by_date_range(served, rad):
    found = rad.search_for_studies(search_filters={"PatientID": LIDC_PATIENT})
    assert [s["0020000D"]["Value"][0] for s in found] == [served["study"]]
    study = found[0]
    assert study["00100020"]["Value"] == [LIDC_PATIENT]
    assert study["00080020"]["Value"] == [LIDC_DATE]
    assert set(study["00080061"]["Value"]) >= {"CT", "SEG", "SR"}
    assert study["00201206"]["Value"][0] >= 3  # CT, SR and SEG series
    assert rad.search_for_studies(search_filters={"StudyDate": "19991201-20000131"})
    assert rad.search_for_studies(search_filters={"StudyDate": "20000102-"}) == []
    assert rad.search_for_studies(search_filters={"StudyDate": "-19991231"}) == []
    assert rad.search_for_studies(search_filters={"PatientID": "LIDC-IDRI-000*"})
    assert rad.search_for_studies(search_filters={"PatientID": "LIDC-IDRI-0002"}) == []
    assert rad.search_for_studies(search_filters={"ModalitiesInStudy": "MR"}) == []
    assert rad.search_for_studies(search_filters={"StudyInstanceUID": f"1.2.3,{served['study']}"})


def test_search_series_and_instances(served, rad):
    series = rad.search_for_series(served["study"])
    by_modality = {s["00080060"]["Value"][0]: s for s in series}
    assert set(by_modality) >= {"CT", "SEG", "SR"}
    assert by_modality["CT"]["00201209"]["Value"] == [133]
    ct = rad.search_for_series(served["study"], search_filters={"Modality": "CT"})
    assert [s["0020000E"]["Value"][0] for s in ct] == [served["series"]]
    page = rad.search_for_instances(served["study"], served["series"], limit=10, offset=5)
    assert len(page) == 10
    assert page[0]["00200013"]["Value"] == [6]  # ordered by InstanceNumber
    assert len(rad.search_for_instances(served["study"], served["series"])) == 133


def test_series_metadata_is_built_once_and_rebuilt_when_the_series_changes(served, rad):
    cache = served["app"].state.dicomweb_metadata
    before = cache.builds
    meta = rad.retrieve_series_metadata(served["study"], served["series"])
    assert len(meta) == 133
    first = meta[0]
    assert first["00280010"]["Value"] == [512] and "BulkDataURI" in first["7FE00010"]
    assert "InlineBinary" not in first.get("7FE00010", {})
    again = rad.retrieve_series_metadata(served["study"], served["series"])
    assert again == meta and cache.builds == before + 1  # the second answer came from the cache
    node = served["node"]
    from storage.models import Instance, Series

    with node.sessions.begin() as s:  # an instance replaced by a resend: new received_at
        ct = s.scalar(select(Series).where(Series.series_instance_uid == served["series"]))
        row = s.scalar(select(Instance).where(Instance.series_id == ct.id).order_by(Instance.id).limit(1))
        from storage.models import utcnow

        row.received_at = utcnow()
    rad.retrieve_series_metadata(served["study"], served["series"])
    assert cache.builds == before + 2


def test_frames_of_the_ct_are_its_pixels(served, rad):
    ds = served["datasets"][40]
    frames = rad.retrieve_instance_frames(served["study"], served["series"], str(ds.SOPInstanceUID), frame_numbers=[1])
    assert len(frames) == 1
    pixels = np.frombuffer(frames[0], dtype=ds.pixel_array.dtype).reshape(ds.Rows, ds.Columns)
    assert np.array_equal(pixels, ds.pixel_array)


def test_seg_and_sr_of_the_processed_study_are_retrieved(served, rad):
    import highdicom as hd

    series = rad.search_for_series(served["study"])
    seg_series = [s for s in series if s["00080060"]["Value"] == ["SEG"]]
    sr_series = [s for s in series if s["00080060"]["Value"] == ["SR"]]
    assert len(seg_series) == 1 and len(sr_series) == 1
    seg_uid = seg_series[0]["0020000E"]["Value"][0]
    (seg_inst,) = rad.search_for_instances(served["study"], seg_uid)
    seg = rad.retrieve_instance(served["study"], seg_uid, seg_inst["00080018"]["Value"][0])
    assert seg.SOPClassUID == SEG_CLASS
    seg = hd.seg.Segmentation.from_dataset(seg)
    assert seg.number_of_segments == 1
    meta = rad.retrieve_series_metadata(served["study"], seg_uid)
    assert meta[0]["00620002"]["Value"][0]["00620004"]["Value"] == [1]  # SegmentNumber
    bulk = rad.retrieve_bulkdata(meta[0]["7FE00010"]["BulkDataURI"])
    assert bulk[0] == seg.PixelData  # packed 1-bit frames, as stored
    sr_uid = sr_series[0]["0020000E"]["Value"][0]
    (sr,) = rad.retrieve_series(served["study"], sr_uid)
    assert sr.SOPClassUID == SR_CLASS
    assert sr.StudyInstanceUID == served["study"]
    sr_meta = rad.retrieve_series_metadata(served["study"], sr_uid)
    assert sr_meta[0]["0040A730"]["Value"]  # the content tree is in the metadata


def test_study_retrieve_streams_every_instance_and_rendered_is_a_png(served, rad):
    ds = served["datasets"][0]
    inst = rad.retrieve_instance(served["study"], served["series"], str(ds.SOPInstanceUID))
    assert inst.SOPInstanceUID == ds.SOPInstanceUID
    png = rad.retrieve_instance_rendered(served["study"], served["series"], str(ds.SOPInstanceUID),
                                         media_types=("image/png",), params={"window": "-600,1500"})
    from PIL import Image

    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (512, 512)
    thumb = rad._http_get(f"{served['base']}/dicom-web/studies/{served['study']}/series/{served['series']}/thumbnail",
                          headers={"Accept": "image/jpeg"})
    assert thumb.headers["content-type"] == "image/jpeg" and max(Image.open(io.BytesIO(thumb.content)).size) == 128
    study = rad.retrieve_study(served["study"])
    assert len(study) >= 135  # 133 CT slices, the SR and the SEG


def test_radiologist_may_read_but_not_store_and_anonymous_gets_401(served, rad):
    from requests.exceptions import HTTPError

    with pytest.raises(HTTPError) as forbidden:
        rad.store_instances([served["datasets"][0]])
    assert forbidden.value.response.status_code == 403
    anonymous = _client(served["base"], None)
    for call in (lambda: anonymous.search_for_studies(),
                 lambda: anonymous.retrieve_series_metadata(served["study"], served["series"]),
                 lambda: anonymous.store_instances([served["datasets"][0]])):
        with pytest.raises(HTTPError) as unauth:
            call()
        assert unauth.value.response.status_code == 401
    sender = _client(served["base"], _token(served["base"], SENDER))
    with pytest.raises(HTTPError) as cannot_read:
        sender.search_for_studies()
    assert cannot_read.value.response.status_code == 403
    admin = _client(served["base"], _token(served["base"], ADMIN))
    assert admin.search_for_studies(search_filters={"PatientID": LIDC_PATIENT})


def test_a_sender_account_has_no_pages_and_no_api(served):
    import requests

    from webtools import csrf_of

    base = served["base"]
    token = _token(base, SENDER)
    assert requests.get(f"{base}/api/studies", headers={"Authorization": f"Bearer {token}"}).status_code == 403
    with requests.Session() as browser:
        csrf = csrf_of(browser.get(f"{base}/login").text)
        browser.post(f"{base}/login", data={"username": SENDER[0], "password": SENDER[1], "csrf_token": csrf,
                                            "next": "/worklist"}, allow_redirects=False)
        page = browser.get(f"{base}/worklist", allow_redirects=False)
        assert page.status_code == 403 and "STOW-RS" in page.text
        assert LIDC_PATIENT not in page.text


def test_stow_refusals_are_listed_with_their_reasons(served):
    token = _token(served["base"], SENDER)
    good = served["files"][0].read_bytes()
    mark = "b0undary"
    body = (f"--{mark}\r\nContent-Type: application/dicom\r\n\r\n".encode() + good
            + f"\r\n--{mark}\r\nContent-Type: application/dicom\r\n\r\n".encode() + b"not dicom at all"
            + f"\r\n--{mark}--\r\n".encode())
    req = urllib.request.Request(f"{served['base']}/dicom-web/studies", data=body, method="POST", headers={
        "Authorization": f"Bearer {token}", "Accept": "application/dicom+json",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={mark}'})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 202
        answer = json.loads(r.read())
    assert len(answer["00081199"]["Value"]) == 1  # the resend of a stored instance: acknowledged
    (failed,) = answer["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]
    other_study = f"{served['base']}/dicom-web/studies/1.2.3.4"
    req = urllib.request.Request(other_study, data=body.replace(b"not dicom at all", good), method="POST",
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": f'multipart/related; type="application/dicom"; boundary={mark}'})
    with pytest.raises(urllib.error.HTTPError) as conflict:
        urllib.request.urlopen(req, timeout=60)
    assert conflict.value.code == 409
    reasons = json.loads(conflict.value.read())["00081198"]["Value"]
    assert [r["00081197"]["Value"] for r in reasons] == [[0xA900], [0xA900]]
    from storage.models import AssociationLog, AuditEvent

    with served["node"].sessions() as s:
        assert s.scalar(select(func.count()).select_from(AssociationLog).where(AssociationLog.calling_ae == "STOW-RS")) >= 6
        assert s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "stow")) >= 6


def test_results_indexed_as_instances_are_backed_up_once_and_removed_by_retention(served, tmp_path):
    """The SR and SEG are rows of ``instances`` (DICOMweb) and of ``result_objects`` (delivery):
    a backup copies each file once; retention removes them with the study."""
    from dicom_node import backup, retention
    from storage.models import Instance, ResultObject, Series, Study

    node = served["node"]
    with node.sessions() as s:
        results = s.execute(select(ResultObject.path, Instance.path).join(
            Instance, Instance.sop_instance_uid == ResultObject.sop_instance_uid)).all()
        assert {len(results)} == {2} and all(a == b for a, b in results)  # SR and SEG, the same file
        n_instances = s.scalar(select(func.count()).select_from(Instance))
    report = backup.backup(node.settings.database_url, node.settings.node.data_dir, tmp_path / "backup")
    manifest = json.loads((tmp_path / "backup" / backup.MANIFEST).read_text())
    paths = [e["path"] for e in manifest["files"] if e["kind"] != "other"]
    assert len(paths) == len(set(paths)) == n_instances and not report.missing
    with node.sessions.begin() as s:
        study_id = s.scalar(select(Study.id).where(Study.study_instance_uid == served["study"]))
        files, why = retention.delete_study(s, study_id, "test")
    # Every indexed file once, plus the key images the worker pre-rendered for the study page.
    indexed = [f for f in files if "/render/" not in f]
    assert why is None and len(files) == len(set(files)) and len(indexed) == n_instances
    assert all(f.endswith((".png", ".json")) for f in files if "/render/" in f)
    retention.remove_files(node.settings.node.data_dir, files)
    assert not any(node.store.path(p).exists() for p, _ in results)
    with node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Series)) == 0


def test_qido_bounds_and_bad_values_are_400(served):
    token = _token(served["base"], RAD)
    for query in ("limit=100000", "offset=-1", "limit=abc", "StudyDate=2000", "NotAKeyword=1", "StudyDate=2000-01-01"):
        req = urllib.request.Request(f"{served['base']}/dicom-web/studies?{query}",
                                     headers={"Authorization": f"Bearer {token}"})
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(req, timeout=30)
        assert bad.value.code == 400, query
        assert "detail" in json.loads(bad.value.read())
    req = urllib.request.Request(f"{served['base']}/dicom-web/series?SeriesNumber=one",
                                 headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(req, timeout=30)
    assert bad.value.code == 400 and "SeriesNumber" in json.loads(bad.value.read())["detail"]


@pytest.mark.slow
def test_stow_answered_200_survives_kill_9_of_the_node(tmp_path):
    """``dicom-node serve`` (all stages, SQLite) stores with STOW-RS; SIGKILL of the whole process
    group right after the 200: the instances are on disk and indexed, and served after a restart."""
    import hashlib

    from tests.peers import NodeProcess, wait_port
    from storage.models import Instance

    files = _need_lidc()[:5]
    node = NodeProcess(tmp_path / "node", web=True)
    node.cli("user", "add", SENDER[0], "--role", "sender", "--password-stdin", input=f"{SENDER[1]}\n")
    node.cli("user", "add", RAD[0], "--role", "radiologist", "--password-stdin", input=f"{RAD[1]}\n")
    node.start(timeout=120)
    try:
        wait_port(node.web_port, timeout=60)
        base = f"http://127.0.0.1:{node.web_port}"
        response = _client(base, _token(base, SENDER)).store_instances([pydicom.dcmread(f) for f in files])
        node.kill()  # at once after the 200: no clean shutdown, no chance to flush anything later
        assert len(response.ReferencedSOPSequence) == len(files) and "FailedSOPSequence" not in response
        with node.sessions()() as s:
            rows = {r.sop_instance_uid: r for r in s.scalars(select(Instance)).all()}
        for f in files:
            uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            stored = (node.data_dir / rows[uid].path).read_bytes()
            assert hashlib.sha256(stored).hexdigest() == rows[uid].sha256
            assert pydicom.dcmread(io.BytesIO(stored)).PixelData == pydicom.dcmread(f).PixelData
        node.start(timeout=120)
        wait_port(node.web_port, timeout=60)
        rad = _client(base, _token(base, RAD))
        (study,) = rad.search_for_studies(search_filters={"PatientID": LIDC_PATIENT})
        assert study["00201208"]["Value"] == [len(files)]
    finally:
        node.stop()
