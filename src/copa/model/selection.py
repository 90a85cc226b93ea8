"""Patch selection: the Text-aware Patch Detector (TPD) and the baseline selectors.

Every selector maps the tokens entering a selection point, ``x: (B, 1+N, D)`` (image [CLS] first),
and an optional text query ``t: (B, Dt)`` to patch logits ``(B, N)``. ``select_and_fuse`` keeps the
top-K patches by logit with ``topk``-style sorting and ``gather`` (no masks, so the pruned sequence
is really shorter in training too) and fuses the dropped ones into one token weighted by the
softmax of their logits. The fused-token weights are also how a loss on the output sends gradient
back into the selector.

``tome`` is the exception that merges instead of selecting: ToMe-style bipartite soft matching on
the next block's keys (``TokenMerging``), to the same number of visual tokens and the same layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from copa.model.layers import ViTBlock


def num_keep(n: int, ratio: float) -> int:
    """K = ceil(ratio * N), clamped to [1, N]."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
    return max(1, min(n, math.ceil(ratio * n - 1e-9)))


@dataclass
class Selection:
    """What one selection stage did.

    - ``logits``: (B, N_s) selector logits of the candidate patches (sigmoid gives TPD scores);
    - ``candidates``: (B, N_s) original patch index (0..N-1) of each candidate;
    - ``kept``: (B, K) original patch indices kept, best first;
    - ``fuse_weights``: (B, N_s - K) softmax weights of the dropped patches in the fused token;
    - ``sizes``: (B, K(+1)) merging selectors only: how many original patches each output visual token
      (kept slots, then the fused slot) stands for; None for the selecting ones (1 per kept token).
    """

    logits: Tensor
    candidates: Tensor
    kept: Tensor
    fuse_weights: Tensor | None
    sizes: Tensor | None = None


