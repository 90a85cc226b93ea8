"""The pieces that make the selector text-aware: text specificity, the TPD forms, the straight-through
score path, phrase-level negatives, boxed-image oversampling, the random baseline selector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from copa.model.selection import (
    TPD,
    TPD_FORMS,
    RandomSelector,
    bce_patch_loss,
    make_selector,
    select_and_fuse,
)
from copa.train.losses import other_object_weight, phrase_contrast_loss
from copa.train.pta_metrics import PTAMeter, text_specificity
from copa.train.sampler import BoxedMixSampler


def _two_object_labels() -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.zeros(3, 8)
    labels[0, :2] = 1  # image 0, object A
    labels[1, 2:4] = 1  # image 0, object B
    labels[2, 4:6] = 1  # image 1, its only object
    return labels, torch.tensor([0, 0, 1])


def test_specificity_is_one_for_a_text_aware_ranking_and_zero_for_a_blind_one() -> None:
    labels, image = _two_object_labels()
    aware = labels * 5.0  # each query ranks its own object first
    spec = text_specificity(aware, labels, image, 0.25)
    assert spec[:2].tolist() == [1.0, 1.0] and torch.isnan(spec[2])
    blind = torch.zeros(3, 8)
    blind[:, :4] = 5.0  # every query keeps both objects: recall 1 for all, specificity 0
    assert text_specificity(blind, labels, image, 0.5)[:2].tolist() == [0.0, 0.0]
    wrong = torch.zeros(3, 8)
    wrong[0, 2:4] = 5.0  # query A keeps B only
    assert text_specificity(wrong, labels, image, 0.25)[0].item() == -1.0


def test_meter_reports_specificity_and_random_selection_scores_about_zero() -> None:
    torch.manual_seed(0)
    labels = torch.zeros(400, 64)
    image = torch.arange(400) // 2
    for i in range(400):
        start = (i % 2) * 16 + (i // 2) % 8
        labels[i, start : start + 6] = 1
    meter = PTAMeter(0.5)
    meter.add("phrase", torch.randn(400, 64), labels, image)
    res = meter.result()
    assert abs(res["specificity@0.25"]) < 0.05 and abs(res["specificity@0.5"]) < 0.05
    assert abs(res["recall_phrase"] - 0.5) < 0.05


@pytest.mark.parametrize("form", TPD_FORMS)
def test_tpd_forms_depend_on_the_text(form: str) -> None:
    torch.manual_seed(0)
    tpd = TPD(16, 12, 8, form)
    x = torch.randn(2, 1 + 9, 16)
    q = torch.randn(2, 12)
    a, b = tpd(x, q), tpd(x, torch.randn(2, 12))
    assert a.shape == (2, 9)
    # the ranking, not just a common shift, must change with the text
    assert not torch.allclose(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), atol=1e-4)
    assert tpd(x, None).shape == (2, 9)


def test_unknown_tpd_form_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown TPD form"):
        TPD(16, 12, 8, "cubic")


def test_straight_through_keeps_the_forward_and_adds_a_gradient_path() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 6, 4)
    logits = torch.randn(2, 6, requires_grad=True)
    plain, _, _ = select_and_fuse(x, logits, 3, fuse=False)
    st, _, _ = select_and_fuse(x, logits, 3, fuse=False, straight_through=True)
    assert torch.equal(plain, st)
    assert not plain.requires_grad  # gather alone: the kept tokens carry no gradient to the logits
    st.sum().backward()
    assert float(logits.grad.abs().sum()) > 0


def test_phrase_contrast_prefers_the_queried_object() -> None:
    labels, image = _two_object_labels()
    aware = labels * 4.0 - 2.0
    blind = torch.zeros(3, 8)
    blind[:, :4] = 2.0
    assert phrase_contrast_loss(aware, labels, image) < phrase_contrast_loss(blind, labels, image)
    single = phrase_contrast_loss(torch.randn(1, 8, requires_grad=True), labels[2:], image[2:])
    assert single.item() == 0.0 and single.requires_grad


def test_other_object_weight_prices_a_blind_ranking_higher() -> None:
    labels, image = _two_object_labels()
    union = torch.stack([labels[image == i].amax(0) for i in image.tolist()])  # (P, N) the image's boxes
    assert other_object_weight(labels, union, 1.0) is None
    w = other_object_weight(labels, union, 3.0)
    assert w[0, 2:4].tolist() == [3.0, 3.0] and w[0, :2].tolist() == [1.0, 1.0] and w[0, 6:].eq(1).all()
    assert w[2].eq(1).all()  # an image with one object has no other object to weigh
    blind = torch.zeros(3, 8)
    blind[:, :4] = 5.0  # both objects of image 0 first, whatever the phrase
    aware = labels * 5.0
    gap = [
        float(bce_patch_loss(blind, labels, 2.0, other_object_weight(labels, union, k)))
        - float(bce_patch_loss(aware, labels, 2.0, other_object_weight(labels, union, k)))
        for k in (1.0, 3.0)
    ]
    assert 0 < gap[0] < gap[1]  # the weight widens what a blind ranking costs over a text-aware one


def test_boxed_mix_sampler_puts_boxed_images_in_every_batch_and_resumes_exactly() -> None:
    pool = [3, 17, 42, 99]
    s = BoxedMixSampler(100, pool, boxed=2, batch_size=8, seed=1)
    it = iter(s)
    keys = [next(it) for _ in range(8 * 10)]
    for b in range(10):
        batch = [k % 100 for k in keys[8 * b : 8 * b + 8]]
        assert all(i in pool for i in batch[-2:])
    resumed = iter(BoxedMixSampler(100, pool, boxed=2, batch_size=8, seed=1, start=8 * 4))
    assert [next(resumed) for _ in range(8 * 6)] == keys[8 * 4 :]
    with pytest.raises(ValueError):
        BoxedMixSampler(100, pool, boxed=8, batch_size=8)


def test_random_selector_is_repeatable_and_uniform() -> None:
    x = torch.randn(4, 1 + 64, 8)
    a, b = RandomSelector(seed=3)(x, None), RandomSelector(seed=3)(x, None)
    assert torch.equal(a, b) and a.shape == (4, 64)
    assert make_selector("random", 8, 8, 4) is not None
    counts = np.zeros(64)
    sel = RandomSelector(seed=0)
    for _ in range(200):
        counts[sel(x, None).topk(16, dim=1).indices.flatten().numpy()] += 1
    assert counts.min() > 0.5 * counts.mean()
