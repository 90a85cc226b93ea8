"""Generation: captions may be as long as the references, and every row stops at its own [SEP]."""

from __future__ import annotations

import pytest
import torch

from copa.config import EvalConfig
from copa.model.decoder import beam_search, greedy_search
from copa.tasks import generation


def _scripted(script: list[list[int]], vocab: int):
    """A step function that predicts ``script[row][i]`` as the i-th new token of each row (repeated per
    beam row when there are more rows than scripts)."""

    def step(tokens, cache, start):
        i = start + tokens.shape[1] - 1  # index of the token this call predicts
        rows = tokens.shape[0]
        per = rows // len(script)
        logits = torch.full((rows, vocab), -20.0)
        for r in range(rows):
            seq = script[r // per]
            logits[r, seq[min(i, len(seq) - 1)]] = 0.0
        return logits

    return step


def test_search_stops_each_row_at_sep_and_pads_after_it():
    sep, pad, vocab = 3, 0, 20
    script = [[5, sep, 7, 7, 7, 7], [5, 6, 8, 9, sep, 7], [5] * 17 + [sep]]
    bos = torch.ones(3, 1, dtype=torch.long)
    g = greedy_search(_scripted(script, vocab), None, bos, 30, sep, pad)
    assert g.tokens.shape == (3, 18)  # stops once every row is done, not after 30
    assert g.tokens[0, :2].tolist() == [5, sep] and (g.tokens[0, 2:] == pad).all()
    assert g.tokens[1, :5].tolist() == [5, 6, 8, 9, sep] and (g.tokens[1, 5:] == pad).all()
    assert g.tokens[2, -1] == sep

    class NoCache:
        def reorder(self, index):
            pass

    bos2 = bos.repeat_interleave(2, 0)
    b = beam_search(_scripted(script, vocab), NoCache(), bos2, 30, sep, beam=2, pad_id=pad)
    assert b.tokens[0, :2].tolist() == [5, sep] and (b.tokens[0, 2:] == pad).all()
    assert b.tokens[1, :5].tolist() == [5, 6, 8, 9, sep] and (b.tokens[1, 5:] == pad).all()
    assert b.tokens[2, :18].tolist() == script[2]


def test_captions_are_not_cut_at_12_tokens(micro_model, monkeypatch):
    tok = micro_model.tokenizer
    texts = ["a red circle", "a small blue square to the left of a big green triangle above a yellow star"]
    script = [tok(t, add_special_tokens=False)["input_ids"] + [tok.sep_token_id, 2417, 2417] for t in texts]
    assert len(script[1]) - 3 > 12  # longer than the old limit
    assert EvalConfig().max_new_tokens == 30
    monkeypatch.setattr(generation, "_step", lambda model, ctx, mask: _scripted(script, tok.vocab_size))
    ctx, mask = torch.zeros(2, 1, 8), torch.ones(2, 1, dtype=torch.long)
    for mode in ("greedy", "beam"):
        out = generation.generate(micro_model, ctx, mask, mode, beam=2, max_new=EvalConfig().max_new_tokens)
        assert out == texts, mode


def test_output_vocab_scores_only_its_tokens_and_renormalises(micro_model, tmp_path):
    """A restricted output vocabulary gives the same logits on its tokens, -inf elsewhere, a loss and
    log-probabilities normalised over it, generation inside it, and it travels with a saved model."""
    from copa.model.copa import COPAModel

    m, tok = micro_model, micro_model.tokenizer
    texts = ["a red circle", "two objects: a big green ring and a blue star"]
    ids, mask = generation.tokenize(m, texts, torch.device("cpu"))
    torch.manual_seed(0)
    ctx, cmask = torch.randn(2, 5, m.cfg.text.width), torch.ones(2, 5, dtype=torch.long)
    h = torch.randn(2, 3, m.cfg.text.width)
    with torch.no_grad():
        full = m.lm_logits(h)
        full_logp, _ = generation.token_logprobs(m, ctx, cmask, ids, mask)
    vocab = generation.target_vocab(m, texts)
    assert vocab == sorted(set(ids[mask.bool()].tolist()) | {tok.pad_token_id})
    m.set_output_vocab(vocab)
    assert m.cfg.decoder.output_vocab == vocab
    with torch.no_grad():
        part = m.lm_logits(h)
        logits, slots = m.lm_target_logits(h[0], torch.tensor([vocab[2], -100, tok.mask_token_id]))
        logp, labels = generation.token_logprobs(m, ctx, cmask, ids, mask)
        loss = generation.lm_loss(m, ctx, cmask, ids, mask)
        out = generation.generate(m, ctx, cmask, "greedy", max_new=6)
    inside = torch.zeros(full.shape[-1], dtype=torch.bool)
    inside[vocab] = True
    assert (
        torch.allclose(part[..., inside], full[..., inside], atol=1e-5)
        and torch.isneginf(part[..., ~inside]).all()
    )
    assert logits.shape == (3, len(vocab)) and slots.tolist() == [2, -100, -1]
    # the same scores, renormalised over the listed tokens: every target token is among them
    valid = labels != -100
    norm = torch.logsumexp(full[0, 0, inside], -1) - torch.logsumexp(full[0, 0], -1)
    assert norm < 0 and (logp[valid] >= full_logp[valid] - 1e-4).all()
    assert torch.isclose(-logp[valid].mean(), loss, atol=1e-4)
    assert all(set(tok(t, add_special_tokens=False)["input_ids"]) <= set(vocab) for t in out)
    # a target outside the list: the loss says which token; its log-probability is -inf
    far, far_mask = generation.tokenize(m, ["a purple hexagon"], torch.device("cpu"))
    with pytest.raises(ValueError, match="outside the model's output vocabulary"):
        generation.lm_loss(m, ctx[:1], cmask[:1], far, far_mask)
    with torch.no_grad():
        assert torch.isneginf(generation.token_logprobs(m, ctx[:1], cmask[:1], far, far_mask)[0]).any()
    m.save_pretrained(tmp_path / "m")
    loaded = COPAModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.cfg.decoder.output_vocab == vocab
    with torch.no_grad():
        assert torch.equal(loaded.lm_logits(h), part)
    m.set_output_vocab([])
    with torch.no_grad():
        assert torch.equal(m.lm_logits(h), full)
    with pytest.raises(ValueError, match="sorted distinct"):
        m.set_output_vocab([5, 3])
