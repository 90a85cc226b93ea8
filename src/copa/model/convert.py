"""Load standard ``transformers`` checkpoints into COPA's own modules.

- HF ``CLIPVisionModel`` (or the vision half of a full ``CLIPModel``) -> our ``VisionTransformer``;
- HF ``ViTModel`` -> our ``VisionTransformer``;
- BERT layers (``transformers`` ``BertLayer``) -> our ``BertStyleLayer`` (fusion / decoder init).

Converters work on plain state dicts, so they accept a live ``transformers`` module, a dict read from
``model.safetensors`` / ``pytorch_model.bin``, or a dict saved by another tool with an extra key
prefix: the prefix is found from an anchor key rather than assumed, because the same weights appear
as ``embeddings.*`` (transformers 5 ``CLIPVisionModel``), ``vision_model.embeddings.*`` (hub CLIP
checkpoints, full ``CLIPModel``) or ``vit.embeddings.*`` (``ViTForImageClassification``).

Nothing here touches the network: ``load_from_local`` reads a local directory only.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from copa.config import CLIP_MEAN, CLIP_STD, PreprocessConfig, VisionConfig
from copa.model.layers import BertStyleLayer
from copa.model.vit import VisionTransformer, resize_pos_embed

if TYPE_CHECKING:  # only for annotations; the functions read plain config attributes
    from transformers import CLIPConfig, CLIPVisionConfig, ViTConfig

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]

__all__ = [
    "LoadReport",
    "bert_layer_to_copa",
    "convert_clip_vision",
    "convert_hf_vit",
    "init_layers_from_bert",
    "interpolate_pos_embed_in_state",
    "load_from_local",
    "load_vision_weights",
    "preprocess_from_local",
    "read_local_state_dict",
    "vision_config_from_clip",
    "vision_config_from_vit",
]


# ------------------------------------------------------------------------------------- helpers
def _as_state_dict(src: Mapping[str, Tensor] | nn.Module) -> Mapping[str, Tensor]:
    """A module's state dict, or the mapping itself (no copy: converters only read it)."""
    return src.state_dict() if isinstance(src, nn.Module) else src


def _find_prefix(state: Mapping[str, Tensor], anchor: str, what: str) -> str:
    """The key prefix in front of ``anchor`` (e.g. ``"vision_model."``), found from the state itself.

    Several candidates (e.g. a CLIP ``text_model`` that also had the anchor) would be ambiguous, so
    the shortest one wins and the choice is logged; none at all means this is not a ``what`` checkpoint.
    """
    hits = sorted((k[: -len(anchor)] for k in state if k == anchor or k.endswith("." + anchor)), key=len)
    if not hits:
        raise KeyError(f"not a {what} state dict: no key ending in {anchor!r}")
    if len(hits) > 1:
        log.warning("%s: several candidate prefixes %s; using %r", what, hits, hits[0])
    return hits[0]


def _square(v: int | Sequence[int], name: str) -> int:
    """HF configs allow ``int`` or ``(h, w)``; our ViT has one square grid, so require h == w."""
    if isinstance(v, int):
        return v
    vals = list(v)
    if len(vals) != 2 or vals[0] != vals[1]:
        raise ValueError(f"{name}={v!r}: only square sizes are supported")
    return int(vals[0])


def _mlp_ratio(hidden: int, intermediate: int) -> float:
    """``VisionConfig`` stores the MLP width as a ratio; make sure it round-trips to the exact width."""
    ratio = intermediate / hidden
    if int(hidden * ratio) != intermediate:
        raise ValueError(f"intermediate size {intermediate} is not representable as {hidden} * ratio")
    return ratio


def _act(name: Any) -> str:
    # HF "gelu" is the exact erf GELU, which is nn.GELU(); tanh approximations would differ by ~1e-3,
    # so they are rejected rather than silently mapped.
    if name not in ("gelu", "quick_gelu"):
        raise ValueError(f"unsupported activation {name!r} (COPA's ViT supports 'gelu' and 'quick_gelu')")
    return str(name)


