"""`env_spec` and `make_vector_env`: the one way the rest of the system builds environments."""

from __future__ import annotations

import difflib
import importlib

import numpy as np

from apex_local.errors import BadInputError  # a ValueError; the CLI exits 2
from apex_local.envs.atari import AleVectorEnv, AtariFrameEnv, atari_num_actions
from apex_local.envs.spec import ATARI_SCORES, EnvSpec, ResolvedId, resolve_env_id
from apex_local.envs.vector import GymFrameEnv, PyLoopVectorEnv, VectorEnv
from apex_local.envs.wrappers import MaskVelocity

__all__ = ["env_spec", "make_vector_env", "make_gym_env"]

_BACKENDS = ("auto", "ale_vector", "gymnasium")


def env_spec(env_cfg) -> EnvSpec:
    """The EnvSpec of ``env_cfg`` (Atari: no env is built; others: one env is built and closed)."""
    resolved = resolve_env_id(env_cfg.id)
    _check_cfg(env_cfg, resolved)
    if resolved.kind == "atari":
        return _atari_spec(resolved, env_cfg)
    env = make_gym_env(env_cfg, resolved)
    try:
        return _gym_layout(env, resolved, env_cfg)[0]
    finally:
        env.close()


def make_vector_env(env_cfg, num_envs: int | None = None, seed: int = 0) -> VectorEnv:
    """Build ``num_envs`` (default ``env_cfg.num_envs``) envs as one `VectorEnv`.

    Env i is seeded with ``seed + i`` on the first ``reset()``. Atari uses ale-py's
    ``AtariVectorEnv`` for ``env.backend`` 'ale_vector' (and 'auto' when ``env.kwargs`` is empty),
    else the Python loop over gymnasium ALE envs; every other id uses the Python loop.
    """
    n = env_cfg.num_envs if num_envs is None else int(num_envs)
    if n < 1:
        raise BadInputError(f"num_envs must be >= 1, got {n}")
    resolved = resolve_env_id(env_cfg.id)
    _check_cfg(env_cfg, resolved)
    opts = dict(clip_rewards=env_cfg.clip_rewards, flicker_prob=env_cfg.flicker_prob)
    if resolved.kind == "atari":
        spec = _atari_spec(resolved, env_cfg)
        if _atari_backend(env_cfg) == "ale_vector":
            return AleVectorEnv(spec, env_cfg, n, seed)
        envs = _build_all(n, lambda: AtariFrameEnv(resolved.env_id, env_cfg))
        return PyLoopVectorEnv(spec, envs, seed, **opts)
    envs = _build_all(n, lambda: make_gym_env(env_cfg, resolved))
    try:
        spec, start, one_hot = _gym_layout(envs[0], resolved, env_cfg)
    except Exception:
        for env in envs:
            env.close()
        raise
    frame_envs = [GymFrameEnv(e, spec.env_id, spec.frame_shape, spec.obs_dtype, start, one_hot) for e in envs]
    return PyLoopVectorEnv(spec, frame_envs, seed, **opts)


def _build_all(n: int, build) -> list:
    envs = []
    try:
        for _ in range(n):
            envs.append(build())
    except Exception:
        for env in envs:
            env.close()
        raise
    return envs


def _check_cfg(cfg, resolved: ResolvedId) -> None:
    if cfg.backend not in _BACKENDS:
        raise BadInputError(f"env.backend {cfg.backend!r} is not one of {', '.join(_BACKENDS)}")
    if cfg.frame_stack < 1:
        raise BadInputError(f"env.frame_stack must be >= 1, got {cfg.frame_stack}")
    if resolved.kind != "atari" and cfg.backend == "ale_vector":
        raise BadInputError(f"env.backend 'ale_vector' is for Atari games only, not env.id {cfg.id!r}")
    if resolved.kind == "atari" and cfg.mask_velocity:
        raise BadInputError(f"env.mask_velocity is only defined for CartPole, not env.id {cfg.id!r}")


