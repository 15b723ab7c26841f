"""Q heads: plain, dueling (Wang et al. 2016), noisy (Fortunato et al. 2018), C51 (Bellemare
et al. 2017). All four compose; Rainbow (Hessel et al. 2018) = dueling + noisy + C51.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn


class QOut(NamedTuple):
    """Network output. q: (..., A). log_probs: (..., A, atoms) for C51 heads, else None."""

    q: torch.Tensor
    log_probs: Optional[torch.Tensor]


class NoisyLinear(nn.Module):
    """Factorised Gaussian noisy linear layer (Fortunato et al. 2018, §3.2).

    w = mu_w + sigma_w * (f(eps_out) f(eps_in)^T), b = mu_b + sigma_b * f(eps_out),
    f(x) = sign(x) sqrt(|x|); init mu ~ U(-1/sqrt(p), 1/sqrt(p)), sigma = sigma0 / sqrt(p)
    with p = fan_in. Train mode: fresh noise on every forward. Eval mode: mean weights only.
    The noise buffers are not persistent (not in state_dict, not in flat parameters).
    """

    def __init__(self, in_features: int, out_features: int, sigma0: float = 0.5):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_sigma = nn.Parameter(torch.empty(out_features, in_features))
        self.bias_mu = nn.Parameter(torch.empty(out_features))
        self.bias_sigma = nn.Parameter(torch.empty(out_features))
        self.register_buffer("eps_in", torch.zeros(in_features), persistent=False)
        self.register_buffer("eps_out", torch.zeros(out_features), persistent=False)
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            self.weight_mu.uniform_(-bound, bound)
            self.bias_mu.uniform_(-bound, bound)
            self.weight_sigma.fill_(sigma0 / math.sqrt(in_features))
            self.bias_sigma.fill_(sigma0 / math.sqrt(in_features))

    @staticmethod
    def _f(x: torch.Tensor) -> torch.Tensor:
        return x.sign() * x.abs().sqrt()  # f(x) = sign(x) sqrt(|x|)

    @torch.no_grad()
    def reset_noise(self) -> None:
        # Rebind (not copy_): a graph built by an earlier forward keeps its own noise tensors.
        device = self.weight_mu.device
        self.eps_in = self._f(torch.randn(self.in_features, device=device))
        self.eps_out = self._f(torch.randn(self.out_features, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.weight_mu, self.bias_mu)
        self.reset_noise()
        weight = self.weight_mu + self.weight_sigma * torch.outer(self.eps_out, self.eps_in)
        bias = self.bias_mu + self.bias_sigma * self.eps_out
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def run_layers(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)`` with nn.Linear / nn.ReLU applied as their functional ops (the same ops, so the
    same result): a module call costs ~2.5 us, ~10 of them per forward pass of a small MLP,
    which on CartPole is ~25% of a forward. Other layers (NoisyLinear, ...) are called as
    modules. Forward hooks on the Linear/ReLU children themselves are therefore not run."""
    for m in layers:
        if type(m) is nn.Linear:
            x = F.linear(x, m.weight, m.bias)
        elif type(m) is nn.ReLU and not m.inplace:
            x = torch.relu(x)
        else:
            x = m(x)
    return x


def _mlp(in_dim: int, hidden: int, out_dim: int, noisy: bool, sigma0: float) -> nn.Sequential:
    def linear(i: int, o: int) -> nn.Module:
        return NoisyLinear(i, o, sigma0) if noisy else nn.Linear(i, o)

    if hidden > 0:
        return nn.Sequential(linear(in_dim, hidden), nn.ReLU(), linear(hidden, out_dim))
    return nn.Sequential(linear(in_dim, out_dim))


class QHead(nn.Module):
    """features (N, F) -> QOut(q (N, A), log_probs (N, A, atoms) or None)."""

    def __init__(self, in_dim: int, num_actions: int, *, hidden: int, dueling: bool, noisy: bool,
                 sigma0: float, support: Optional[torch.Tensor]):
        super().__init__()
        self.num_actions = int(num_actions)
        self.categorical = support is not None
        self.num_atoms = int(support.numel()) if support is not None else 1
        self.dueling = dueling
        self.advantage = _mlp(in_dim, hidden, self.num_actions * self.num_atoms, noisy, sigma0)
        self.value = _mlp(in_dim, hidden, self.num_atoms, noisy, sigma0) if dueling else None

    def forward(self, x: torch.Tensor, support: Optional[torch.Tensor]) -> QOut:
        n = x.shape[0]
        out = run_layers(self.advantage, x).view(n, self.num_actions, self.num_atoms)
        if self.value is not None:
            # Wang et al. 2016, Eq. (9): Q = V + (A - mean_a' A); for C51 per atom, on logits.
            value = run_layers(self.value, x).view(n, 1, self.num_atoms)
            out = value + out - out.mean(dim=1, keepdim=True)
        if not self.categorical:
            return QOut(out.squeeze(-1), None)
        # Bellemare et al. 2017: p_i(s, a) = softmax_i(logits); Q(s, a) = sum_i z_i p_i(s, a).
        log_probs = F.log_softmax(out, dim=-1)
        q = (log_probs.exp() * support).sum(-1)
        return QOut(q, log_probs)
