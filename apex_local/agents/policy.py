"""Acting: epsilon-greedy (or noisy-net) action selection on a batch of observations.

Feed-forward and recurrent nets share one class; for recurrent nets the policy carries the
``(h, c)`` state of every env and zeroes a row when that env starts a new episode.
"""
from __future__ import annotations

import numpy as np
import torch

from apex_local.config import ActorConfig
from apex_local.exploration import apex_epsilon, draw_exploration, epsilon_greedy, linear_epsilon


def ladder_position(slot: int) -> float:
    """Position in [0, 1] of exploration slot ``slot`` on a prefix-covering ladder.

    0, 1, then the van der Corput sequence 1/2, 1/4, 3/4, 1/8, 5/8, ...: any first N slots
    (N >= 2) include both ends and spread evenly between them, so actors started by
    ``honcho start -c actor=N`` cover [0.4^8, 0.4] without knowing N.
    """
    if slot <= 1:
        return float(slot)
    k, pos, denom = slot - 1, 0.0, 1.0
    while k:
        denom *= 2
        pos += (k & 1) / denom
        k >>= 1
    return pos


class EpsilonSchedule:
    """Per-env epsilon for an actor: linear decay (single-process DQN), the Ape-X ladder, or 0.

    Ape-X (Horgan et al. 2018 §4): eps_i = 0.4^(1 + 7 i / (N - 1)) over the N exploring
    slots. A slot is one env of one actor (actor ``index`` owns slots index*M .. index*M+M-1
    for M envs). With ``actor.num_actors`` = N > 0 the ladder is the paper's, exactly, over
    N*M slots; with 0 (the default) it is the prefix-covering ladder of ``ladder_position``.
    """

    def __init__(self, actor_cfg: ActorConfig, index: int = 0, num_envs: int = 1) -> None:
        self.cfg = actor_cfg
        slots = index * num_envs + np.arange(num_envs)
        c = actor_cfg
        if c.num_actors > 0:
            total = c.num_actors * num_envs
            if index >= c.num_actors:
                raise ValueError(f"actor index {index} >= actor.num_actors={c.num_actors}; set "
                                 "actor.num_actors to the number of actors, or 0 for the open-ended ladder")
            self.ladder = np.array([apex_epsilon(int(s), total, c.apex_eps, c.apex_alpha) for s in slots])
        else:
            pos = np.array([ladder_position(int(s)) for s in slots])
            self.ladder = c.apex_eps ** (1.0 + c.apex_alpha * pos)

    def __call__(self, env_steps: int):
        c = self.cfg
        if c.exploration == "none":
            return 0.0
        if c.exploration == "apex":
            return self.ladder
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

    def _mode(self) -> None:
        """Noisy layers sample in train mode only; ``train()`` walks every submodule, so it is
        called only when the mode differs (the local trainer's learner flips it back)."""
        if self.net.training != self.noise:
            self.net.train(self.noise)

    @torch.no_grad()
    def q_values(self, obs: np.ndarray) -> np.ndarray:
        """Q(s, .) for a batch without touching the recurrent state (feed-forward nets only)."""
        self._mode()
        return self.net(torch.as_tensor(obs, device=self.device)).q.float().cpu().numpy()

    @torch.no_grad()
    def bootstrap_q(self, obs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Q of ``obs`` (the final observations of envs ``rows``) for n-step bootstrapping.

        Recurrent nets continue from each row's current state (the state after the last
        step) without advancing it; call before ``reset_state``."""
        if not self.net.recurrent:
            return self.q_values(obs)
        self._mode()
        idx = torch.as_tensor(np.asarray(rows), device=self.device)
        state = tuple(s[idx] for s in self.state)
        out, _ = self.net.step(torch.as_tensor(obs, device=self.device), state)
        return out.q.float().cpu().numpy()

    @torch.no_grad()
    def act(self, obs: np.ndarray, epsilon, need_q: bool = True) -> tuple[np.ndarray, np.ndarray | None, tuple | None]:
        """Returns (actions (N,), q (N, A), state before acting or None).

        ``need_q=False`` (the single-process trainer, whose replay does not use actor
        priorities; feed-forward nets without noisy layers, scalar epsilon > 0): q is None, and when every env
        explores this step the network is not run at all. The random draws and the actions
        are the same either way (``epsilon_greedy``)."""
        if not need_q and not (self.net.recurrent or self.net.noisy) and not np.ndim(epsilon) and epsilon > 0:
            explore, random_actions = draw_exploration(len(obs), epsilon, self.net.num_actions, self.rng)
            if explore.all():
                return random_actions, None, None
            return np.where(explore, random_actions, self.q_values(obs).argmax(axis=1)), None, None
        self._mode()
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
