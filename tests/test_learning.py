"""Learning tests: the single-process trainer must actually learn (seeded, CPU, 2 cores).

Each run evaluates the greedy policy (10 episodes, epsilon 0.001) every few thousand env steps
and stops as soon as the mean return reaches the threshold (``stop_on_return``); the step
budget leaves several times the margin measured over seeds 0-2 (docs/benchmarks_learning.md). Runs are
deterministic for a given seed (torch on 1 thread, seeded envs, replay and policy RNGs), so a
pass/fail never depends on machine load; only the wall-clock does. Wall-clock and steps are
printed (``pytest -s`` shows them).

Default suite: local DQN to 200 on CartPole-v1, the recurrent agent to 150 on velocity-masked
CartPole. ``-m slow``: Rainbow to 475 (CartPole-v1 solved level) on 3 seeds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import apex_local

ROOT = Path(__file__).resolve().parents[1]


def _learn(tmp_path, config: str, *, seed: int, budget: int, eval_every: int, threshold: float,
           label: str) -> dict:
    evals = []
    summary = apex_local.train(
        str(ROOT / "configs" / config),
        [f"run.seed={seed}", f"run.max_env_steps={budget}", f"run.dir={tmp_path / 'run'}",
         "run.log_every_seconds=0", "learner.checkpoint_every_seconds=0"],
        eval_every_steps=eval_every, eval_episodes=10, stop_on_return=threshold,
        on_eval=lambda steps, secs, rs: evals.append((steps, round(secs, 1), round(float(np.mean(rs)), 1))))
    solved = summary["solved"]
    print(f"\n[{label}] seed={seed} solved={solved is not None} "
          f"env_steps={summary['env_steps']} updates={summary['updates']} wall={summary['wall_seconds']:.1f}s "
          f"evals(steps, s, mean)={evals}")
    assert summary["exit_code"] == 0 and summary["nonfinite_losses"] == 0
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert solved is not None, (
        f"{label}: greedy mean never reached {threshold} within {budget} env steps; evals {evals}")
    assert solved["mean_return"] >= threshold
    return summary


# Seeds 0-2 reach 200 at the 2k-3k-step evaluations (a few seconds); 20k is the budget.
@pytest.mark.timeout(900)
def test_local_dqn_reaches_200_on_cartpole(tmp_path):
    _learn(tmp_path, "dqn_cartpole.yaml", seed=0, budget=20_000, eval_every=1000, threshold=200.0,
           label="dqn")


# Velocity-masked CartPole (obs = [x, theta], frame_stack 1): only the LSTM can recover the
# velocities. Seeds 0-2 reach 150 at 10k-12.5k env steps (~20 s, Ape-X ε ladder); 80k is the budget.
@pytest.mark.timeout(900)
def test_recurrent_agent_reaches_150_on_masked_cartpole(tmp_path):
    _learn(tmp_path, "r2d2_cartpole_masked.yaml", seed=0, budget=80_000, eval_every=2500, threshold=150.0,
           label="r2d2-masked")


# Seeds 0-2 reach 475 at 12.5k / 17.5k / 12.5k env steps (eval every 2.5k), 2-4 min each at
# ~100 env steps/s; 60k is the budget.
@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rainbow_solves_cartpole(tmp_path, seed):
    _learn(tmp_path, "rainbow_cartpole.yaml", seed=seed, budget=60_000, eval_every=2500, threshold=475.0,
           label="rainbow")
