"""Python API for notebooks and scripts; mirrors the CLI.

    import apex_local
    summary = apex_local.train("configs/dqn_cartpole.yaml", ["run.max_env_steps=20000"])
    summary = apex_local.train(method="r2d2", env_id="CartPole-v1")      # preset filled in
    result = apex_local.evaluate("configs/dqn_cartpole.yaml", summary["checkpoint"], episodes=10)
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from apex_local.config import Config, ConfigError, apply_overrides, config_from_dict, load_config

Overrides = Sequence[str] | Mapping[str, Any] | None


def resolve_config(config: Config | str | os.PathLike | None = None, overrides: Overrides = None, *,
                   method: str | None = None, env_id: str | None = None) -> Config:
    """A Config from an object, a YAML path, or (method, env_id) with the method's preset."""
    if isinstance(config, Config):
        data = config.to_dict()
    elif config is not None or (method is None and env_id is None):
        return load_config(config, overrides)
    else:
        from apex_local.networks import preset_overrides

        if method is None:
            raise ConfigError("pass a config, or method= (dqn, rainbow, apex, r2d2, drqn) and env_id=")
        atari = False
        if env_id is not None:
            from apex_local.envs import resolve_env_id

            atari = resolve_env_id(env_id).kind == "atari"  # R2D2/DRQN presets: LSTM 512 on Atari
        data = apply_overrides({"run": {"method": method}}, preset_overrides(method, atari=atari))
        if env_id is not None:
            data.setdefault("env", {})["id"] = env_id
            if "cartpole" in env_id.lower():  # small vector task: small nets
                data.setdefault("network", {}).setdefault("hidden_sizes", [128])
                if data.get("network", {}).get("lstm_size"):
                    data["network"]["lstm_size"] = 64
    return config_from_dict(apply_overrides(data, overrides))


def train(config: Config | str | os.PathLike | None = None, overrides: Overrides = None, *,
          method: str | None = None, env_id: str | None = None, **kwargs) -> dict:
    """Single-process training (``apex-local train --local``); returns the run summary."""
    from apex_local.agents.local import train_local

    cfg = resolve_config(config, overrides, method=method, env_id=env_id)
    return train_local(cfg, **kwargs)


def evaluate(config: Config | str | os.PathLike | None, checkpoint: str | os.PathLike, episodes: int = 10,
             overrides: Overrides = None, seed: int = 12345, epsilon: float | None = None) -> dict:
    """Play greedy episodes with a checkpoint; returns {'mean_return', 'episodes', 'returns'}."""
    from apex_local.agents.builders import make_learner
    from apex_local.agents.checkpoint import load_checkpoint
    from apex_local.agents.evaluation import evaluate_policy
    from apex_local.envs import env_spec

    state = load_checkpoint(checkpoint)
    if config is None and not os.environ.get("APEX_CONFIG"):
        cfg = config_from_dict(apply_overrides(state["config"], overrides))
    else:
        cfg = resolve_config(config, overrides)
    spec = env_spec(cfg.env)
    learner = make_learner(cfg, spec, device="cpu")
    try:
        learner.online.load_state_dict(state["learner"]["online"])
    except RuntimeError as exc:
        from apex_local.errors import BadInputError

        first = str(exc).splitlines()[0]
        raise BadInputError(f"checkpoint {checkpoint} does not fit the network of this config ({first}); "
                            "pass the config the run was trained with, or omit --config to use the one "
                            "stored in the checkpoint") from None
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    eps = cfg.actor.eval_epsilon if epsilon is None else epsilon
    returns = evaluate_policy(learner.online, cfg.env, episodes, seed=seed, epsilon=eps)
    return {"mean_return": float(np.mean(returns)), "episodes": len(returns), "returns": returns}
