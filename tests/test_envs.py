"""Env factory: vector API, same-step autoreset, stacking, partial observability, ids, custom envs.

Atari (real Pong / Breakout through ale-py) is in test_envs_atari.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from apex_local.config import EnvConfig
from apex_local.envs import describe_env_families, env_spec, make_vector_env, resolve_env_id


@pytest.fixture(autouse=True)
def _custom_env_on_path(monkeypatch):
    # tests/custom_env_example.py is importable as 'custom_env_example' however pytest is run
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def cfg(**kw) -> EnvConfig:
    return dataclasses.replace(EnvConfig(), **kw)


# ----------------------------------------------------------------------------- CartPole


def test_cartpole_spec_and_shapes():
    spec = env_spec(cfg(id="CartPole-v1"))
    assert spec.obs_shape == (1, 4) and spec.frame_shape == (4,) and spec.frame_stack == 1
    assert spec.obs_dtype == np.float32 and spec.num_actions == 2 and not spec.is_atari
    with make_vector_env(cfg(id="CartPole-v1", frame_stack=3), num_envs=2) as venv:
        assert venv.num_envs == 2 and venv.spec.obs_shape == (3, 4)
        obs = venv.reset()
        assert obs.shape == (2, 3, 4) and obs.dtype == np.float32
        assert (obs[:, :-1] == 0).all() and (obs[:, -1] != 0).any()
        obs2, reward, terminated, truncated, info = venv.step(np.array([0, 1]))
        assert reward.dtype == np.float32 and reward.shape == (2,)
        assert terminated.dtype == bool and truncated.dtype == bool
        assert info["final_obs"].shape == (2, 3, 4) and info["game_over"].dtype == bool
        assert (obs2[:, :-1] == obs[:, 1:]).all()  # the stack shifts, newest frame last


def test_cartpole_autoreset_matches_plain_gymnasium():
    """Same seeds and actions as N independent gymnasium envs: obs, final_obs, returns, lengths."""
    n, k, seed = 3, 2, 11
    rng = np.random.default_rng(0)
    refs = [gym.make("CartPole-v1") for _ in range(n)]
    ref_obs = [r.reset(seed=seed + i)[0] for i, r in enumerate(refs)]
    ref_ret, ref_len, finished = np.zeros(n), np.zeros(n, int), 0
    with make_vector_env(cfg(id="CartPole-v1", frame_stack=k), num_envs=n, seed=seed) as venv:
        obs = venv.reset()
        np.testing.assert_array_equal(obs[:, -1], np.stack(ref_obs))
        for _ in range(300):
            actions = rng.integers(0, 2, n)
            nxt, reward, terminated, truncated, info = venv.step(actions)
            for i, ref in enumerate(refs):
                o, r, te, tr, _ = ref.step(int(actions[i]))
                ref_ret[i] += r
                ref_len[i] += 1
                assert reward[i] == r and terminated[i] == te and truncated[i] == tr
                if te or tr:
                    finished += 1
                    assert info["game_over"][i]
                    np.testing.assert_array_equal(info["final_obs"][i, -1], o)
                    np.testing.assert_array_equal(info["final_obs"][i, :-1], obs[i, 1:])
                    assert info["episode_return"][i] == ref_ret[i]
                    assert info["episode_length"][i] == ref_len[i]
                    o, _ = ref.reset()
                    ref_ret[i], ref_len[i] = 0, 0
                    assert (nxt[i, :-1] == 0).all()  # zero padding at the next episode's start
                else:
                    assert not info["game_over"][i]
                    np.testing.assert_array_equal(nxt[i, :-1], obs[i, 1:])
                np.testing.assert_array_equal(nxt[i, -1], o)
            obs = nxt
    assert finished >= 5


def test_determinism_and_seed_per_env():
    def rollout(seed: int, n: int = 3, steps: int = 200) -> list[np.ndarray]:
        rng = np.random.default_rng(123)
        with make_vector_env(cfg(id="CartPole-v1", flicker_prob=0.2), num_envs=n, seed=seed) as venv:
            out = [venv.reset()]
            for _ in range(steps):
                out.append(venv.step(rng.integers(0, 2, n))[0])
        return out

    a, b, c = rollout(7), rollout(7), rollout(8)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not all((x == y).all() for x, y in zip(a, c))
    with make_vector_env(cfg(id="CartPole-v1"), num_envs=2, seed=7) as v7, \
            make_vector_env(cfg(id="CartPole-v1"), num_envs=1, seed=8) as v8:
        np.testing.assert_array_equal(v7.reset()[1], v8.reset()[0])  # env i uses seed + i
        np.testing.assert_array_equal(v7.reset(seed=8)[0], v8.reset(seed=8)[0])


def test_truncation_is_game_over():
    with make_vector_env(cfg(id="CartPole-v1", max_episode_steps=5), num_envs=2) as venv:
        venv.reset()
        for t in range(1, 6):
            _, _, terminated, truncated, info = venv.step(np.array([0, 1]))
        assert truncated.all() and not terminated.any() and info["game_over"].all()
        assert (info["episode_length"] == 5).all() and (info["episode_return"] == 5).all()


def test_bad_actions_rejected():
    with make_vector_env(cfg(id="CartPole-v1"), num_envs=2) as venv:
        venv.reset()
        for bad in (np.array([0]), np.array([0.0, 1.0]), np.array([0, 2]), np.array([-1, 0])):
            with pytest.raises(ValueError, match="actions"):
                venv.step(bad)


# ----------------------------------------------------------------------------- partial observability


def test_flicker_rate_is_binomial():
    p, n, steps = 0.3, 4, 400
    with make_vector_env(cfg(id="CartPole-v1", flicker_prob=p), num_envs=n, seed=3) as venv:
        frames = [venv.reset()[:, -1]]
        rng = np.random.default_rng(0)
        for _ in range(steps):
            frames.append(venv.step(rng.integers(0, 2, n))[0][:, -1])
    hidden = np.all(np.stack(frames) == 0, axis=-1)  # a real CartPole state is never exactly 0
    trials = hidden.size
    bound = 4.5 * np.sqrt(p * (1 - p) / trials)  # ~1e-5 false-failure rate
    assert abs(hidden.mean() - p) < bound, (hidden.mean(), p, bound)


def test_masked_cartpole_drops_velocities():
    n, seed = 2, 5
    spec = env_spec(cfg(id="CartPole-v1", mask_velocity=True))
    assert spec.frame_shape == (2,) and spec.obs_shape == (1, 2)
    rng = np.random.default_rng(0)
    with make_vector_env(cfg(id="CartPole-v1", mask_velocity=True, frame_stack=2), n, seed) as masked, \
            make_vector_env(cfg(id="CartPole-v1", frame_stack=2), n, seed) as full:
        m, f = masked.reset(), full.reset()
        np.testing.assert_array_equal(m, f[..., [0, 2]])
        for _ in range(100):  # includes autoresets
            a = rng.integers(0, 2, n)
            m, _, mte, _, minfo = masked.step(a)
            f, _, fte, _, finfo = full.step(a)
            np.testing.assert_array_equal(m, f[..., [0, 2]])
            np.testing.assert_array_equal(mte, fte)
    with pytest.raises(ValueError, match="mask_velocity"):
        make_vector_env(cfg(id="Acrobot-v1", mask_velocity=True), 1)


# ----------------------------------------------------------------------------- custom envs


@pytest.mark.parametrize("env_id", ["custom_env_example:ChainEnv", "custom_env_example:make_chain"])
def test_custom_factory_env(env_id):
    c = cfg(id=env_id, kwargs={"length": 4, "goal_reward": 5.0}, clip_rewards=True, frame_stack=2)
    spec = env_spec(c)
    assert spec.obs_shape == (2, 4) and spec.num_actions == 2 and spec.env_id == env_id
    with make_vector_env(c, num_envs=2) as venv:
        venv.reset()
        for _ in range(2):
            _, reward, terminated, _, info = venv.step(np.array([1, 1]))
            assert (reward == -1).all()
        _, reward, terminated, _, info = venv.step(np.array([1, 1]))
        assert terminated.all() and info["game_over"].all()
        assert (reward == 1.0).all()  # clipped for training ...
        assert (info["episode_return"] == 3.0).all()  # ... but the game return is unclipped: -1 -1 +5


def test_wrong_shape_user_env_is_refused():
    with make_vector_env(cfg(id="custom_env_example:BadShapeEnv"), num_envs=1) as venv:
        with pytest.raises(ValueError) as err:
            venv.reset()
    msg = str(err.value)
    assert "custom_env_example:BadShapeEnv" in msg and "(3,)" in msg and "(4,)" in msg


@pytest.mark.parametrize("env_id, match", [
    ("custom_env_example:ContinuousActionEnv", "Discrete"),
    ("custom_env_example:not_an_env", "gymnasium.Env"),
    ("custom_env_example:ChainEnvv", "ChainEnv"),
    ("no_such_module_xyz:Env", "cannot import"),
    ("Pendulum-v1", "Discrete"),
])
def test_bad_custom_and_continuous_envs(env_id, match):
    with pytest.raises(ValueError, match=match):
        make_vector_env(cfg(id=env_id), num_envs=1)


# ----------------------------------------------------------------------------- ids


@pytest.mark.parametrize("bad, suggestion", [("CartPol-v1", "'CartPole-v1'"), ("pongg", "'pong'"),
                                             ("Acrobat-v1", "'Acrobot-v1'"), ("ALE/Pongg-v5", "'pong'"),
                                             ("SpaceInvader", "'space_invaders'")])
def test_unknown_id_lists_close_matches(bad, suggestion):
    with pytest.raises(ValueError, match="unknown env.id") as err:
        env_spec(cfg(id=bad))
    assert suggestion in str(err.value)
    with pytest.raises(ValueError, match="unknown env.id"):
        make_vector_env(cfg(id=bad), 1)


@pytest.mark.parametrize("raw, kind, env_id, game", [
    ("ALE/Pong-v5", "atari", "ALE/Pong-v5", "pong"),
    ("PongNoFrameskip-v4", "atari", "ALE/Pong-v5", "pong"),
    ("Pong-v4", "atari", "ALE/Pong-v5", "pong"),
    ("Pong", "atari", "ALE/Pong-v5", "pong"),
    ("pong", "atari", "ALE/Pong-v5", "pong"),
    ("MsPacman", "atari", "ALE/MsPacman-v5", "ms_pacman"),
    ("space_invaders", "atari", "ALE/SpaceInvaders-v5", "space_invaders"),
    ("CartPole-v1", "gym", "CartPole-v1", None),
    ("pkg.mod:Factory", "custom", "pkg.mod:Factory", None),
])
def test_resolve_env_id(raw, kind, env_id, game):
    r = resolve_env_id(raw)
    assert (r.kind, r.env_id, r.game) == (kind, env_id, game)


def test_describe_env_families():
    text = describe_env_families()
    for needle in ("ALE/Pong-v5", "CartPole-v1", "module:ClassOrFactory", "flicker", "mask_velocity", "LunarLander"):
        assert needle in text
