"""The COPA model: ViT with TPD + BERT text encoder + skip-connected fusion + decoder + heads."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_model, save_file, save_model
from torch import Tensor, nn

from copa.config import (
    ConfigError,
    ModelConfig,
    SelectConfig,
    check_model_config,
    model_config_from_dict,
    to_dict,
)
from copa.errors import CheckpointError, CheckpointNotFoundError, UserError
from copa.model.decoder import Decoder
from copa.model.feature_cache import FrozenFeatureCache, weights_fingerprint
from copa.model.fusion import FusionEncoder
from copa.model.heads import GroundingOutput, ITCHead, PatchBoxHead, TiedLMHead
from copa.model.layers import KVCache
from copa.model.text import TextEncoder, load_tokenizer, pool_text
from copa.model.vit import SelectionState, VisionOutput, VisionTransformer

if TYPE_CHECKING:
    from copa.model.convert import LoadReport

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class FusedOutput:
    """Fused states of (image, text) pairs: image (B, T, D), text (B, L, D), text mask (B, L)."""

    image: Tensor
    text: Tensor
    text_mask: Tensor
    vision: VisionOutput

    @property
    def cls(self) -> Tensor:
        """(B, D) fused [CLS]: the first text position."""
        return self.text[:, 0]

    def context(self) -> tuple[Tensor, Tensor]:
        """[image; text] states (B, T+L, D) and their mask (B, T+L) for the decoder."""
        ones = torch.ones(self.image.shape[:2], dtype=self.text_mask.dtype, device=self.text_mask.device)
        return torch.cat([self.image, self.text], 1), torch.cat([ones, self.text_mask], 1)


class COPAModel(nn.Module):
    """The whole model. Code outside ``copa.model`` uses its methods and properties only, never its
    submodules: images -> ``image_prefix`` -> ``image_tokens`` (selection) -> ``fuse`` -> heads
    (``itm_logits``, ``mlm_logits``, ``ground``) or ``decode`` -> ``lm_logits``; ``encode_image`` /
    ``encode_text`` are the ITC embeddings (the open_clip meaning)."""

    def __init__(self, cfg: ModelConfig, load_text_weights: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        dt, dv = cfg.text.width, cfg.vision.width
        self.text = TextEncoder(cfg.text, load_weights=load_text_weights)
        self.vision = VisionTransformer(
            cfg.vision, cfg.select, text_dim=dt, relevance=cfg.fusion.relevance or cfg.box_relevance
        )
        self.fusion = FusionEncoder(
            cfg.fusion.layers,
            cfg.fusion.stride,
            dt,
            cfg.fusion.heads,
            cfg.text.intermediate,
            dv,
            position=cfg.fusion.position,
            relevance=cfg.fusion.relevance,
            relevance_token=cfg.fusion.relevance_token,
        )
        self.decoder = Decoder(cfg.decoder.layers, dt, cfg.decoder.heads, cfg.text.intermediate)
        self.itc = ITCHead(dv, dt, cfg.embed_dim, cfg.temperature)
        self.itm = nn.Linear(dt, 2)
        self.mlm_head = TiedLMHead(dt, self.text.word_embeddings)
        self.lm_head = TiedLMHead(dt, self.text.word_embeddings)
        self.lm_head.set_vocab(list(cfg.decoder.output_vocab))
        self.box_head = PatchBoxHead(dt, context=cfg.box_context, relevance=cfg.box_relevance)
        if load_text_weights and cfg.text.pretrained:
            self._init_from_text()

    def _init_from_text(self) -> None:
        """Fusion and decoder start from the text encoder's BERT layers (mPLUG/ALBEF practice)."""
        src = list(self.text.bert.encoder.layer)
        if self.cfg.fusion.init_from_text:
            from copa.model.convert import init_layers_from_bert

            # the last text layers, as mPLUG initialises fusion from BERT's upper half
            n = len(self.fusion.layers)
            init_layers_from_bert(self.fusion.layers, [src[(len(src) - n + i) % len(src)] for i in range(n)])
        if self.cfg.decoder.init_from_text:
            from copa.model.convert import init_layers_from_bert

            init_layers_from_bert(
                self.decoder.layers, [src[i % len(src)] for i in range(len(self.decoder.layers))]
            )

    # ------------------------------------------------------------------ pieces
    @property
    def tokenizer(self):
        return load_tokenizer(self.cfg.text.tokenizer)

    @property
    def image_transform(self):
        """PIL image -> (3, H, W) input tensor, from the preprocessing saved with the model
        (``copa.preprocess.ImageTransform``)."""
        from copa.preprocess import ImageTransform

        return ImageTransform.from_config(self.cfg)

    def text_states(self, ids: Tensor, mask: Tensor) -> Tensor:
        """The text encoder's states: ids, mask (B, L) -> (B, L, Dt)."""
        return self.text(ids, mask)

    def text_query(self, txt: Tensor, mask: Tensor) -> Tensor:
        """The pooled text vector (B, Dt) that queries the selectors and feeds ITC
        (``model.text.pooling``). txt: (B, L, Dt) from ``text_states``, mask: (B, L)."""
        return pool_text(txt, mask, self.cfg.text.pooling)

    def image_prefix(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> text-independent ViT prefix (B, 1+N, Dv); compute once per image."""
        return self.vision.forward_prefix(images)

    def image_tokens(
        self, prefix: Tensor, query: Tensor | None = None, keep_ratios: list[float] | None = None
    ) -> VisionOutput:
        """The selection and the remaining ViT blocks: prefix (B, 1+N, Dv) from ``image_prefix``
        (index it to pair one image with several texts), query (B, Dt) from ``text_query`` or None
        (text-agnostic) -> VisionOutput with tokens (B, T, Dv)."""
        return self.vision.forward_suffix(prefix, query, keep_ratios)

    def selector_logits(self, prefix: Tensor, query: Tensor | None) -> Tensor:
        """The first selection stage's per-patch logits (B, N), what PTA trains and measures:
        prefix (B, 1+N, Dv) from ``image_prefix``, query (B, Dt) or None (text-agnostic)."""
        return self.vision.first_stage_logits(prefix, query)

    def itc_image(self, cls: Tensor) -> Tensor:
        """ITC image embedding: the vision [CLS] (B, Dv) of ``image_tokens(prefix)`` -> (B, E) unit."""
        return self.itc.image(cls)

    def itc_text(self, query: Tensor) -> Tensor:
        """ITC text embedding: ``text_query`` (B, Dt) -> (B, E) unit vectors."""
        return self.itc.text(query)

    @property
    def itc_scale(self) -> Tensor:
        """The learnt ITC logit scale (1,), clamped at 100."""
        return self.itc.scale

    def fuse(self, vision: VisionOutput, txt: Tensor, txt_mask: Tensor) -> FusedOutput:
        """Visual tokens (B, T, Dv) with text states (B, L, Dt) and mask (B, L) -> FusedOutput."""
        grid = math.isqrt(vision.num_patches)
        img, t = self.fusion(vision.tokens, txt, txt_mask, vision.patch_index, grid, vision.relevance)
        return FusedOutput(img, t, txt_mask, vision)

    def itm_logits(self, fused: FusedOutput) -> Tensor:
        """Image-text matching logits (B, 2) (column 1: the pair matches) from the fused [CLS]."""
        return self.itm(fused.cls)

    def mlm_logits(self, x: Tensor) -> Tensor:
        """Masked-token logits: fused text states (..., Dt) -> (..., V)."""
        return self.mlm_head(x)

    def lm_logits(self, h: Tensor) -> Tensor:
        """Next-token logits by token id: decoder states (..., Dt) from ``decode`` -> (..., V); -inf
        outside the output vocabulary (``set_output_vocab``)."""
        return self.lm_head(h)

    def lm_target_logits(self, h: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """What a loss on next tokens needs, over the output vocabulary only: decoder states (..., Dt),
        token-id labels (...) -> (logits (..., V'), labels as positions in them; -1: outside it,
        -100 kept)."""
        return self.lm_head.target_logits(h, labels)

    def add_fusion_relevance(self, token: bool = False) -> bool:
        """Let the fusion read each kept patch's relevance by the model's own first selector
        (``model.fusion.relevance``; the projection starts fresh), and with ``token`` the kept tokens
        averaged by it as one more token (``model.fusion.relevance_token``). Returns True when
        anything was added, False when the model already has it; a model without a selector has none
        to read."""
        f = self.cfg.fusion
        if f.relevance and (f.relevance_token or not token):
            return False
        if not self.has_selectors:
            raise UserError("model.fusion.relevance needs a selector to read (select.selector is none)")
        self.fusion.add_relevance(token)
        self.vision.relevance = True
        f.relevance = True
        f.relevance_token = f.relevance_token or token
        return True

    def add_box_relevance(self) -> bool:
        """Let the grounding head's patch scores add each kept patch's relevance by the model's own
        first selector (``model.box_relevance``; its weight starts at 1). Returns True when it was
        added, False when the model already has it; a model without a selector has none to read."""
        if self.cfg.box_relevance:
            return False
        if not self.has_selectors:
            raise UserError("model.box_relevance needs a selector to read (select.selector is none)")
        self.box_head.add_relevance()
        self.vision.relevance = True
        self.cfg.box_relevance = True
        return True

    def set_output_vocab(self, ids: list[int]) -> None:
        """Let the decoder write only the token ids ``ids`` (sorted, distinct; empty: every token).
        Kept in the config, so a saved model generates from the same list."""
        self.lm_head.set_vocab(ids)
        self.cfg.decoder.output_vocab = list(ids)

    def new_decoder_cache(self) -> KVCache:
        """An empty KV cache for ``decode`` (one entry per decoder layer)."""
        return self.decoder.new_cache()

    def embed_tokens(self, ids: Tensor, start: int = 0) -> Tensor:
        """Decoder input embeddings (shared with the text encoder). ids: (B, L) -> (B, L, D)"""
        pos = torch.arange(start, start + ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return self.text.embeddings(input_ids=ids, position_ids=pos)

    def decode(
        self,
        ids: Tensor,
        mask: Tensor | None,
        ctx: Tensor,
        ctx_mask: Tensor,
        cache: KVCache | None = None,
        start: int = 0,
    ) -> Tensor:
        """Decoder hidden states for ids (B, L) given context (B, S, D) -> (B, L, D)."""
        return self.decoder(self.embed_tokens(ids, start), mask, ctx, ctx_mask, cache)

    # ------------------------------------------------------------------ composite forwards
    def forward(
        self, images: Tensor, ids: Tensor, mask: Tensor, keep_ratios: list[float] | None = None
    ) -> FusedOutput:
        """Image-text pairs through the whole encoder stack (VQA / ITM style, text-aware selection).

        images: (B, 3, H, W); ids, mask: (B, L) -> FusedOutput
        """
        txt = self.text_states(ids, mask)
        return self.fuse(self.vision(images, self.text_query(txt, mask), keep_ratios), txt, mask)

    def ground(self, fused: FusedOutput) -> GroundingOutput:
        """Box of the object a pair's text refers to, from the fused patch states (grounding)."""
        v = fused.vision
        index = v.patch_index
        grid = math.isqrt(v.num_patches)
        return self.box_head(fused.image[:, 1 : 1 + index.shape[1]], fused.cls, index, grid, v.relevance)

    def encode_image(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> text-agnostic ITC embedding (B, E), unit vectors (retrieval)."""
        return self.itc_image(self.vision(images).cls)

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Texts ids, mask (B, L) -> ITC embedding (B, E), unit vectors (retrieval)."""
        return self.itc_text(self.text_query(self.text_states(ids, mask), mask))

    # ------------------------------------------------------------------ live state
    @property
    def keep_ratios(self) -> list[float]:
        """The keep ratio of each selection stage now in use (a copy; ``set_keep_ratio`` changes it)."""
        return list(self.vision.keep_ratios)

    @property
    def pruning(self) -> bool:
        """Whether the selection drops patches now (a selector and a keep ratio below 1)."""
        return self.vision.pruning

    @property
    def has_selectors(self) -> bool:
        """Whether selection modules are in place (False for ``selector: none``)."""
        return len(self.vision.selectors) > 0

    @property
    def num_patches(self) -> int:
        """N, the patches of an input at the model's image size."""
        return self.vision.num_patches

    @property
    def grid(self) -> int:
        """Patches per side of an input at the model's image size."""
        return self.vision.grid

    def selector_parameters(self) -> list[nn.Parameter]:
        """The first selection stage's parameters (what PTA trains); empty without a selector."""
        return list(self.vision.selectors[0].parameters()) if self.has_selectors else []

    def set_keep_ratio(self, ratio: float | list[float]) -> None:
        """One keep ratio for every stage, or one per stage."""
        self.vision.set_keep_ratios(ratio)

    def set_input_size(self, image_size: int) -> bool:
        """Take ``image_size`` px inputs: the ViT's position table is resized once (bicubic) and the
        config updated, so a saved model is consistent. Returns True when something changed."""
        return self.vision.set_input_size(image_size)

    def new_selectors(self, selector: str, count: int | None = None) -> nn.ModuleList:
        """``count`` (default: one per selection layer) fresh ``selector`` modules for
        ``swap_selection``; ``none`` gives an empty list."""
        return self.vision.new_selectors(selector, len(self.cfg.select.layers) if count is None else count)

    def swap_selection(self, selectors: nn.ModuleList, select: SelectConfig | None = None) -> SelectionState:
        """Select with other selector modules (and, with ``select``, its layers, options and keep
        ratios), every other weight shared; the config the model saves is not changed. Returns the
        previous state, for ``restore_selection``. See ``VisionTransformer.swap_selection``."""
        return self.vision.swap_selection(selectors, select)

    def restore_selection(self, state: SelectionState) -> None:
        """Put back a state that ``swap_selection`` returned."""
        self.vision.swap_selection(state.selectors, state.select, state.keep_ratios)

    @contextlib.contextmanager
    def selecting_with(
        self, selectors: nn.ModuleList, select: SelectConfig | None = None
    ) -> Iterator[COPAModel]:
        """``swap_selection`` for the block, restored after."""
        saved = self.swap_selection(selectors, select)
        try:
            yield self
        finally:
            self.restore_selection(saved)

    def with_selectors(self, selectors: nn.ModuleList) -> COPAModel:
        """A shallow view of this model sharing every module except the selectors, which are
        ``selectors`` (ablations and selector transplants; the model itself is unchanged)."""
        vit = copy.copy(self.vision)
        vit._modules = dict(self.vision._modules)
        vit.swap_selection(selectors)
        view = copy.copy(self)
        view._modules = dict(self._modules)
        view.vision = vit
        return view

    def selectors_copy(self) -> nn.ModuleList:
        """A deep copy of the selector modules (to select with them in another model of the same
        selection config, ``with_selectors``)."""
        return copy.deepcopy(self.vision.selectors)

    # ------------------------------------------------------------------ training hooks
    @staticmethod
    def param_group(name: str) -> str:
        """Which learning-rate group a parameter (its ``named_parameters`` name) is in: ``vit`` (the
        backbone), ``text`` (the pretrained text encoder), ``selector``, ``head`` (the task heads that
        start from scratch: box, ITM, the fusion's patch positions, relevance and relevance token), or
        ``rest``."""
        if name.startswith("vision.selectors"):
            return "selector"
        if name.startswith(("box_head.", "itm.", "fusion.pos.", "fusion.rel.", "fusion.pool.")):
            return "head"
        if name.startswith("vision."):
            return "vit"
        if name.startswith("text."):
            return "text"
        return "rest"

    def transformer_layers(self) -> list[nn.Module]:
        """Every transformer layer (ViT, text encoder, fusion, decoder): FSDP's sharding units."""
        return [*self.vision.blocks, *self.text.bert.encoder.layer, *self.fusion.layers, *self.decoder.layers]

    def methods_outside_forward(self) -> list[tuple[nn.Module, str]]:
        """(module, method name) of the methods that run a layer's weights outside its forward: the
        attention selectors and token merging call a ViT block's query/key projections."""
        return [(b, name) for b in self.vision.blocks for name in ("attention_scores", "attention_keys")]

    def load_vision_weights(self, state: Mapping[str, Tensor]) -> LoadReport:
        """Load a converted CLIP/ViT state dict into the ViT (``copa.model.convert.load_vision_weights``:
        position table resized to the model's grid, selectors left at their init)."""
        from copa.model.convert import load_vision_weights

        return load_vision_weights(self.vision, state)

    def set_selection(self, select: SelectConfig) -> None:
        """Use another selection config (layers, keep ratios, selector); see
        ``VisionTransformer.set_selection``."""
        if select != self.cfg.select:
            log.info("selection: %s -> %s", self.cfg.select, select)
        select = copy.deepcopy(select)
        self.vision.set_selection(select)
        self.cfg.select = select  # the same object as the ViT's, so the saved config is what runs

    def freeze(
        self, text_layers: int = 0, vit: bool = False, selector: bool = False, tune_vit_suffix: bool = False
    ) -> None:
        """Freeze the text encoder's embeddings and first ``text_layers`` layers (-1: all of it; 0:
        none), with ``vit`` the ViT backbone — with ``tune_vit_suffix`` only its part before the first
        selection — and with ``selector`` the selectors (each independent of the other)."""
        if text_layers:
            self.text.freeze(text_layers)
        if vit:
            self.vision.freeze_backbone(tune_suffix=tune_vit_suffix)
        if selector:
            for p in self.vision.selectors.parameters():
                p.requires_grad_(False)

    def use_feature_cache(self, cache: FrozenFeatureCache | None) -> None:
        """Serve what the frozen encoders compute from one input alone from ``cache`` (None: stop
        caching; ``copa.model.feature_cache``): the ViT's text-independent outputs when the part that
        computes them is frozen, the text encoder's states when all of it is frozen; a trained part
        computes as always."""
        self.vision.use_feature_cache(cache if self.vision.prefix_frozen else None)
        self.text.use_feature_cache(cache if self.text.fully_frozen else None)

    @contextlib.contextmanager
    def evaluation_cache(self, cache: FrozenFeatureCache | None) -> Iterator[None]:
        """While evaluating, serve what the encoders compute from one input alone from ``cache``, frozen
        or not: in eval mode with no weight changing, the ViT prefix of an image and a text's states are
        fixed functions of the input, and VQA or grounding read each image once per question or
        expression. Keys are scoped by a fingerprint of each encoder's weights, so ``cache`` may be
        shared by the evaluations of several models: those with the same frozen trunk or text encoder
        reuse each other's entries, the others never see them. The caches in use before come back
        afterwards; None changes nothing."""
        if cache is None:
            yield
            return
        if self.training:
            raise ValueError("the evaluation cache needs the model in eval mode (no dropout, no drop-path)")
        vit, text = self.vision, self.text
        saved = vit.cache_state(), (text.feature_cache, text.cache_scope)
        # the selectors act after the prefix: models that differ only there share it, and the prefix
        # of models whose ViT differs only after the first selection (``train.tune_vit_suffix``) too
        vit_scope = f"vit:{weights_fingerprint(vit, ('selectors.',))}|"
        prefix_scope = f"vit:{weights_fingerprint(vit, ('selectors.', *vit.suffix_names()))}|"
        vit.use_feature_cache(cache, frozen_only=False, scope=vit_scope, prefix_scope=prefix_scope)
        text.use_feature_cache(cache, frozen_only=False, scope=f"text:{weights_fingerprint(text)}|")
        try:
            yield
        finally:
            vit.restore_cache_state(saved[0])
            text.use_feature_cache(saved[1][0], frozen_only=False, scope=saved[1][1])

    def adapt_stem_statistics(self, images: Iterable[Tensor]) -> int:
        """AdaBN for a conv stem: its BatchNorm statistics re-estimated on ``images`` ((B, 3, H, W)
        batches, normalised as the model expects) of a new domain, no label and no weight touched
        (``copa adapt-stem``). Returns the number of images read."""
        from copa.model.vit import ConvStem

        stem = self.vision.patch_embed
        if not isinstance(stem, ConvStem):
            raise UserError(
                f"model.vision.stem is {self.cfg.vision.stem!r}: only a conv stem has normalisation "
                "statistics to adapt"
            )
        n = stem.adapt_statistics(images)
        if n == 0:
            raise UserError("no image to re-estimate the stem's statistics on")
        return n

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.grad_checkpointing = enable
        bert = self.text.bert
        on = getattr(bert, "activation_checkpointing_enable", None) or bert.gradient_checkpointing_enable
        off = getattr(bert, "activation_checkpointing_disable", None) or bert.gradient_checkpointing_disable
        on() if enable else off()

    def compile_blocks(self, enable: bool = True, backend: str = "inductor", mode: str | None = None) -> int:
        """``torch.compile`` the model's dense repeated blocks in place — each ViT block, the text
        encoder, each fusion and decoder layer — or (``enable=False``) undo it; returns how many
        modules were (un)compiled. The selection between blocks (top-k, gather, the fused token) stays
        eager: its shapes change with the keep ratio, a block's only with the sequence it is given,
        so each keep setting compiles each block once. The weights and ``state_dict`` are unchanged."""
        mods: list[nn.Module] = [*self.vision.blocks, self.text, *self.fusion.layers, *self.decoder.layers]
        for m in mods:
            if enable:
                m.compile(backend=backend, mode=mode, dynamic=False)
            else:
                m._compiled_call_impl = None  # what nn.Module.compile sets
        return len(mods)

    def num_parameters(self) -> dict[str, int]:
        def count(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters())

        sel = count(self.vision.selectors)
        parts = {
            "vision": count(self.vision) - sel,
            "selector": sel,
            "text": count(self.text),
            "fusion": count(self.fusion),
            "decoder": count(self.decoder),
            "heads": count(self.itc)
            + count(self.itm)
            + count(self.box_head)
            + sum(p.numel() for n, p in self.named_parameters() if n.startswith(("mlm_head", "lm_head"))),
        }
        parts["total"] = count(self)
        return parts

    # ------------------------------------------------------------------ persistence
    def save_pretrained(
        self,
        path: str | Path,
        extra: dict[str, Any] | None = None,
        state_dict: dict[str, Tensor] | None = None,
    ) -> None:
        """Write ``config.json`` + ``model.safetensors`` + the tokenizer; atomic per file.

        ``state_dict`` replaces the module's own (e.g. the gathered full state of an FSDP model).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = to_dict(self.cfg)
        cfg["text"]["tokenizer"] = "."  # the tokenizer travels with the checkpoint
        meta = {"model": cfg, "format": "copa", "version": 1, **(extra or {})}
        tmp = path / (WEIGHTS_NAME + ".tmp")
        if state_dict is None:
            save_model(self, str(tmp))
        else:
            save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
        tmp.replace(path / WEIGHTS_NAME)
        self.tokenizer.save_pretrained(str(path))
        tmp_cfg = path / (CONFIG_NAME + ".tmp")
        tmp_cfg.write_text(json.dumps(meta, indent=2, sort_keys=True))
        tmp_cfg.replace(path / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> COPAModel:
        """Load a model written by ``save_pretrained`` (safetensors only: no pickle is read).

        Raises:
            CheckpointNotFoundError: ``path`` lacks the config or the weights file.
            CheckpointError: either is damaged (garbage JSON, an unusable model section, a truncated
                or non-safetensors weights file, weights that do not fit the config).
        """
        path = Path(path)
        cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not cfg_file.is_file() or not weights.is_file():
            raise CheckpointNotFoundError(
                f"{path} is not a COPA checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        cfg = read_model_config(path)
        if cfg.text.tokenizer == ".":
            cfg.text.tokenizer = str(path)
        with without_weight_init():  # every weight comes from the file
            model = cls(cfg, load_text_weights=False)
        missing, unexpected = load_weights(model, weights, strict=False, device=str(map_location))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {path} does not match its config: missing={missing} unexpected={unexpected}"
            )
        return model


def without_weight_init() -> contextlib.AbstractContextManager[None]:
    """Build modules without drawing their random initial weights (torch's ``nn.init`` functions and
    transformers' ``init_weights`` do nothing inside): for a model whose every weight is loaded next.
    The draws were 0.33 s of a 0.4-s checkpoint load (~60 loads in the demo). Buffers computed in
    ``__init__`` (position ids, the output vocabulary) are unaffected. Whatever is not then loaded
    holds uninitialised memory, so the caller must check that every key was loaded."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def read_model_config(path: str | Path) -> ModelConfig:
    """The model config stored in ``path/config.json``; ``CheckpointError`` when it is unusable."""
    cfg_file = Path(path) / CONFIG_NAME
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{cfg_file} has no 'model' section; it was not written by save_pretrained")
    try:
        cfg = model_config_from_dict(meta["model"])
        check_model_config(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    return cfg


def load_weights(
    model: nn.Module, weights: str | Path, strict: bool = True, device: str = "cpu"
) -> tuple[list[str], list[str]]:
    """``safetensors.torch.load_model`` whose failures on a damaged file (truncated, not
    safetensors, tensors of other shapes) are ``CheckpointError``s naming the file."""
    from safetensors import SafetensorError

    try:
        return load_model(model, str(weights), strict=strict, device=device)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        first = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{weights} cannot be loaded: {first}") from None


def load(path: str | Path, map_location: str | torch.device = "cpu") -> COPAModel:
    """Load a saved COPA model ready for inference (eval mode): a local model directory, a training
    run directory (its ``model/``), or a hub id (``copa.hub.resolve_checkpoint``)."""
    from copa.hub import resolve_checkpoint

    return COPAModel.from_pretrained(resolve_checkpoint(path), map_location).eval()


def build_model(cfg: ModelConfig, load_text_weights: bool = True) -> COPAModel:
    return COPAModel(cfg, load_text_weights=load_text_weights)