def select_and_fuse(
    x: Tensor,
    logits: Tensor,
    k: int,
    fuse: bool = True,
    fused_prev: tuple[Tensor, float] | None = None,
    straight_through: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Keep the top-k patches of ``x`` and fuse the rest.

    x: (B, 1+N, D) with [CLS] first; logits: (B, N). ``fused_prev`` = (token (B, 1, D), alpha) is
    the fused token of an earlier stage and the share alpha of all dropped patches it stands for;
    the new fused token is the count-weighted mean of both, so it still averages every dropped patch.
    ``straight_through`` multiplies each kept token by ``1 + sigmoid(l) - sigmoid(l).detach()``:
    the forward pass is unchanged (the factor is exactly 1), but every loss on the output now sends
    gradient into the kept patches' logits, which ``gather`` alone never does.
    Returns (out, order, weights): out (B, 1+K+1, D) = [CLS, kept, fused] (no fused token when
    ``fuse`` is False or K = N); order (B, N) positions sorted by logit, best first; weights (B, N-K).
    """
    b, n1, d = x.shape
    n = n1 - 1
    cls, patches = x[:, :1], x[:, 1:]
    _, order = logits.sort(dim=1, descending=True)
    keep_idx = order[:, :k]
    kept = patches.gather(1, keep_idx.unsqueeze(-1).expand(b, k, d))
    if straight_through and torch.is_grad_enabled() and logits.requires_grad:
        s = torch.sigmoid(logits.gather(1, keep_idx).float())
        kept = kept * (1.0 + (s - s.detach())).to(kept.dtype).unsqueeze(-1)  # exactly 1 forward
    if not fuse or k == n:
        return torch.cat([cls, kept], dim=1), order, None
    drop_idx = order[:, k:]
    weights = logits.gather(1, drop_idx).float().softmax(dim=1).to(x.dtype)  # (B, N-K)
    dropped = patches.gather(1, drop_idx.unsqueeze(-1).expand(b, n - k, d))
    fused = torch.bmm(weights.unsqueeze(1), dropped)  # (B, 1, D)
    if fused_prev is not None:
        fused = fused_prev[1] * fused_prev[0] + (1.0 - fused_prev[1]) * fused
    return torch.cat([cls, kept, fused], dim=1), order, weights


class Selector(nn.Module):
    """Interface: ``forward(x, query, block) -> logits (B, N)``.

    A selector with ``merges = True`` also builds the output tokens itself (``TokenMerging.merge``)
    instead of ``select_and_fuse``; its logits still rank the patches (for ``kept`` and PTA metrics).
    """

    needs_text: bool = False
    merges: bool = False

    def forward(self, x: Tensor, query: Tensor | None, block: ViTBlock) -> Tensor:  # pragma: no cover
        raise NotImplementedError


TPD_FORMS = ("additive", "bilinear", "film")


class TPD(Selector):
    """Text-aware Patch Detector: patch logits from LN-normalised patch tokens and a text query.

    ``form`` chooses how the text enters (all three share the patch branch ``fc_patch`` on
    ``LN(v_i)`` and the text projection ``W t``):

    - ``additive`` (the paper's ``s_i = sigmoid(MLP([LN(v_i); W t]))``): the first MLP layer on the
      concatenation, split into a patch part and a text part computed once per sample. The text
      can only add the same vector to every patch's hidden state, so a text-blind "objectness"
      ranking is the easy optimum (measured: text specificity ~0).
    - ``bilinear``: ``p_i . q / sqrt(h) + o(p_i)``, a patch embedding ``p_i = MLP(LN(v_i))`` matched
      against a text embedding ``q``, plus a text-independent objectness term ``o``; "this patch
      matches this text" is one dot product.
    - ``film``: the text scales and shifts the patch hidden state,
      ``MLP(GELU(fc_patch(LN v_i) * (1 + g(t)) + b(t)))``.

    Without a text, the query is a learned vector (text-agnostic mode).
    """

    needs_text = True

    def __init__(self, dim: int, text_dim: int, hidden: int, form: str = "additive") -> None:
        super().__init__()
        if form not in TPD_FORMS:
            raise ValueError(f"unknown TPD form {form!r}; expected one of {TPD_FORMS}")
        self.form = form
        self.norm = nn.LayerNorm(dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.fc_patch = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        if form == "additive":
            self.fc_text = nn.Linear(dim, hidden, bias=False)
            self.fc_out = nn.Linear(hidden, 1)
        elif form == "bilinear":
            self.fc_embed = nn.Linear(hidden, hidden)
            self.fc_text = nn.Linear(dim, hidden)
            self.fc_out = nn.Linear(hidden, 1)  # objectness
        else:
            self.fc_text = nn.Linear(dim, 2 * hidden)
            self.fc_out = nn.Linear(hidden, 1)
        self.agnostic_query = nn.Parameter(torch.randn(text_dim) * 0.02)

    def forward(self, x: Tensor, query: Tensor | None, block: ViTBlock | None = None) -> Tensor:
        """x: (B, 1+N, D), query: (B, Dt) or None -> logits (B, N)"""
        if query is None:
            query = self.agnostic_query.to(x.dtype).expand(x.shape[0], -1)
        t = self.fc_text(self.text_proj(query))  # (B, hidden) or (B, 2 hidden) for film
        h = self.fc_patch(self.norm(x[:, 1:]))  # (B, N, hidden)
        if self.form == "additive":
            return self.fc_out(self.act(h + t.unsqueeze(1))).squeeze(-1)
        if self.form == "bilinear":
            p = self.fc_embed(self.act(h))  # (B, N, hidden)
            match = (p @ t.unsqueeze(-1)).squeeze(-1) / math.sqrt(p.shape[-1])
            return match + self.fc_out(p).squeeze(-1)
        gain, shift = t.unsqueeze(1).chunk(2, dim=-1)
        return self.fc_out(self.act(h * (1.0 + gain) + shift)).squeeze(-1)


def _attention_logits(scores: Tensor) -> Tensor:
    """scores: (B, H, 1, N) scaled q.k -> log of head-averaged attention probabilities (B, N)."""
    att = scores.squeeze(2).float().softmax(dim=-1).mean(dim=1)
    return att.clamp_min(1e-12).log().to(scores.dtype)


class ClsAttention(Selector):
    """EViT: keep the patches the image [CLS] attends to most in the next block (no parameters)."""

    def forward(self, x: Tensor, query: Tensor | None, block: ViTBlock) -> Tensor:
        return _attention_logits(block.attention_scores(x))  # a block method: FSDP gathers its weights


class TextAttention(Selector):
    """TRIPS: the text [CLS] queries the patch keys through the next block's own query projection.

    Adds parameters only when the text width differs from the vision width (a projection).
    Without a text it falls back to image-[CLS] attention.
    """

    needs_text = True

    def __init__(self, dim: int, text_dim: int) -> None:
        super().__init__()
        self.text_proj = nn.Identity() if dim == text_dim else nn.Linear(text_dim, dim)

    def forward(self, x: Tensor, query: Tensor | None, block: ViTBlock) -> Tensor:
        if query is None:
            return ClsAttention.forward(self, x, None, block)  # type: ignore[arg-type]
        tq = self.text_proj(query).unsqueeze(1).to(x.dtype)  # (B, 1, D)
        # one call for the text query and the patches (LN and projections act per token)
        return _attention_logits(block.attention_scores(torch.cat([tq, x[:, 1:]], dim=1)))


class RandomSelector(Selector):
    """K patches uniformly at random: the baseline many token-reduction methods fail to beat.

    Logits are i.i.d. uniform per sample and patch, drawn from a private generator seeded once, so
    an evaluation is repeatable; no parameters, text ignored.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self._gen: dict[str, torch.Generator] = {}

    def forward(self, x: Tensor, query: Tensor | None, block: ViTBlock | None = None) -> Tensor:
        key = str(x.device)
        if key not in self._gen:
            self._gen[key] = torch.Generator(device=x.device).manual_seed(self.seed)
        b, n = x.shape[0], x.shape[1] - 1
        return torch.rand(b, n, generator=self._gen[key], device=x.device).to(x.dtype)


# ------------------------------------------------------------------------------ token merging (ToMe)
def _merge_round(
    metric: Tensor, sizes: Tensor, rep: Tensor, assign: Tensor, r: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One round of bipartite soft matching: merge ``r`` tokens of set A into their best match in B.

    metric: (B, n, c) size-weighted mean keys of the current tokens; sizes: (B, n) patches per token;
    rep: (B, n) input index of the token each current token still is (its representative);
    assign: (B, n0) current token of each of the n0 input tokens.
    A = even positions, B = odd positions (positions ordered by representative, so both sets are
    spread over the image). Each A token's edge goes to its most cosine-similar B token; the ``r``
    A tokens with the most similar edges are merged (ties: the earlier A token first).
    Returns (metric, sizes, rep, assign) after the round, each with n - r tokens, and ``gone``:
    (B, r) the representatives merged away, in merge order.
    """
    b, n, c = metric.shape
    a_m, b_m = metric[:, 0::2], metric[:, 1::2]
    sim = F.normalize(a_m, dim=-1) @ F.normalize(b_m, dim=-1).transpose(1, 2)  # (B, nA, nB)
    best, dst = sim.max(dim=-1)  # (B, nA)
    edges = best.argsort(dim=-1, descending=True, stable=True)
    src = 2 * edges[:, :r]  # (B, r) current index of each merged A token
    tgt = 2 * dst.gather(1, edges[:, :r]) + 1  # (B, r) current index of its B match
    ar = torch.arange(n, device=metric.device).expand(b, n)
    alive = torch.ones(b, n, dtype=torch.bool, device=metric.device).scatter(1, src, False)
    survivors = ar[alive].view(b, n - r)  # current indices of the tokens that remain
    new = survivors.gather(1, rep.gather(1, survivors).argsort(dim=1))  # ordered by representative
    pos = torch.empty_like(ar).scatter(1, new, torch.arange(n - r, device=metric.device).expand(b, -1))
    pos = pos.scatter(1, src, pos.gather(1, tgt))  # a merged token goes where its match goes
    s_src = sizes.gather(1, src)
    merged_sizes = sizes.scatter_add(1, tgt, s_src)
    moved = metric.gather(1, src.unsqueeze(-1).expand(b, r, c)) * s_src.unsqueeze(-1)
    weighted = (metric * sizes.unsqueeze(-1)).scatter_add(1, tgt.unsqueeze(-1).expand(b, r, c), moved)
    merged_metric = weighted / merged_sizes.unsqueeze(-1)
    return (
        merged_metric.gather(1, new.unsqueeze(-1).expand(b, n - r, c)),
        merged_sizes.gather(1, new),
        rep.gather(1, new),
        pos.gather(1, assign),
        rep.gather(1, src),
    )


@torch.no_grad()
def bipartite_merge_plan(metric: Tensor, sizes: Tensor, target: int) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching (Bolya et al., ICLR 2023), repeated until ``target`` tokens remain.

    metric: (B, n, c) token keys; sizes: (B, n) patches each token stands for (1 for raw patches).
    One round can merge at most the ceil(n/2) tokens of set A, so reaching ``target`` < n/2 takes
    several rounds; each round merges as many tokens as it can (all of A) until the last one, which
    merges the ``r`` best edges that land exactly on ``target``. The merged metric is the size-weighted
    mean of its members' metrics. This schedule makes the merge of any target a prefix of the merge
    down to 1 token, so one ranking serves every target.

    Returns
    - ``rank``: (B, n) float32 in [0, 1], the position of each token in the merge order down to 1
      token, normalised (merged first = 0, the last survivor = 1): the top-M by rank are exactly the
      representatives of a merge down to M tokens;
    - ``group``: (B, n) long, which output token (0..target-1) each input token is merged into;
    - ``rep``: (B, target) long, the input token each output token is, best rank first (so output
      token j is the group of ``rep[:, j]``).
    """
    b, n, _ = metric.shape
    if not 1 <= target <= n:
        raise ValueError(f"merge target must be in 1..{n}, got {target}")
    dev = metric.device
    m, s = metric.float(), sizes.float()
    rep = torch.arange(n, device=dev).expand(b, n)
    assign = rep
    order = torch.full((b, n), n - 1, dtype=torch.long, device=dev)  # the last survivor stays n - 1
    done, snap = 0, None
    while m.shape[1] > 1:
        cur = m.shape[1]
        na = (cur + 1) // 2
        if snap is None and target >= cur - na:  # the target lies within this round
            snap = _merge_round(m, s, rep, assign, cur - target)[2:4]
        m, s, rep, assign, gone = _merge_round(m, s, rep, assign, na)
        order = order.scatter(1, gone, done + torch.arange(na, device=dev).expand(b, -1))
        done += na
    if snap is None:  # target 1
        snap = (rep, assign)
    rank = order.float() / max(1, n - 1)
    t_rep, t_assign = snap
    best_first = rank.gather(1, t_rep).argsort(dim=1, descending=True)
    inverse = best_first.argsort(dim=1)
    return rank, inverse.gather(1, t_assign), t_rep.gather(1, best_first)


def merge_tokens(x: Tensor, sizes: Tensor, group: Tensor, rep: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted averages of the groups of a merge plan.

    x: (B, n, D) tokens; sizes: (B, n); group: (B, n) output token of each input token; rep: (B, M)
    representative input token of each output token. -> (merged (B, M, D), merged sizes (B, M)).
    Computed as ``x_rep + sum_i (s_i / S) (x_i - x_rep)``, equal to ``sum_i s_i x_i / S``, but exact
    where the members are identical (their differences are exactly zero).
    """
    b, n, d = x.shape
    m = rep.shape[1]
    total = torch.zeros(b, m, dtype=sizes.dtype, device=x.device).scatter_add(1, group, sizes)  # (B, M)
    base = x.gather(1, rep.unsqueeze(-1).expand(b, m, d))  # (B, M, D)
    idx = group.unsqueeze(-1).expand(b, n, d)
    share = (sizes / total.gather(1, group)).to(x.dtype).unsqueeze(-1)  # (B, n, 1)
    delta = torch.zeros_like(base).scatter_add(1, idx, (x - base.gather(1, idx)) * share)
    return base + delta, total


class TokenMerging(Selector):
    """ToMe-style merging (Bolya et al., ICLR 2023) to the same number of visual tokens as selection.

    Written from the paper's description: tokens are matched by the cosine similarity of the next
    block's attention keys (mean over heads), by bipartite soft matching (``bipartite_merge_plan``),
    and merged into size-weighted averages (``merge_tokens``); no parameters, no text. Where the
    selectors keep K patches and fuse the rest into one token, this merges the N candidates into K+1
    groups (K without a fused token) and keeps the layout ``[CLS, K tokens, fused]``: the K groups with
    the best-ranked representatives fill the kept slots (``kept`` = their representatives' patch
    indices, which the grounding head reads as positions) and the last group fills the fused slot,
    size-weighted with an earlier stage's fused token. Patch sizes carry over between stages
    (``Selection.sizes``). Proportional attention (ToMe's ``+ log s`` in the following blocks'
    attention) is not implemented: every later block, the fusion encoder and the decoder attend to
    the merged tokens as plain tokens, as they do to the selectors' fused token.

    ``forward`` gives the ranking logits of a merge down to one token (float32, in [0, 1]): the top-M
    patches by logit are the representatives of a merge down to M, so the PTA metrics (object-patch
    recall, specificity) measure what merging keeps as its own token.
    """

    merges = True

    @staticmethod
    def metric(x: Tensor, block: ViTBlock) -> Tensor:
        """x: (B, n, D) tokens -> (B, n, d) the block's keys, mean over heads."""
        return block.attention_keys(x).mean(dim=1)

    def forward(self, x: Tensor, query: Tensor | None, block: ViTBlock) -> Tensor:
        """x: (B, 1+N, D) -> logits (B, N): rank in the merge order (text ignored)."""
        patches = x[:, 1:]
        ones = torch.ones(patches.shape[:2], device=x.device)
        return bipartite_merge_plan(self.metric(patches, block), ones, 1)[0]

    def merge(
        self,
        x: Tensor,
        block: ViTBlock,
        k: int,
        fuse: bool = True,
        fused_prev: tuple[Tensor, Tensor] | None = None,
        sizes: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Merge the N patches of ``x`` into K kept tokens (+ the fused one).

        x: (B, 1+N, D) with [CLS] first (never merged); k: kept slots; ``fused_prev`` = (an earlier
        stage's fused token (B, 1, D), the patches it stands for (B,)); sizes: (B, N) patches each
        candidate stands for (None: 1 each).
        Returns (out, logits, order, out_sizes): out (B, 1+K+1, D) = [CLS, K merged, fused] (no fused
        token when ``fuse`` is False or K = N); logits (B, N) merge ranks; order (B, N) positions
        sorted by rank, best first (``order[:, :K]`` are the kept slots' representatives);
        out_sizes (B, K(+1)).
        """
        cls, patches = x[:, :1], x[:, 1:]
        b, n, _ = patches.shape
        if sizes is None:
            sizes = torch.ones(b, n, device=x.device)
        sizes = sizes.float()
        target = k + 1 if fuse and k < n else k
        logits, group, rep = bipartite_merge_plan(self.metric(patches, block), sizes, target)
        merged, total = merge_tokens(patches, sizes, group, rep)
        order = logits.argsort(dim=1, descending=True)
        if target == k:
            return torch.cat([cls, merged], dim=1), logits, order, total
        fused, s_fused = merged[:, k:], total[:, k]
        if fused_prev is not None:
            prev, s_prev = fused_prev[0], fused_prev[1].float()
            s_all = s_prev + s_fused
            fused = prev + (s_fused / s_all).to(x.dtype).view(b, 1, 1) * (fused - prev)
            s_fused = s_all
        out_sizes = torch.cat([total[:, :k], s_fused.unsqueeze(1)], dim=1)
        return torch.cat([cls, merged[:, :k], fused], dim=1), logits, order, out_sizes


SELECTORS = ("tpd", "text_attn", "cls_attn", "random", "tome", "none")


def make_selector(name: str, dim: int, text_dim: int, hidden: int, form: str = "additive") -> Selector | None:
    if name == "tpd":
        return TPD(dim, text_dim, hidden, form)
    if name == "text_attn":
        return TextAttention(dim, text_dim)
    if name == "cls_attn":
        return ClsAttention()
    if name == "random":
        return RandomSelector()
    if name == "tome":
        return TokenMerging()
    if name == "none":
        return None
    raise ValueError(f"unknown selector {name!r}; expected one of {', '.join(SELECTORS)}")


def tpd_scores(logits: Tensor) -> Tensor:
    """Selector logits -> scores in [0, 1] (TPD's sigmoid)."""
    return torch.sigmoid(logits.float())


def bce_patch_loss(
    logits: Tensor, labels: Tensor, pos_weight: float = 1.0, weight: Tensor | None = None
) -> Tensor:
    """Patch-Text Alignment loss: BCE between logits (B, N) and 0/1 labels (B, N), patch-averaged;
    ``weight`` (B, N), if given, scales each patch's term."""
    pw = torch.tensor(pos_weight, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), weight=weight, pos_weight=pw)
