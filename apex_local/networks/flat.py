"""Flat float32 view of a network for the shared-memory weights board.

The order is `net.state_dict()` order: parameters and persistent buffers (e.g. the C51
support), in module registration order, which is fixed for a given config. Noise buffers
of noisy layers are not persistent and are not included (they are resampled anyway).
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import nn


def _entries(net: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in net.state_dict(keep_vars=False).items() if v.is_floating_point()]


def num_flat_parameters(net: nn.Module) -> int:
    """Number of float32 values `flat_parameters(net)` returns."""
    return sum(v.numel() for _, v in _entries(net))


@torch.no_grad()
def flat_parameters(net: nn.Module, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """All inference state as a 1-D float32 tensor.

    Without `out`: a new tensor on the parameters' device. With `out` (a 1-D float32 tensor,
    e.g. a CPU view of a shared-memory board): written in place (device copies included), returned.
    """
    entries = _entries(net)
    if out is None:
        return torch.cat([v.reshape(-1).float() for _, v in entries]) if entries else torch.zeros(0)
    total = sum(v.numel() for _, v in entries)
    if out.dim() != 1 or out.numel() != total or out.dtype != torch.float32:
        raise ValueError(f"flat_parameters: out must be 1-D float32 with {total} values, "
                         f"got shape {tuple(out.shape)} dtype {out.dtype}")
    if entries:
        out.copy_(torch.cat([v.reshape(-1).float() for _, v in entries]))  # one device -> host copy
    return out


@torch.no_grad()
def load_flat_parameters(net: nn.Module, flat: Union[torch.Tensor, np.ndarray]) -> None:
    """Inverse of `flat_parameters`: copy a 1-D float32 vector into the network in place."""
    if isinstance(flat, np.ndarray):
        flat = torch.from_numpy(np.ascontiguousarray(flat))
    flat = flat.reshape(-1)
    entries = _entries(net)
    total = sum(v.numel() for _, v in entries)
    if flat.numel() != total:
        raise ValueError(f"load_flat_parameters: expected {total} values for this network, got {flat.numel()} "
                         "(was the sender built from the same network config and env?)")
    pos = 0
    for _, v in entries:  # state_dict tensors share storage with the module's parameters/buffers
        n = v.numel()
        v.copy_(flat[pos:pos + n].view_as(v))
        pos += n
