"""Hub ids resolve through ``huggingface_hub`` from a local cache laid out as the hub's, with no
network; local paths always win; an id that is neither cached nor downloadable is one clear error."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from copa.errors import CheckpointNotFoundError
from copa.hub import is_hub_id, resolve_checkpoint
from tests.conftest import scene_png

ROOT = Path(__file__).parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(cache: Path, repo: str, model_dir: Path) -> Path:
    """``cache/models--org--name/{blobs, refs/main, snapshots/COMMIT}`` with the snapshot's files
    symlinked to content-addressed blobs, as ``huggingface_hub`` writes them."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    for f in model_dir.iterdir():
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hub_id_from_local_cache(micro_ckpt, tmp_path, no_network):
    import copa

    snap = hub_cache(tmp_path / "hub", "copa-org/copa-micro", micro_ckpt)
    assert resolve_checkpoint("copa-org/copa-micro", cache_dir=tmp_path / "hub") == snap
    assert resolve_checkpoint("copa-org/copa-micro", revision="main", cache_dir=tmp_path / "hub") == snap
    model = copa.COPAModel.from_pretrained(
        resolve_checkpoint("copa-org/copa-micro", cache_dir=tmp_path / "hub")
    )
    assert model.image_transform.image_size == 32


def test_not_cached_and_offline_is_one_clear_error(tmp_path, no_network):
    with pytest.raises(CheckpointNotFoundError, match="not in the local hub cache"):
        resolve_checkpoint("copa-org/nothing-here", cache_dir=tmp_path / "hub")
    with pytest.raises(CheckpointNotFoundError, match="no such path"):
        resolve_checkpoint("./no/such/dir/at/all")


def test_local_paths_win(micro_ckpt, tmp_path, monkeypatch):
    assert resolve_checkpoint(micro_ckpt) == micro_ckpt
    assert resolve_checkpoint(micro_ckpt.parent) == micro_ckpt  # a run directory: its model/
    monkeypatch.chdir(micro_ckpt.parent.parent)
    rel = f"{micro_ckpt.parent.name}/model"  # looks like org/name, but exists here
    assert not is_hub_id(rel) and resolve_checkpoint(rel) == Path(rel)
    assert is_hub_id("org/name") and not is_hub_id("a/b/c") and not is_hub_id("../x")


def test_cli_predicts_with_a_hub_id(micro_ckpt, tmp_path):
    """`copa predict --ckpt org/name` in a fresh process: HF_HUB_CACHE names the cache, offline."""
    hub_cache(tmp_path / "hub", "copa-org/copa-micro", micro_ckpt)
    img = scene_png(tmp_path / "mine.png")
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "copa",
            "predict",
            "vqa",
            "--ckpt",
            "copa-org/copa-micro",
            "--image",
            str(img),
            "--question",
            "what color is the circle?",
        ],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"answer"' in r.stdout
