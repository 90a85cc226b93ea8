"""Pre-training: losses fall when overfitting, ITM negatives re-run selection, exact resume,
non-finite losses stop cleanly, 2-process torchrun training keeps ranks identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from copa.model.copa import COPAModel
from copa.train.loop import NonFiniteLossError
from copa.train.losses import PretrainObjective
from copa.train.trainer import build_datasets, make_loader, pretrain
from tests.conftest import train_config


def _batch(cfg, n=8):
    ds = build_datasets(cfg, ("train",))["train"]
    return next(iter(make_loader(ds, cfg, train=True, batch_size=n)))


def test_each_loss_decreases_when_overfitting_one_batch(synth_dir):
    cfg = train_config(synth_dir)
    torch.manual_seed(0)
    model = COPAModel(cfg.model).train()
    obj = PretrainObjective(model, cfg.train.loss_weights)
    batch = _batch(cfg)
    assert batch.has_boxes.any() and batch.phrase_ids.shape[0] > 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = last = None
    for i in range(30):
        out = obj(batch)
        assert all(torch.isfinite(v) for v in out.losses.values())
        if i == 0:
            first = {k: float(v.detach()) for k, v in out.losses.items()}
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    last = {k: float(v) for k, v in obj(batch).losses.items()}
    assert set(first) == {"itc", "itm", "mlm", "prefix_lm", "pta"}
    for k in first:
        assert last[k] < first[k] * 0.9, (k, first[k], last[k])


def test_itm_negative_pairs_rerun_selection_with_their_own_text(synth_dir):
    cfg = train_config(
        synth_dir,
        "model.text.pretrained=minilm",
        "model.text.width=384",
        "model.text.heads=12",
        "model.text.intermediate=1536",
        "model.text.layers=6",
        "model.fusion.heads=12",
        "model.decoder.heads=12",
    )
    torch.manual_seed(0)
    model = COPAModel(cfg.model).eval()
    with torch.no_grad():  # a text-sensitive TPD, as PTA training makes it
        model.vision.selectors[0].fc_text.weight.mul_(50)
    obj = PretrainObjective(model, cfg.train.loss_weights)
    batch = _batch(cfg)
    with torch.no_grad():
        out = obj(batch)
        b = batch.images.shape[0]
        prefix = model.image_prefix(batch.images)
        txt_cls = model.text_query(
            model.text_states(batch.caption_ids, batch.caption_mask), batch.caption_mask
        )
        expect = model.image_tokens(prefix, txt_cls[out.neg_txt]).kept  # image i with its hard text
    pos, neg = out.itm_kept[:b], out.itm_kept[b : 2 * b]
    assert torch.equal(neg, expect)
    differ = [not torch.equal(pos[i].sort().values, neg[i].sort().values) for i in range(b)]
    assert sum(differ) >= b // 2, differ


def test_itm_one_negative_per_row_alternates_hard_text_and_hard_image(synth_dir):
    cfg = train_config(synth_dir)
    torch.manual_seed(0)
    model = COPAModel(cfg.model).eval()
    obj = PretrainObjective(model, cfg.train.loss_weights, itm_negatives="one")
    batch = _batch(cfg)
    with torch.no_grad():
        out = obj(batch)
        b = batch.images.shape[0]
        prefix = model.image_prefix(batch.images)
        txt_cls = model.text_query(
            model.text_states(batch.caption_ids, batch.caption_mask), batch.caption_mask
        )
        hard_text = model.image_tokens(prefix, txt_cls[out.neg_txt]).kept
        hard_image = model.image_tokens(prefix[out.neg_img], txt_cls).kept
    assert out.itm_kept.shape[0] == 2 * b  # positives + one negative per row, not 3B
    neg = out.itm_kept[b:]
    assert torch.equal(neg[0::2], hard_text[0::2]) and torch.equal(neg[1::2], hard_image[1::2])
    assert torch.isfinite(out.losses["itm"])


def _params(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    latest = (path / "checkpoints" / "latest").read_text().strip()
    return load_file(str(path / "checkpoints" / latest / "model.safetensors"))


def test_exact_resume(synth_dir, tmp_path):
    over = ["train.steps=6", "train.ckpt_every=3", "train.val_every=3", "model.text.layers=1"]
    cfg = train_config(synth_dir, *over)
    pretrain(cfg, tmp_path / "full")
    pretrain(cfg, tmp_path / "killed", stop_at=3)
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    pretrain(cfg, tmp_path / "killed", resume=True)
    a, b = _params(tmp_path / "full"), _params(tmp_path / "killed")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    # and the run really moved: the parameters differ from the ones at step 3
    full_log = (tmp_path / "full" / "train_log.csv").read_text().splitlines()
    resumed_log = (tmp_path / "killed" / "train_log.csv").read_text().splitlines()
    assert full_log[0] == resumed_log[0] and len(resumed_log) == len(full_log)


def test_branch_continues_exactly_and_ablations_share_the_trunk(synth_dir, tmp_path):
    over = ["train.steps=4", "train.ckpt_every=2", "train.val_every=2", "model.text.layers=1"]
    cfg = train_config(synth_dir, *over)
    pretrain(cfg, tmp_path / "full")
    pretrain(cfg, tmp_path / "trunk", stop_at=2)
    # a branch with the trunk's own settings is the uninterrupted run
    pretrain(cfg, tmp_path / "same", branch_from=tmp_path / "trunk")
    a, b = _params(tmp_path / "full"), _params(tmp_path / "same")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert len((tmp_path / "same" / "train_log.csv").read_text().splitlines()) == len(
        (tmp_path / "full" / "train_log.csv").read_text().splitlines()
    )
    # a branch with PTA off moves the TPD differently; the trunk is left as it was
    pretrain(
        train_config(synth_dir, *over, "train.loss_weights.pta=0.0"),
        tmp_path / "nopta",
        branch_from=tmp_path / "trunk",
    )
    c = _params(tmp_path / "nopta")
    tpd = [k for k in a if k.startswith("vision.selectors")]
    assert tpd and max((a[k] - c[k]).abs().max().item() for k in tpd) > 0
    assert (tmp_path / "trunk" / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    with pytest.raises(FileExistsError):
        pretrain(cfg, tmp_path / "same", branch_from=tmp_path / "trunk")
    with pytest.raises(FileNotFoundError):
        pretrain(cfg, tmp_path / "x", branch_from=tmp_path / "nothing")


def test_non_finite_loss_stops_and_keeps_last_checkpoint(synth_dir, tmp_path, monkeypatch):
    cfg = train_config(synth_dir, "train.steps=4", "train.ckpt_every=2", "model.text.layers=1")
    from copa.train import losses

    real = losses.ITCLoss.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        loss, sim = real(self, *a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), sim

    monkeypatch.setattr(losses.ITCLoss, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="itc"):
        pretrain(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000002"


def test_torchrun_two_processes_keep_identical_parameters(synth_dir, tmp_path):
    summary = _torchrun(tmp_path / "ddp", synth_dir, "train.steps=3")
    assert summary["world_size"] == 2 and summary["steps"] == 3
    a, b = summary["param_checksums"]
    assert a == b
    assert (tmp_path / "ddp" / "model" / "model.safetensors").exists()


def test_torchrun_ranks_with_skewed_clocks_stop_together(synth_dir, tmp_path):
    # rank 1 sees a tenth of the elapsed time: deciding the budget per rank would send rank 0 into
    # validation's all-gather while rank 1 trains on (a hang until the process-group timeout)
    summary = _torchrun(
        tmp_path / "skew",
        synth_dir,
        "train.steps=500",
        "train.time_budget_s=4",
        "train.val_every=500",
        entry=("tests/skewed_clock.py",),
    )
    assert summary["stopped_early"] and 0 < summary["steps"] < 500
    a, b = summary["param_checksums"]
    assert a == b


def _torchrun(
    out: Path, synth_dir, *extra: str, args: tuple[str, ...] = (), entry: tuple[str, ...] = ("-m", "copa")
) -> dict:
    from tests.conftest import MICRO, TRAIN_MICRO

    sets = [
        *MICRO,
        *TRAIN_MICRO,
        "model.text.layers=1",
        f"data.train={synth_dir}/train.json",
        f"data.val={synth_dir}/val.json",
        *extra,
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *entry,
        "pretrain",
        "--config",
        "configs/tiny.yaml",
        "--out",
        str(out),
        *args,
    ]
    for s in sets:
        cmd += ["--set", s]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(["src", os.getcwd(), os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_fsdp_two_processes_resume_exactly(synth_dir, tmp_path):
    over = ("train.distributed=fsdp", "train.steps=3", "train.ckpt_every=1")
    full = _torchrun(tmp_path / "full", synth_dir, *over)
    _torchrun(tmp_path / "cut", synth_dir, *over, args=("--stop-at", "2"))
    resumed = _torchrun(tmp_path / "cut", synth_dir, *over, args=("--resume",))
    assert full["steps"] == resumed["steps"] == 3
    assert full["param_checksums"] == resumed["param_checksums"]


def test_pretrain_streams_webdataset_shards(synth_dir, tmp_path):
    from copa.data.readers import read_records
    from copa.data.shards import write_shards

    shards = write_shards(read_records(synth_dir / "train.json"), tmp_path / "shards", shard_size=8)
    assert len(shards) == 3
    cfg = train_config(
        synth_dir,
        "train.steps=2",
        "model.text.layers=1",
        f"data.train={tmp_path}/shards/shard-{{000000..000002}}.tar",
    )
    res = pretrain(cfg, tmp_path / "run")
    assert res.steps == 2 and (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_grad_checkpointing_matches(synth_dir):
    cfg = train_config(synth_dir, "model.text.layers=1", "model.text.pretrained=")
    batch = _batch(cfg, 4)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = COPAModel(cfg.model).train()
        for mod in model.modules():  # dropout off so both passes see the same randomness
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        model.set_grad_checkpointing(ckpt)
        obj = PretrainObjective(model, {"itc": 1.0, "mlm": 0.0, "itm": 0.0, "prefix_lm": 0.0, "pta": 1.0})
        torch.manual_seed(1)
        obj(batch).loss.backward()
        grads.append(model.vision.blocks[0].mlp.fc1.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def _finite_latest(out: Path) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in _params(out).values())


def test_diverging_run_exits_3_and_latest_stays_finite(synth_dir, tmp_path, capsys):
    from copa.cli import main
    from tests.conftest import MICRO, TRAIN_MICRO

    out = tmp_path / "run"
    stale = [out / "checkpoints" / ".tmp_step_0000009_4242", out / "checkpoints" / ".latest.4242"]
    stale[0].mkdir(parents=True)  # what a run killed while saving leaves behind
    stale[1].write_text("step_0000009")
    sets = [
        *MICRO,
        *TRAIN_MICRO,
        "model.text.layers=1",
        f"data.train={synth_dir}/train.json",
        f"data.val={synth_dir}/val.json",
        "train.steps=8",
        "train.ckpt_every=1",
        "train.lr=1e6",
        "train.lr_vit=1e6",
        "train.lr_text=1e6",
    ]
    argv = ["pretrain", "--config", "configs/tiny.yaml", "--out", str(out)]
    rc = main(argv + [a for s in sets for a in ("--set", s)])
    err = capsys.readouterr().err
    assert rc == 3, err[-2000:]
    assert "Traceback" not in err and "non-finite" in err
    assert not any(p.exists() for p in stale)
    assert (out / "checkpoints" / "latest").exists() and _finite_latest(out)
    assert not (out / "model").exists()


def test_non_finite_parameters_are_never_checkpointed(synth_dir, tmp_path, monkeypatch):
    cfg = train_config(synth_dir, "train.steps=4", "train.ckpt_every=1", "model.text.layers=1")
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned(self, *a, **k):  # the second update leaves a NaN in the weights, losses still finite
        res = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return res

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite parameters after step 2"):
        pretrain(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    assert _finite_latest(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step_0000001"]


def test_one_image_batches_skip_itm_and_count_it(synth_dir, tmp_path):
    """ALBEF-style lists (one entry per caption) can fill a batch with one image: no ITM negative."""
    recs = json.loads((synth_dir / "val.json").read_text())

    def albef(images: list[dict], per_image: int) -> list[dict]:
        return [
            {"image": r["image"], "caption": (r["captions"] * per_image)[k]}
            for r in images
            for k in range(per_image)
        ]

    (tmp_path / "train.json").write_text(json.dumps(albef(recs[:1], 8)))
    (tmp_path / "val.json").write_text(json.dumps(albef(recs[1:3], 4)))  # in order: a val batch is one image
    cfg = train_config(
        synth_dir,
        "train.steps=2",
        "model.text.layers=1",
        f"data.train={tmp_path}/train.json",
        f"data.val={tmp_path}/val.json",
        f"data.image_root={synth_dir}",
    )
    res = pretrain(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert res.steps == 2 and summary["events"] == {"itm_skipped": 2}
    assert summary["final_val"]["val_itm_skipped"] == 8  # 8 validation batches of one image
    assert "val_itm" not in summary["final_val"]
    log = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    header = log[0].split(",")
    for row in log[1:]:
        values = dict(zip(header, row.split(","), strict=True))
        assert float(values["itm"]) == 0.0 and float(values["itc"]) > 0.0
