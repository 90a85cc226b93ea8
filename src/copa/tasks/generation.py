"""Decoder-side pieces shared by VQA and captioning: the LM loss on target texts, greedy / beam
generation from fused context, and scoring a list of candidate answers by log-likelihood.

Decoder convention (as the pre-training PrefixLM): for a target ``[CLS] w1..wn [SEP]``, the decoder
reads ``[CLS] w1..wn`` and predicts ``w1..wn [SEP]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from copa.model.copa import COPAModel
from copa.model.decoder import beam_search, greedy_search
from copa.model.text import load_tokenizer


def tokenize(model: COPAModel, texts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """(T,) strings -> ids, mask (T, L) long on ``device`` ("[CLS] ... [SEP]", padded)."""
    tok = load_tokenizer(model.cfg.text.tokenizer)
    enc = tok(
        texts, padding="longest", truncation=True, max_length=model.cfg.decoder.max_len, return_tensors="pt"
    )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def target_vocab(model: COPAModel, texts: list[str]) -> list[int]:
    """The sorted token ids of ``texts`` as the decoder's targets ([CLS] ... [SEP]) and [PAD]."""
    tok = load_tokenizer(model.cfg.text.tokenizer)
    ids = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id}
    for start in range(0, len(texts), 4096):
        for row in tok(texts[start : start + 4096])["input_ids"]:
            ids.update(row)
    return sorted(ids)


def shift(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Targets ``[CLS] w.. [SEP] pad`` (B, L) -> decoder input (B, L-1), its mask, labels (B, L-1)
    with -100 on padding."""
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return ids[:, :-1], mask[:, :-1], labels


def token_logprobs(
    model: COPAModel, ctx: Tensor, ctx_mask: Tensor, ids: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Log-probability of every target token. ctx (B, S, D), ctx_mask (B, S), ids/mask (B, L)
    -> (logp (B, L-1) with 0 on padding, -inf for a token outside the model's output vocabulary;
    labels (B, L-1))."""
    dec_in, dec_mask, labels = shift(ids, mask)
    h = model.decode(dec_in, dec_mask, ctx, ctx_mask)
    logits, slots = model.lm_target_logits(h, labels)
    logp = logits.float().log_softmax(-1).gather(-1, slots.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = logp.masked_fill(slots == -1, float("-inf"))
    return logp.masked_fill(labels == -100, 0.0), labels


def lm_loss(model: COPAModel, ctx: Tensor, ctx_mask: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """Mean token cross-entropy of the targets ``ids`` (B, L) given the context; the vocabulary
    projection runs on the real (non-padding) positions only, over the model's output vocabulary.

    Raises:
        ValueError: a target token is outside the model's output vocabulary.
    """
    dec_in, dec_mask, labels = shift(ids, mask)
    h = model.decode(dec_in, dec_mask, ctx, ctx_mask)
    valid = labels != -100
    logits, slots = model.lm_target_logits(h[valid], labels[valid])
    if (slots < 0).any():
        bad = labels[valid][slots < 0].unique()[:5].tolist()
        raise ValueError(
            f"target token ids {bad} are outside the model's output vocabulary "
            f"({len(model.cfg.decoder.output_vocab)} tokens): fine-tune with train.output_vocab=targets "
            "on these targets, or =full"
        )
    return F.cross_entropy(logits.float(), slots)


def _step(model: COPAModel, ctx: Tensor, ctx_mask: Tensor):
    def step(tokens: Tensor, cache, start: int) -> Tensor:
        h = model.decode(tokens, None, ctx, ctx_mask, cache=cache, start=start)
        return model.lm_logits(h[:, -1])

    return step


@torch.no_grad()
def generate(
    model: COPAModel,
    ctx: Tensor,
    ctx_mask: Tensor,
    mode: str = "greedy",
    beam: int = 3,
    max_new: int = 30,
    length_penalty: float = 1.0,
) -> list[str]:
    """Texts decoded from context ctx (B, S, D), ctx_mask (B, S) with greedy or beam search."""
    tok = load_tokenizer(model.cfg.text.tokenizer)
    b = ctx.shape[0]
    bos = torch.full((b, 1), tok.cls_token_id, dtype=torch.long, device=ctx.device)
    if mode == "greedy" or beam <= 1:
        out = greedy_search(
            _step(model, ctx, ctx_mask),
            model.new_decoder_cache(),
            bos,
            max_new,
            tok.sep_token_id,
            tok.pad_token_id,
        )
    elif mode == "beam":
        # the search expects every row repeated per beam (cache, context, prompt)
        step = _step(model, ctx.repeat_interleave(beam, 0), ctx_mask.repeat_interleave(beam, 0))
        out = beam_search(
            step,
            model.new_decoder_cache(),
            bos.repeat_interleave(beam, 0),
            max_new,
            tok.sep_token_id,
            beam=beam,
            length_penalty=length_penalty,
            pad_id=tok.pad_token_id,
        )
    else:
        raise ValueError(f"decode mode must be greedy or beam, got {mode!r}")
    return [t.strip() for t in tok.batch_decode(out.tokens.tolist(), skip_special_tokens=True)]


@torch.no_grad()
def rank_candidates(
    model: COPAModel, ctx: Tensor, ctx_mask: Tensor, cand_ids: Tensor, cand_mask: Tensor, chunk: int = 64
) -> Tensor:
    """Sum log-likelihood of every candidate text for every context row.

    ctx (B, S, D), ctx_mask (B, S); candidates cand_ids / cand_mask (A, L) -> scores (B, A).
    Candidates go through the decoder ``chunk`` at a time, each paired with every context row.
    """
    b, a = ctx.shape[0], cand_ids.shape[0]
    scores = torch.empty(b, a, device=ctx.device)
    for s in range(0, a, chunk):
        ids, mask = cand_ids[s : s + chunk], cand_mask[s : s + chunk]
        n = ids.shape[0]
        # row (i, j) = context i with candidate j
        logp, _ = token_logprobs(
            model,
            ctx.repeat_interleave(n, 0),
            ctx_mask.repeat_interleave(n, 0),
            ids.repeat(b, 1),
            mask.repeat(b, 1),
        )
        scores[:, s : s + n] = logp.sum(1).view(b, n)
    return scores
