"""Multi-process retrieval evaluation: 2 torchrun processes split both stages by rank and give the
same metrics as 1 process (and do not hang: both ranks make the same collective calls)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from copa.cli import main
from copa.model.copa import COPAModel
from tests.conftest import MICRO, TRAIN_MICRO, micro_config

RECALL_KEYS = [f"{p}{d}_r{k}" for p in ("", "itc_") for d in ("i2t", "t2i") for k in (1, 5, 10)] + [
    "r_mean",
    "itc_r_mean",
]


def test_torchrun_two_process_retrieval_matches_one_process(synth_dir, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "model"
    COPAModel(micro_config().model).save_pretrained(ckpt)
    sets = [
        *MICRO,
        *TRAIN_MICRO,
        "eval.batch_size=3",
        "eval.itm_topk=5",
        f"data.test={synth_dir}/test.json",
        f"data.train={synth_dir}/train.json",
    ]
    args = ["evaluate", "retrieval", "--config", "configs/tiny.yaml", "--ckpt", str(ckpt), "--split", "test"]
    for s in sets:
        args += ["--set", s]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "copa",
        *args,
        "--out",
        str(tmp_path / "two"),
    ]
    res = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert one["itm_pairs"] == two["itm_pairs"] and one["num_texts"] == two["num_texts"] == 24
    for k in RECALL_KEYS:
        assert one[k] == pytest.approx(two[k]), k
