"""Orientation letters and display geometry of dicom_node.render on volumes of known direction."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dicom_node import render
from dicom_node.volume import Volume


def _volume(direction, shape=(20, 40, 50), spacing=(2.5, 0.7, 0.7)) -> Volume:
    return Volume(array=np.full(shape, -800, dtype=np.float32), spacing=spacing, origin=(0.0, 0.0, 0.0),
                  direction=np.asarray(direction, dtype=float), datasets=[])


@pytest.mark.parametrize("direction, expected", [
    (np.eye(3), {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}),
    # Feet first (slice index towards the feet) and the rows flipped: the letters follow.
    (np.diag([1.0, -1.0, -1.0]), {"axial": ("P", "A", "R", "L"), "coronal": ("S", "I", "R", "L"),
                                  "sagittal": ("S", "I", "P", "A")}),
])
def test_orientation_letters_follow_the_direction_cosines(direction, expected):
    vol = _volume(direction)
    for plane, (top, bottom, left, right) in expected.items():
        assert render.orientation(vol, plane) == {"top": top, "bottom": bottom, "left": left, "right": right}, plane


def test_oblique_directions_get_two_letters():
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])  # columns: x and y index axes rotated in the axial plane
    assert render.orientation(_volume(rot), "axial") == {"top": "AL", "bottom": "PR", "left": "RA", "right": "LP"}


def test_reformats_keep_millimetres_square_and_windows_differ():
    vol = _volume(np.eye(3))
    vol.array[:, :, :25] = 40.0  # soft tissue on one half
    view = render.render_view(vol, None, (10.0, 10.0, 20.0), 5.0, 1, plane="coronal")
    w, h = Image.open(io.BytesIO(view.png)).size
    assert (w, h) == (round(512 * (50 * 0.7) / (20 * 2.5)), 512)  # 35 mm wide, 50 mm tall
    pngs = {name: render.render_view(vol, None, (10.0, 10.0, 20.0), 5.0, 1, window=name).png for name in render.WINDOWS}
    assert len(set(pngs.values())) == 3
    with pytest.raises(ValueError, match="window 'brain' is not one of"):
        render.render_view(vol, None, (10.0, 10.0, 20.0), 5.0, 1, window="brain")
