"""Vision Transformer with text-aware patch selection inside it.

The encoder is split at the first selection layer into a text-independent *prefix* (patch
embedding + blocks ``0..k-1`` on all N patches) and a text-dependent *suffix* (selection, then the
remaining blocks on K+2 tokens). ``forward_prefix`` runs once per image; ``forward_suffix`` runs per
(prefix, query) pair, so one image's prefix serves its positive text, hard negatives, MLM, PTA
phrases and retrieval candidates. ``forward`` is the composition of both.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from copa.config import SelectConfig, VisionConfig
from copa.model.feature_cache import FrozenFeatureCache
from copa.model.layers import ViTBlock
from copa.model.selection import Selection, make_selector, num_keep, select_and_fuse

log = logging.getLogger(__name__)


def resize_pos_embed(pos: Tensor, new_grid: tuple[int, int], num_prefix: int = 1) -> Tensor:
    """Bicubic interpolation of a (1, P+N, D) position table to a new patch grid (P prefix rows kept)."""
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    n, d = grid.shape[1], grid.shape[2]
    old = round(n**0.5)
    if old * old != n:
        raise ValueError(f"position table has {n} patch rows, not a square grid")
    if (old, old) == tuple(new_grid):
        return pos
    grid = grid.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


@dataclass
class VisionOutput:
    """tokens: (B, T, D) after the final norm, T = 1+K(+1 fused) or 1+N unpruned; ``num_patches``
    is N, the patch count of the input grid (square)."""

    tokens: Tensor
    selections: list[Selection] = field(default_factory=list)
    num_patches: int = 0
    # (B, K) how well each patch of ``tokens[:, 1:1+K]`` matches the text by the model's own first
    # selector, standardised over the image's patches and detached; None unless the ViT is asked for
    # it (``VisionTransformer.relevance``) and given a text query
    relevance: Tensor | None = None

    @property
    def kept(self) -> Tensor | None:
        """(B, K) original indices of the patches that survive every stage; None if unpruned."""
        return self.selections[-1].kept if self.selections else None

    @property
    def cls(self) -> Tensor:
        return self.tokens[:, 0]

    @property
    def patch_index(self) -> Tensor:
        """(B, K) original patch index (row-major on the grid) of ``tokens[:, 1:1+K]``; all N when
        unpruned."""
        if self.selections:
            return self.selections[-1].kept
        b = self.tokens.shape[0]
        return torch.arange(self.num_patches, device=self.tokens.device).expand(b, -1)


@dataclass
class SelectionState:
    """What ``VisionTransformer.swap_selection`` replaces and returns, so it can be put back: the
    selection config (layers, selector options), the selector modules and the live keep ratios."""

    select: SelectConfig
    selectors: nn.ModuleList
    keep_ratios: list[float]


def conv_stem_depth(patch_size: int) -> int:
    """Stride-2 convolutions a conv stem needs for ``patch_size`` (log2 of it); ``ValueError`` when it
    is not a power of two of at least 2."""
    n = patch_size.bit_length() - 1
    if n < 1 or 1 << n != patch_size:
        raise ValueError(f"a conv stem needs a power-of-two patch size, got {patch_size}")
    return n


class ConvStem(nn.Module):
    """Early convolutions in place of the patch embedding (Xiao et al. 2021, "Early Convolutions Help
    Transformers See Better"): log2(p) stride-2 3x3 convolutions, channels doubling up to ``width``,
    each with a BatchNorm and a ReLU, then a 1x1 projection; the same (B, D, H/p, W/p) grid.

    A p x p linear patch embedding must learn every local feature from the loss above it; trained from
    scratch on a few thousand images it converges several times slower (BENCHMARKS.md). BatchNorm, as
    in the paper: GroupNorm measured worse here (validation ITC 2.57 against 1.3 after the same steps).
    A stem whose parameters are frozen stays in eval mode, so its running statistics do not move."""

    def __init__(self, width: int, patch_size: int) -> None:
        super().__init__()
        n = conv_stem_depth(patch_size)
        chans = [3] + [max(8, width >> (n - 1 - i)) for i in range(n)]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            layers += [
                nn.Conv2d(cin, cout, 3, 2, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(chans[-1], width, 1))
        self.layers = nn.Sequential(*layers)

    def train(self, mode: bool = True) -> ConvStem:
        return super().train(mode and any(p.requires_grad for p in self.parameters()))

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, D, H/p, W/p)"""
        return self.layers(images)

    @torch.no_grad()
    def adapt_statistics(self, batches: Iterable[Tensor]) -> int:
        """Replace every BatchNorm's running mean and variance by those of ``batches`` ((B, 3, H, W)
        images of a new domain; one average over all of them) and return how many images were read.
        Weights and the module's mode are unchanged; nothing changes when there is no image."""
        probe = copy.deepcopy(self)
        norms = [m for m in probe.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average, the same whatever the batch order
            m.train()
        n = 0
        for images in batches:
            probe.layers(images)
            n += images.shape[0]
        if n:
            own = [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]
            for mine, new in zip(own, norms, strict=True):
                mine.running_mean.copy_(new.running_mean)
                mine.running_var.copy_(new.running_var)
        return n


def make_stem(cfg: VisionConfig) -> nn.Module:
    """The image -> patch-grid embedding of ``cfg.stem``."""
    if cfg.stem == "conv":
        return ConvStem(cfg.width, cfg.patch_size)
    return nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)


class VisionTransformer(nn.Module):
    def __init__(
        self, cfg: VisionConfig, select: SelectConfig, text_dim: int, relevance: bool = False
    ) -> None:
        super().__init__()
        _check_select(select, cfg.layers)
        self.cfg, self.select_cfg, self.text_dim = cfg, select, text_dim
        d = cfg.width
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embed = make_stem(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid**2, d) * 0.02)
        self.ln_pre = nn.LayerNorm(d, eps=cfg.ln_eps) if cfg.pre_norm else nn.Identity()
        # stochastic depth rising linearly from 0 at the first block to drop_path at the last
        rates = [cfg.drop_path * i / max(1, cfg.layers - 1) for i in range(cfg.layers)]
        self.blocks = nn.ModuleList(
            ViTBlock(d, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps, drop_path=r) for r in rates
        )
        self.norm = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.selectors = _build_selectors(select, select.selector, d, text_dim, len(select.layers))
        self.keep_ratios = list(select.keep_ratios)
        # whether outputs carry ``relevance`` (``model.fusion.relevance``), always by the model's own
        # first selector, also when another selects (ablation rows swap the selection only) or none
        # prunes; a tuple, so the module is not registered twice
        self.relevance = relevance
        self._own_selector: tuple[nn.Module, ...] = tuple(self.selectors[:1])
        self.grad_checkpointing = False
        self.feature_cache: FrozenFeatureCache | None = None
        self.cache_scope = self.prefix_scope = ""
        self._cache_tokens = False
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    # ------------------------------------------------------------------ properties
    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def prefix_depth(self) -> int:
        return self.select_cfg.layers[0]

    @property
    def pruning(self) -> bool:
        return self.selects()

    def set_keep_ratios(self, ratios: float | list[float]) -> None:
        if isinstance(ratios, (int, float)):
            ratios = [float(ratios)] * len(self.select_cfg.layers)
        if len(ratios) != len(self.select_cfg.layers):
            raise ValueError(f"need {len(self.select_cfg.layers)} keep ratios, got {ratios}")
        for r in ratios:
            num_keep(self.num_patches, r)  # validates the range
        self.keep_ratios = list(ratios)

    def set_selection(self, select: SelectConfig) -> None:
        """Move or replace the selection stages (``pretrain --init`` under another ``model.select``).

        The current selectors keep their weights (at the new layers) where the new config builds
        selectors of the same types and parameter shapes; otherwise the freshly built ones are used.
        Everything that reads the selection (prefix depth, keep ratios, the saved config) then agrees
        with ``select``.
        """
        _check_select(select, len(self.blocks))
        if select != self.select_cfg:
            fresh = self.new_selectors(select.selector, len(select.layers), select)
            if _signature(fresh) != _signature(self.selectors):
                self.selectors = fresh
                self._own_selector = tuple(fresh[:1])
        self.select_cfg = select
        self.set_keep_ratios(list(select.keep_ratios))

    def swap_selection(
        self,
        selectors: nn.ModuleList,
        select: SelectConfig | None = None,
        keep_ratios: list[float] | None = None,
    ) -> SelectionState:
        """Select with ``selectors`` (one per stage, or none: unpruned) and, when given, ``select``'s
        layers and options and ``keep_ratios`` (default: ``select``'s, else the current ones); every
        other weight stays. The one way the selection is swapped (ablation views, the benchmark's keep
        settings). Returns the previous state: ``swap_selection(**vars(state))`` puts it back."""
        saved = SelectionState(self.select_cfg, self.selectors, list(self.keep_ratios))
        if select is not None:
            self.select_cfg = select
        self.selectors = selectors
        if keep_ratios is None:
            keep_ratios = select.keep_ratios if select is not None else saved.keep_ratios
        self.keep_ratios = list(keep_ratios)
        return saved

    def new_selectors(self, name: str, count: int, select: SelectConfig | None = None) -> nn.ModuleList:
        """``count`` fresh ``name`` selectors (``none``: an empty list) for this ViT's widths and the
        selector options of ``select`` (default: the current ones), initialised as the constructor
        initialises them and on the ViT's device and dtype."""
        mods = _build_selectors(select or self.select_cfg, name, self.cfg.width, self.text_dim, count)
        # from a fixed seed, not the global RNG: a selector swapped in for an ablation stays untrained
        # (text_attn's text->vision projection), and drawn from the global RNG the same model and data
        # gave grounding 4% in one process and 28% in the next (BENCHMARKS.md, session 8)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mods.apply(_init_weights)
        p = self.pos_embed
        return mods.to(device=p.device, dtype=p.dtype)

    def first_stage_logits(self, prefix: Tensor, query: Tensor | None) -> Tensor:
        """The first selection stage's per-patch logits (B, N), what PTA trains: prefix (B, 1+N, D)
        from ``forward_prefix``, query (B, Dt) or None (text-agnostic). Needs a selector."""
        if not len(self.selectors):
            raise ValueError("the model has no selector (select.selector: none)")
        return self.selectors[0](prefix, query, self.blocks[self.prefix_depth])

    def set_input_size(self, image_size: int) -> bool:
        """Resize the stored position table for ``image_size`` px inputs and record the size in the
        config (shared with the model's, so a saved model is consistent). Returns True when something
        changed; raises ``ValueError`` when the size is not a multiple of the patch size."""
        v = self.cfg
        if image_size == v.image_size:
            return False
        if image_size % v.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {v.patch_size}")
        grid = image_size // v.patch_size
        with torch.no_grad():
            table = resize_pos_embed(self.pos_embed.detach(), (grid, grid))
        self.pos_embed = nn.Parameter(table.contiguous())
        self.grid = grid
        log.info(
            "resolution %d -> %d px: position table resized to a %dx%d grid",
            v.image_size,
            image_size,
            grid,
            grid,
        )
        v.image_size = image_size
        return True

    def freeze_backbone(self, tune_suffix: bool = False) -> None:
        """Stop training everything but the selectors; autograd then records no backward through
        the ViT blocks (the selectors' own gradients, from PTA, need none). ``tune_suffix`` freezes
        the prefix only: the blocks after the first selection and the final norm, which see only
        the kept patches, still train, and the prefix stays a fixed function of the pixels that the
        feature cache may serve."""
        for name, p in self.named_parameters():
            if not name.startswith("selectors."):
                p.requires_grad_(False)
        if tune_suffix:
            for name, p in self.named_parameters():
                if name.startswith(self.suffix_names()):
                    p.requires_grad_(True)
        self.train(self.training)  # a conv stem's BatchNorm goes to eval mode now, not at the next train()

    def use_feature_cache(
        self,
        cache: FrozenFeatureCache | None,
        frozen_only: bool = True,
        scope: str = "",
        prefix_scope: str | None = None,
    ) -> None:
        """Serve the frozen backbone's text-independent outputs from ``cache`` (None: stop); see
        ``copa.model.feature_cache``. Only a ViT whose prefix is frozen may cache (the prefix is then
        a fixed function of the pixels; the unpruned output tokens only when the whole backbone is
        frozen). ``frozen_only=False`` is for evaluation, where no weight changes
        while the cache lives; ``scope`` prefixes every key (a fingerprint of these weights, for a
        cache that other models share; ``prefix_scope``, default ``scope``, those of the prefix, which
        models that differ only after it share)."""
        if cache is not None and frozen_only and not self.prefix_frozen:
            raise ValueError("only a frozen ViT can cache its features (freeze_backbone first)")
        self.feature_cache = cache
        self.cache_scope = scope
        self.prefix_scope = scope if prefix_scope is None else prefix_scope
        # the unpruned output tokens too, when nothing that computes them changes while cached
        self._cache_tokens = not frozen_only or self.backbone_frozen

    @property
    def backbone_frozen(self) -> bool:
        """No parameter outside the selectors trains."""
        return not any(p.requires_grad for n, p in self.named_parameters() if not n.startswith("selectors."))

    def cache_state(self) -> tuple[FrozenFeatureCache | None, str, str, bool]:
        """What ``use_feature_cache`` set, for ``restore_cache_state``."""
        return self.feature_cache, self.cache_scope, self.prefix_scope, self._cache_tokens

    def restore_cache_state(self, state: tuple[FrozenFeatureCache | None, str, str, bool]) -> None:
        self.feature_cache, self.cache_scope, self.prefix_scope, self._cache_tokens = state

    def suffix_names(self) -> tuple[str, ...]:
        """Name prefixes of the parameters after the first selection (later blocks, final norm)."""
        return (*(f"blocks.{i}." for i in range(self.prefix_depth, len(self.blocks))), "norm.")

    @property
    def prefix_frozen(self) -> bool:
        """No parameter of the part before the first selection (stem, position table, first blocks)
        trains: ``forward_prefix`` is a fixed function of the pixels."""
        skip = ("selectors.", *self.suffix_names())
        return not any(p.requires_grad for n, p in self.named_parameters() if not n.startswith(skip))

    def _cached(self) -> FrozenFeatureCache | None:
        """The cache, while the backbone is deterministic (stochastic depth draws anew in training)."""
        if self.feature_cache is None or (self.training and self.cfg.drop_path > 0):
            return None
        return self.feature_cache

    def selects(self, keep_ratios: list[float] | None = None) -> bool:
        """Whether any stage drops patches at ``keep_ratios`` (default: the live ones)."""
        ratios = self.keep_ratios if keep_ratios is None else keep_ratios
        return len(self.selectors) > 0 and any(r < 1.0 for r in ratios)

    # ------------------------------------------------------------------ forward
    def _run(self, x: Tensor, start: int, stop: int) -> Tensor:
        for blk in self.blocks[start:stop]:
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def embed(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) -> tokens (B, 1+N, D) with position embeddings."""
        x = self.patch_embed(images)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        pos = self.pos_embed
        if gh * gw != pos.shape[1] - 1 or gh != gw:
            pos = resize_pos_embed(pos, (gh, gw))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + pos.to(x.dtype)
        return self.ln_pre(x)

    def forward_prefix(self, images: Tensor) -> Tensor:
        """Text-independent part. images: (B, 3, H, W) -> (B, 1+N, D) after the first k blocks."""
        cache = self._cached()
        if cache is not None:
            return cache.lookup(f"{self.prefix_scope}prefix{self.prefix_depth}", images, self._prefix)
        return self._prefix(images)

    def _prefix(self, images: Tensor) -> Tensor:
        return self._run(self.embed(images), 0, self.prefix_depth)

    def forward_suffix(
        self, prefix: Tensor, query: Tensor | None = None, keep_ratios: list[float] | None = None
    ) -> VisionOutput:
        """Text-dependent part.

        prefix: (B, 1+N, D) from ``forward_prefix`` (index it to pair one image with several texts);
        query: (B, Dt) text [CLS] states, or None for the text-agnostic query.
        """
        ratios = self.keep_ratios if keep_ratios is None else keep_ratios
        layers = list(self.select_cfg.layers) + [len(self.blocks)]
        x = prefix
        b, n = x.shape[0], x.shape[1] - 1
        candidates = torch.arange(n, device=x.device).expand(b, n)
        selections: list[Selection] = []
        has_fused, dropped = False, 0
        sizes: Tensor | None = None  # (B, T) patches per visual token, kept by merging selectors only
        for s, layer in enumerate(layers[:-1]):
            k = num_keep(candidates.shape[1], ratios[s])
            if self.selectors and k < candidates.shape[1]:
                core = x[:, :-1] if has_fused else x
                nc = candidates.shape[1]
                sel, fuse = self.selectors[s], self.select_cfg.fuse_dropped
                if sel.merges:  # ToMe: merged groups in the same [CLS, K, fused] layout
                    prev_m = (x[:, -1:], sizes[:, -1]) if has_fused and sizes is not None else None
                    core_sizes = None if sizes is None else sizes[:, :nc]
                    x, logits, order, sizes = sel.merge(core, self.blocks[layer], k, fuse, prev_m, core_sizes)
                    weights = None
                else:
                    logits = sel(core, query, self.blocks[layer])
                    prev = None
                    if has_fused:
                        prev = (x[:, -1:], dropped / (dropped + nc - k))
                    st = self.select_cfg.straight_through
                    x, order, weights = select_and_fuse(core, logits, k, fuse, prev, st)
                kept = candidates.gather(1, order[:, :k])
                selections.append(Selection(logits, candidates, kept, weights, sizes))
                candidates, dropped = kept, dropped + nc - k
                has_fused = self.select_cfg.fuse_dropped
            x = self._run(x, layer, layers[s + 1])
        out = VisionOutput(self.norm(x), selections, n)
        if self._wants_relevance(query):
            out.relevance = self._relevance(prefix, query, out.patch_index, selections)
        return out

    def forward(
        self, images: Tensor, query: Tensor | None = None, keep_ratios: list[float] | None = None
    ) -> VisionOutput:
        """images: (B, 3, H, W), query: (B, Dt) or None -> VisionOutput"""
        cache = self._cached()
        if cache is not None and self._cache_tokens and not self.selects(keep_ratios):  # text-free tokens
            tokens = cache.lookup(
                f"{self.cache_scope}tokens",
                images,
                lambda x: self.forward_suffix(self._prefix(x), None, keep_ratios).tokens,
            )
            out = VisionOutput(tokens, [], tokens.shape[1] - 1)
            if self._wants_relevance(query):
                out.relevance = self._relevance(self.forward_prefix(images), query, out.patch_index, [])
            return out
        return self.forward_suffix(self.forward_prefix(images), query, keep_ratios)

    def _wants_relevance(self, query: Tensor | None) -> bool:
        """Outputs carry ``relevance``: asked for, a text to score by, and a selector of its own."""
        return self.relevance and query is not None and bool(self._own_selector)

    def _relevance(self, prefix: Tensor, query: Tensor, index: Tensor, selections: list[Selection]) -> Tensor:
        """The own first selector's logits over all N patches, standardised per image and detached,
        at the patches ``index`` (B, K) -> (B, K) float32. Reuses the selection's logits when the own
        selector made it (its first stage scores every patch)."""
        own = self._own_selector[0]
        if selections and self.selectors and self.selectors[0] is own:
            logits = selections[0].logits
        else:
            with torch.no_grad():
                logits = own(prefix, query, self.blocks[self.prefix_depth])
        z = logits.detach().float()
        z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True).clamp(min=1e-6)
        return z.gather(1, index)


def _check_select(select: SelectConfig, depth: int) -> None:
    if len(select.layers) != len(select.keep_ratios):
        raise ValueError("select.layers and select.keep_ratios must have the same length")
    if sorted(select.layers) != list(select.layers) or any(not 0 < i < depth for i in select.layers):
        raise ValueError(f"select.layers must increase within (0, {depth}): {select.layers}")


def _build_selectors(select: SelectConfig, name: str, width: int, text_dim: int, count: int) -> nn.ModuleList:
    """``count`` ``name`` selectors with ``select``'s options (``none``: an empty list), not yet
    initialised (the constructor initialises the whole ViT, ``new_selectors`` its own)."""
    built = [make_selector(name, width, text_dim, select.tpd_hidden, select.tpd_form) for _ in range(count)]
    return nn.ModuleList([m for m in built if m is not None])


def _signature(selectors: nn.ModuleList) -> list[tuple[type, list[tuple[str, tuple[int, ...]]]]]:
    return [(type(m), [(k, tuple(v.shape)) for k, v in m.state_dict().items()]) for m in selectors]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
