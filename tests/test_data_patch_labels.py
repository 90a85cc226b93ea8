"""Box → patch labels: hand-computed cases, a pixel-count reference, and properties."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from copa.data.patch_labels import box_to_patch_labels, union_labels


def positives(box, size=(64, 64), patch=16, tau=0.25) -> set[int]:
    lab = box_to_patch_labels(torch.tensor([box], dtype=torch.float32), size, patch, tau)
    assert lab.shape == (1, (size[0] // patch) * (size[1] // patch))
    return set(torch.nonzero(lab[0]).flatten().tolist())


def test_box_inside_one_patch():
    assert positives((18, 2, 4, 4)) == {1}


def test_box_centred_on_patch_corner_picks_one_patch():
    # each of the four patches gets 4x4 = 16 px < 0.25 * 256; the centre (16, 16) lies on the corner
    assert positives((12, 12, 8, 8)) == {5}  # floor(16/16) = row 1, col 1


def test_full_image_is_all_positive():
    assert positives((0, 0, 64, 64)) == set(range(16))


def test_tau_boundary_is_inclusive():
    # 8x8 = 64 px = exactly 0.25 of each of the four patches
    assert positives((8, 8, 16, 16)) == {0, 1, 4, 5}
    # shifted half a pixel right: left patches get 7.5*8 = 60 < 64, right ones 8.5*8 = 68
    assert positives((8.5, 8, 16, 16)) == {1, 5}
    assert positives((8, 8, 16, 16), tau=0.26) == {5}  # only the centre patch


def test_centre_on_far_edge_is_clamped():
    assert positives((60, 60, 4, 4), tau=1.0) == {15}
    # a sliver on the image's last column: centre x = 64 would be column 4, clamped to 3
    assert positives((63.5, 0, 1.0, 4), tau=1.0) == {3}


def test_row_major_on_non_square_grid():
    # (H, W) = (32, 64), grid 2 x 4: row 1, col 3 -> index 1 * 4 + 3
    assert positives((50, 18, 10, 10), size=(32, 64)) == {7}


def test_empty_and_union():
    empty = box_to_patch_labels(torch.zeros(0, 4), (64, 64), 16)
    assert empty.shape == (0, 16) and empty.dtype == torch.float32
    assert union_labels(empty, 16).sum() == 0
    lab = box_to_patch_labels(torch.tensor([[0, 0, 16, 16], [48, 48, 16, 16]]), (64, 64), 16)
    assert set(torch.nonzero(union_labels(lab, 16)).flatten().tolist()) == {0, 15}


def reference(box: tuple[int, int, int, int], size: tuple[int, int], patch: int, tau: float) -> np.ndarray:
    """Rasterise the box and count covered pixels per patch (integer boxes only)."""
    H, W = size
    mask = np.zeros((H, W), dtype=np.int64)
    x, y, w, h = box
    mask[y : y + h, x : x + w] = 1
    gh, gw = H // patch, W // patch
    counts = mask[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).sum(axis=(1, 3))
    pos = (counts >= tau * patch * patch) & (counts > 0)
    cr = min(int(np.floor((y + h / 2) / patch)), gh - 1)
    cc = min(int(np.floor((x + w / 2) / patch)), gw - 1)
    pos[cr, cc] = True
    return pos.reshape(-1).astype(np.float32)


@st.composite
def scene(draw):
    patch = draw(st.sampled_from([4, 8, 16]))
    gh, gw = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    H, W = gh * patch, gw * patch
    x = draw(st.integers(0, W - 1))
    y = draw(st.integers(0, H - 1))
    w = draw(st.integers(1, W - x))
    h = draw(st.integers(1, H - y))
    tau = draw(st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]))
    return (x, y, w, h), (H, W), patch, tau


@settings(max_examples=200, deadline=None)
@given(scene())
def test_matches_pixel_count_reference(case):
    box, size, patch, tau = case
    got = box_to_patch_labels(torch.tensor([box], dtype=torch.float32), size, patch, tau)[0].numpy()
    np.testing.assert_array_equal(got, reference(box, size, patch, tau))


@st.composite
def float_box(draw):
    patch = draw(st.sampled_from([8, 16]))
    H, W = draw(st.integers(1, 8)) * patch, draw(st.integers(1, 8)) * patch
    fx = st.floats(0, 1, allow_nan=False, allow_infinity=False)
    x0, x1 = sorted((draw(fx) * W, draw(fx) * W))
    y0, y1 = sorted((draw(fx) * H, draw(fx) * H))
    tau = draw(st.floats(0.01, 1.0))
    return (x0, y0, x1 - x0, y1 - y0), (H, W), patch, tau


@settings(max_examples=300, deadline=None)
@given(float_box())
def test_property_nonempty_and_within_reach(case):
    (x, y, w, h), (H, W), patch, tau = case
    lab = box_to_patch_labels(torch.tensor([[x, y, w, h]], dtype=torch.float64), (H, W), patch, tau)[0]
    if w > 0 and h > 0:
        assert lab.sum() >= 1
    gw = W // patch
    cx, cy = x + w / 2, y + h / 2
    for i in torch.nonzero(lab).flatten().tolist():
        r, c = divmod(i, gw)
        px0, py0 = c * patch, r * patch
        ix = min(x + w, px0 + patch) - max(x, px0)
        iy = min(y + h, py0 + patch) - max(y, py0)
        intersects = ix > 0 and iy > 0
        has_centre = px0 <= cx <= px0 + patch and py0 <= cy <= py0 + patch
        assert intersects or has_centre, (i, (x, y, w, h))
