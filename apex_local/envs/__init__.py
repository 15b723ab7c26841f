"""Environments: `env_spec`, `make_vector_env` and the observation contract.

Every env yields observations of shape ``(k, *frame_shape)`` (``k = env.frame_stack``), stacked
by our own wrapper with zero padding at episode start and the newest frame last, with
same-step autoreset (docs/architecture.md, "Observation contract"). Families: Atari via ale-py
(DQN preprocessing, Mnih et al. 2015), registered gymnasium ids, user 'module:Factory' envs, and
the partial-observability variants of Hausknecht & Stone 2015 (flickering, masked velocities).
"""

from apex_local.envs.factory import env_spec, make_gym_env, make_vector_env
from apex_local.envs.spec import ATARI_SCORES, EnvSpec, describe_env_families, resolve_env_id
from apex_local.envs.vector import VectorEnv

__all__ = [
    "EnvSpec", "VectorEnv", "env_spec", "make_vector_env", "make_gym_env", "resolve_env_id",
    "describe_env_families", "ATARI_SCORES",
]