def _atari_backend(cfg) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    if cfg.kwargs:  # gym.make arguments (mode, difficulty, ...) need the gymnasium path
        return "gymnasium"
    try:
        import ale_py.vector_env  # noqa: F401
    except ImportError:
        return "gymnasium"
    return "ale_vector"


def _atari_spec(resolved: ResolvedId, cfg) -> EnvSpec:
    frame = (cfg.screen_size, cfg.screen_size)
    random_score, human_score = ATARI_SCORES.get(resolved.game, (None, None))
    return EnvSpec(obs_shape=(cfg.frame_stack, *frame), frame_shape=frame, frame_stack=cfg.frame_stack,
                   obs_dtype=np.dtype(np.uint8), num_actions=atari_num_actions(resolved.game, cfg.full_action_space),
                   is_atari=True, env_id=resolved.env_id, game=resolved.game,
                   random_score=random_score, human_score=human_score)


def make_gym_env(env_cfg, resolved: ResolvedId | None = None):
    """One non-Atari gymnasium env for ``env_cfg`` (registered id or 'module:Factory'), with the
    time limit and velocity mask applied. Raises ValueError for non-Discrete action spaces."""
    import gymnasium as gym

    resolved = resolved or resolve_env_id(env_cfg.id)
    kwargs = dict(env_cfg.kwargs)
    if resolved.kind == "custom":
        env = _call_factory(resolved.env_id, kwargs)
        if env_cfg.max_episode_steps:
            env = gym.wrappers.TimeLimit(env, env_cfg.max_episode_steps)
    else:
        env = gym.make(resolved.env_id, max_episode_steps=env_cfg.max_episode_steps or None,
                       disable_env_checker=True, **kwargs)
    if not isinstance(env.action_space, gym.spaces.Discrete):
        env.close()
        raise BadInputError(f"env.id {env_cfg.id!r} has action space {env.action_space}; Q-learning needs "
                         "a Discrete action space")
    if env_cfg.mask_velocity:
        try:
            env = MaskVelocity(env, env_cfg.id)
        except ValueError:
            env.close()
            raise
    return env


def _call_factory(env_id: str, kwargs: dict):
    import gymnasium as gym

    module_name, _, attr = env_id.partition(":")
    if not module_name or not attr:
        raise BadInputError(f"env.id {env_id!r}: a custom env must look like 'package.module:ClassOrFactory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BadInputError(f"env.id {env_id!r}: cannot import module {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if factory is None:
        if attr in gym.registry:  # gymnasium's own 'module:EnvId' form: the import registered it
            return gym.make(attr, disable_env_checker=True, **kwargs)
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise BadInputError(f"env.id {env_id!r}: module {module_name!r} has no attribute {attr!r}{hint}")
    if not callable(factory):
        raise BadInputError(f"env.id {env_id!r}: {attr!r} is not a class or function")
    env = factory(**kwargs)
    if not isinstance(env, gym.Env):
        raise BadInputError(f"env.id {env_id!r}: {attr}(**env.kwargs) returned {type(env).__name__}, "
                         "expected a gymnasium.Env")
    return env


def _gym_layout(env, resolved: ResolvedId, cfg) -> tuple[EnvSpec, int, int | None]:
    """(spec, action start, first value of a one-hot encoded Discrete observation or None)."""
    import gymnasium as gym

    space = env.observation_space
    if isinstance(space, gym.spaces.Box) and space.shape:
        frame, one_hot = tuple(int(d) for d in space.shape), None
        dtype = np.dtype(np.uint8) if space.dtype == np.uint8 else np.dtype(np.float32)
    elif isinstance(space, gym.spaces.Discrete):
        frame, one_hot, dtype = (int(space.n),), int(space.start), np.dtype(np.float32)
    else:
        raise BadInputError(f"env.id {cfg.id!r}: observation space {space} is not supported "
                         "(use a Box with at least one axis, or Discrete)")
    spec = EnvSpec(obs_shape=(cfg.frame_stack, *frame), frame_shape=frame, frame_stack=cfg.frame_stack,
                   obs_dtype=dtype, num_actions=int(env.action_space.n), is_atari=False, env_id=resolved.env_id)
    return spec, int(env.action_space.start), one_hot
