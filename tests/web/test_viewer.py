"""The /viewer routes without a browser: the installed files (public path rewritten to /viewer/),
the generated app-config, sign-in rules, the CSP on /viewer vs elsewhere, and the 503 of a node
without the viewer installed."""
from __future__ import annotations

import re

import pytest

from webtools import RAD, page_login

from dicom_node.web import viewer_install


@pytest.fixture
def installed():
    if viewer_install.installed() is None:
        pytest.skip(viewer_install.missing_message())
    return viewer_install.viewer_dir()


@pytest.fixture
def rad_client(client):
    page_login(client, RAD)
    yield client
    client.cookies.clear()


def test_logged_out_viewer_redirects_to_login_with_return_url(client):
    client.cookies.clear()
    r = client.get("/viewer/?StudyInstanceUIDs=1.2.3", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/login?next=%2Fviewer%2F%3FStudyInstanceUIDs%3D1.2.3"
    r = client.get("/viewer/viewer?StudyInstanceUIDs=1.2.3", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=%2Fviewer%2Fviewer")


def test_logged_out_assets_are_401(client):
    client.cookies.clear()
    for path in ("/viewer/app-config.js", "/viewer/app.bundle.css", "/viewer/0ddf166f7a343eda.wasm"):
        assert client.get(path).status_code == 401, path


def test_bearer_token_reads_assets(client, rad_h, installed):
    client.cookies.clear()
    assert client.get("/viewer/app-config.js", headers=rad_h).status_code == 200


def test_study_link_redirects_to_ohif_viewer_route(rad_client, installed):
    r = rad_client.get("/viewer/?StudyInstanceUIDs=1.2.3", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/viewer/viewer?StudyInstanceUIDs=1.2.3"
    assert rad_client.get("/viewer?StudyInstanceUIDs=1.2.3", follow_redirects=False).headers["location"] == \
        "/viewer/?StudyInstanceUIDs=1.2.3"


def test_index_and_client_routes_serve_the_rewritten_app(rad_client, installed):
    for path in ("/viewer/", "/viewer/viewer", "/viewer/segmentation"):
        r = rad_client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
        html = r.text
        assert 'window.PUBLIC_URL="/viewer/"' in html
        assert 'src="/viewer/app-config.js"' in html
        assert not re.search(r'(?:src|href)="/(?!viewer/)', html), "a root-relative reference was left"
        bundle = re.search(r'src="(/viewer/app\.bundle\.[0-9a-f]+\.js)"', html).group(1)
    js = rad_client.get(bundle)
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert '__webpack_require__.p = "/viewer/";' in js.text and '__webpack_require__.p = "/";' not in js.text
    css = rad_client.get("/viewer/app.bundle.css").text
    assert "url(/viewer/" in css and "url(/a" not in css
    wasm = next(installed.glob("*.wasm")).name
    r = rad_client.get(f"/viewer/{wasm}")
    assert r.status_code == 200 and r.headers["content-type"] == "application/wasm"


def test_app_config_points_at_own_dicomweb_and_nothing_external(rad_client, installed):
    r = rad_client.get("/viewer/app-config.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    text = r.text
    assert '"qidoRoot": "/dicom-web"' in text and '"wadoRoot": "/dicom-web"' in text
    assert '"supportsFuzzyMatching": false' in text
    assert '"routerBasename": "/viewer"' in text
    assert "window.location.origin" in text
    assert not re.search(r"https?://", text), "app-config names an external URL"


def test_no_path_escapes_the_install_folder(rad_client, installed):
    assert rad_client.get("/viewer/..%2F..%2Fapp.py").status_code == 404
    assert rad_client.get(f"/viewer/{viewer_install.MARKER}").status_code == 404
    assert rad_client.get("/viewer/no-such-chunk.js").status_code == 404


def test_csp_relaxed_on_viewer_only(rad_client, installed):
    viewer = rad_client.get("/viewer/viewer").headers["content-security-policy"]
    assert "'unsafe-eval'" in viewer and "'wasm-unsafe-eval'" in viewer
    assert "worker-src 'self' blob:" in viewer
    assert "frame-ancestors 'none'" in viewer and "object-src 'none'" in viewer
    assert re.search(r"script-src [^;]*'sha256-", viewer), "index.html's inline scripts not allowed by hash"
    assert "'unsafe-inline'" not in viewer.split("script-src", 1)[1].split(";", 1)[0]
    for path in ("/worklist", "/login", "/dicom-web/studies", "/api/studies"):
        csp = rad_client.get(path).headers["content-security-policy"]
        assert "unsafe-eval" not in csp and "unsafe-inline" not in csp and "blob:" not in csp.split("img-src")[0], path


def test_worklist_and_study_page_link_to_viewer(rad_client, node):
    from web_phantom import add_study_row

    with node.sessions.begin() as s:
        add_study_row(s, "1.2.826.0.1.3680043.10.999.1")
    html = rad_client.get("/worklist").text
    assert 'href="/viewer/?StudyInstanceUIDs=1.2.826.0.1.3680043.10.999.1"' in html
    html = rad_client.get("/studies/1.2.826.0.1.3680043.10.999.1").text
    assert 'href="/viewer/?StudyInstanceUIDs=1.2.826.0.1.3680043.10.999.1"' in html


def test_missing_install_answers_503_with_the_message(rad_client, tmp_path, monkeypatch):
    monkeypatch.setenv(viewer_install.DIR_ENV, str(tmp_path / "none"))
    for path in ("/viewer/?StudyInstanceUIDs=1.2.3", "/viewer/app-config.js", "/viewer/app.bundle.css"):
        r = rad_client.get(path, follow_redirects=False)
        assert r.status_code == 503, path
        assert "not installed" in r.text and "make viewer" in r.text


def test_install_refuses_a_tarball_with_the_wrong_integrity(tmp_path):
    import io
    import tarfile

    bad = tmp_path / "ohif-app-3.13.2.tgz"
    with tarfile.open(bad, "w:gz") as tar:
        data = b"<html></html>"
        info = tarfile.TarInfo("package/dist/index.html")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(viewer_install.ViewerInstallError, match="integrity"):
        viewer_install.install(tmp_path / "dest", tarball=bad)
    assert not (tmp_path / "dest").exists()


def test_install_without_npm_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(viewer_install.ViewerInstallError, match="npm was not found"):
        viewer_install.install(tmp_path / "dest")