def _check_complete(out: StateDict, layers: int, what: str, ignored: list[str]) -> StateDict:
    """Fail loudly when a block is incomplete: a half-converted block would load 'fine' and be wrong."""
    per_block = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    missing = [
        f"blocks.{i}.{p}.weight"
        for i in range(layers)
        for p in per_block
        if f"blocks.{i}.{p}.weight" not in out
    ]
    missing += [k for k in ("cls_token", "pos_embed", "patch_embed.weight", "norm.weight") if k not in out]
    if missing:
        raise KeyError(f"{what} conversion is missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if ignored:
        log.info("%s conversion ignored %d key(s): %s", what, len(ignored), ignored[:8])
    return out


def _fuse_qkv(out: StateDict, parts: dict[int, dict[str, Tensor]], width: int) -> None:
    """Concatenate per-block q, k, v into our fused ``attn.qkv`` (rows ordered q | k | v, as
    ``SelfAttention`` chunks them). A missing q/k/v bias (HF ViT with ``qkv_bias=False``) is zeros,
    which is the same function as no bias since our qkv Linear always has one."""
    for i, p in sorted(parts.items()):
        try:
            out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([p["q.weight"], p["k.weight"], p["v.weight"]], 0)
        except KeyError as e:
            raise KeyError(f"block {i}: missing attention projection {e}") from None
        biases = [p.get(f"{n}.bias") for n in "qkv"]
        ref = p["q.weight"]
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
            [b if b is not None else ref.new_zeros(width) for b in biases], 0
        )


def _num_layers(state: Mapping[str, Tensor], pattern: str) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def _block_param(
    m: re.Match[str],
    t: torch.Tensor,
    key: str,
    qkv_names: dict[str, str],
    block_names: dict[str, str],
    qkv: dict[int, dict[str, torch.Tensor]],
    out: dict[str, torch.Tensor],
    ignored: list[str],
) -> None:
    """One transformer-block tensor (``m``: block index, HF sub-name, weight/bias) into COPA's names:
    q/k/v parts into ``qkv`` (fused later), the rest into ``out``, anything else into ``ignored``."""
    i, name, kind = int(m.group(1)), m.group(2), m.group(3)
    if name in qkv_names:
        qkv.setdefault(i, {})[f"{qkv_names[name]}.{kind}"] = t
    elif name in block_names:
        out[f"blocks.{i}.{block_names[name]}.{kind}"] = t
    else:
        ignored.append(key)


# ------------------------------------------------------------------------------------------ CLIP
def vision_config_from_clip(hf_cfg: CLIPVisionConfig | CLIPConfig) -> VisionConfig:
    """HF ``CLIPVisionConfig`` (or a full ``CLIPConfig``: its ``vision_config`` is used) -> ``VisionConfig``.

    CLIP's ViT differs from the classic one in three ways our ViT makes configurable: a LayerNorm
    after the embeddings (``pre_norm``), no bias on the patch convolution, and QuickGELU.
    """
    return _vision_config(getattr(hf_cfg, "vision_config", None) or hf_cfg, pre_norm=True, patch_bias=False)


def _vision_config(hf: Any, pre_norm: bool, patch_bias: bool) -> VisionConfig:
    """The fields an HF CLIP / ViT vision config shares -> ``VisionConfig``; the two flags are where
    the architectures differ."""
    if getattr(hf, "num_channels", 3) != 3:
        raise ValueError(f"num_channels={hf.num_channels}: COPA's patch embedding takes RGB images")
    return VisionConfig(
        image_size=_square(hf.image_size, "image_size"),
        patch_size=_square(hf.patch_size, "patch_size"),
        width=hf.hidden_size,
        layers=hf.num_hidden_layers,
        heads=hf.num_attention_heads,
        mlp_ratio=_mlp_ratio(hf.hidden_size, hf.intermediate_size),
        act=_act(hf.hidden_act),
        pre_norm=pre_norm,
        ln_eps=float(hf.layer_norm_eps),
        patch_bias=patch_bias,
    )


_CLIP_BLOCK = {
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_CLIP_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}


