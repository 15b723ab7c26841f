"""Tiny user environments for tests and as an example of env.id 'module:ClassOrFactory'.

    env:
      id: custom_env_example:ChainEnv     # or custom_env_example:make_chain
      kwargs: {length: 6}
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class ChainEnv(gym.Env):
    """Walk along a chain of ``length`` cells from cell 0; action 1 = right, 0 = left.

    Reward -1 per step and ``goal_reward`` on reaching the last cell (terminated). The
    observation is the one-hot position (float32, shape (length,)).
    """

    def __init__(self, length: int = 5, goal_reward: float = 10.0):
        self.length, self.goal_reward = length, goal_reward
        self.observation_space = gym.spaces.Box(0.0, 1.0, (length,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self._pos = 0

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.length, np.float32)
        obs[self._pos] = 1.0
        return obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._pos = 0
        return self._obs(), {}

    def step(self, action):
        self._pos = max(0, self._pos + (1 if int(action) == 1 else -1))
        terminated = self._pos == self.length - 1
        reward = self.goal_reward if terminated else -1.0
        return self._obs(), reward, terminated, False, {}


def make_chain(**kwargs) -> ChainEnv:
    """A factory function works as well as a class."""
    return ChainEnv(**kwargs)


class BadShapeEnv(ChainEnv):
    """Declares Box(4,) observations but returns 3 numbers: must be refused with a clear error."""

    def __init__(self):
        super().__init__(length=4)

    def _obs(self) -> np.ndarray:
        return np.zeros(3, np.float32)


class ContinuousActionEnv(ChainEnv):
    """A Box action space: not usable for Q-learning."""

    def __init__(self):
        super().__init__()
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)


def not_an_env(**kwargs):
    return {"not": "an env"}
