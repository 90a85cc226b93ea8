"""Fine-tuning under torchrun with 2 processes (gloo): FSDP trains the same model as DDP (both average
the same gradients; FSDP only shards them), saves it whole and evaluates it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from copa.model.copa import COPAModel
from tests.conftest import MICRO, TRAIN_MICRO, micro_config


def _finetune(out: Path, init: Path, synth_dir: Path, *extra: str) -> dict:
    sets = [
        *MICRO,
        *TRAIN_MICRO,
        "train.steps=2",
        "eval.batch_size=8",
        "eval.itm_topk=4",
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
        "-m",
        "copa",
        "finetune",
        "retrieval",
        "--config",
        "configs/tiny.yaml",
        "--init",
        str(init),
        "--out",
        str(out),
    ]
    for s in sets:
        cmd += ["--set", s]
    # this checkout's sources, not whatever copa the interpreter has installed
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(["src", os.getcwd(), os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_fsdp_finetune_matches_ddp(synth_dir, tmp_path):
    torch.manual_seed(0)
    init = tmp_path / "init"
    COPAModel(micro_config().model).save_pretrained(init)
    ddp = _finetune(tmp_path / "ddp", init, synth_dir)
    fsdp = _finetune(tmp_path / "fsdp", init, synth_dir, "train.distributed=fsdp")
    assert ddp["world_size"] == fsdp["world_size"] == 2 and ddp["steps"] == fsdp["steps"] == 2
    a = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "model" / "model.safetensors"))
    start = load_file(str(init / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4  # and it trained
    # the FSDP-trained model is evaluated whole, with the DDP one's metrics
    m_ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    m_fsdp = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert m_fsdp["world_size"] == 2 and m_fsdp["num_texts"] == m_ddp["num_texts"]
    for k in ("i2t_r1", "t2i_r1", "r_mean", "itc_r_mean"):
        assert abs(m_fsdp[k] - m_ddp[k]) <= 1e-6, (k, m_fsdp[k], m_ddp[k])
