"""``copa bench`` on a micro model: keep-setting parser, JSON keys, FLOP ratios, CLI (issue 6)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from copa.bench.flops import count_flops
from copa.bench.harness import build_bench_model
from copa.bench.inference import bench_inference
from copa.bench.keep import BenchError, KeepSetting, parse_keep, parse_keeps
from copa.bench.memory import cpu_tensor_peak
from copa.bench.train import bench_train
from tests.conftest import MICRO, micro_config

INFER_KEYS = {
    "precision",
    "keep",
    "layers",
    "ratios",
    "visual_tokens",
    "batch",
    "flops",
    "flops_vit",
    "flops_ratio",
    "flops_ratio_vit",
    "images_per_s",
    "pairs_per_s",
    "speedup_vit",
    "speedup_e2e",
    "efficiency",
    "efficiency_vit",
    "achieved_flops_per_s",
    "achieved_flops_per_s_vit",
    "peak_share",
    "peak_share_vit",
    "peak_memory_mb",
    "peak_rss_mb",
    "time_e2e",
    "time_vit",
    "retried_calls",
}
TRAIN_KEYS = {
    "precision",
    "keep",
    "batch",
    "flops",
    "flops_ratio",
    "samples_per_s",
    "speedup",
    "efficiency",
    "achieved_flops_per_s",
    "peak_memory_mb",
    "peak_rss_mb",
    "time_step",
}


@pytest.mark.parametrize(
    ("spec", "layers", "ratios"),
    [
        ("none", (), ()),
        ("6:0.5", (6,), (0.5,)),
        ("4:0.7,8:0.5", (4, 8), (0.7, 0.5)),
        (" 3 : 0.4 , 9:1 ", (3, 9), (0.4, 1.0)),
        ("NONE", (), ()),
    ],
)
def test_parse_keep(spec, layers, ratios):
    s = parse_keep(spec, num_layers=12)
    assert (s.layers, s.ratios) == (layers, ratios)
    assert s.pruned == any(r < 1 for r in ratios)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("6", "not LAYER:RATIO"),
        ("6:0.5:1", "not LAYER:RATIO"),
        ("a:0.5", "not an integer"),
        ("6:half", "not a number"),
        ("6:0", r"in \(0, 1\]"),
        ("6:1.5", r"in \(0, 1\]"),
        ("6:nan", r"in \(0, 1\]"),
        ("0:0.5", "must be in 1..11"),
        ("12:0.5", "must be in 1..11"),
        ("8:0.5,4:0.5", "strictly increase"),
        ("4:0.5,4:0.5", "strictly increase"),
        ("4:0.5,", "not LAYER:RATIO"),
    ],
)
def test_parse_keep_rejects_bad_input(spec, message):
    with pytest.raises(BenchError, match=message):
        parse_keep(spec, num_layers=12)


def test_parse_keeps_puts_unpruned_first_once():
    settings = parse_keeps(["6:0.5", "none", "6:0.5", "4:0.7,8:0.5"], 12)
    assert [s.name for s in settings] == ["none", "6:0.5", "4:0.7,8:0.5"]


def test_count_flops_includes_cpu_sdpa():
    q = torch.randn(2, 3, 10, 8)
    with torch.inference_mode():
        flops = count_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * 2 * 3 * 10 * 10 * 8)  # QK^T and PV


def test_cpu_tensor_peak_sees_live_tensors():
    x = torch.randn(256, 256)

    def f():
        a = x @ x  # 256 KiB
        b = a + 1  # 256 KiB, both alive
        del a
        return (b * 2).sum()

    peak = cpu_tensor_peak(f)
    assert peak is not None and 2 * 256 * 256 * 4 <= peak < 4 * 256 * 256 * 4


@pytest.fixture(scope="module")
def micro():
    cfg = micro_config()
    return cfg, build_bench_model(cfg, None, torch.device("cpu"))


def test_bench_inference_micro(micro):
    cfg, model = micro
    own = model.vision.selectors
    settings = parse_keeps(["2:0.5", "1:0.7,3:0.5"], cfg.model.vision.layers)
    recs = bench_inference(
        model,
        settings,
        batch=2,
        text_len=6,
        runs=1,
        warmup=1,
        precisions=[torch.float32, torch.bfloat16],
        decode=True,
        peaks={"fp32": 1e9},
    )
    assert [(r["precision"], r["keep"]) for r in recs] == [
        (p, k) for p in ("fp32", "bf16") for k in ("none", "2:0.5", "1:0.7,3:0.5")
    ]
    n = model.vision.num_patches
    for r in recs:
        assert INFER_KEYS <= set(r)
        assert r["efficiency"] == pytest.approx(r["speedup_e2e"] / r["flops_ratio"])
        assert r["pairs_per_s"] > 0 and r["images_per_s"] > 0 and r["peak_memory_mb"] > 0
        if r["keep"] == "none":
            assert r["flops_ratio"] == 1.0 and r["speedup_e2e"] == 1.0 and r["visual_tokens"] == 1 + n
        else:
            assert r["flops_ratio"] > 1.0 and r["flops_ratio_vit"] > 1.0 and r["flops"] < recs[0]["flops"]
    assert recs[1]["visual_tokens"] == 1 + n // 2 + 1  # [CLS, K kept, fused]
    assert recs[0]["peak_share"] is not None and recs[3]["peak_share"] is None
    json.dumps(recs)  # serialisable as it is
    # the model is handed back as it came: own selectors, fp32
    assert model.vision.selectors is own and next(model.parameters()).dtype == torch.float32


def test_bench_inference_needs_unpruned_first(micro):
    _, model = micro
    with pytest.raises(BenchError, match="unpruned"):
        bench_inference(model, [KeepSetting((2,), (0.5,))], batch=1, runs=1, warmup=0)


def test_bench_train_micro(micro):
    cfg, model = micro
    settings = parse_keeps(["2:0.5"], cfg.model.vision.layers)
    recs = bench_train(
        model, cfg, settings, batch=2, text_len=6, runs=1, warmup=0, dtype=torch.float32, memory=False
    )
    assert [r["keep"] for r in recs] == ["none", "2:0.5"]
    for r in recs:
        assert TRAIN_KEYS <= set(r) and r["samples_per_s"] > 0 and r["peak_memory_mb"] is None
    assert recs[0]["flops_ratio"] == 1.0 and recs[1]["flops_ratio"] > 1.0
    assert not model.training


def _fast_bf16(monkeypatch, fast: bool) -> None:
    """Mock the CPU capability check (AVX-512 BF16 / AMX) that decides what the CPU runs natively."""
    import copa.utils.device

    monkeypatch.setattr(copa.utils.device, "cpu_has_fast_bf16", lambda: fast)


def test_cli_writes_json(tmp_path, capsys, monkeypatch):
    from copa.cli import main

    _fast_bf16(monkeypatch, True)  # a CPU with native bf16: both peaks are probed

    sets = [a for o in MICRO for a in ("--set", o)]
    rc = main(
        [
            "bench",
            "--config",
            "configs/tiny.yaml",
            *sets,
            "--batch",
            "2",
            "--runs",
            "1",
            "--warmup",
            "1",
            "--keep",
            "2:0.5",
            "--precision",
            "fp32",
            "--peak-size",
            "64",
            "--text-len",
            "6",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {"hardware", "matmul_peak", "results", "memory_method", "date", "command"} <= set(data)
    assert {"cpu", "cpu_cores", "torch", "torch_threads"} <= set(data["hardware"])
    assert set(data["matmul_peak"]) == {"bf16", "fp32"}
    assert [r["keep"] for r in data["results"]] == ["none", "2:0.5"]
    assert "| fp32 | 2:0.5 |" in capsys.readouterr().out


def test_cli_rejects_bad_keep(tmp_path):
    from copa.cli import main

    sets = [a for o in MICRO for a in ("--set", o)]
    assert (
        main(["bench", "--config", "configs/tiny.yaml", *sets, "--keep", "9:0.5", "--out", str(tmp_path)])
        == 2
    )


def test_native_precisions_follow_the_capability_check(monkeypatch):
    from copa.bench.hardware import native_precisions

    cpu = torch.device("cpu")
    _fast_bf16(monkeypatch, True)
    assert native_precisions(cpu) == [torch.bfloat16, torch.float32]
    _fast_bf16(monkeypatch, False)
    assert native_precisions(cpu) == [torch.float32]


def test_matmul_peak_shrinks_to_its_time_cap():
    from copa.bench.hardware import matmul_peak

    pk = matmul_peak(torch.float32, torch.device("cpu"), n=2048, runs=1, max_seconds=1e-6)
    assert pk["size"] == 256 and pk["capped"] and pk["flops_per_s"] > 0
    assert not matmul_peak(torch.float32, torch.device("cpu"), n=64, runs=1, max_seconds=1e-6)["capped"]


def test_cli_without_native_bf16_probes_fp32_only(tmp_path, capsys, monkeypatch):
    """An AVX2-only CPU: the default run never touches bf16 (a 4096^3 bf16 probe took > 15 min)."""
    from copa.cli import main

    _fast_bf16(monkeypatch, False)
    sets = [a for o in MICRO for a in ("--set", o)]
    rc = main(
        [
            "bench",
            "--config",
            "configs/tiny.yaml",
            *sets,
            "--batch",
            "2",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--keep",
            "2:0.5",
            "--peak-size",
            "64",
            "--text-len",
            "6",
            "--no-memory",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert set(data["matmul_peak"]) == {"fp32"} and data["warnings"] == []
    assert {r["precision"] for r in data["results"]} == {"fp32"}  # auto -> fp32 here
    assert "WARNING" not in capsys.readouterr().out


def test_cli_warns_loudly_when_bf16_is_forced_without_native_bf16(tmp_path, capsys, monkeypatch):
    from copa.cli import main

    _fast_bf16(monkeypatch, False)
    sets = [a for o in MICRO for a in ("--set", o)]
    rc = main(
        [
            "bench",
            "--config",
            "configs/tiny.yaml",
            *sets,
            "--batch",
            "2",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--keep",
            "2:0.5",
            "--precision",
            "bf16",
            "--peak-size",
            "64",
            "--text-len",
            "6",
            "--no-memory",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["warnings"]) == 1 and "without native bf16" in data["warnings"][0]
    out = capsys.readouterr()
    assert "WARNING: bf16 was forced" in out.out  # in the printed table's header
    assert "WARNING copa.bench.cli: " + "!" * 100 in out.err  # and as a banner in the log, first
    # the forced precision is probed (it is what the shares refer to), flagged as emulated
    assert set(data["matmul_peak"]) == {"bf16", "fp32"} and data["matmul_peak"]["bf16"]["emulated"]


@pytest.mark.parametrize(
    ("spec", "name", "selector"),
    [
        ("tome@2:0.5", "tome@2:0.5", "tome"),
        (" Random @ 1:0.7,3:0.5", "random@1:0.7,3:0.5", "random"),
        ("2:0.5", "2:0.5", None),
    ],
)
def test_parse_keep_with_a_selector(spec, name, selector):
    s = parse_keep(spec, num_layers=4)
    assert (s.name, s.selector) == (name, selector)
    assert parse_keep(s.name, num_layers=4) == s  # the name parses back


@pytest.mark.parametrize("spec", ["bogus@2:0.5", "none@2:0.5", "@2:0.5"])
def test_parse_keep_rejects_unknown_selectors(spec):
    with pytest.raises(BenchError, match="unknown selector"):
        parse_keep(spec, num_layers=4)


def test_bench_compares_selectors_in_one_run(micro):
    """tome and random against the config's selector, same weights, same visual-token count."""
    cfg, model = micro
    settings = parse_keeps(["2:0.5", "tome@2:0.5", "random@2:0.5"], cfg.model.vision.layers)
    recs = bench_inference(model, settings, batch=2, text_len=6, runs=1, warmup=0, memory=False)
    assert [(r["keep"], r["selector"]) for r in recs] == [
        ("none", "none"),
        ("2:0.5", "tpd"),
        ("tome@2:0.5", "tome"),
        ("random@2:0.5", "random"),
    ]
    assert len({r["visual_tokens"] for r in recs[1:]}) == 1
    assert recs[1]["visual_tokens"] < recs[0]["visual_tokens"]
    assert model.vision.select_cfg.selector == "tpd"  # handed back with its own selection


