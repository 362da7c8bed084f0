"""Install the prebuilt OHIF viewer (npm package ``@ohif/app``, pinned) for the node to serve.

``make viewer`` (and ``dicom-node viewer install``) runs :func:`install`: ``npm pack`` fetches the
pinned tarball from the npm registry, its sha512 is checked against :data:`INTEGRITY` (the
registry's ``integrity`` field), and the tarball's ``package/dist/`` (the built viewer, about
200 MB) is unpacked into :data:`DEFAULT_DIR` (ignored by git), replacing an older copy atomically.

The public path rewrite: the prebuilt app's webpack runtime loads its chunks, workers, wasm
codecs and fonts from ``/`` (``__webpack_require__.p = "/"`` and ``window.PUBLIC_URL = "/"`` are
baked in). The node serves it under ``/viewer/``, so at install time every
``__webpack_require__.p = "/"`` in the bundles, ``window.PUBLIC_URL="/"`` and the root-relative
``href``/``src`` of ``index.html``, the root-relative ``url(/…)`` of ``app.bundle.css`` and the
icon paths of ``manifest.json`` are rewritten to ``/viewer/``. The package's own
``app-config.js`` (a public demo server) is removed: the node generates its own
(``dicom_node.web.routes.viewer``). A marker file records what was installed.

Nothing here runs at request time; without npm, ``install`` raises :class:`ViewerInstallError`
with a message saying so, and the viewer routes answer 503 with :func:`missing_message`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@ohif/app"
VERSION = "3.13.2"
#: The registry's integrity of ohif-app-3.13.2.tgz (``npm view @ohif/app@3.13.2 dist.integrity``).
INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
#: Where the node serves the viewer from.
PUBLIC_PATH = "/viewer/"
DEFAULT_DIR = Path(__file__).parent / "viewer_dist"
MARKER = ".dicom-node-viewer.json"
#: Environment variable naming another install folder (tests; a read-only package install).
DIR_ENV = "DICOM_NODE_VIEWER_DIR"


class ViewerInstallError(RuntimeError):
    """The viewer could not be installed; the message says why and what to do."""


def viewer_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or DEFAULT_DIR)


def installed(folder: Path | None = None) -> dict | None:
    """The marker of a complete install in ``folder`` ({package, version, integrity, public_path}),
    or None."""
    folder = folder or viewer_dir()
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not (folder / "index.html").is_file():
        return None
    return marker


def missing_message(folder: Path | None = None) -> str:
    folder = folder or viewer_dir()
    npm = "" if shutil.which("npm") else " npm was not found on this host: install Node.js/npm (Debian: apt-get install npm) first."
    return (f"The OHIF viewer is not installed in {folder}.{npm} Install it with `make viewer` "
            f"or `dicom-node viewer install` ({PACKAGE}@{VERSION} from the npm registry).")


def _sri(path: Path) -> str:
    h = hashlib.sha512()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha512-" + base64.b64encode(h.digest()).decode()


_WEBPACK_PUBLIC = re.compile(rb'__webpack_require__\.p = "/";')
_HTML_ROOT_REF = re.compile(r'((?:href|src)=")/(?!/)')
_CSS_ROOT_URL = re.compile(rb"url\(/(?!/)")


def rewrite_public_path(dist: Path, public_path: str = PUBLIC_PATH) -> dict[str, int]:
    """Point the unpacked app at ``public_path`` instead of ``/``; returns counts per kind of
    rewrite (the tests check they are not zero)."""
    counts = {"webpack": 0, "html": 0, "css": 0, "manifest": 0}
    pp = public_path.encode()
    for js in dist.glob("*.js"):
        data = js.read_bytes()
        new, n = _WEBPACK_PUBLIC.subn(b'__webpack_require__.p = "' + pp + b'";', data)
        if n:
            js.write_bytes(new)
            counts["webpack"] += n
    index = dist / "index.html"
    html = index.read_text()
    html, n1 = re.subn(r'window\.PUBLIC_URL="/"', f'window.PUBLIC_URL="{public_path}"', html)
    html, n2 = _HTML_ROOT_REF.subn(lambda m: m.group(1) + public_path, html)
    index.write_text(html)
    counts["html"] = n1 + n2
    for css in dist.glob("*.css"):
        data = css.read_bytes()
        new, n = _CSS_ROOT_URL.subn(b"url(" + pp, data)
        if n:
            css.write_bytes(new)
            counts["css"] += n
    manifest = dist / "manifest.json"
    if manifest.is_file():
        text, n = re.subn(r'"/(?!/)', f'"{public_path}', manifest.read_text())
        manifest.write_text(text)
        counts["manifest"] = n
    return counts


def install(dest: Path | None = None, *, npm: str | None = None, tarball: Path | None = None,
            force: bool = False, log=print) -> dict:  # noqa: ANN001
    """Fetch, check and unpack the pinned viewer into ``dest``; returns the marker. Skips the work
    when the same version is already there (unless ``force``). ``tarball``: use this file instead
    of ``npm pack`` (its integrity is still checked)."""
    dest = Path(dest or viewer_dir())
    current = installed(dest)
    if current and current.get("version") == VERSION and current.get("integrity") == INTEGRITY and not force:
        log(f"OHIF viewer {VERSION} already installed in {dest}")
        return current
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".viewer-", dir=dest.parent) as tmp:
        work = Path(tmp)
        if tarball is None:
            npm = npm or shutil.which("npm")
            if not npm:
                raise ViewerInstallError(missing_message(dest))
            log(f"fetching {PACKAGE}@{VERSION} with npm pack")
            r = subprocess.run([npm, "pack", f"{PACKAGE}@{VERSION}", "--json", "--pack-destination", str(work)],
                               capture_output=True, text=True, timeout=1800)
            if r.returncode != 0:
                raise ViewerInstallError(f"npm pack {PACKAGE}@{VERSION} failed (exit {r.returncode}): "
                                         f"{(r.stderr or r.stdout).strip()[-2000:]}")
            try:
                tarball = work / json.loads(r.stdout)[0]["filename"]
            except (ValueError, KeyError, IndexError) as exc:
                raise ViewerInstallError(f"npm pack printed no file name: {r.stdout[-500:]!r}") from exc
        got = _sri(Path(tarball))
        if got != INTEGRITY:
            raise ViewerInstallError(f"{Path(tarball).name}: integrity {got} is not the pinned {INTEGRITY}; not installed")
        unpacked = work / "unpacked"
        with tarfile.open(tarball, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/") and (m.isfile() or m.isdir())]
            tar.extractall(unpacked, members=members, filter="data")
        dist = unpacked / "package" / "dist"
        if not (dist / "index.html").is_file():
            raise ViewerInstallError(f"{Path(tarball).name} has no package/dist/index.html")
        (dist / "app-config.js").unlink(missing_ok=True)  # the node generates its own
        counts = rewrite_public_path(dist)
        if not counts["webpack"] or not counts["html"]:
            raise ViewerInstallError(f"public path rewrite found nothing to rewrite ({counts}); "
                                     f"{PACKAGE}@{VERSION} is not laid out as expected")
        marker = {"package": PACKAGE, "version": VERSION, "integrity": INTEGRITY, "public_path": PUBLIC_PATH,
                  "rewrites": counts}
        (dist / MARKER).write_text(json.dumps(marker, indent=1))
        old = work / "old"
        if dest.exists():
            dest.rename(old)
        dist.rename(dest)
    log(f"OHIF viewer {VERSION} installed in {dest} (public path {PUBLIC_PATH}; rewrites {counts})")
    return marker


def main(argv: list[str] | None = None) -> int:
    """``python -m dicom_node.web.viewer_install [DEST]`` (what ``make viewer`` runs)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        install(Path(argv[0]) if argv else None)
    except ViewerInstallError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
