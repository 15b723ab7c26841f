"""Greedy evaluation on separate environments (used by ``apex-local eval``, the local trainer
and the evaluator service)."""
from __future__ import annotations

import dataclasses

import numpy as np

from apex_local.agents.policy import Policy
from apex_local.config import EnvConfig
from apex_local.envs import make_vector_env


def eval_env_config(env_cfg: EnvConfig) -> EnvConfig:
    """Evaluation plays whole games with unclipped rewards."""
    return dataclasses.replace(env_cfg, terminal_on_life_loss=False, clip_rewards=False)


def evaluate_policy(net, env_cfg: EnvConfig, episodes: int, seed: int, epsilon: float,
                    num_envs: int | None = None, max_steps: int = 10_000_000) -> list[float]:
    """Play ``episodes`` games with an epsilon-greedy policy (noisy layers off); return their returns.

    Each env contributes its first finished games in env order so the result does not depend
    on which env happens to finish first.
    """
    n = num_envs or min(episodes, 8)
    was_training = net.training
    venv = make_vector_env(eval_env_config(env_cfg), n, seed=seed)
    try:
        policy = Policy(net, n, seed=seed, noise=False)
        per_env: list[list[float]] = [[] for _ in range(n)]
        quota = [episodes // n + (1 if i < episodes % n else 0) for i in range(n)]
        obs = venv.reset(seed=seed)
        steps = 0
        while any(len(per_env[i]) < quota[i] for i in range(n)) and steps < max_steps:
            actions, _, _ = policy.act(obs, epsilon)
            obs, _, term, trunc, info = venv.step(actions)
            policy.reset_state(term | trunc)
            steps += n
            for i in np.flatnonzero(info["game_over"]):
                if len(per_env[i]) < quota[i]:
                    per_env[i].append(float(info["episode_return"][i]))
    finally:
        venv.close()
        net.train(was_training)
    return [r for rs in per_env for r in rs]
