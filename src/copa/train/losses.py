"""The five pre-training objectives as modules (SPEC §2), and their combination.

``PretrainObjective`` owns the whole per-step computation so that DDP/FSDP can wrap one module:
every image's text-independent ViT prefix is computed once per step and shared by ITC (text-
agnostic query), ITM (positive and both hard-negative pairs, each with its own text query), MLM,
PrefixLM and PTA (phrase queries; PTA needs only the selector's logits on the prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from copa.model.copa import COPAModel
from copa.model.selection import bce_patch_loss
from copa.train.distributed import all_gather_nograd, all_gather_with_grad, rank

LOSS_NAMES = ("itc", "itm", "mlm", "prefix_lm", "pta")


class ITCLoss(nn.Module):
    """Symmetric InfoNCE with negatives from every process (features gathered with gradient).

    Rows sharing an image id are all positives (soft targets), so duplicate images in a batch are
    not pushed apart.
    """

    def forward(self, img: Tensor, txt: Tensor, scale: Tensor, image_ids: Tensor) -> tuple[Tensor, Tensor]:
        """img, txt: (B, E) unit vectors; image_ids: (B,) -> (loss, local similarity (B, B) detached)"""
        all_img, all_txt = all_gather_with_grad(img), all_gather_with_grad(txt)
        all_ids = all_gather_nograd(image_ids)
        # fp32 even under bf16 autocast: bf16's 8-bit mantissa puts errors of ~0.4 on logits of
        # scale ~100, as large as the margins between hard negatives
        with torch.autocast(img.device.type, enabled=False):
            img, txt, all_img, all_txt, scale = (t.float() for t in (img, txt, all_img, all_txt, scale))
            logits_i2t = scale * img @ all_txt.t()  # (B, world*B)
            logits_t2i = scale * txt @ all_img.t()
        pos = (image_ids[:, None] == all_ids[None, :]).float()
        targets = pos / pos.sum(1, keepdim=True)
        loss = 0.5 * (
            torch.sum(-targets * logits_i2t.log_softmax(1), 1).mean()
            + torch.sum(-targets * logits_t2i.log_softmax(1), 1).mean()
        )
        b = img.shape[0]
        local = logits_i2t[:, rank() * b : (rank() + 1) * b]
        return loss, local.detach()


def sample_hard_negatives(
    sim: Tensor, image_ids: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Sample one hard negative text per image and one hard negative image per text.

    sim: (B, B) image-to-text similarity logits; rows/cols with the same image id are never chosen.
    Returns (neg_text_for_image (B,), neg_image_for_text (B,)). Non-finite similarities (a
    diverging run) count as 0, so the choice there is uniform and the caller's loss check, not this
    sampler, stops the run. A batch of one distinct image has no negative: ``ValueError``.
    """
    same = image_ids[:, None] == image_ids[None, :]
    sim = torch.nan_to_num(sim.float(), nan=0.0, posinf=0.0, neginf=0.0)
    w_i2t = sim.softmax(1).masked_fill(same, 0) + 1e-8 * (~same)
    w_t2i = sim.t().softmax(1).masked_fill(same, 0) + 1e-8 * (~same)
    if bool((~same).any(1).all()):
        neg_txt = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
        neg_img = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    else:
        raise ValueError("hard negatives need at least two distinct images in the batch")
    return neg_txt, neg_img


def mask_tokens(
    ids: Tensor, mask: Tensor, vocab: int, mask_id: int, special: Tensor, prob: float
) -> tuple[Tensor, Tensor]:
    """BERT masking: choose ``prob`` of the real tokens; 80% -> [MASK], 10% random, 10% kept.

    ids, mask: (B, L); special: (B, L) bool for [CLS]/[SEP]/[PAD]. Returns (masked ids, labels with
    -100 where not chosen). A row of n real tokens gets ``floor(prob * n + u)`` targets, u ~ U(0, 1)
    (stochastic rounding), so the expected rate is exactly ``prob`` however short the captions; the
    old "at least one per row" doubled it on short captions (0.30 measured). Only a batch left with
    no target at all gets one, so the loss is always defined.
    """
    cand = mask.bool() & ~special
    n = cand.sum(1)
    count = (prob * n.float() + torch.rand(n.shape, device=ids.device)).floor().long().minimum(n)
    # a random order of each row's candidates: the first ``count`` of them are chosen
    score = torch.rand(ids.shape, device=ids.device).masked_fill(~cand, 2.0)
    rank = score.argsort(1).argsort(1)
    chosen = (rank < count[:, None]) & cand
    if not bool(chosen.any()) and bool(cand.any()):
        flat = cand.flatten().nonzero().squeeze(1)
        pick = flat[torch.randint(flat.numel(), (1,), device=ids.device)]
        chosen.view(-1)[pick] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, device=ids.device)
    out = ids.clone()
    out[chosen & (r < 0.8)] = mask_id
    rand_pos = chosen & (r >= 0.8) & (r < 0.9)
    out[rand_pos] = torch.randint(vocab, (int(rand_pos.sum()),), device=ids.device)
    return out, labels


