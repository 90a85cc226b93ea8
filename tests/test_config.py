import pytest

from copa.config import Config, ConfigError, load_config, to_dict


def test_presets_load():
    tiny = load_config("configs/tiny.yaml")
    base = load_config("configs/base.yaml")
    assert tiny.model.vision.width == 384 and tiny.model.vision.layers == 6
    assert base.model.vision.width == 768 and base.model.decoder.layers == 12
    assert base.model.fusion.stride == 3 and base.model.select.layers == [6]


def test_overrides_are_typed_and_nested():
    over = ["train.steps=7", "model.select.keep_ratios=[0.25]", "train.lr=1e-3"]
    cfg = load_config("configs/tiny.yaml", over)
    assert cfg.train.steps == 7
    assert cfg.model.select.keep_ratios == [0.25]
    assert cfg.train.lr == pytest.approx(1e-3)


def test_unknown_key_and_bad_type_raise():
    with pytest.raises(ConfigError, match="unknown"):
        load_config(None, ["model.vision.widht=3"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(None, ["train.steps=abc"])
    with pytest.raises(ConfigError, match="a.b=c"):
        load_config(None, ["train.steps"])


def test_base_inheritance(tmp_path):
    tiny = __import__("os").path.abspath("configs/tiny.yaml")
    (tmp_path / "child.yaml").write_text(f"_base_: {tiny}\ntrain: {{steps: 3}}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.train.steps == 3 and cfg.model.vision.width == 384


def test_round_trip_dict():
    cfg = load_config("configs/tiny.yaml")
    from copa.config import from_dict

    assert from_dict(Config, to_dict(cfg)) == cfg


def test_partial_mapping_override_keeps_other_defaults():
    cfg = load_config("configs/tiny.yaml", ["train.loss_weights.pta=0.0"])
    assert cfg.train.loss_weights["pta"] == 0.0
    assert cfg.train.loss_weights["itc"] == 1.0 and cfg.train.loss_weights["mlm"] == 1.0


def test_distributed_mode_is_validated():
    assert load_config(None, ["train.distributed=fsdp"]).train.distributed == "fsdp"
    with pytest.raises(ConfigError, match="train.distributed"):
        load_config(None, ["train.distributed=fsdp2"])
    with pytest.raises(ConfigError, match="train.distributed"):
        load_config(None, ["train.distributed=DDP"])


def test_defaults_are_the_tiny_preset_and_build_a_model():
    from copa.model.copa import COPAModel

    assert Config().model == load_config("configs/tiny.yaml").model
    assert load_config("configs/base.yaml").model.text.pooling == "cls"  # BERT-base keeps [CLS]
    import torch

    cfg = Config().model
    model = COPAModel(cfg).eval()  # failed with fusion/decoder heads 6 vs MiniLM's 12
    ids, mask = torch.tensor([[101, 2417, 4540, 102]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        out = model(torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size), ids, mask)
    assert out.text.shape == (1, 4, cfg.text.width) and torch.isfinite(out.text).all()


def test_tuning_the_vit_suffix_needs_a_frozen_vit():
    cfg = load_config(None, ["train.freeze_vit=true", "train.tune_vit_suffix=true"])
    assert cfg.train.tune_vit_suffix
    with pytest.raises(ConfigError, match="tune_vit_suffix needs train.freeze_vit"):
        load_config(None, ["train.tune_vit_suffix=true"])
