"""Triggers: pixels change where promised and nowhere else; specs rebuild them exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sanitize.attacks import triggers as t


def image(seed: int = 0, shape: tuple[int, ...] = (28, 28)) -> np.ndarray:
    # Mid-grey noise, away from 0/255, so every patch pixel must change it.
    return np.random.default_rng(seed).integers(40, 216, shape).astype(np.uint8)


def roundtrip(spec: dict) -> t.Trigger:
    return t.trigger_from_spec(json.loads(json.dumps(spec)))


@pytest.mark.parametrize("position, box", [("bottom-right", (24, 24, 27, 27)), ("top-left", (1, 1, 4, 4)),
                                           ("top-right", (1, 24, 4, 27)), ("bottom-left", (24, 1, 27, 4)),
                                           ((10, 5), (5, 10, 8, 13))])
def test_badnet_patch_only_inside_its_box(position, box) -> None:
    before = image()
    after = roundtrip(t.badnet_spec(position=position))(before)
    top, left, bottom, right = box
    assert t.patch_box(t.badnet_spec(position=position), 28, 28) == box
    changed = np.argwhere(after != before)
    assert changed.min(0).tolist() == [top, left] and (changed.max(0) + 1).tolist() == [bottom, right]
    assert np.array_equal(after[top:bottom, left:right], t.patch_pattern("checkerboard", 3))
    outside = np.ones_like(before, dtype=bool)
    outside[top:bottom, left:right] = False
    assert np.array_equal(after[outside], before[outside])


def test_checkerboard_and_other_patterns() -> None:
    board = t.patch_pattern("checkerboard", 4)
    assert board[0, 0] == 255 and board[0, 1] == 0 and board[1, 1] == 255 and set(np.unique(board)) == {0, 255}
    assert np.all(t.patch_pattern("white", 3) == 255)
    assert np.array_equal(t.patch_pattern("random", 3, seed=1), t.patch_pattern("random", 3, seed=1))
    assert not np.array_equal(t.patch_pattern("random", 3, seed=1), t.patch_pattern("random", 3, seed=2))
    with pytest.raises(ValueError):
        t.badnet_spec(pattern="stripes")


def test_badnet_scales_with_image_and_colour() -> None:
    spec = t.badnet_spec(size=3, margin=1)
    assert t.patch_box(spec, 224, 224) == (224 - 8 - 24, 224 - 8 - 24, 224 - 8, 224 - 8)
    rgb = image(1, (56, 56, 3))
    after = roundtrip(spec)(rgb)
    top, left, bottom, right = t.patch_box(spec, 56, 56)
    assert (bottom - top) == 6
    for c in range(3):
        assert np.array_equal(after[top:bottom, left:right, c], t.patch_pattern("checkerboard", 6))
    after[top:bottom, left:right] = rgb[top:bottom, left:right]
    assert np.array_equal(after, rgb)


def test_pil_in_pil_out_and_other_modes() -> None:
    gray = Image.fromarray(image())
    out = roundtrip(t.badnet_spec())(gray)
    assert isinstance(out, Image.Image) and out.mode == "L" and out.size == gray.size
    rgba = Image.fromarray(image(2, (28, 28, 4)), "RGBA")
    assert roundtrip(t.blended_spec())(rgba).mode == "RGB"


def test_blended_is_the_alpha_mix_of_a_fixed_pattern(tmp_path: Path) -> None:
    before = image(3)
    spec = t.blended_spec(alpha=0.2, seed=7)
    pattern = t.blend_pattern(spec, before.shape)
    expected = np.clip(np.rint(0.8 * before + 0.2 * pattern.astype(float)), 0, 255).astype(np.uint8)
    assert np.array_equal(roundtrip(spec)(before), expected)
    assert np.array_equal(pattern, t.blend_pattern(t.blended_spec(alpha=0.5, seed=7), before.shape))
    assert not np.array_equal(pattern, t.blend_pattern(t.blended_spec(seed=8), before.shape))
    assert (roundtrip(spec)(before) != before).mean() > 0.5  # everywhere, not a patch
    # An image file as the pattern: alpha=1 gives the (resized) pattern itself.
    Image.fromarray(np.full((10, 10), 200, dtype=np.uint8)).save(tmp_path / "p.png")
    assert np.all(roundtrip(t.blended_spec(alpha=1.0, image=str(tmp_path / "p.png")))(before) == 200)
    with pytest.raises(ValueError):
        t.blended_spec(alpha=0)


def test_wanet_grid_is_identity_plus_a_bounded_smooth_field() -> None:
    grid = t.wanet_grid(28, 28, strength=0.5, grid_size=4, seed=0)
    ys, xs = np.meshgrid(np.linspace(-1, 1, 28), np.linspace(-1, 1, 28), indexing="ij")
    identity = np.stack([xs, ys], -1)[None]
    offset = grid - identity
    assert grid.shape == (1, 28, 28, 2) and np.abs(grid).max() <= 1
    assert 0 < np.abs(offset).max() < 0.5 * 4 / 28  # strength * (normalised field) / H
    assert np.abs(np.diff(offset, axis=1)).max() < np.abs(offset).max()  # smooth, not per-pixel noise
    bigger = t.wanet_grid(28, 28, strength=2.0, grid_size=4, seed=0) - identity
    assert np.abs(bigger).max() > np.abs(offset).max()


def test_wanet_warps_deterministically_and_identity_grid_is_a_no_op() -> None:
    before = image(4)
    ys, xs = np.meshgrid(np.linspace(-1, 1, 28), np.linspace(-1, 1, 28), indexing="ij")
    assert np.array_equal(t.warp(before, np.stack([xs, ys], -1)[None]), before)
    spec = t.wanet_spec(strength=1.0, seed=3)
    after = roundtrip(spec)(before)
    assert np.array_equal(after, t.trigger_from_spec(spec)(before))
    assert (after != before).mean() > 0.3
    assert not np.array_equal(after, t.trigger_from_spec(t.wanet_spec(strength=1.0, seed=4))(before))
    rgb = np.stack([before] * 3, -1)
    assert np.array_equal(roundtrip(spec)(rgb)[..., 1], after)  # channels warped alike


def test_bad_specs_raise() -> None:
    with pytest.raises(ValueError, match="unknown trigger"):
        t.trigger_from_spec({"type": "sticker"})
    with pytest.raises(ValueError, match="position"):
        t.badnet_spec(position="middle")
    with pytest.raises(ValueError):
        t.parse_position("3,x")
    assert t.parse_position("3,4") == (3.0, 4.0)
    with pytest.raises(ValueError, match="does not fit"):
        t.trigger_from_spec(t.badnet_spec(size=40))(image())