def split_prefix(
    ids: Tensor, mask: Tensor, cls_id: int, sep_id: int, pad_id: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Cut each caption at a random word boundary for PrefixLM (vectorised, no loop over the batch).

    ids, mask: (B, L) as ``[CLS] w1..wn [SEP] pad``. The prefix ``[CLS] w1..wc [SEP]`` (c in [0, n-1])
    goes to the encoder; the decoder reads ``[CLS] w_{c+1}..w_n`` and predicts ``w_{c+1}..w_n [SEP]``.
    Returns (prefix ids, prefix mask, decoder input, decoder mask, targets with -100 on padding).
    """
    b, length = ids.shape
    n = mask.sum(1) - 2  # words per caption
    cut = (torch.rand(b, device=ids.device) * n.clamp(min=1).float()).long().clamp(max=(n - 1).clamp(min=0))
    pos = torch.arange(length, device=ids.device)[None, :]
    pre = torch.where(pos <= cut[:, None], ids, torch.full_like(ids, pad_id))
    pre = torch.where(pos == cut[:, None] + 1, torch.full_like(ids, sep_id), pre)
    pre_mask = (pos <= cut[:, None] + 1).long()
    width = int((n - cut).max()) + 1  # words after the cut + [SEP]
    j = torch.arange(width, device=ids.device)[None, :]
    src = (cut[:, None] + 1 + j).clamp(max=length - 1)
    valid = j <= (n - cut)[:, None]
    target = torch.where(valid, ids.gather(1, src), torch.full_like(src, -100))
    dec_in = torch.cat(
        [torch.full((b, 1), cls_id, device=ids.device, dtype=ids.dtype), ids.gather(1, src)[:, :-1]], 1
    )
    dec_mask = valid.long()
    dec_in = torch.where(dec_mask.bool(), dec_in, torch.full_like(dec_in, pad_id))
    keep = int(pre_mask.sum(1).max())
    return pre[:, :keep], pre_mask[:, :keep], dec_in, dec_mask, target


def phrase_contrast_loss(logits: Tensor, labels: Tensor, image: Tensor) -> Tensor:
    """Phrase-level negatives for PTA: a patch of object ``a`` must score higher under ``a``'s phrase
    than under the phrase of any other object of the same image.

    BCE alone counts the other objects' patches as negatives no harder than the background, so a
    text-blind "objectness" ranking already earns most of it; this term rewards only what tells the
    objects of one image apart. logits, labels: (P, N); image: (P,) -> scalar (0 with a graph when no
    image has two phrases). For each patch under exactly one phrase's box, cross-entropy over the
    image's phrases (softmax over their logits at that patch) toward the phrase whose box it is in.
    """
    lg = logits.float()
    same = image[:, None] == image[None, :]  # (P, P), includes the row itself
    pos = labels.bool()
    exclusive = pos & ((pos.float().unsqueeze(0) * same.unsqueeze(-1).float()).sum(1) == 1)  # (P, N)
    multi = same.sum(1) > 1
    target = exclusive & multi[:, None]
    if not bool(target.any()):
        return lg.sum() * 0.0
    other = lg.unsqueeze(0).expand(lg.shape[0], -1, -1).masked_fill(~same.unsqueeze(-1), float("-inf"))
    lse = torch.logsumexp(other, dim=1)  # (P, N) over the phrases of the row's image
    return (lse - lg)[target].mean()


def other_object_weight(labels: Tensor, union: Tensor, weight: float) -> Tensor | None:
    """Per-patch BCE weights for phrase queries: ``weight`` on the patches of the image's other objects
    (in ``union``, not in the phrase's own box), 1 elsewhere; None when ``weight`` is 1.

    A selector that keeps the queried object and then the other objects before the background is
    text-blind past the first object (specificity ~0 at any keep ratio above the object's area); plain
    BCE prices such a ranking like any other negative, this prices it ``weight`` times higher.
    labels, union: (P, N) 0/1 -> (P, N) float or None.
    """
    if weight == 1.0:
        return None
    others = union.bool() & ~labels.bool()
    return 1.0 + (weight - 1.0) * others.float()


@dataclass
class StepOutput:
    loss: Tensor
    losses: dict[str, Tensor]
    sim: Tensor | None = None  # (B, B) ITC similarity, for inspection
    neg_txt: Tensor | None = None
    neg_img: Tensor | None = None
    itm_kept: Tensor | None = None  # (3B or 2B, K) kept patches of [positive; negative pairs]
    events: dict[str, int] = field(default_factory=dict)  # e.g. {"itm_skipped": 1}, for the run summary


class PretrainObjective(nn.Module):
    """All pre-training losses for one batch; wrap this module with DDP/FSDP."""

    def __init__(
        self,
        model: COPAModel,
        weights: dict[str, float],
        mlm_prob: float = 0.15,
        pta_pos_weight: float = 2.0,
        pta_contrast: float = 0.0,
        itm_negatives: str = "both",
        pta_other_weight: float = 1.0,
    ) -> None:
        super().__init__()
        unknown = set(weights) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; known: {LOSS_NAMES}")
        self.model = model
        self.weights = {k: float(weights.get(k, 0.0)) for k in LOSS_NAMES}
        self.itc_loss = ITCLoss()
        self.mlm_prob = mlm_prob
        self.pta_pos_weight = pta_pos_weight
        self.pta_contrast = pta_contrast
        self.pta_other_weight = pta_other_weight
        self.itm_negatives = itm_negatives
        tok = model.tokenizer
        self.cls_id, self.sep_id, self.pad_id, self.mask_id = (
            tok.cls_token_id,
            tok.sep_token_id,
            tok.pad_token_id,
            tok.mask_token_id,
        )
        self.vocab = tok.vocab_size

    def _special(self, ids: Tensor) -> Tensor:
        return (ids == self.cls_id) | (ids == self.sep_id) | (ids == self.pad_id)

    def forward(self, batch) -> StepOutput:
        m, w = self.model, self.weights
        losses: dict[str, Tensor] = {}
        ids, mask = batch.caption_ids, batch.caption_mask
        prefix = m.image_prefix(batch.images)  # (B, 1+N, D): once per image per step
        txt = m.text_states(ids, mask)
        txt_cls = m.text_query(txt, mask)
        sim = neg_txt = neg_img = itm_kept = None
        events: dict[str, int] = {}

        if w["itc"] or w["itm"]:
            img_feat = m.itc_image(m.image_tokens(prefix).cls)  # text-agnostic query
            txt_feat = m.itc_text(txt_cls)
            losses["itc"], sim = self.itc_loss(img_feat, txt_feat, m.itc_scale, batch.image_ids)

        if w["itm"]:
            b = ids.shape[0]
            ar = torch.arange(b, device=ids.device)
            # one distinct image (e.g. an ALBEF list with one entry per caption) has no negative: the
            # pairs still run, so every DDP/FSDP rank calls the same modules, but ITM weighs 0 here
            skip_itm = not bool((batch.image_ids != batch.image_ids[0]).any())
            if skip_itm:
                neg_txt, neg_img = ar, ar
                events["itm_skipped"] = 1
            else:
                neg_txt, neg_img = sample_hard_negatives(sim, batch.image_ids)
            if self.itm_negatives == "both":  # positive, (image, hard text), (hard image, text)
                img_idx, txt_idx = torch.cat([ar, ar, neg_img]), torch.cat([ar, neg_txt, ar])
            else:  # even rows pair their image with a hard text, odd rows their text with a hard image
                even = ar % 2 == 0
                img_idx = torch.cat([ar, torch.where(even, ar, neg_img)])
                txt_idx = torch.cat([ar, torch.where(even, neg_txt, ar)])
            vis = m.image_tokens(prefix[img_idx], txt_cls[txt_idx])
            fused = m.fuse(vis, txt[txt_idx], mask[txt_idx])
            itm_kept = vis.kept
            n_neg = img_idx.shape[0] - b
            labels = torch.cat([torch.ones(b), torch.zeros(n_neg)]).long().to(ids.device)
            losses["itm"] = F.cross_entropy(m.itm_logits(fused).float(), labels) * (0.0 if skip_itm else 1.0)

        if w["mlm"]:
            mids, mlabels = mask_tokens(
                ids, mask, self.vocab, self.mask_id, self._special(ids), self.mlm_prob
            )
            mtxt = m.text_states(mids, mask)
            fused = m.fuse(m.image_tokens(prefix, m.text_query(mtxt, mask)), mtxt, mask)
            chosen = mlabels != -100  # the vocabulary projection runs on masked positions only
            logits = m.mlm_logits(fused.text[chosen])
            losses["mlm"] = F.cross_entropy(logits.float(), mlabels[chosen])

        if w["prefix_lm"]:
            pids, pmask, dec_in, dec_mask, target = split_prefix(
                ids, mask, self.cls_id, self.sep_id, self.pad_id
            )
            ptxt = m.text_states(pids, pmask)
            fused = m.fuse(m.image_tokens(prefix, m.text_query(ptxt, pmask)), ptxt, pmask)
            ctx, cmask = fused.context()
            h = m.decode(dec_in, dec_mask, ctx, cmask)
            valid = target != -100
            logits, slots = m.lm_target_logits(h[valid], target[valid])
            losses["prefix_lm"] = F.cross_entropy(logits.float(), slots)

        if w["pta"]:
            losses["pta"] = self.pta_loss(prefix, batch)

        if not losses:
            raise ValueError(f"every pre-training loss has weight 0: {w}")
        total = sum(w[k] * v for k, v in losses.items())
        return StepOutput(total, losses, sim, neg_txt, neg_img, itm_kept, events)

    def pta_loss(self, prefix: Tensor, batch, phrase_query: Tensor | None = None) -> Tensor:
        """BCE of first-stage selector logits vs patch labels, for phrase queries and the
        text-agnostic query (union of boxes). Zero (with a graph) when no sample carries boxes or the
        selector has no parameters to train. ``phrase_query`` (P, Dt): the phrases' pooled text,
        when the caller already has it (a frozen text encoder); else computed here."""
        zero = prefix.sum() * 0.0
        if not any(p.requires_grad for p in self.model.selector_parameters()):
            return zero
        out = pta_logits(self.model, prefix, batch, phrase_query)
        parts = []
        if out.phrase is not None:
            weight = other_object_weight(
                batch.phrase_labels, batch.union_labels[batch.phrase_image], self.pta_other_weight
            )
            loss = bce_patch_loss(out.phrase, batch.phrase_labels, self.pta_pos_weight, weight)
            if self.pta_contrast:
                loss = loss + self.pta_contrast * phrase_contrast_loss(
                    out.phrase, batch.phrase_labels, batch.phrase_image
                )
            parts.append(loss)
        if out.agnostic is not None:
            parts.append(bce_patch_loss(out.agnostic, batch.union_labels[out.boxed], self.pta_pos_weight))
        return sum(parts) / len(parts) if parts else zero


@dataclass
class PTALogits:
    """First-stage selector logits for one batch's PTA targets: ``phrase`` (P, N), each phrase on
    its own image (None without phrases); ``agnostic`` (Bb, N), the text-agnostic query on the
    ``boxed`` (Bb,) images that carry boxes (None when none does)."""

    phrase: Tensor | None
    agnostic: Tensor | None
    boxed: Tensor


def phrase_queries(model: COPAModel, batch) -> Tensor:
    """The pooled text (P, Dt) of a batch's P phrases, the selector's queries in PTA."""
    return model.text_query(model.text_states(batch.phrase_ids, batch.phrase_mask), batch.phrase_mask)


def pta_logits(model: COPAModel, prefix: Tensor, batch, phrase_query: Tensor | None = None) -> PTALogits:
    """The selector logits PTA scores (``pta_loss``) and measures (``trainer.pta_batch``):
    prefix (B, 1+N, D) from ``model.image_prefix(batch.images)``; ``phrase_query`` (P, Dt) from
    ``phrase_queries`` (computed here when None). The model must have selectors."""
    phrase = agnostic = None
    if batch.phrase_ids.shape[0] > 0:
        q = phrase_queries(model, batch) if phrase_query is None else phrase_query
        phrase = model.selector_logits(prefix[batch.phrase_image], q)
    boxed = batch.has_boxes.nonzero().squeeze(1)
    if boxed.numel() > 0:
        agnostic = model.selector_logits(prefix[boxed], None)
    return PTALogits(phrase, agnostic, boxed)
