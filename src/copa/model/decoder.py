"""Causal decoder with cross-attention to the fused states, a key/value cache, greedy and beam search.

Token embeddings are the text encoder's (passed in by the caller), and the LM head is tied to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from copa.model.layers import BertStyleLayer, KVCache


class Decoder(nn.Module):
    def __init__(self, layers: int, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BertStyleLayer(dim, heads, hidden, cross=True) for _ in range(layers))

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        ctx: Tensor,
        ctx_mask: Tensor | None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x: (B, L, D) embedded tokens; mask: (B, L_total) or None; ctx: (B, S, D) -> (B, L, D).

        With ``cache``, x holds only the new positions and past keys/values come from the cache.
        """
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, ctx=ctx, ctx_mask=ctx_mask, causal=True, cache=cache, index=i)
        return x


# step(tokens (B, L_new), cache, start) -> logits of the next token (B, V)
StepFn = Callable[[Tensor, KVCache, int], Tensor]


@dataclass
class GenerationResult:
    tokens: Tensor  # (B, T) generated ids, padded with pad_id after eos
    scores: Tensor  # (B,) sum of log-probs (beam: length-penalised score)


@torch.no_grad()
def greedy_search(
    step: StepFn, cache: KVCache, bos: Tensor, max_new: int, eos_id: int, pad_id: int = 0
) -> GenerationResult:
    """bos: (B, L0) prompt ids (the cache must be empty) -> greedy continuation."""
    b = bos.shape[0]
    logits = step(bos, cache, 0)
    pos = bos.shape[1]
    out, scores = [], torch.zeros(b, device=bos.device)
    done = torch.zeros(b, dtype=torch.bool, device=bos.device)
    for _ in range(max_new):
        logp = logits.float().log_softmax(-1)
        nxt = logp.argmax(-1)
        scores += torch.where(done, 0.0, logp.gather(1, nxt[:, None]).squeeze(1))
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()):
            break
        logits = step(nxt[:, None], cache, pos)
        pos += 1
    return GenerationResult(torch.stack(out, 1), scores)


@torch.no_grad()
def beam_search(
    step: StepFn,
    cache: KVCache,
    bos: Tensor,
    max_new: int,
    eos_id: int,
    beam: int = 3,
    length_penalty: float = 1.0,
    pad_id: int = 0,
) -> GenerationResult:
    """Beam search; the caller's cache/context must already be expanded to B*beam rows.

    bos: (B*beam, L0) prompt ids. Finished hypotheses are scored ``logp / len**length_penalty``.
    """
    bb, dev = bos.shape[0], bos.device
    b = bb // beam
    logits = step(bos, cache, 0)
    pos = bos.shape[1]
    beam_scores = torch.zeros(b, beam, device=dev)
    beam_scores[:, 1:] = -1e9  # all beams start identical: expand only the first
    seqs = torch.zeros(bb, 0, dtype=torch.long, device=dev)
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(b)]
    for t in range(max_new):
        logp = logits.float().log_softmax(-1)  # (B*beam, V)
        v = logp.shape[-1]
        cand = (beam_scores.view(-1, 1) + logp).view(b, beam * v)
        top_s, top_i = cand.topk(2 * beam, dim=1)
        parent, token = top_i // v, top_i % v
        new_scores = torch.full((b, beam), -1e9, device=dev)
        new_parent = torch.zeros(b, beam, dtype=torch.long, device=dev)
        new_token = torch.full((b, beam), pad_id, dtype=torch.long, device=dev)
        for i in range(b):
            j = 0
            for s, p, tok in zip(top_s[i].tolist(), parent[i].tolist(), token[i].tolist(), strict=True):
                if s < -1e8:
                    break
                if tok == eos_id:
                    hyp = torch.cat([seqs[i * beam + p], seqs.new_tensor([tok])])
                    finished[i].append((s / ((t + 1) ** length_penalty), hyp))
                    continue
                new_scores[i, j], new_parent[i, j], new_token[i, j] = s, p, tok
                j += 1
                if j == beam:
                    break
        rows = (new_parent + torch.arange(b, device=dev)[:, None] * beam).view(-1)
        seqs = torch.cat([seqs[rows], new_token.view(-1, 1)], dim=1)
        beam_scores = new_scores
        cache.reorder(rows)
        if all(len(f) >= beam for f in finished):
            break
        logits = step(new_token.view(-1, 1), cache, pos)
        pos += 1
    tokens, scores = [], []
    for i in range(b):
        hyps = list(finished[i])
        if len(hyps) < beam:  # unfinished beams compete on the same length-penalised score
            for j in range(beam):
                if beam_scores[i, j] > -1e8:
                    hyps.append(
                        (float(beam_scores[i, j]) / (seqs.shape[1] ** length_penalty), seqs[i * beam + j])
                    )
        s, seq = max(hyps, key=lambda h: h[0])
        tokens.append(seq)
        scores.append(s)
    width = max(1, max(len(x) for x in tokens))
    out = torch.full((b, width), pad_id, dtype=torch.long, device=dev)
    for i, seq in enumerate(tokens):
        out[i, : len(seq)] = seq
    return GenerationResult(out, torch.tensor(scores, device=dev))
