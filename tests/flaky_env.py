"""A CartPole whose ``step`` raises now and then (env-error recovery tests)."""
from __future__ import annotations

import gymnasium as gym


class FlakyCartPole(gym.Wrapper):
    def __init__(self, fail_every: int = 300) -> None:
        super().__init__(gym.make("CartPole-v1"))
        self.fail_every = fail_every
        self.calls = 0

    def step(self, action):
        self.calls += 1
        if self.calls % self.fail_every == 0:
            raise RuntimeError(f"simulated emulator crash at call {self.calls}")
        return self.env.step(action)
