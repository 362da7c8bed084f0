"""WADO-RS metadata (PS3.18 10.4.1.1.2): DICOM JSON of every instance of a series, cached.

A series' metadata is built once from the stored headers (``dcmread(stop_before_pixels=True)``:
pixel data is never read, let alone decoded) and kept, encoded, in a small in-process LRU cache.
The cache entry carries the series' fingerprint from the index (instance count, newest
``received_at``, total size, largest row id): a new, replaced or removed instance changes it, and
the next request builds the series again. Pixel data is answered with a ``BulkDataURI`` (the
instance's ``/bulk/7FE00010``), as are other binary values over ``BULK_THRESHOLD`` bytes.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict

from pydicom import dcmread
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.models import Instance, Series

log = logging.getLogger(__name__)

#: Binary values larger than this (bytes) are answered with a BulkDataURI.
BULK_THRESHOLD = 64 * 1024
PIXEL_DATA = "7FE00010"
_ENCAPSULATED_NOT = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}


def is_native(transfer_syntax: str) -> bool:
    """Whether pixel data in this transfer syntax is native (not encapsulated)."""
    return transfer_syntax in _ENCAPSULATED_NOT


def instance_json(path, instance_url: str, transfer_syntax: str) -> dict:  # noqa: ANN001
    """DICOM JSON of one stored instance without its pixel data (read up to it, not beyond)."""
    ds = dcmread(path, stop_before_pixels=True)

    def bulk(elem) -> str:  # noqa: ANN001
        return f"{instance_url}/bulk/{int(elem.tag):08X}"

    out = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=bulk,
                          suppress_invalid_tags=True)
    if "Rows" in ds and "BitsAllocated" in ds:  # an image: its pixel data follows the header
        vr = "OW" if is_native(transfer_syntax) and int(ds.BitsAllocated) > 8 else "OB"
        out[PIXEL_DATA] = {"vr": vr, "BulkDataURI": f"{instance_url}/bulk/{PIXEL_DATA}"}
    return out


def fingerprint(s: Session, series_id: int) -> tuple:
    """Changes whenever an instance of the series is added, replaced or removed."""
    row = s.execute(select(func.count(Instance.id), func.max(Instance.received_at), func.sum(Instance.size_bytes),
                           func.max(Instance.id)).where(Instance.series_id == series_id)).one()
    return tuple(str(v) for v in row)


class MetadataCache:
    """Encoded series metadata (bytes of a JSON array), at most ``size`` series, per process."""

    def __init__(self, node, size: int = 16):  # noqa: ANN001 - dicom_node.node.Node
        self.node = node
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, tuple[tuple, bytes]] = OrderedDict()
        self.builds = 0  # series built (not served from the cache): tests and the benchmark read it

    def series(self, s: Session, series: Series, study_uid: str, base: str) -> bytes:
        """The series' metadata as a JSON array (bytes); built on the first request, then cached."""
        key = (series.series_instance_uid, base)
        stamp = fingerprint(s, series.id)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] == stamp:
                self._entries.move_to_end(key)
                return hit[1]
        rows = s.execute(select(Instance.sop_instance_uid, Instance.path, Instance.transfer_syntax_uid)
                         .where(Instance.series_id == series.id)
                         .order_by(Instance.instance_number, Instance.id)).all()
        s.commit()  # end the read before the files are read (SQLite)
        prefix = f"{base}/studies/{study_uid}/series/{series.series_instance_uid}/instances/"
        items = []
        for sop_uid, relpath, ts in rows:
            try:
                items.append(instance_json(self.node.store.path(relpath), prefix + sop_uid, ts))
            except FileNotFoundError:
                log.warning("metadata of series %s: instance %s has no file (removed meanwhile?)",
                            series.series_instance_uid, sop_uid)
                stamp = None  # do not cache an incomplete answer
            except Exception as exc:  # noqa: BLE001 - one unreadable file must not hide the others
                log.warning("metadata of series %s: instance %s unreadable: %s", series.series_instance_uid,
                            sop_uid, type(exc).__name__)
                stamp = None
        data = json.dumps(items, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        with self._lock:
            self.builds += 1
            if stamp is not None:
                self._entries[key] = (stamp, data)
                self._entries.move_to_end(key)
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        return data
