"""FusedAdam (agents/optim.py): the update of torch.optim.Adam(fused=True) bit for bit, its
state dict in torch's format both ways, and the fallbacks."""
from __future__ import annotations

import copy
import sys

import pytest
import torch

from apex_local.agents.optim import FusedAdam, make_adam


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _grads(net, k: int, skip_last_bias: bool = False) -> None:
    g = torch.Generator().manual_seed(k)
    for i, p in enumerate(net.parameters()):
        p.grad = None if (skip_last_bias and i == 3) else torch.randn(p.shape, generator=g) * (k + 1)


def _steps(net, opt, ks, skip_last_bias=False):
    for k in ks:
        _grads(net, k, skip_last_bias and k % 3 == 0)
        opt.step()


def test_same_parameters_and_state_as_torch_fused_adam_bit_for_bit():
    a, b = _net(), _net()
    ours = FusedAdam(a.parameters(), lr=1e-3, eps=1e-4)
    ref = torch.optim.Adam(b.parameters(), lr=1e-3, eps=1e-4, fused=True)
    _steps(a, ours, range(25), skip_last_bias=True)  # a parameter without a grad some steps: skipped, as torch does
    _steps(b, ref, range(25), skip_last_bias=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    mine, theirs = ours.state_dict(), ref.state_dict()
    common = mine["param_groups"][0].keys() & theirs["param_groups"][0].keys()  # keys vary across torch versions
    assert {"lr", "betas", "eps", "params", "fused"} <= common
    assert {k: mine["param_groups"][0][k] for k in common} == {k: theirs["param_groups"][0][k] for k in common}
    assert mine["state"].keys() == theirs["state"].keys()
    for i in mine["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(mine["state"][i][key], theirs["state"][i][key]), (i, key)


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dicts_load_across_and_training_continues_identically(direction):
    a, b = _net(), _net()
    first = torch.optim.Adam(a.parameters(), lr=3e-3, eps=1e-6, fused=True) if direction == "torch_to_ours" \
        else FusedAdam(a.parameters(), lr=3e-3, eps=1e-6)
    _steps(a, first, range(7))
    saved = copy.deepcopy(first.state_dict())
    b.load_state_dict(a.state_dict())
    second = FusedAdam(b.parameters(), lr=1.0, eps=1.0) if direction == "torch_to_ours" \
        else torch.optim.Adam(b.parameters(), lr=1.0, eps=1.0, fused=True)
    second.load_state_dict(saved)  # the saved lr / eps win, as in torch
    _steps(a, first, range(7, 15))
    _steps(b, second, range(7, 15))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_load_refuses_a_state_of_another_shape():
    a = _net()
    opt = FusedAdam(a.parameters(), lr=1e-3)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ref = torch.optim.Adam(other.parameters(), lr=1e-3, fused=True)
    _grads(other, 0)
    ref.step()
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match="group"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    rms = torch.optim.RMSprop(a.parameters(), lr=1e-3)  # a checkpoint of another learner.optimizer
    _grads(a, 0)
    rms.step()
    with pytest.raises(ValueError, match="not Adam's"):
        opt.load_state_dict(rms.state_dict())


def test_zero_grad_and_no_grad_step():
    a = _net()
    opt = FusedAdam(a.parameters(), lr=1e-3)
    before = [p.clone() for p in a.parameters()]
    opt.step()  # no gradients at all: nothing happens, no state
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before)) and opt.state == {}
    _grads(a, 1)
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in a.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in a.parameters())


def test_make_adam_avoids_torch_optimizer_and_falls_back_without_the_kernel(monkeypatch):
    a = _net()
    assert isinstance(make_adam(a.parameters(), torch.device("cpu"), lr=1e-3, eps=1e-8), FusedAdam)
    monkeypatch.delattr(torch, "_fused_adam_")  # a torch without the fused kernel
    opt = make_adam(a.parameters(), torch.device("cpu"), lr=1e-3, eps=1e-8)
    assert isinstance(opt, torch.optim.Adam)


def test_building_a_learner_does_not_import_dynamo():
    """The reason FusedAdam exists: torch.optim.Optimizer imports torch._dynamo on first use."""
    import subprocess

    code = ("import sys, numpy as np; from apex_local.agents.learner import Learner; "
            "from apex_local.config import Config; Learner(Config(), (4,), np.float32, 2); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
