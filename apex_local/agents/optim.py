"""Adam through torch's fused kernel, without `torch.optim.Optimizer`.

`FusedAdam` makes the update ``torch.optim.Adam(fused=True)`` makes, bit for bit: it calls the
same kernel (``torch._fused_adam_``) with the same arguments, after the same step-count
increment. What it leaves out is `torch.optim.Optimizer` around it: the first construction or
step of one imports ``torch._dynamo`` (~1.4 s of every learner start, ~7 % of a CartPole
time-to-solve), and every step runs ~0.15 ms of Python (profiler hooks, grad-mode guards,
grouping by device and dtype, graph-capture checks) around a kernel that takes less on a
small net. The state dict is `torch.optim.Adam`'s format, so checkpoints load into either.

Only what the learner uses: one parameter group, no weight decay, no amsgrad, no closure; it
is not a `torch.optim.Optimizer` (no LR schedulers, hooks or ``add_param_group``).
`make_adam` falls back to ``torch.optim.Adam`` where the fused kernel is missing (a device it
does not support, or a torch without it).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

__all__ = ["FusedAdam", "make_adam"]


class FusedAdam:
    def __init__(self, params: Iterable[torch.Tensor], lr: float, eps: float = 1e-8,
                 betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("FusedAdam: no parameters")
        devices = {(p.device, p.dtype) for p in self.params}
        if len(devices) != 1 or not self.params[0].is_floating_point():
            raise ValueError(f"FusedAdam: parameters must share one device and floating dtype, got {devices}")
        self.defaults = {"lr": float(lr), "betas": (float(betas[0]), float(betas[1])), "eps": float(eps),
                         "weight_decay": 0, "amsgrad": False, "maximize": False, "foreach": None,
                         "capturable": False, "differentiable": False, "fused": True,
                         "decoupled_weight_decay": False}
        self.param_groups = [dict(self.defaults, params=self.params)]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def _state_of(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        st = self.state.get(p)
        if st is None:  # as torch.optim.Adam initialises it (a float32 step on the device when fused)
            st = self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                  "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                  "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return st

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step on the parameters that have a gradient (others keep their state)."""
        g = self.param_groups[0]
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in self.params:
            if p.grad is None:
                continue
            st = self._state_of(p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        if not params:
            return
        beta1, beta2 = g["betas"]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=g["lr"],
                           beta1=beta1, beta2=beta2, weight_decay=0.0, eps=g["eps"], maximize=False,
                           grad_scale=None, found_inf=None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    # ------------------------------------------------------------------ torch.optim.Adam's format
    def state_dict(self) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(self.params)}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": {index[p]: dict(st) for p, st in self.state.items()},
                "param_groups": [dict(group, params=list(range(len(self.params))))]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A state dict of this class or of ``torch.optim.Adam`` (one group, these parameters);
        like torch, the saved lr / betas / eps replace the current ones."""
        groups = state_dict.get("param_groups", [])
        if len(groups) != 1 or len(groups[0].get("params", [])) != len(self.params):
            raise ValueError(f"optimizer state has {len(groups)} group(s) of "
                             f"{[len(g.get('params', [])) for g in groups]} parameters; this optimizer has one "
                             f"group of {len(self.params)}")
        saved = groups[0]
        if saved.get("amsgrad") or saved.get("weight_decay") or saved.get("maximize"):
            raise ValueError("optimizer state uses amsgrad / weight_decay / maximize, which FusedAdam does not")
        by_id = dict(zip(saved["params"], self.params))
        state = {}
        for key, st in state_dict.get("state", {}).items():
            p = by_id.get(key)
            if p is None or not isinstance(st, dict) or not {"step", "exp_avg", "exp_avg_sq"} <= st.keys():
                raise ValueError(f"optimizer state of parameter {key!r} is not Adam's (step, exp_avg, exp_avg_sq): "
                                 f"{sorted(st) if isinstance(st, dict) else type(st).__name__} (a checkpoint of "
                                 "another learner.optimizer?)")
            exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]
            if exp_avg.shape != p.shape or exp_avg_sq.shape != p.shape:
                raise ValueError(f"optimizer state of parameter {key} has shape {tuple(exp_avg.shape)}, "
                                 f"the parameter {tuple(p.shape)}")
            step = st["step"]
            state[p] = {"step": torch.as_tensor(step, dtype=torch.float32).to(p.device).clone().reshape(()),
                        "exp_avg": exp_avg.to(p.device, p.dtype).clone(),
                        "exp_avg_sq": exp_avg_sq.to(p.device, p.dtype).clone()}
        self.state = state
        g = self.param_groups[0]
        g.update(lr=float(saved.get("lr", g["lr"])), eps=float(saved.get("eps", g["eps"])),
                 betas=tuple(float(b) for b in saved.get("betas", g["betas"])))


def make_adam(params, device: torch.device, lr: float, eps: float):
    """`FusedAdam` where the fused kernel serves ``device`` (CPU, CUDA), else
    ``torch.optim.Adam`` (fused when it can be, else the default implementation)."""
    params = list(params)
    if device.type in ("cpu", "cuda") and hasattr(torch, "_fused_adam_"):
        try:
            opt = FusedAdam(params, lr=lr, eps=eps)
            probe = [torch.zeros(1, device=params[0].device, dtype=params[0].dtype)]
            torch._fused_adam_(probe, [torch.zeros_like(probe[0])], [torch.zeros_like(probe[0])],
                               [torch.zeros_like(probe[0])], [], [torch.ones((), device=probe[0].device)],
                               amsgrad=False, lr=lr, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=eps,
                               maximize=False, grad_scale=None, found_inf=None)
            return opt
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            pass  # no fused kernel for this device / dtype in this torch
    try:
        return torch.optim.Adam(params, fused=True, lr=lr, eps=eps)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, eps=eps)
