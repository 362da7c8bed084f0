"""One validator per kind of value, used by the configuration file, the API schemas, the admin
pages and the CLI alike, so a value refused by one is refused by all with the same sentence.

``check_ae_title`` applies pynetdicom's own AE rules (``pynetdicom._config.VALIDATORS["AE"]``:
at most 16 characters, ASCII only, no backslash, no control character) and refuses an empty or
all-space title (PS3.8 forbids it as a called or calling AE title); leading and trailing spaces
are not significant and are stripped. Imports nothing from ``dicom_node``.
"""
from __future__ import annotations

from pynetdicom import _config

#: Result kinds a destination can receive: structured report, segmentation, key images.
OUTPUTS = ("sr", "seg", "sc")
#: Destination kinds (``dicom_node.destinations.KINDS``).
DESTINATION_KINDS = ("dicom", "dicomweb")


def check_ae_title(value: str) -> str:
    """The AE title, stripped; ValueError "AE title '<value>' <pynetdicom's reason>" otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"AE title must be a string, got {value!r}")
    stripped = value.strip()
    if not stripped:
        raise ValueError(f"AE title {value!r} is empty")
    ok, reason = _config.VALIDATORS["AE"](stripped)
    if not ok:
        raise ValueError(f"AE title {value!r} {reason}")
    return stripped


def check_outputs(value: list[str]) -> list[str]:
    """Result kinds a destination receives: any of ``OUTPUTS``, each once, in the order given."""
    bad = [o for o in value if o not in OUTPUTS]
    if bad:
        raise ValueError(f"unknown output(s) {bad}; choose from {list(OUTPUTS)}")
    return list(dict.fromkeys(value))


def check_port(value: int) -> int:
    """A TCP port a peer listens on: 1-65535."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"port {value!r} is not a number from 1 to 65535")
    return value


def check_url(value: str | None) -> str:
    """A DICOMweb base URL: http:// or https://."""
    if not isinstance(value, str) or not value.strip().startswith(("http://", "https://")) \
            or len(value.strip()) <= len("https://"):
        raise ValueError(f"url {value!r} is not an http(s):// address, e.g. http://pacs:8042/dicom-web")
    return value.strip()


def check_destination_target(name: str, kind: str, ae_title: str, host: str, port: int,
                             url: str | None) -> tuple[str, str, int, str | None]:
    """Where a destination of ``kind`` is reached: "dicom" needs an AE title, host and port;
    "dicomweb" a URL (its AE title, host and port stay empty). Returns (ae_title, host, port, url)."""
    if kind == "dicom":
        if not (host or "").strip() or not port:
            raise ValueError(f"destination {name!r}: kind dicom needs host and port (1-65535)")
        return check_ae_title(ae_title), host.strip(), check_port(port), url or None
    if kind == "dicomweb":
        try:
            return (ae_title or "").strip(), (host or "").strip(), port or 0, check_url(url)
        except ValueError as exc:
            raise ValueError(f"destination {name!r}: kind dicomweb needs a url: {exc}") from None
    raise ValueError(f"destination {name!r}: kind {kind!r} is not one of {list(DESTINATION_KINDS)}")


def parse_peer(text: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` -> (ae_title, host, port); ValueError naming the bad part."""
    if "@" not in text or ":" not in text.rsplit("@", 1)[1]:
        raise ValueError(f"peer {text!r} is not AE@HOST:PORT")
    ae, hostport = text.rsplit("@", 1)
    host, port_s = hostport.rsplit(":", 1)
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"port {port_s!r} in {text!r} is not a number") from None
    if not host.strip("[]"):
        raise ValueError(f"peer {text!r} names no host")
    return check_ae_title(ae), host.strip("[]"), check_port(port)
