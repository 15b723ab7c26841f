"""Small helpers shared by the losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def is_finite(loss: torch.Tensor) -> bool:
    """True when every element of `loss` is finite. The learner skips (and counts) an update
    otherwise; the losses themselves never raise on NaN/inf input."""
    return bool(torch.isfinite(loss).all().item())


def huber(x: torch.Tensor, delta: float, target: torch.Tensor | None = None) -> torch.Tensor:
    """Huber loss of x (or of x - target): 0.5 x^2 for |x| <= delta, delta (|x| - 0.5 delta)
    beyond; delta = 0 -> 0.5 x^2. delta > 0 is torch's huber_loss, one autograd node instead of
    seven (on a small net the loss's per-op cost is a visible part of an update); pass
    ``target`` rather than x - target to save the subtraction and a zeros target."""
    if delta <= 0:
        d = x if target is None else x - target
        return 0.5 * d.square()
    if target is None:
        target = torch.zeros_like(x)
    return F.huber_loss(x, target, reduction="none", delta=float(delta))


def select(values: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """values (..., A[, N]) indexed by actions (...) int64 on the action axis -> (...[, N])."""
    idx = actions.long().unsqueeze(-1)
    if values.dim() == actions.dim() + 2:  # categorical: (..., A, N)
        idx = idx.unsqueeze(-1).expand(*actions.shape, 1, values.shape[-1])
        return values.gather(actions.dim(), idx).squeeze(actions.dim())
    return values.gather(-1, idx).squeeze(-1)


def to_floats(**scalars: torch.Tensor) -> dict[str, float]:
    """Detached scalar tensors -> {name: float} with one device sync."""
    values = torch.stack([v.detach().float().reshape(()) for v in scalars.values()]).tolist()
    return dict(zip(scalars, values))
