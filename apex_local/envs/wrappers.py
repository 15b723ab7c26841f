"""Partial-observability wrappers after Hausknecht & Stone 2015 ("Deep Recurrent Q-Learning
for Partially Observable MDPs").

* Flickering (their "Flickering Pong"): each observed frame is fully obscured (zeroed) with
  probability ``flicker_prob``. It is applied per step to the newest frame *before* stacking,
  inside `VectorEnv`, so it works the same on every backend (`VectorEnv._flicker`).
* Velocity masking (the usual POMDP CartPole variant): `MaskVelocity` below.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from apex_local.errors import BadInputError  # a ValueError; the CLI exits 2

__all__ = ["MaskVelocity", "CARTPOLE_KEPT"]

# CartPole observation: [x, x_dot, theta, theta_dot]; keep the positions only.
CARTPOLE_KEPT = (0, 2)


class MaskVelocity(gym.ObservationWrapper):
    """CartPole with cart velocity (index 1) and pole angular velocity (index 3) DROPPED.

    The observation becomes ``[x, theta]`` with shape (2,) (dropped rather than zeroed, so the
    network cannot tell a hidden entry from a true zero and no input is wasted). The agent must
    infer velocities from history: frame stacking or a recurrent core.
    """

    def __init__(self, env: gym.Env, env_id: str = "CartPole"):
        super().__init__(env)
        space = env.observation_space
        if not isinstance(space, gym.spaces.Box) or space.shape != (4,):
            raise BadInputError(f"env.mask_velocity expects CartPole's Box(4,) observations; "
                             f"{env_id!r} has {space}")
        self._keep = np.asarray(CARTPOLE_KEPT)
        self.observation_space = gym.spaces.Box(space.low[self._keep], space.high[self._keep],
                                                dtype=space.dtype)

    def observation(self, observation):
        return np.asarray(observation)[self._keep]
