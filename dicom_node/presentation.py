"""How findings are presented to a reader: suspicion bands, rounding, nodule colours.

A leaf module (standard library only) so that the result builders (``dicom_node.results``), the
web pages, the JSON API, the export and the model card all cite one definition.

Suspicion of malignancy comes from the model's malignancy probability ``p`` in [0, 1] (the
probability that LIDC readers would rate the nodule malignant -- readers' suspicion, not
pathology):

=============  ==========================================
level          cut-off
=============  ==========================================
low            ``p < INTERMEDIATE_SUSPICION_FROM`` (0.40)
intermediate   ``0.40 <= p < HIGH_SUSPICION_FROM`` (0.70)
high           ``p >= 0.70``
=============  ==========================================

Rounding, to what the measurements can carry: lengths (diameters, positions) to 0.1 mm, volumes
to 1 mm^3, probabilities and scores to two decimals. Nodule ``n`` (1-based, the SR tracking
identifier "Nodule n") is drawn in ``SEGMENT_PALETTE[(n - 1) % 7]``, the colour its SEG segment
recommends (Okabe-Ito, colour-blind safe).
"""
from __future__ import annotations

HIGH_SUSPICION_FROM = 0.7
INTERMEDIATE_SUSPICION_FROM = 0.4
SUSPICION_LABELS = {"low": "Low suspicion", "intermediate": "Intermediate suspicion", "high": "High suspicion"}

SEGMENT_PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")


def suspicion_level(probability: float) -> str:
    """``"low"``, ``"intermediate"`` or ``"high"`` for a malignancy probability in [0, 1]."""
    p = float(probability)
    if p >= HIGH_SUSPICION_FROM:
        return "high"
    if p >= INTERMEDIATE_SUSPICION_FROM:
        return "intermediate"
    return "low"


def round_mm(value_mm: float) -> float:
    """A length in mm rounded to what it can carry: 0.1 mm."""
    return round(float(value_mm), 1)


def round_mm3(value_mm3: float) -> int:
    """A volume in mm^3 rounded to what it can carry: 1 mm^3."""
    return int(round(float(value_mm3)))


def round_probability(value: float) -> float:
    """A probability or score in [0, 1], clipped to [0, 1] and rounded to two decimals."""
    return round(min(max(float(value), 0.0), 1.0), 2)


def nodule_colour(number: int) -> str:
    """``"#rrggbb"`` of nodule ``number`` (1-based): the SEG segment's recommended colour."""
    if int(number) < 1:
        raise ValueError(f"nodule numbers start at 1, got {number}")
    return SEGMENT_PALETTE[(int(number) - 1) % len(SEGMENT_PALETTE)]


def hex_rgb(hex_colour: str) -> tuple[int, int, int]:
    """``"#rrggbb"`` -> (r, g, b) in 0..255."""
    value = hex_colour.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)
