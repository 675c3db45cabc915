"""Pure helpers of workbench.explore that need no model: picture layout."""

from __future__ import annotations

import numpy as np

from workbench.explore import panels


def _solid(h: int, w: int, value: int) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def test_panels_places_square_pictures_side_by_side_below_their_captions():
    a, b = _solid(56, 56, 10), _solid(40, 56, 200)
    out = panels([a, b], ["layer", "rollout"], gap=8)
    assert out.shape == (56 + 16, 56 + 8 + 56, 3) and out.dtype == np.uint8
    assert (out[16:, :56] == 10).all()  # a, untouched, under its caption
    assert (out[16 : 16 + 40, 64:] == 200).all() and (out[16 + 40 :, 64:] == 255).all()  # b, padded white
    assert (out[16:, 56:64] == 255).all()  # the gap
    assert (out[:16, :56] < 255).any() and (out[:16, 64:] < 255).any()  # each caption is drawn


def test_panels_stacks_wide_strips():
    a, b = _solid(40, 300, 10), _solid(40, 200, 90)
    out = panels([a, b], ["layer", "rollout"], gap=8)
    assert out.shape == (2 * (40 + 16) + 8, 300, 3)
    assert (out[16:56] == 10).all() and (out[56 + 8 + 16 :, :200] == 90).all()