RETRIEVAL_KEYS = {"hardware", "command", "date", "num_images", "num_texts", "captions_per_image", "itm_topk"}
RETRIEVAL_KEYS |= {"results", "speedup_reuse", "speedup_pruning", "reuse_max_abs_diff", "reuse_same_r1"}
RETRIEVAL_RECORD_KEYS = {
    "setting",
    "keep_ratio",
    "prefix_reuse",
    "itm_pairs",
    "itc_s",
    "itm_s",
    "total_s",
    "images_per_s",
    "itm_pairs_per_s",
    "itm_breakdown_s",
    "i2t_r1",
    "t2i_r1",
    "itc_i2t_r1",
    "speedup_reuse",
    "speedup_pruning_itm",
}


@pytest.fixture(scope="module")
def gallery_json(tmp_path_factory):
    """20 synthetic scenes of 64 px with 5 captions each (the retrieval benchmark's shape, small)."""
    from copa.data.synth import write_synth

    out = tmp_path_factory.mktemp("gallery")
    write_synth(out, seed=0, n_train=1, n_val=1, n_test=20, image_size=64, n_captions=5)
    return out / "test.json"


def test_cli_retrieval_bench(tmp_path, capsys, micro_ckpt, gallery_json):
    from copa.cli import main

    sets = [a for o in MICRO for a in ("--set", o)]
    args = ["bench", "retrieval", "--config", "configs/tiny.yaml", *sets, "--ckpt", str(micro_ckpt)]
    args += ["--data", str(gallery_json), "--batch", "8", "--itm-topk", "4", "--precision", "fp32"]
    assert main([*args, "--runs", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "retrieval_bench.json").read_text())
    assert RETRIEVAL_KEYS <= set(data) and {"cpu", "torch_threads"} <= set(data["hardware"])
    assert (data["num_images"], data["num_texts"]) == (20, 100)
    assert data["captions_per_image"] == {"min": 5, "mean": 5.0, "max": 5}
    recs = data["results"]
    assert [(r["setting"], r["prefix_reuse"]) for r in recs] == [
        ("pruned", True),
        ("pruned", False),
        ("unpruned", True),
        ("unpruned", False),
    ]
    for r in recs:
        assert RETRIEVAL_RECORD_KEYS <= set(r)
        assert (
            r["itc_s"] > 0
            and r["itm_s"] > 0
            and r["images_per_s"] > 0
            and len(r["itm_timing"]["runs_ms"]) == 2
        )
        assert r["itm_pairs"] >= 100 * 4  # every text query's top 4 images at least
    assert recs[0]["keep_ratio"] == 0.5 and recs[2]["keep_ratio"] == 1.0
    # reuse and no reuse compute the same scores, so the same recall
    assert data["reuse_same_r1"] and max(data["reuse_max_abs_diff"].values()) < 1e-4
    for a, b in zip(recs[::2], recs[1::2], strict=True):
        assert (a["i2t_r1"], a["t2i_r1"], a["r_mean"]) == (b["i2t_r1"], b["t2i_r1"], b["r_mean"])
    assert set(data["speedup_pruning"]["pruned"]) == {"itc", "itm", "total"}
    md = (tmp_path / "retrieval_bench.md").read_text()
    assert "| pruned (0.5) | yes |" in md and md in capsys.readouterr().out