def convert_clip_vision(src: Mapping[str, Tensor] | nn.Module) -> StateDict:
    """HF CLIP vision weights -> our ``VisionTransformer`` state dict (trunk only, no selectors).

    ``src``: a ``CLIPVisionModel`` / ``CLIPModel`` or its state dict (any key prefix).
    Shapes: ``class_embedding (D,) -> cls_token (1, 1, D)``; ``position_embedding.weight (1+N, D) ->
    pos_embed (1, 1+N, D)``; per block ``q/k/v_proj (D, D) -> attn.qkv (3D, D)``.
    CLIP's ``post_layernorm`` becomes our final ``norm``, which we apply to every token (CLIP applies it
    to the pooled [CLS] only), so our tokens equal ``post_layernorm(last_hidden_state)``.
    ``visual_projection`` and the text tower are not part of the vision trunk and are ignored.
    """
    state = _as_state_dict(src)
    pre = _find_prefix(state, "embeddings.class_embedding", "CLIP vision")
    out: StateDict = {}
    qkv: dict[int, dict[str, Tensor]] = {}
    ignored: list[str] = []
    block_re = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    for key, t in state.items():
        if not key.startswith(pre):
            continue  # text tower, projections, logit_scale of a full CLIPModel
        k = key[len(pre) :]
        if k == "embeddings.class_embedding":
            out["cls_token"] = t.reshape(1, 1, -1)
        elif k == "embeddings.patch_embedding.weight":
            out["patch_embed.weight"] = t
        elif k == "embeddings.position_embedding.weight":
            out["pos_embed"] = t.unsqueeze(0)
        elif k.startswith("pre_layrnorm."):  # (sic) the HF name has this typo
            out["ln_pre." + k.split(".", 1)[1]] = t
        elif k.startswith("post_layernorm."):
            out["norm." + k.split(".", 1)[1]] = t
        elif m := block_re.match(k):
            _block_param(m, t, key, _CLIP_QKV, _CLIP_BLOCK, qkv, out, ignored)
        else:
            ignored.append(key)  # e.g. embeddings.position_ids (a buffer in older transformers)
    _fuse_qkv(out, qkv, out["cls_token"].shape[-1])
    layers = _num_layers(out, r"blocks\.(\d+)\.")
    return _check_complete(out, layers, "CLIP vision", ignored)


# ------------------------------------------------------------------------------------------- ViT
def vision_config_from_vit(hf_cfg: ViTConfig) -> VisionConfig:
    """HF ``ViTConfig`` -> ``VisionConfig``: no pre-norm, biased patch conv, eps from the config
    (1e-12 by default in HF ViT, not timm's 1e-6 — the difference is visible at 1e-4 tolerance)."""
    return _vision_config(hf_cfg, pre_norm=False, patch_bias=True)


# Both spellings of a ViT block: the on-disk / transformers 4 names (``encoder.layer.N.attention.
# attention.query``) and the in-memory transformers 5 names (``layers.N.attention.q_proj``), so one
# converter serves hub checkpoints and live modules alike.
_VIT_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc2": "mlp.fc2",
}
_VIT_QKV = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
}


def convert_hf_vit(src: Mapping[str, Tensor] | nn.Module) -> StateDict:
    """HF ``ViTModel`` weights -> our ``VisionTransformer`` state dict (trunk only, no selectors).

    ``src``: a ``ViTModel`` (or ``ViTForImageClassification``: the ``vit.`` prefix is found) or its
    state dict, in either the transformers 4 / on-disk or the transformers 5 in-memory naming.
    ``cls_token (1, 1, D)`` and ``position_embeddings (1, 1+N, D)`` keep their shapes; the final
    ``layernorm`` becomes ``norm``, so our tokens equal ``last_hidden_state``. The pooler and the
    classifier are ignored.
    """
    state = _as_state_dict(src)
    pre = _find_prefix(state, "embeddings.cls_token", "HF ViT")
    out: StateDict = {}
    qkv: dict[int, dict[str, Tensor]] = {}
    ignored: list[str] = []
    block_re = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
    for key, t in state.items():
        if not key.startswith(pre):
            ignored.append(key)  # e.g. the classifier of ViTForImageClassification
            continue
        k = key[len(pre) :]
        if k == "embeddings.cls_token":
            out["cls_token"] = t
        elif k == "embeddings.position_embeddings":
            out["pos_embed"] = t
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed." + k.rsplit(".", 1)[1]] = t
        elif k.startswith("layernorm."):
            out["norm." + k.split(".", 1)[1]] = t
        elif m := block_re.match(k):
            _block_param(m, t, key, _VIT_QKV, _VIT_BLOCK, qkv, out, ignored)
        else:
            ignored.append(key)  # pooler.*, embeddings.mask_token
    if "patch_embed.bias" not in out and "patch_embed.weight" in out:
        # VisionConfig for HF ViT has patch_bias=True; a bias-free export is the same as a zero bias.
        out["patch_embed.bias"] = out["patch_embed.weight"].new_zeros(out["patch_embed.weight"].shape[0])
    _fuse_qkv(out, qkv, out["cls_token"].shape[-1])
    layers = _num_layers(out, r"blocks\.(\d+)\.")
    return _check_complete(out, layers, "HF ViT", ignored)


