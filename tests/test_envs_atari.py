"""Real Atari games through ale-py on both backends (no mocks): the observation contract,
DQN preprocessing (no-op + FIRE reset, life-loss terminals, truncation) and flickering."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from apex_local.config import EnvConfig
from apex_local.envs import env_spec, make_vector_env
from apex_local.envs.atari import AleVectorEnv
from apex_local.envs.vector import PyLoopVectorEnv

BACKENDS = ["ale_vector", "gymnasium"]


def atari(backend: str, **kw) -> EnvConfig:
    return dataclasses.replace(EnvConfig(), id="pong", frame_stack=4, backend=backend, **kw)


def test_pong_spec_and_scores():
    spec = env_spec(atari("auto"))
    assert spec.obs_shape == (4, 84, 84) and spec.frame_shape == (84, 84)
    assert spec.obs_dtype == np.uint8 and spec.num_actions == 6 and spec.is_atari
    assert spec.env_id == "ALE/Pong-v5" and spec.game == "pong"
    assert (spec.random_score, spec.human_score) == (-20.7, 14.6)
    assert spec.human_normalized(14.6) == pytest.approx(1.0)
    assert env_spec(atari("auto", full_action_space=True)).num_actions == 18
    for game, scores in {"breakout": (1.7, 30.5), "space_invaders": (148.0, 1668.7), "seaquest": (68.4, 42054.7),
                         "qbert": (163.9, 13455.0), "beam_rider": (363.9, 16926.5), "enduro": (0.0, 860.5)}.items():
        s = env_spec(dataclasses.replace(EnvConfig(), id=game))
        assert (s.random_score, s.human_score) == scores


def test_auto_backend_picks_ale_vector():
    with make_vector_env(atari("auto"), num_envs=1) as venv:
        assert isinstance(venv, AleVectorEnv)
    with make_vector_env(atari("gymnasium"), num_envs=1) as venv:
        assert isinstance(venv, PyLoopVectorEnv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pong_observation_contract(backend):
    n = 2
    with make_vector_env(atari(backend), num_envs=n, seed=0) as venv:
        obs = venv.reset()
        assert obs.shape == (n, 4, 84, 84) and obs.dtype == np.uint8
        assert (obs[:, :-1] == 0).all()  # zero padding: only the newest slot holds a frame
        assert obs[:, -1].min() < obs[:, -1].max() and obs[:, -1].mean() > 10
        rng = np.random.default_rng(0)
        for t in range(40):
            nxt, reward, terminated, truncated, info = venv.step(rng.integers(0, 6, n))
            assert nxt.shape == (n, 4, 84, 84) and nxt.dtype == np.uint8
            assert reward.dtype == np.float32 and set(np.unique(reward)) <= {-1.0, 0.0, 1.0}
            assert not (terminated | truncated).any()  # a Pong point takes far longer than 40 steps
            np.testing.assert_array_equal(nxt[:, :-1], obs[:, 1:])  # shifts left, newest last
            obs = nxt
        assert (obs != 0).all(axis=(2, 3)).any(axis=1).all() and (obs[:, 0] != 0).any()
        assert not (obs[:, -1] == obs[:, -2]).all()  # the picture moves


@pytest.mark.parametrize("game", ["pong", "breakout"])
def test_backends_are_bit_identical(game):
    """With the emulator's randomness switched off (one no-op frame = just FIRE, no sticky actions)
    both backends must agree exactly: same grayscale, max-pool, INTER_AREA resize, rewards,
    life-loss terminals, truncation, game-over resets and episode statistics. The final frame of a
    finished game is compared only after a life loss: ale-py builds a game's last frame its own
    way (see AleVectorEnv)."""
    runs = []
    for backend in BACKENDS:
        c = dataclasses.replace(atari(backend), id=game, noop_max=1, sticky_action_prob=0.0,
                                terminal_on_life_loss=True, max_episode_steps=150)
        with make_vector_env(c, num_envs=2, seed=0) as venv:
            rng = np.random.default_rng(0)
            out = {"obs": [venv.reset()]}
            for _ in range(320):
                obs, reward, terminated, truncated, info = venv.step(rng.integers(0, venv.spec.num_actions, 2))
                for key, value in dict(obs=obs, reward=reward, terminated=terminated, truncated=truncated,
                                       final=np.where((terminated & ~info["game_over"])[:, None, None, None],
                                                      info["final_obs"], 0), **info).items():
                    if key != "final_obs":
                        out.setdefault(key, []).append(value)
        runs.append({k: np.stack(v) for k, v in out.items()})
    a, b = runs
    assert a["truncated"].sum() >= 2 and a["game_over"].sum() >= 2
    if game == "breakout":
        assert (a["terminated"] & ~a["game_over"]).sum() >= 2  # life losses
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_atari_determinism(backend):
    def rollout():
        rng = np.random.default_rng(1)
        with make_vector_env(atari(backend, flicker_prob=0.1), num_envs=2, seed=5) as venv:
            out = [venv.reset()]
            out += [venv.step(rng.integers(0, 6, 2))[0] for _ in range(30)]
        return np.stack(out)

    np.testing.assert_array_equal(rollout(), rollout())


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncation_after_max_episode_steps(backend):
    with make_vector_env(atari(backend, max_episode_steps=12), num_envs=2) as venv:
        obs = venv.reset()
        for t in range(12):
            last = obs
            obs, _, terminated, truncated, info = venv.step(np.zeros(2, np.int64))
            assert truncated.all() == (t == 11)
        assert info["game_over"].all() and (info["episode_length"] == 12).all()
        np.testing.assert_array_equal(info["final_obs"][:, :-1], last[:, 1:])
        assert (obs[:, :-1] == 0).all() and (obs[:, -1] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fire_reset_and_life_loss_terminals(backend):
    """Breakout only launches the ball after FIRE: with NOOPs only, a life can be lost only if the
    reset pressed FIRE. A life loss terminates without ending the game or its return."""
    c = dataclasses.replace(atari(backend), id="breakout", terminal_on_life_loss=True,
                            sticky_action_prob=0.0, frame_stack=2)
    with make_vector_env(c, num_envs=1, seed=0) as venv:
        obs = venv.reset()
        for _ in range(400):
            last = obs
            obs, _, terminated, truncated, info = venv.step(np.zeros(1, np.int64))
            if terminated[0]:
                break
        assert terminated[0] and not truncated[0] and not info["game_over"][0]
        assert (obs[0, :-1] == 0).all()  # a new (life) episode: the stack restarts
        np.testing.assert_array_equal(info["final_obs"][0, :-1], last[0, 1:])
        np.testing.assert_array_equal(info["final_obs"][0, -1], obs[0, -1])  # same frame ends the life


@pytest.mark.parametrize("backend", BACKENDS)
def test_flicker_on_atari_frames(backend):
    with make_vector_env(atari(backend, flicker_prob=1.0), num_envs=2) as venv:
        assert (venv.reset() == 0).all()
        obs, *_ , info = venv.step(np.ones(2, np.int64))
        assert (obs == 0).all()
