"""Compact transformer building blocks shared by the ViT, the fusion encoder and the decoder.

All attention goes through ``attention``, which picks the fastest kernel for the device, dtype
and sequence length (plain matmul + softmax, or SDPA: FlashAttention / memory-efficient / CPU flash).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def patch_centres(index: Tensor, grid: int) -> Tensor:
    """index (B, K) row-major patch indices on a ``grid`` x ``grid`` grid -> (B, K, 2) float32 (x, y)
    of each patch's centre, normalised to (0, 1)."""
    col = torch.remainder(index, grid)
    row = torch.div(index, grid, rounding_mode="floor")
    return (torch.stack([col, row], -1).float() + 0.5) / grid


class QuickGELU(nn.Module):
    """CLIP's sigmoid approximation of GELU."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r} (expected 'gelu' or 'quick_gelu')")


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, H*d) -> (B, H, L, d)"""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, L, d) -> (B, L, H*d)"""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention. q: (B, H, Lq, d), k/v: (B, H, Lk, d), mask: bool, True = attend.

    On the CPU in bf16, PyTorch's fused SDPA kernel is slower than plain matmul + softmax for short
    sequences and for every training backward (measured on 2 cores, fwd+bwd of (32, 6, 65, 64):
    28.8 ms fused vs 6.3 ms plain; (8, 12, 257, 64): 79.6 vs 37.3 ms), so those cases take the plain
    path; long-sequence inference and every GPU case take SDPA (FlashAttention / efficient kernels).
    """
    cpu_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16
    if cpu_bf16 and (torch.is_grad_enabled() or k.shape[2] <= 128):
        att = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        return att.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def key_padding_mask(mask: Tensor | None) -> Tensor | None:
    """(B, L) 1 = attend -> boolean (B, 1, 1, L) for SDPA; None stays None."""
    if mask is None:
        return None
    return mask.bool()[:, None, None, :]


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (ViT / CLIP layout)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Queries and keys, each (B, H, L, d); used by attention-based selectors."""
        q, k, _ = self.qkv(x).chunk(3, dim=-1)
        return split_heads(q, self.heads), split_heads(k, self.heads)

    def keys(self, x: Tensor) -> Tensor:
        """Keys alone, (B, L, D) -> (B, H, L, d): only the key rows of the fused projection run."""
        d = x.shape[-1]
        w = self.qkv.weight[d : 2 * d]
        b = None if self.qkv.bias is None else self.qkv.bias[d : 2 * d]
        return split_heads(F.linear(x, w, b), self.heads)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, L, D), mask: (B, L) or None -> (B, L, D)"""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        out = attention(q, k, v, key_padding_mask(mask))
        return self.proj(merge_heads(out))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a whole sample with probability p
    and scale the surviving samples by 1 / (1 - p); the identity in eval mode."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, ...) -> same shape"""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)); both branches with
    stochastic depth ``drop_path``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        eps: float = 1e-6,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act)
        self.drop_path = DropPath(drop_path)

    def attention_scores(self, x: Tensor, queries: int = 1) -> Tensor:
        """Scaled dot products of this block's attention from the first ``queries`` tokens of x to
        the others: x (B, Q+N, D) -> (B, H, Q, N). For the attention-based selectors.

        They run outside the block's forward, so under FSDP this method is registered as a forward
        method (``copa.train.loop.shard_fsdp``) and the sharded weights are gathered for it too.
        """
        q, k = self.attn.qk(self.norm1(x))
        return (q[:, :, :queries] @ k[:, :, queries:].transpose(-1, -2)) * q.shape[-1] ** -0.5

    def attention_keys(self, x: Tensor) -> Tensor:
        """This block's attention keys of x: (B, L, D) -> (B, H, L, d). For token merging (``tome``),
        which matches tokens by key similarity; registered for FSDP like ``attention_scores``."""
        return self.attn.keys(self.norm1(x)).contiguous()  # not a view: FSDP hooks its outputs

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L, D) -> (B, L, D)"""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class KVCache:
    """Per-layer key/value cache for incremental decoding.

    ``self_kv[i]`` grows by one step per call; ``cross_kv[i]`` holds the projected encoder states,
    computed once. ``reorder`` follows beam search's choice of parents.
    """

    def __init__(self, layers: int) -> None:
        self.self_kv: list[tuple[Tensor, Tensor] | None] = [None] * layers
        self.cross_kv: list[tuple[Tensor, Tensor] | None] = [None] * layers

    @property
    def length(self) -> int:
        kv = self.self_kv[0]
        return 0 if kv is None else kv[0].shape[2]

    def reorder(self, index: Tensor) -> None:
        """index: (B',) rows of the current batch to keep, in order."""
        self.self_kv = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.self_kv]
        self.cross_kv = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.cross_kv]


