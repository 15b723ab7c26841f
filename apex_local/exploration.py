"""Epsilon-greedy exploration: linear decay (Mnih et al. 2015), the Ape-X per-actor ladder
(Horgan et al. 2018 §4), and 'none' (noisy nets, Fortunato et al. 2018: epsilon = 0).
"""
from __future__ import annotations

from typing import Callable, Union

import numpy as np
import torch

EXPLORATION_KINDS = ("linear", "apex", "none")


def linear_epsilon(step: int, start: float, end: float, decay_steps: int) -> float:
    """start -> end linearly over decay_steps env steps, then constant at end."""
    if decay_steps <= 0:
        return float(end)
    frac = min(max(step, 0) / decay_steps, 1.0)
    return float(start + frac * (end - start))


def apex_epsilon(i: int, n: int, base: float = 0.4, alpha: float = 7.0) -> float:
    """Ape-X (Horgan et al. 2018 §4): eps_i = base^(1 + alpha * i / (N - 1)), i in [0, N); N == 1 -> base."""
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"apex_epsilon: need 0 <= i < n, got i={i}, n={n}")
    if n == 1:
        return float(base)
    return float(base ** (1.0 + alpha * i / (n - 1)))


def epsilon_schedule(kind: str, *, actor_index: int = 0, num_actors: int = 1, eps_start: float = 1.0,
                     eps_end: float = 0.05, eps_decay_steps: int = 10_000, apex_eps: float = 0.4,
                     apex_alpha: float = 7.0) -> Callable[[int], float]:
    """epsilon(env_step) for actor `actor_index` (actor.exploration: linear | apex | none)."""
    if kind == "linear":
        return lambda step: linear_epsilon(step, eps_start, eps_end, eps_decay_steps)
    if kind == "apex":
        eps = apex_epsilon(actor_index, num_actors, apex_eps, apex_alpha)
        return lambda step: eps
    if kind == "none":  # noisy nets explore through their weights
        return lambda step: 0.0
    raise ValueError(f"actor.exploration: {kind!r} is not allowed; choose one of {', '.join(EXPLORATION_KINDS)}")


def epsilon_greedy(q: Union[torch.Tensor, np.ndarray], eps: Union[float, np.ndarray],
                   rng: np.random.Generator) -> np.ndarray:
    """q (B, A), eps scalar or (B,) -> actions (B,) int64: uniform random with probability eps,
    else argmax_a q (first maximum on ties). No random numbers are drawn when eps is all 0."""
    if isinstance(q, torch.Tensor):
        q = q.detach().cpu().numpy()
    q = np.asarray(q)
    if q.ndim != 2:
        raise ValueError(f"epsilon_greedy: q must be (B, A), got shape {q.shape}")
    batch, num_actions = q.shape
    actions = q.argmax(axis=1).astype(np.int64)
    eps_arr = np.broadcast_to(np.asarray(eps, dtype=np.float64), (batch,))
    if not np.any(eps_arr > 0):
        return actions
    explore, random_actions = draw_exploration(batch, eps_arr, num_actions, rng)
    return np.where(explore, random_actions, actions)


def draw_exploration(batch: int, eps, num_actions: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The random draws of ``epsilon_greedy`` (eps > 0 somewhere): (explore (B,) bool, random
    actions (B,) int64), in its order, so a caller that needs no Q-values when every env
    explores can skip the network and still act exactly as ``epsilon_greedy`` would."""
    explore = rng.random(batch) < eps
    return explore, rng.integers(0, num_actions, size=batch, dtype=np.int64)
