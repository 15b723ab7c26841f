"""Torsos: observation (B, k, *frame_shape) -> features (B, F).

Inputs arrive already converted to float (uint8 frames scaled by 1/255 in `QNetwork`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from apex_local.networks.heads import run_layers


class MLPTorso(nn.Module):
    """Flatten everything after the batch axis, then Linear+ReLU per hidden size."""

    def __init__(self, obs_shape: Sequence[int], hidden_sizes: Sequence[int]):
        super().__init__()
        in_dim = 1
        for s in obs_shape:
            in_dim *= int(s)
        layers: list[nn.Module] = []
        for h in hidden_sizes:
            layers += [nn.Linear(in_dim, int(h)), nn.ReLU()]
            in_dim = int(h)
        self.layers = nn.Sequential(*layers)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_layers(self.layers, x.flatten(1))


class NatureCNNTorso(nn.Module):
    """Mnih et al. 2015 (Nature DQN): 32x8x8 s4, 64x4x4 s2, 64x3x3 s1, each + ReLU.

    Input (B, k, H, W) with the k stacked frames as channels. The flatten size is computed
    from the screen size (84x84 -> 64*7*7 = 3136), so other sizes >= 36 work too.
    """

    def __init__(self, obs_shape: Sequence[int]):
        super().__init__()
        if len(obs_shape) != 3:
            raise ValueError(
                f"network.torso nature_cnn needs image observations (k, H, W), got obs shape {tuple(obs_shape)}")
        k, height, width = (int(s) for s in obs_shape)
        if min(height, width) < 36:
            raise ValueError(
                f"network.torso nature_cnn needs frames of at least 36x36 (env.screen_size), got {height}x{width}")
        self.convs = nn.Sequential(
            nn.Conv2d(k, 32, kernel_size=8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1), nn.ReLU(),
        )
        with torch.no_grad():
            self.out_dim = int(self.convs(torch.zeros(1, k, height, width)).numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x).flatten(1)


def is_image_obs(obs_shape: Sequence[int], is_uint8: bool) -> bool:
    """`torso: auto` rule: (k, H, W) uint8 observations are images."""
    return len(obs_shape) == 3 and is_uint8


def make_torso(kind: str, obs_shape: Sequence[int], is_uint8: bool,
               hidden_sizes: Sequence[int]) -> nn.Module:
    """kind: auto | mlp | nature_cnn. The returned module has an `out_dim` attribute."""
    if kind == "auto":
        kind = "nature_cnn" if is_image_obs(obs_shape, is_uint8) else "mlp"
    if kind == "mlp":
        return MLPTorso(obs_shape, hidden_sizes)
    if kind == "nature_cnn":
        return NatureCNNTorso(obs_shape)
    raise ValueError(f"network.torso: {kind!r} is not allowed; choose one of auto, mlp, nature_cnn")
