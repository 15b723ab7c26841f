"""Acting: epsilon-greedy (or noisy-net) action selection on a batch of observations.

Feed-forward and recurrent nets share one class; for recurrent nets the policy carries the
``(h, c)`` state of every env and zeroes a row when that env starts a new episode.
"""
from __future__ import annotations

import numpy as np
import torch

from apex_local.config import ActorConfig
from apex_local.exploration import apex_epsilon, epsilon_greedy, linear_epsilon


class EpsilonSchedule:
    """Epsilon for an actor: linear decay (single-process DQN), the Ape-X ladder, or 0 (noisy)."""

    def __init__(self, actor_cfg: ActorConfig, index: int = 0, num_actors: int | None = None) -> None:
        self.cfg = actor_cfg
        self.index = index
        self.num_actors = num_actors or actor_cfg.num_actors

    def __call__(self, env_steps: int) -> float:
        c = self.cfg
        if c.exploration == "none":
            return 0.0
        if c.exploration == "apex":
            # Horgan et al. 2018 §4: eps_i = 0.4^(1 + 7 i / (N - 1))
            return float(apex_epsilon(self.index, self.num_actors, c.apex_eps, c.apex_alpha))
        return float(linear_epsilon(env_steps, c.eps_start, c.eps_end, c.eps_decay_steps))


class Policy:
    """Wraps a Q-network for acting on the CPU (or the learner's device in local mode).

    ``noise=True`` keeps noisy layers sampling (training actors); ``noise=False`` acts with
    the mean weights (evaluation).
    """

    def __init__(self, net: torch.nn.Module, num_envs: int, seed: int = 0, noise: bool = True) -> None:
        self.net = net
        self.num_envs = num_envs
        self.rng = np.random.default_rng(seed)
        self.noise = noise
        self.device = next(net.parameters()).device
        self.state = net.initial_state(num_envs, self.device) if net.recurrent else None

    @torch.no_grad()
    def q_values(self, obs: np.ndarray) -> np.ndarray:
        """Q(s, .) for a batch without touching the recurrent state (feed-forward nets only)."""
        self.net.train(self.noise)
        return self.net(torch.as_tensor(obs, device=self.device)).q.float().cpu().numpy()

    @torch.no_grad()
    def act(self, obs: np.ndarray, epsilon) -> tuple[np.ndarray, np.ndarray, tuple | None]:
        """Returns (actions (N,), q (N, A), state before acting or None)."""
        self.net.train(self.noise)
        x = torch.as_tensor(obs, device=self.device)
        prev = None
        if self.net.recurrent:
            prev = tuple(s.clone() for s in self.state)
            out, self.state = self.net.step(x, self.state)
        else:
            out = self.net(x)
        q = out.q.float().cpu().numpy()
        return epsilon_greedy(q, epsilon, self.rng), q, prev

    def reset_state(self, done: np.ndarray) -> None:
        """Zero the recurrent state of envs that start a new episode."""
        if self.state is None or not np.any(done):
            return
        mask = torch.as_tensor(~np.asarray(done, bool), device=self.device).float().unsqueeze(-1)
        self.state = tuple(s * mask for s in self.state)