def test_cli_retrieval_bench_random_model_unpruned_only(tmp_path, gallery_json):
    """The config's model with random weights; selector none: only the unpruned setting, 6 images."""
    from copa.cli import main

    sets = [a for o in [*MICRO, "model.select.selector=none"] for a in ("--set", o)]
    args = ["bench", "retrieval", "--config", "configs/tiny.yaml", *sets, "--data", str(gallery_json)]
    args += [
        "--n-images",
        "6",
        "--itm-topk",
        "3",
        "--warmup",
        "0",
        "--json",
        "r.json",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert (data["num_images"], data["num_texts"]) == (6, 30)
    assert [r["setting"] for r in data["results"]] == ["unpruned", "unpruned"] and not data["speedup_pruning"]
    assert data["reuse_same_r1"]


def test_compile_blocks_keeps_outputs_and_undoes(micro):
    """``COPAModel.compile_blocks`` (traced by dynamo without graph breaks; the eager backend keeps
    the test fast) gives the eager outputs, pruned and unpruned, and ``False`` restores eager."""
    from torch._dynamo.utils import counters

    _, model = micro
    tok = model.tokenizer(["a red circle", "is there a star?"], padding=True, return_tensors="pt")
    images, ids, mask = torch.randn(2, 3, 32, 32), tok["input_ids"], tok["attention_mask"]
    with torch.no_grad():
        want = [model(images, ids, mask, keep_ratios=[r]).text for r in (0.5, 1.0)]
        counters.clear()
        assert model.compile_blocks(backend="eager") == 4 + 1 + 2 + 2  # ViT blocks, text, fusion, decoder
        got = [model(images, ids, mask, keep_ratios=[r]).text for r in (0.5, 1.0)]
        assert not counters["graph_break"] and counters["frames"]["ok"] > 0
        model.compile_blocks(False)
    assert all(b._compiled_call_impl is None for b in model.vision.blocks)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w)


