"""Value rescaling (Pohlen et al. 2018, "Observe and Look Further"), used by R2D2.

h(x)     = sign(x) (sqrt(|x| + 1) - 1) + eps x
h^-1(x)  = sign(x) (((sqrt(1 + 4 eps (|x| + 1 + eps)) - 1) / (2 eps))^2 - 1)   (Prop. A.2)

Both are evaluated in algebraically identical forms without cancellation, so the round trip
holds to float32 precision for small and large |x| alike (and eps = 0 is allowed):
    sqrt(|x|+1) - 1 = |x| / (sqrt(|x|+1) + 1)
    with s = sqrt(1 + 4 eps (|x|+1+eps)):  y = (s - 1) / (2 eps) = 2 (|x|+1+eps) / (s + 1)
    y - 1 = 4 |x| (|x|+1+eps) / ((2|x| + 1 + 2 eps + s)(s + 1)),   h^-1 = sign(x) (y - 1)(y + 1)
"""
from __future__ import annotations

import torch


def value_rescale(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """h(x) = sign(x)(sqrt(|x|+1) - 1) + eps x."""
    ax = x.abs()
    return x.sign() * (ax / ((ax + 1.0).sqrt() + 1.0)) + eps * x


def inverse_value_rescale(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Exact inverse h^-1 (Pohlen et al. 2018, Prop. A.2), in the cancellation-free form."""
    ax = x.abs()
    s = (1.0 + 4.0 * eps * (ax + 1.0 + eps)).sqrt()
    y = 2.0 * (ax + 1.0 + eps) / (s + 1.0)
    y_minus_1 = 4.0 * ax * (ax + 1.0 + eps) / ((2.0 * ax + 1.0 + 2.0 * eps + s) * (s + 1.0))
    return x.sign() * y_minus_1 * (y + 1.0)
