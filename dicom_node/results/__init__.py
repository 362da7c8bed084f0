"""Result objects for one analysed series: TID 1500 SR, binary SEG, optional key images.

Contract: ``build_results(volume, findings, ...)`` turns the model's findings on one ``Volume``
into DICOM objects that file under the source study (patient and study attributes copied, new
series, same frame of reference) and that say, in their series descriptions, that they come
from an automated, non-clinical research tool. It writes nothing and sends nothing: the caller
stores and dispatches the returned datasets. Findings are numbered ``Nodule 1..N`` in the
order of ``common.order_findings`` (descending malignancy probability, then descending detection
score) -- one numbering for the SR tracking identifiers, the SEG segment labels and the key
images; each gets one tracking UID shared by its SR measurement groups and SEG segment.
See ``sr.py`` for the SR content tree and ``common.py`` for the codes, cut-offs and palette.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pydicom

from dicom_node.results.common import (
    Producer,
    UidSource,
    order_findings,
    prepare_nodules,
    segment_colour,
    suspicion_level,
)
from dicom_node.results.keyimages import build_key_images
from dicom_node.results.seg import build_seg
from dicom_node.results.sr import build_sr, summary_text
from dicom_node.volume import Volume
from model.finding import Finding

__all__ = ["ResultSet", "build_results", "order_findings", "segment_colour", "suspicion_level"]


@dataclass
class ResultSet:
    """The objects to send for one series.

    ``sr``: Comprehensive 3D SR (TID 1500). ``seg``: binary SEG, ``None`` when no finding has a
    mask (in particular when there are no findings). ``key_images``: RGB Secondary Capture
    images, one per finding in nodule-number order, only when asked for. Indexed like the
    caller's ``findings``: ``numbers[i]`` is the nodule number of ``findings[i]`` (store it as the
    finding's number so that the web page shows the SR's numbering), ``tracking_uids[i]`` and
    ``segment_numbers[i]`` its tracking UID (SR groups and SEG segment) and SEG segment number
    (``None`` without a mask) -- segment numbers differ from nodule numbers when some finding has
    no mask. ``summary``: the SR's plain-language summary.
    """

    sr: pydicom.Dataset
    seg: pydicom.Dataset | None
    key_images: list[pydicom.Dataset] = field(default_factory=list)
    tracking_uids: list[str] = field(default_factory=list)
    segment_numbers: list[int | None] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    summary: str = ""

    def datasets(self) -> list[pydicom.Dataset]:
        """All objects, SEG before the SR that references it."""
        return ([self.seg] if self.seg is not None else []) + [self.sr] + list(self.key_images)


def build_results(
    volume: Volume,
    findings: Sequence[Finding],
    *,
    algorithm_name: str,
    algorithm_version: str,
    want_key_images: bool = False,
    manufacturer: str = "dicom-node",
    manufacturer_model_name: str = "dicom-node lung nodule analysis",
    device_serial_number: str = "0",
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    malignancy_threshold: float = 0.5,
    uid_seed: str | None = None,
    lobes: Sequence[str | None] | None = None,
) -> ResultSet:
    """Build SR, SEG (when some finding has a mask) and, if ``want_key_images``, key images.

    ``findings``: coordinates as in ``model.finding.Finding`` (voxel indices into
    ``volume.array``, LPS mm), in any order: they are numbered by ``order_findings``.
    ``malignancy_threshold``: accepted for old callers and checked, no longer used -- the SR gives
    a suspicion level (``common.suspicion_level``), not a malignant/benign verdict. ``lobes``:
    optional, ``lobes[i]`` the lobe of ``findings[i]`` (a key of ``common.LOBES``) or ``None``
    where it is not known; without it the finding site is the lung with the side from the
    centre's patient x. ``uid_seed``: when given (e.g.
    the job's idempotency key), all new UIDs are derived from it, so a re-run of the same job
    yields the same SOP Instance UIDs; otherwise UIDs are random.
    """
    producer = Producer(
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        device_serial_number=device_serial_number,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        malignancy_threshold=malignancy_threshold,
    )
    uids = UidSource(uid_seed)
    nodules = prepare_nodules(volume, findings, uids, lobes)
    seg = build_seg(volume, nodules, producer, uids)
    sr = build_sr(volume, nodules, seg, producer, uids)
    key_images = build_key_images(volume, nodules, producer, uids) if want_key_images else []
    by_index = sorted(nodules, key=lambda n: n.index)
    return ResultSet(
        sr=sr,
        seg=seg,
        key_images=key_images,
        tracking_uids=[n.tracking_uid for n in by_index],
        segment_numbers=[n.segment_number for n in by_index],
        numbers=[n.number for n in by_index],
        summary=summary_text(nodules),
    )