def test_bench_compile_needs_a_warmup_and_a_known_mode(micro):
    cfg, model = micro
    settings = parse_keeps(["2:0.5"], cfg.model.vision.layers)
    with pytest.raises(BenchError, match="warmup"):
        bench_inference(model, settings, batch=1, runs=1, warmup=0, compile_mode="default")
    with pytest.raises(BenchError, match="mode"):
        bench_train(model, cfg, settings, batch=2, runs=1, warmup=1, compile_mode="fast")


@pytest.mark.slow
def test_bench_with_torch_compile_micro(micro):
    """Inference and the training step timed with the blocks compiled by inductor."""
    cfg, model = micro
    settings = parse_keeps(["2:0.5"], cfg.model.vision.layers)
    kw = {"batch": 2, "text_len": 6, "runs": 1, "warmup": 1, "memory": False, "compile_mode": "default"}
    recs = bench_inference(model, settings, precisions=[torch.float32], **kw)
    train = bench_train(model, cfg, settings, dtype=torch.float32, **kw)
    assert [(r["keep"], r["compile"]) for r in recs + train] == [
        ("none", "default"),
        ("2:0.5", "default"),
    ] * 2
    assert all(r["pairs_per_s"] > 0 for r in recs) and all(r["samples_per_s"] > 0 for r in train)
    assert all(b._compiled_call_impl is None for b in model.vision.blocks)  # eager again after
