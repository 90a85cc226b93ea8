"""The one optimizer builder: the fused AdamW kernel where torch has it, a fallback where it refuses,
checkpoints that resume exactly across kernels, and the schedules its callers use."""

from __future__ import annotations

import pytest
import torch

from copa.train import optim
from copa.train.loop import load_optimizer_state


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(6, 5, generator=g)),
        torch.nn.Parameter(torch.randn(5, generator=g)),
    ]


def _step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_cpu_gets_the_fused_kernel():
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    if "cpu" not in _get_fused_kernels_supported_devices():
        pytest.skip("this torch has no fused CPU AdamW")
    opt = optim.adamw(_params())
    assert opt.param_groups[0]["fused"] is True and opt.defaults["betas"] == optim.BETAS


def test_falls_back_when_the_kernel_is_refused(monkeypatch):
    real = torch.optim.AdamW.__init__

    def picky(self, params, *a, fused=None, foreach=None, **k):
        if fused or foreach:
            raise RuntimeError("no such kernel here")
        real(self, params, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", picky)
    opt = optim.adamw(_params())
    assert not opt.param_groups[0].get("fused") and not opt.param_groups[0].get("foreach")


def test_resume_across_kernels_keeps_this_machines_kernel_and_the_update():
    """A checkpoint of the per-tensor AdamW resumed with the fused one (and back): the loaded
    optimizer keeps its own kernel and takes the same step as the uninterrupted run."""
    ref_params = _params()
    ref = torch.optim.AdamW(ref_params, lr=1e-2, betas=optim.BETAS)
    for s in range(3):
        _step(ref, ref_params, s)
    saved_params = _params()
    saved = torch.optim.AdamW(saved_params, lr=1e-2, betas=optim.BETAS)
    for s in range(2):
        _step(saved, saved_params, s)
    state = saved.state_dict()
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in saved_params]
    resumed = optim.adamw(resumed_params, lr=1e-2)
    kernel = optim.kernel_flags(resumed)
    load_optimizer_state(torch.nn.Module(), resumed, state, fsdp=False)
    assert optim.kernel_flags(resumed) == kernel  # not the checkpoint's (per-tensor) flags
    _step(resumed, resumed_params, 2)
    for a, b in zip(ref_params, resumed_params, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_schedules():
    f = optim.lr_lambda(warmup=2, total=10)
    assert [f(0), f(1)] == [0.5, 1.0] and f(10) == pytest.approx(0.05) and f(100) == pytest.approx(0.05)
    # the selector stage's warm-up then constant rate
    g = optim.lr_lambda(warmup=4, total=40, floor=1.0)
    assert [g(s) for s in range(6)] == [min(1.0, (s + 1) / 4) for s in range(6)]
    assert optim.lr_lambda(0, 5, floor=1.0)(0) == 1.0


def test_param_groups_split_rates_and_decay(micro_model):
    from tests.conftest import micro_config

    t = micro_config("train.lr=1e-3", "train.lr_vit=1e-4", "train.lr_text=1e-5").train
    groups = {g["name"]: g for g in optim.param_groups(micro_model, t)}
    assert groups["vit"]["lr"] == 1e-4 and groups["text"]["lr"] == 1e-5 and groups["rest"]["lr"] == 1e-3
    assert groups["vit_nodecay"]["weight_decay"] == 0.0 and groups["vit"]["weight_decay"] == t.weight_decay
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == sum(p.numel() for p in micro_model.parameters() if p.requires_grad)


def test_lr_head_reaches_exactly_the_heads_trained_from_scratch(micro_model):
    from tests.conftest import micro_config

    t = micro_config("train.lr=1e-3", "train.lr_head=3e-3").train
    groups = {g["name"]: g for g in optim.param_groups(micro_model, t)}
    new = (micro_model.box_head, micro_model.itm, micro_model.fusion.pos)
    heads = {id(p) for m in new for p in m.parameters()}
    in_head = {id(p) for name in ("head", "head_nodecay") for p in groups[name]["params"]}
    assert in_head == heads and groups["head"]["lr"] == 3e-3 and groups["rest"]["lr"] == 1e-3
    default = {
        g["name"]: g["lr"] for g in optim.param_groups(micro_model, micro_config("train.lr=1e-3").train)
    }
    assert default["head"] == default["rest"] == 1e-3


def test_trainable_only_trains_the_given_parameters_and_restores_every_flag():
    import pytest
    from torch import nn

    from copa.train.optim import trainable_only

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].bias.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError), trainable_only(model, [model[0].weight]):
        assert [p.requires_grad for p in model.parameters()] == [True, False, False, False]
        raise RuntimeError("a stage that fails")
    assert [p.requires_grad for p in model.parameters()] == before