class BertAttention(nn.Module):
    """BERT-layout attention (separate q/k/v, output dense + residual + post-LayerNorm).

    Used for self- and cross-attention in the fusion encoder and the decoder, so that BERT layers
    load into it one-to-one.
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, eps: float = 1e-12) -> None:
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim, dim)
        self.value = nn.Linear(kv_dim, dim)
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def project_kv(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """ctx: (B, S, Dk) -> keys, values, each (B, H, S, d)"""
        return split_heads(self.key(ctx), self.heads), split_heads(self.value(ctx), self.heads)

    def forward(
        self,
        x: Tensor,
        ctx: Tensor | None = None,
        ctx_mask: Tensor | None = None,
        causal: bool = False,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x: (B, L, D); ctx: (B, S, Dk) or None for self-attention; ctx_mask: (B, S) -> (B, L, D).

        ``kv`` supplies precomputed keys/values (cross-attention cache, or cached past + present for
        incremental causal self-attention, in which case no causal mask is needed for one new step).
        """
        q = split_heads(self.query(x), self.heads)
        if kv is None:
            k, v = self.project_kv(x if ctx is None else ctx)
        else:
            k, v = kv
        mask = key_padding_mask(ctx_mask)
        if causal and q.shape[2] > 1:
            s, lq = k.shape[2], q.shape[2]
            tri = torch.ones(lq, s, dtype=torch.bool, device=x.device).tril(diagonal=s - lq)
            mask = tri if mask is None else mask & tri
        out = attention(q, k, v, mask)
        return self.norm(x + self.dense(merge_heads(out)))


class BertFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


class BertStyleLayer(nn.Module):
    """Post-norm BERT layer: self-attention -> optional cross-attention -> FFN.

    With ``cross=False`` (or no context given) it computes exactly what a ``transformers``
    ``BertLayer`` computes, which is how fusion and decoder layers are initialised from BERT.
    """

    def __init__(
        self, dim: int, heads: int, hidden: int, cross: bool = False, ctx_dim: int | None = None
    ) -> None:
        super().__init__()
        self.attn = BertAttention(dim, heads)
        self.cross = BertAttention(dim, heads, kv_dim=ctx_dim) if cross else None
        self.ffn = BertFFN(dim, hidden)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        ctx: Tensor | None = None,
        ctx_mask: Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        index: int = 0,
    ) -> Tensor:
        """x: (B, L, D), mask: (B, L); ctx: (B, S, Dc), ctx_mask: (B, S) -> (B, L, D)"""
        if cache is not None:
            k, v = self.attn.project_kv(x)
            past = cache.self_kv[index]
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            cache.self_kv[index] = (k, v)
            x = self.attn(x, ctx_mask=mask, causal=causal, kv=(k, v))
        else:
            x = self.attn(x, ctx_mask=mask, causal=causal)
        if self.cross is not None and ctx is not None:
            kv = None
            if cache is not None:
                if cache.cross_kv[index] is None:
                    cache.cross_kv[index] = self.cross.project_kv(ctx)
                kv = cache.cross_kv[index]
            x = self.cross(x, ctx, ctx_mask, kv=kv)
        return self.ffn(x)
