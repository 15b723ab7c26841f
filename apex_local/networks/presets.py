"""Per-method presets: {'section.field': value} overrides that define each algorithm.

Apply them under the user's topology file and `--set` overrides (explicit settings win).
Only algorithm-defining settings are listed; scale-dependent ones (replay capacity, target
period, learning rate) stay with the topology file, except where the paper fixes them (R2D2).
"""
from __future__ import annotations

from typing import Any, Optional

METHODS = ("dqn", "rainbow", "apex", "r2d2", "drqn", "gorila")

_FEED_FORWARD = {"network.lstm_size": 0, "learner.value_rescale": False, "learner.drqn_update": "none"}


def _lstm(atari: bool, lstm_size: Optional[int]) -> int:
    # R2D2 (Kapturowski et al. 2019) and DRQN (Hausknecht & Stone 2015) both use 512 units on Atari.
    if lstm_size:
        return int(lstm_size)
    return 512 if atari else 64


def preset_overrides(method: str, *, atari: bool = False, lstm_size: Optional[int] = None) -> dict[str, Any]:
    """Overrides for `method` (dqn | rainbow | apex | r2d2 | drqn | gorila).

    Recurrent methods: `lstm_size` if given (pass the config's value when it is > 0), else 512
    on Atari and 64 otherwise.
    """
    if method == "dqn" or method == "gorila":
        # Mnih et al. 2015 / Nair et al. 2015: 1-step, max target, uniform replay, linear epsilon.
        return {"run.method": method, **_FEED_FORWARD,
                "network.dueling": False, "network.noisy": False, "network.categorical": False,
                "replay.prioritized": False, "replay.n_step": 1,
                "learner.double_q": False, "actor.exploration": "linear"}
    if method == "rainbow":
        # Hessel et al. 2018: dueling + noisy + C51 + double + 3-step + PER (omega 0.5, beta 0.4 -> 1).
        return {"run.method": "rainbow", **_FEED_FORWARD,
                "network.dueling": True, "network.noisy": True, "network.categorical": True,
                "network.num_atoms": 51, "network.v_min": -10.0, "network.v_max": 10.0,
                "replay.prioritized": True, "replay.n_step": 3, "replay.alpha": 0.5,
                "replay.beta": 0.4, "replay.beta_final": 1.0,
                "learner.double_q": True, "actor.exploration": "none"}
    if method == "apex":
        # Horgan et al. 2018: dueling double DQN, 3-step, PER (alpha 0.6, beta 0.4), epsilon ladder.
        return {"run.method": "apex", **_FEED_FORWARD,
                "network.dueling": True, "network.noisy": False, "network.categorical": False,
                "replay.prioritized": True, "replay.n_step": 3, "replay.alpha": 0.6, "replay.beta": 0.4,
                "learner.double_q": True, "actor.exploration": "apex",
                "actor.apex_eps": 0.4, "actor.apex_alpha": 7.0}
    if method == "r2d2":
        # Kapturowski et al. 2019, Table 2: LSTM 512, n = 5, gamma 0.997, eta 0.9, burn-in 40,
        # length 80, period 40, priority exponent 0.9, IS exponent 0.6, Adam lr 1e-4 eps 1e-3,
        # value rescaling eps 1e-3, stored state, dueling double Q, target period 2500.
        return {"run.method": "r2d2", "env.frame_stack": 1,
                "network.lstm_size": _lstm(atari, lstm_size), "network.dueling": True,
                "network.noisy": False, "network.categorical": False,
                "replay.prioritized": True, "replay.alpha": 0.9, "replay.beta": 0.6,
                "replay.n_step": 5, "replay.gamma": 0.997, "replay.burn_in": 40,
                "replay.sequence_length": 80, "replay.sequence_period": 40,
                "learner.optimizer": "adam", "learner.lr": 1e-4, "learner.adam_eps": 1e-3,
                "learner.double_q": True, "learner.value_rescale": True, "learner.rescale_eps": 1e-3,
                "learner.priority_eta": 0.9, "learner.stored_state": True, "learner.drqn_update": "none",
                "learner.target_update_period": 2500, "actor.exploration": "apex"}
    if method == "drqn":
        # Hausknecht & Stone 2015: single frames, 10-step unrolls, bootstrapped random updates
        # (zero initial state), 1-step max targets, uniform replay, linear epsilon, no burn-in.
        return {"run.method": "drqn", "env.frame_stack": 1,
                "network.lstm_size": _lstm(atari, lstm_size), "network.dueling": False,
                "network.noisy": False, "network.categorical": False,
                "replay.prioritized": False, "replay.n_step": 1, "replay.burn_in": 0,
                "replay.sequence_length": 10, "replay.sequence_period": 5,
                "learner.double_q": False, "learner.value_rescale": False,
                "learner.stored_state": False, "learner.drqn_update": "random",
                "actor.exploration": "linear"}
    raise ValueError(f"run.method: {method!r} has no preset; choose one of {', '.join(METHODS)}")
