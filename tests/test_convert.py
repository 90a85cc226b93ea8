"""Converters: HF CLIP / ViT / BERT reference models with random weights must match our modules.

Every parameter of a reference model (LayerNorms included) is randomised, so a wrong mapping (a
swapped norm, a transposed qkv, a wrong eps) cannot pass by the luck of default init values.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    ViTConfig,
    ViTModel,
)

from copa.config import SelectConfig, VisionConfig
from copa.model.convert import (
    bert_layer_to_copa,
    convert_clip_vision,
    convert_hf_vit,
    init_layers_from_bert,
    interpolate_pos_embed_in_state,
    load_from_local,
    load_vision_weights,
    read_local_state_dict,
    vision_config_from_clip,
    vision_config_from_vit,
)
from copa.model.layers import BertStyleLayer
from copa.model.vit import VisionTransformer

TOL = 1e-4
TEXT_DIM = 32
NO_SELECT = SelectConfig(selector="none", layers=[1], keep_ratios=[1.0])
SMALL = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every floating parameter random, LayerNorm weights around 1 (not exactly 1), biases nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if isinstance(_owner(model, name), nn.LayerNorm) and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def _owner(model: nn.Module, pname: str) -> nn.Module:
    mod = model
    for part in pname.split(".")[:-1]:
        mod = getattr(mod, part)
    return mod


def images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def our_vit(cfg: VisionConfig, state: dict, select: SelectConfig = NO_SELECT) -> VisionTransformer:
    vit = VisionTransformer(cfg, select, text_dim=TEXT_DIM).eval()
    load_vision_weights(vit, state)
    return vit


def clip_vision(**kw) -> CLIPVisionModel:
    cfg = CLIPVisionConfig(**{**SMALL, "image_size": 32, "patch_size": 8, **kw})
    return randomise(CLIPVisionModel(cfg))


def hf_vit(**kw) -> ViTModel:
    cfg = ViTConfig(**{**SMALL, "image_size": 32, "patch_size": 8, **kw})
    return randomise(ViTModel(cfg, add_pooling_layer=False))


def clip_reference(ref: CLIPVisionModel, x: torch.Tensor) -> torch.Tensor:
    """CLIP applies post_layernorm to the pooled [CLS] only; ours normalises every token."""
    with torch.no_grad():
        return ref.post_layernorm(ref(pixel_values=x).last_hidden_state)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------ vision
def test_clip_vision_matches() -> None:
    ref = clip_vision()
    cfg = vision_config_from_clip(ref.config)
    assert (cfg.pre_norm, cfg.patch_bias, cfg.act, cfg.ln_eps) == (True, False, "quick_gelu", 1e-5)
    vit = our_vit(cfg, convert_clip_vision(ref))
    x = images()
    with torch.no_grad():
        ours = vit(x).tokens
    assert ours.shape == (2, 17, 64)
    assert maxdiff(ours, clip_reference(ref, x)) <= TOL


def test_clip_vision_from_full_clip_state_dict() -> None:
    vision = {**SMALL, "image_size": 32, "patch_size": 8}
    full = randomise(CLIPModel(CLIPConfig(vision_config=vision, text_config=TINY_TEXT)))
    # A full CLIP state dict (as on the hub) has a "vision_model." prefix, a text tower and projections.
    sd = full.state_dict()
    assert any(k.startswith("vision_model.embeddings.") for k in sd) and "logit_scale" in sd
    cfg = vision_config_from_clip(full.config)
    vit = our_vit(cfg, convert_clip_vision(sd))
    x = images()
    with torch.no_grad():
        out = full.vision_model(pixel_values=x).last_hidden_state
        ref = full.vision_model.post_layernorm(out)
        assert maxdiff(vit(x).tokens, ref) <= TOL


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_hf_vit_matches(qkv_bias: bool) -> None:
    ref = hf_vit(qkv_bias=qkv_bias)
    cfg = vision_config_from_vit(ref.config)
    assert (cfg.pre_norm, cfg.patch_bias, cfg.act, cfg.ln_eps) == (False, True, "gelu", 1e-12)
    vit = our_vit(cfg, convert_hf_vit(ref))
    x = images()
    with torch.no_grad():
        assert maxdiff(vit(x).tokens, ref(pixel_values=x).last_hidden_state) <= TOL


def test_hf_vit_legacy_names_match_module_names(tmp_path) -> None:
    """On-disk (transformers 4 style) and in-memory (transformers 5) names convert to the same dict."""
    ref = hf_vit()
    ref.save_pretrained(tmp_path)
    disk = read_local_state_dict(tmp_path)
    assert any("attention.attention.query" in k for k in disk)  # really the legacy layout
    a, b = convert_hf_vit(ref), convert_hf_vit(disk)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_rejects_unsupported() -> None:
    with pytest.raises(ValueError, match="activation"):
        vision_config_from_vit(ViTConfig(**SMALL, hidden_act="gelu_new"))
    with pytest.raises(ValueError, match="square"):
        vision_config_from_vit(ViTConfig(**SMALL, image_size=[32, 48]))
    with pytest.raises(KeyError):
        convert_clip_vision({"foo.weight": torch.zeros(1)})


# ------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("kind", ["clip_vision", "clip_full", "vit", "vit_bin", "clip_sharded"])
def test_load_from_local_round_trip(tmp_path, kind: str) -> None:
    x = images()
    if kind in ("clip_vision", "clip_sharded"):
        ref = clip_vision()
        # A tiny shard size forces model.safetensors.index.json + several shards.
        ref.save_pretrained(tmp_path, **({"max_shard_size": "100KB"} if kind == "clip_sharded" else {}))
        expected = clip_reference(ref, x)
    elif kind == "clip_full":
        vision = {**SMALL, "image_size": 32, "patch_size": 8}
        full = randomise(CLIPModel(CLIPConfig(vision_config=vision, text_config=TINY_TEXT)))
        full.save_pretrained(tmp_path)
        with torch.no_grad():
            expected = full.vision_model.post_layernorm(full.vision_model(pixel_values=x).last_hidden_state)
    else:
        ref = hf_vit()
        ref.save_pretrained(tmp_path)
        if kind == "vit_bin":  # .bin checkpoint (loaded with weights_only=True)
            from safetensors.torch import load_file

            sd = load_file(str(tmp_path / "model.safetensors"))
            (tmp_path / "model.safetensors").unlink()
            torch.save(sd, tmp_path / "pytorch_model.bin")
        with torch.no_grad():
            expected = ref(pixel_values=x).last_hidden_state
    if kind == "clip_sharded":
        assert (tmp_path / "model.safetensors.index.json").exists()
    cfg, state = load_from_local(tmp_path)
    vit = our_vit(cfg, state)
    with torch.no_grad():
        assert maxdiff(vit(x).tokens, expected) <= TOL


def test_load_from_local_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_from_local(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(FileNotFoundError):  # no weights
        load_from_local(tmp_path)


def test_pos_embed_interpolation() -> None:
    ref = clip_vision()
    cfg = vision_config_from_clip(ref.config)
    state = convert_clip_vision(ref)
    # Same grid: identity.
    same = interpolate_pos_embed_in_state(state, 4)
    assert torch.equal(same["pos_embed"], state["pos_embed"])
    # Grid 4 checkpoint into a grid 6 model (32 px -> 48 px).
    big = VisionConfig(**{**cfg.__dict__, "image_size": 48})
    vit = VisionTransformer(big, NO_SELECT, text_dim=TEXT_DIM).eval()
    report = load_vision_weights(vit, state)
    assert report.resized_pos_embed == (4, 6)
    assert vit.pos_embed.shape == (1, 1 + 36, 64)
    assert torch.equal(vit.pos_embed[:, :1], state["pos_embed"][:, :1])
    assert torch.allclose(vit.pos_embed, interpolate_pos_embed_in_state(state, (6, 6))["pos_embed"])
    with torch.no_grad():
        out = vit(images(size=48)).tokens
    assert out.shape == (2, 37, 64) and torch.isfinite(out).all()
    # The input state dict is not modified by interpolation.
    assert state["pos_embed"].shape == (1, 17, 64)


def test_tpd_runs_on_converted_weights(caplog) -> None:
    ref = hf_vit()
    cfg = vision_config_from_vit(ref.config)
    state = convert_hf_vit(ref)
    select = SelectConfig(selector="tpd", layers=[1], keep_ratios=[0.5])
    vit = VisionTransformer(cfg, select, text_dim=TEXT_DIM).eval()
    before = {k: v.clone() for k, v in vit.selectors.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="copa.model.convert"):
        report = load_vision_weights(vit, state)
    assert report.missing and all(k.startswith("selectors.") for k in report.missing)
    assert any("selector" in r.message for r in caplog.records)
    assert all(torch.equal(before[k], v) for k, v in vit.selectors.state_dict().items())
    assert torch.equal(vit.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    x = images()
    with torch.no_grad():
        out = vit(x, query=torch.randn(2, TEXT_DIM))
        agnostic = vit(x)
        full = vit(x, keep_ratios=[1.0]).tokens
    assert out.tokens.shape == (2, 1 + 8 + 1, 64) and out.kept.shape == (2, 8)
    assert agnostic.tokens.shape == (2, 10, 64)
    # keep ratio 1.0 reproduces the reference model exactly, selectors notwithstanding.
    with torch.no_grad():
        assert maxdiff(full, ref(pixel_values=x).last_hidden_state) <= TOL
    with pytest.raises(KeyError, match="selector"):
        load_vision_weights(vit, state, strict_selectors=True)


def test_load_vision_weights_strictness() -> None:
    ref = hf_vit()
    cfg = vision_config_from_vit(ref.config)
    state = convert_hf_vit(ref)
    vit = VisionTransformer(cfg, NO_SELECT, text_dim=TEXT_DIM)
    with pytest.raises(KeyError, match="unexpected"):
        load_vision_weights(vit, {**state, "bogus": torch.zeros(1)})
    partial = {k: v for k, v in state.items() if not k.startswith("blocks.2.")}
    with pytest.raises(KeyError, match="missing"):
        load_vision_weights(vit, partial)
    report = load_vision_weights(vit, partial, strict=False)
    assert any(k.startswith("blocks.2.") for k in report.missing)


# ------------------------------------------------------------------------------------ BERT
def bert_model(layers: int = 2) -> BertModel:
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    return randomise(BertModel(cfg, add_pooling_layer=False))


def ids_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0  # padded sequences
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("cross", [False, True])
def test_bert_layers_match_bert_model(cross: bool) -> None:
    """Embeddings + our layers == BertModel with the same layers (padding mask, no context)."""
    bert = bert_model()
    ours = nn.ModuleList(BertStyleLayer(64, 4, 128, cross=cross) for _ in range(2)).eval()
    sources = init_layers_from_bert(ours, list(bert.encoder.layer))
    assert sources == (["self", "self"] if cross else ["none", "none"])
    ids, mask = ids_and_mask()
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        x = bert.embeddings(input_ids=ids)
        for layer in ours:
            x = layer(x, mask=mask)
    # Padded query rows too: both sides mask keys only, so every row must agree.
    assert maxdiff(x, ref) <= TOL


def test_bert_layer_additive_4d_mask() -> None:
    """One BertLayer called directly with the additive (B, 1, 1, L) mask HF builds internally."""
    bert = bert_model(1)
    bert.set_attn_implementation("eager")
    layer = bert.encoder.layer[0]
    ours = BertStyleLayer(64, 4, 128).eval()
    ours.load_state_dict(bert_layer_to_copa(bert.state_dict(), prefix="encoder.layer.0"))
    _, mask = ids_and_mask()
    x = torch.randn(3, 7, 64)
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    with torch.no_grad():
        ref = layer(x, attention_mask=additive)
        ref = ref[0] if isinstance(ref, tuple) else ref
        assert maxdiff(ours(x, mask=mask), ref) <= TOL


def test_cross_attention_init_options() -> None:
    bert = bert_model()
    sd = bert_layer_to_copa(bert.encoder.layer[1])
    # Copy (default): cross == self when kv widths match.
    layer = BertStyleLayer(64, 4, 128, cross=True)
    init_layers_from_bert([layer], [bert.encoder.layer[1]])
    assert torch.equal(layer.cross.key.weight, sd["attn.key.weight"])
    assert torch.equal(layer.cross.norm.weight, sd["attn.norm.weight"])
    # Flag off: cross stays at its init.
    layer = BertStyleLayer(64, 4, 128, cross=True)
    init = {k: v.clone() for k, v in layer.cross.state_dict().items()}
    assert init_layers_from_bert(
        [layer], [dict(bert.encoder.layer[1].state_dict())], copy_self_to_cross=False
    ) == ["init"]
    assert all(torch.equal(init[k], v) for k, v in layer.cross.state_dict().items())
    # Different context width (e.g. vision width 96): cannot copy, stays at init even with the flag.
    layer = BertStyleLayer(64, 4, 128, cross=True, ctx_dim=96)
    init = {k: v.clone() for k, v in layer.cross.state_dict().items()}
    assert init_layers_from_bert([layer], [bert.encoder.layer[1]]) == ["init"]
    assert all(torch.equal(init[k], v) for k, v in layer.cross.state_dict().items())
    assert torch.equal(layer.attn.query.weight, sd["attn.query.weight"])


def test_bert_cross_attention_checkpoint() -> None:
    """A BERT decoder layer with its own crossattention loads it into our cross-attention."""
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=128,
        is_decoder=True,
        add_cross_attention=True,
    )
    bert = randomise(BertModel(cfg, add_pooling_layer=False))
    layer = BertStyleLayer(64, 4, 128, cross=True)
    assert init_layers_from_bert([layer], [bert.encoder.layer[0]]) == ["bert_cross"]
    ref = bert.encoder.layer[0].crossattention.self.key.weight
    assert torch.equal(layer.cross.key.weight, ref)


def test_bert_mismatches_raise() -> None:
    bert = bert_model()
    with pytest.raises(ValueError, match="target layers"):
        init_layers_from_bert([BertStyleLayer(64, 4, 128)], list(bert.encoder.layer))
    with pytest.raises(ValueError, match="heads"):
        init_layers_from_bert([BertStyleLayer(64, 8, 128)], [bert.encoder.layer[0]])
    with pytest.raises(ValueError, match="do not fit"):
        init_layers_from_bert([BertStyleLayer(64, 4, 256)], [bert.encoder.layer[0]])
    with pytest.raises(KeyError):
        bert_layer_to_copa(bert.state_dict(), prefix="encoder.layer.9")


def test_copa_convert_cli_builds_a_loadable_model(tmp_path):
    """`copa convert --vision CLIP_DIR` -> a COPA model dir whose ViT matches the CLIP reference."""
    import transformers

    from copa.cli import main
    from copa.model.copa import load

    hf_cfg = transformers.CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    ref = transformers.CLIPVisionModel(hf_cfg).eval()
    ref.save_pretrained(tmp_path / "clip")
    sets = [
        "model.text.pretrained=",
        "model.text.layers=2",
        "model.text.width=64",
        "model.text.heads=4",
        "model.text.intermediate=128",
        "model.fusion.heads=4",
        "model.decoder.heads=4",
        "model.vision.image_size=32",
        "model.select.layers=[1]",
        "model.select.keep_ratios=[1.0]",
    ]
    argv = [
        "convert",
        "--config",
        "configs/tiny.yaml",
        "--vision",
        str(tmp_path / "clip"),
        "--out",
        str(tmp_path / "m"),
    ]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    model = load(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.vision(x).tokens
        theirs = ref.post_layernorm(ref(pixel_values=x).last_hidden_state)
    assert (ours - theirs).abs().max() <= 1e-4