# ---------------------------------------------------------------------- loading into our ViT
def interpolate_pos_embed_in_state(
    state: Mapping[str, Tensor], new_grid: int | tuple[int, int], key: str = "pos_embed"
) -> StateDict:
    """Return a copy of ``state`` whose ``key`` table ``(1, 1+g*g, D)`` is resized to ``new_grid``.

    Bicubic on the patch rows, the [CLS] row kept as is (``resize_pos_embed``), which is what
    fine-tuning at a higher resolution than pre-training needs (e.g. 256 px -> 384 px). Same grid:
    the table is returned unchanged. The input mapping is not modified.
    """
    grid = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    out = dict(state)
    if key not in out:
        raise KeyError(f"no {key!r} in state dict")
    out[key] = resize_pos_embed(out[key], grid)  # type: ignore[arg-type]
    return out


@dataclass
class LoadReport:
    """What ``load_vision_weights`` did: keys left at init, keys not used, and a pos-embed resize."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized_pos_embed: tuple[int, int] | None = None  # (old grid, new grid) side lengths


def load_vision_weights(
    vit: VisionTransformer,
    state: Mapping[str, Tensor],
    strict_selectors: bool = False,
    strict: bool = True,
) -> LoadReport:
    """Load a converted state dict (``convert_clip_vision`` / ``convert_hf_vit`` / our own) into ``vit``.

    - Selector (TPD) parameters are not in a converted checkpoint and stay at their init unless
      ``strict_selectors`` is True, in which case they must be present (loading a full COPA ViT).
    - A position table for another patch grid is interpolated to the model's grid.
    - ``strict``: a missing trunk key or an unused key raises (a wrong checkpoint should not load
      half-way); with ``strict=False`` they are only logged. Shape mismatches always raise.
    """
    report = LoadReport()
    sd = dict(state)
    if "pos_embed" in sd:
        pos = sd["pos_embed"]
        if pos.shape[-1] != vit.pos_embed.shape[-1]:
            raise ValueError(f"pos_embed width {pos.shape[-1]} != model width {vit.pos_embed.shape[-1]}")
        old = round((pos.shape[1] - 1) ** 0.5)
        if pos.shape[1] != vit.pos_embed.shape[1]:
            sd = interpolate_pos_embed_in_state(sd, vit.grid)
            report.resized_pos_embed = (old, vit.grid)
            log.info("interpolated position embeddings from grid %d to %d", old, vit.grid)
    result = vit.load_state_dict(sd, strict=False)
    sel_missing = [k for k in result.missing_keys if k.startswith("selectors.")]
    trunk_missing = [k for k in result.missing_keys if not k.startswith("selectors.")]
    report.missing, report.unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if sel_missing:
        if strict_selectors:
            raise KeyError(f"selector weights missing from the checkpoint: {sel_missing[:8]}")
        log.info("selector parameters left at init: %d tensors", len(sel_missing))
    problems = []
    if trunk_missing:
        problems.append(f"missing trunk keys {trunk_missing[:8]}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys {list(result.unexpected_keys)[:8]}")
    if problems:
        msg = "load_vision_weights: " + "; ".join(problems)
        if strict:
            raise KeyError(msg)
        log.warning(msg)
    return report


# ------------------------------------------------------------------------------------------ BERT
# transformers BertLayer sub-module name -> BertStyleLayer name. ``crossattention`` only exists in a
# BERT *decoder* layer (add_cross_attention=True); when present it maps onto our cross-attention.
_BERT_LAYER = {
    "attention.self.query": "attn.query",
    "attention.self.key": "attn.key",
    "attention.self.value": "attn.value",
    "attention.output.dense": "attn.dense",
    "attention.output.LayerNorm": "attn.norm",
    "crossattention.self.query": "cross.query",
    "crossattention.self.key": "cross.key",
    "crossattention.self.value": "cross.value",
    "crossattention.output.dense": "cross.dense",
    "crossattention.output.LayerNorm": "cross.norm",
    "intermediate.dense": "ffn.fc1",
    "output.dense": "ffn.fc2",
    "output.LayerNorm": "ffn.norm",
}
# TF-era BERT checkpoints name LayerNorm parameters gamma/beta.
_PARAM = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}


def bert_layer_to_copa(bert_layer_state: Mapping[str, Tensor] | nn.Module, prefix: str = "") -> StateDict:
    """One ``transformers`` ``BertLayer`` -> ``BertStyleLayer`` state dict.

    ``bert_layer_state``: the layer's state dict (or the layer), or a larger state dict with
    ``prefix`` naming the layer, e.g. ``"encoder.layer.5."`` in a ``BertModel`` state dict.
    Returns keys ``attn.{query,key,value,dense,norm}.*``, ``ffn.{fc1,fc2,norm}.*`` (and ``cross.*`` for
    a BERT decoder layer with cross-attention). Shapes are unchanged: both use ``nn.Linear`` layouts.
    """
    state = _as_state_dict(bert_layer_state)
    if prefix and not prefix.endswith("."):
        prefix += "."
    out: StateDict = {}
    for key, t in state.items():
        if not key.startswith(prefix):
            continue
        name, _, param = key[len(prefix) :].rpartition(".")
        if name in _BERT_LAYER and param in _PARAM:
            out[f"{_BERT_LAYER[name]}.{_PARAM[param]}"] = t
    required = {f"{v}.weight" for k, v in _BERT_LAYER.items() if not k.startswith("crossattention")}
    if missing := sorted(required - out.keys()):
        raise KeyError(f"not a BertLayer state dict under prefix {prefix!r}: missing {missing}")
    return out


def _sub(state: Mapping[str, Tensor], head: str) -> StateDict:
    """Keys under ``head.`` with the head stripped: ``attn.query.weight`` -> ``query.weight``."""
    return {k[len(head) + 1 :]: v for k, v in state.items() if k.startswith(head + ".")}


def init_layers_from_bert(
    layers: Sequence[BertStyleLayer],
    bert_layers: Sequence[nn.Module | Mapping[str, Tensor]],
    copy_self_to_cross: bool = True,
) -> list[str]:
    """Initialise our fusion / decoder layers from BERT layers, one to one.

    Self-attention and FFN are copied. Cross-attention, where a layer has one, is initialised from
    (in order of preference) the BERT layer's own ``crossattention`` (a BERT decoder checkpoint), or
    — with ``copy_self_to_cross`` — from its self-attention, as mPLUG/ALBEF do, which is only
    possible when the cross key/value input width equals the text width; otherwise it stays at init.

    Pass exactly as many BERT layers as there are target layers (slice the text encoder, e.g. its last
    ``n`` layers, at the call site so the choice is explicit). Returns, per layer, where the
    cross-attention came from: ``"bert_cross"``, ``"self"``, ``"init"`` or ``"none"`` (no cross).
    """
    if len(layers) != len(bert_layers):
        raise ValueError(f"{len(layers)} target layers but {len(bert_layers)} BERT layers")
    sources: list[str] = []
    for i, (ours, bert) in enumerate(zip(layers, bert_layers, strict=True)):
        if isinstance(bert, nn.Module):
            # Same weights with another head count is a different function: check where we can.
            heads = getattr(
                getattr(getattr(bert, "attention", None), "self", None), "num_attention_heads", None
            )
            if heads is not None and heads != ours.attn.heads:
                raise ValueError(f"layer {i}: BERT has {heads} heads, target has {ours.attn.heads}")
        sd = bert_layer_to_copa(bert)
        try:
            ours.attn.load_state_dict(_sub(sd, "attn"))
            ours.ffn.load_state_dict(_sub(sd, "ffn"))
        except RuntimeError as e:
            raise ValueError(f"layer {i}: BERT weights do not fit the target layer: {e}") from None
        src = "none"
        if ours.cross is not None:
            cross_sd = _sub(sd, "cross")
            kv_match = ours.cross.key.in_features == ours.attn.key.in_features
            if cross_sd and cross_sd["key.weight"].shape == ours.cross.key.weight.shape:
                ours.cross.load_state_dict(cross_sd)
                src = "bert_cross"
            elif copy_self_to_cross and kv_match:
                ours.cross.load_state_dict(_sub(sd, "attn"))
                src = "self"
            else:
                src = "init"
        sources.append(src)
    log.info("initialised %d layers from BERT (cross-attention from: %s)", len(layers), sources)
    return sources


# ----------------------------------------------------------------------------- local checkpoints
def _load_weight_file(path: Path) -> StateDict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only: a .bin is a pickle; never execute code from a checkpoint.
    return torch.load(path, map_location="cpu", weights_only=True)


def read_local_state_dict(path: str | Path) -> StateDict:
    """The full state dict of a local HF checkpoint directory (no network).

    Prefers ``model.safetensors`` (or its sharded index) over ``pytorch_model.bin`` (or its index).
    """
    d = Path(path)
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (d / single).is_file():
            return _load_weight_file(d / single)
        if (d / index).is_file():
            shards = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
            state: StateDict = {}
            for shard in shards:
                state.update(_load_weight_file(d / shard))
            return state
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or sharded index) in {d}")


def load_from_local(path: str | Path) -> tuple[VisionConfig, StateDict]:
    """A local HF checkpoint directory -> (``VisionConfig``, converted state dict for our ViT).

    Supports ``model_type`` ``"clip"`` (full CLIP: the vision tower is taken), ``"clip_vision_model"``
    and ``"vit"``. Reads ``config.json`` and the weights only; never touches the network.
    """
    from transformers import CLIPConfig, CLIPVisionConfig, ViTConfig

    d = Path(path)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {d} (COPA never downloads: pass a local directory)")
    raw = json.loads(cfg_file.read_text())
    model_type = raw.get("model_type")
    state = read_local_state_dict(d)
    if model_type == "clip":
        cfg = vision_config_from_clip(CLIPConfig.from_dict(raw).vision_config)
        converted = convert_clip_vision(state)
    elif model_type == "clip_vision_model":
        cfg = vision_config_from_clip(CLIPVisionConfig.from_dict(raw))
        converted = convert_clip_vision(state)
    elif model_type == "vit":
        cfg = vision_config_from_vit(ViTConfig.from_dict(raw))
        converted = convert_hf_vit(state)
    else:
        raise ValueError(
            f"{d}: unsupported model_type {model_type!r} (expected clip, clip_vision_model or vit)"
        )
    if sum(1 for k in converted if k.endswith("attn.qkv.weight")) != cfg.layers:
        raise ValueError(f"{d}: config says {cfg.layers} layers, weights have a different number")
    log.info("converted %s checkpoint %s (%d layers, width %d)", model_type, d, cfg.layers, cfg.width)
    return cfg, converted


# the normalisation each checkpoint family was trained with, when the directory has no
# preprocessor_config.json to say it (google/vit-*: 0.5; every OpenAI / open_clip CLIP: CLIP's)
_FAMILY_NORM = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "clip_vision_model": (CLIP_MEAN, CLIP_STD),
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def preprocess_from_local(path: str | Path) -> PreprocessConfig:
    """The image normalisation a local HF vision checkpoint expects: ``image_mean``/``image_std`` of
    its ``preprocessor_config.json`` when there is one, else its family's (``_FAMILY_NORM``)."""
    d = Path(path)
    raw = json.loads((d / "config.json").read_text())
    proc = d / "preprocessor_config.json"
    if proc.is_file():
        p = json.loads(proc.read_text())
        if isinstance(p, dict) and len(p.get("image_mean") or []) == 3 and len(p.get("image_std") or []) == 3:
            return PreprocessConfig(tuple(map(float, p["image_mean"])), tuple(map(float, p["image_std"])))
    model_type = raw.get("model_type")
    if model_type not in _FAMILY_NORM:
        raise ValueError(
            f"{d}: unsupported model_type {model_type!r} (expected clip, clip_vision_model or vit)"
        )
    mean, std = _FAMILY_NORM[model_type]
    return PreprocessConfig(tuple(mean), tuple(std))
