"""Exploration: linear epsilon, the Ape-X ladder, epsilon-greedy, noisy nets -> epsilon 0."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from apex_local.exploration import apex_epsilon, epsilon_greedy, epsilon_schedule, linear_epsilon


@pytest.mark.parametrize("step,expected", [(0, 1.0), (50, 0.55), (100, 0.1), (10_000, 0.1), (-5, 1.0)])
def test_linear_epsilon(step, expected):
    # 1.0 -> 0.1 over 100 steps: step 50 -> 1.0 + 0.5 * (0.1 - 1.0) = 0.55
    assert linear_epsilon(step, 1.0, 0.1, 100) == pytest.approx(expected)


def test_apex_ladder_n8():
    # N = 8: eps_i = 0.4^(1 + 7 i / 7) = 0.4^(1 + i)
    ladder = [apex_epsilon(i, 8) for i in range(8)]
    assert ladder[0] == pytest.approx(0.4)
    assert ladder[-1] == pytest.approx(0.4 ** 8) == pytest.approx(0.00065536)
    np.testing.assert_allclose(ladder, [0.4 ** (1 + i) for i in range(8)])
    assert all(a > b for a, b in zip(ladder, ladder[1:]))


def test_apex_single_actor_and_bad_index():
    assert apex_epsilon(0, 1) == 0.4
    assert apex_epsilon(1, 3, base=0.5, alpha=2.0) == pytest.approx(0.5 ** 2)  # 0.5^(1 + 2 * 1/2)
    with pytest.raises(ValueError):
        apex_epsilon(8, 8)


def test_epsilon_schedules():
    assert epsilon_schedule("none")(0) == 0.0  # noisy nets: no epsilon
    assert epsilon_schedule("apex", actor_index=7, num_actors=8)(12345) == pytest.approx(0.4 ** 8)
    lin = epsilon_schedule("linear", eps_start=1.0, eps_end=0.0, eps_decay_steps=10)
    assert lin(5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="actor.exploration"):
        epsilon_schedule("boltzmann")


def test_epsilon_greedy_greedy_random_and_per_env():
    q = np.array([[0.0, 2.0, 1.0], [5.0, 5.0, 1.0]])
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    actions = epsilon_greedy(q, 0.0, rng)
    assert actions.dtype == np.int64 and actions.tolist() == [1, 0]  # ties -> first max
    assert rng.bit_generator.state == state  # eps 0 draws nothing
    assert epsilon_greedy(torch.tensor(q), 0.0, rng).tolist() == [1, 0]
    big = np.tile(q[:1], (3000, 1))
    counts = np.bincount(epsilon_greedy(big, 1.0, rng), minlength=3)
    assert counts.min() > 850  # uniform over 3 actions
    eps = np.array([0.0, 1.0] * 1500)
    acts = epsilon_greedy(np.tile(q[:1], (3000, 1)), eps, rng)
    assert (acts[0::2] == 1).all() and len(set(acts[1::2].tolist())) == 3
