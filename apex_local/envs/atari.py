"""Atari 2600 through ale-py with the DQN preprocessing of Mnih et al. 2015 (Nature), "Methods":

* no-op starts: a random number (1..noop_max) of raw NOOP frames after each reset, then FIRE
  once for games whose action set has it (as `ale_py.vector_env`; the FIRE frame counts as one
  of the no-ops);
* frame skip: each action is repeated ``frame_skip`` frames; the observation is the pixel-wise
  max of the last two frames (removes sprite flicker);
* grayscale (ALE palette luminance) resized to ``screen_size`` x ``screen_size`` with
  ``cv2.INTER_AREA``;
* sticky actions (Machado et al. 2018), applied per frame inside ALE;
* optional terminal on life loss: ``terminated`` without a game reset (``game_over`` stays False);
* truncation after ``max_episode_steps`` agent steps (0 = 27000, i.e. 108000 frames).

Two backends produce the same frames: `AtariFrameEnv` (one gymnasium ALE env, stepped in
Python by `PyLoopVectorEnv`) and `AleVectorEnv` (ale-py's C++ `AtariVectorEnv`, threads).
Frame stacking, reward clipping and flickering are done by `VectorEnv` on both.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from apex_local.errors import BadInputError  # a ValueError; the CLI exits 2
from apex_local.envs.spec import EnvSpec
from apex_local.envs.vector import VectorEnv

__all__ = ["AtariFrameEnv", "AleVectorEnv", "atari_num_actions", "DEFAULT_MAX_EPISODE_STEPS"]

DEFAULT_MAX_EPISODE_STEPS = 27_000  # agent steps = 108k frames at frame_skip 4 (Machado et al. 2018)


@functools.lru_cache(maxsize=None)
def atari_num_actions(game: str, full_action_space: bool = False) -> int:
    """Size of the action set (minimal or full 18) without building an env."""
    import ale_py
    from ale_py import roms

    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    ale = ale_py.ALEInterface()
    ale.loadROM(roms.get_rom_path(game))
    return len(ale.getLegalActionSet() if full_action_space else ale.getMinimalActionSet())


def _max_steps(cfg) -> int:
    return cfg.max_episode_steps or DEFAULT_MAX_EPISODE_STEPS


class AtariFrameEnv:
    """One Atari game with DQN preprocessing, driving the gymnasium ALE env's emulator directly.

    Built with ``gym.make('ALE/<Game>-v5', frameskip=1, repeat_action_probability=p, ...)``; the
    frame loop calls ``ale.act`` and grabs grayscale screens into preallocated buffers, so a step
    allocates nothing. Frame interface: ``reset(seed, out)``, ``step(action, out) ->
    (reward, terminated, truncated, needs_reset)`` (reward unclipped).
    """

    def __init__(self, env_id: str, cfg):
        import ale_py
        import cv2
        import gymnasium as gym

        self._cv2 = cv2
        self.env = gym.make(env_id, frameskip=1, repeat_action_probability=cfg.sticky_action_prob,
                            full_action_space=cfg.full_action_space, obs_type="grayscale",
                            max_num_frames_per_episode=0, disable_env_checker=True, **dict(cfg.kwargs))
        self._u = self.env.unwrapped
        self.ale = self._u.ale
        self._actions = list(self._u._action_set)
        self._noop, self._fire = ale_py.Action.NOOP, ale_py.Action.FIRE
        self._use_fire = self._fire in self._actions
        h, w = self.ale.getScreenDims()
        self._raw = np.zeros((2, h, w), np.uint8)  # last two frames of a skip, for the max-pool
        self._pooled = np.zeros((h, w), np.uint8)
        self._size = (cfg.screen_size, cfg.screen_size)
        self._skip, self._noop_max = cfg.frame_skip, cfg.noop_max
        self._life_loss = cfg.terminal_on_life_loss
        self._max_steps = _max_steps(cfg)
        self._steps = 0
        self._lives = 0

    @property
    def num_actions(self) -> int:
        return len(self._actions)

    def _emit(self, frame: np.ndarray, out: np.ndarray) -> None:
        self._cv2.resize(frame, self._size, dst=out, interpolation=self._cv2.INTER_AREA)

    def reset(self, seed: int | None, out: np.ndarray) -> None:
        ale = self.ale
        self._u.reset(seed=seed)  # seeds ALE and np_random when seed is given, then reset_game
        noops = int(self._u.np_random.integers(1, self._noop_max + 1)) if self._noop_max > 0 else 0
        noops -= int(self._use_fire and noops > 0)
        for _ in range(noops):
            ale.act(self._noop)
            if ale.game_over(with_truncation=False):
                ale.reset_game()
        if self._use_fire:
            ale.act(self._fire)
        self._steps = 0
        self._lives = ale.lives()
        ale.getScreenGrayscale(self._raw[1])
        self._emit(self._raw[1], out)

    def step(self, action: int, out: np.ndarray) -> tuple[float, bool, bool, bool]:
        ale, raw, skip = self.ale, self._raw, self._skip
        a = self._actions[action]
        reward = 0
        game_over = False
        j = 0
        for j in range(skip):
            reward += ale.act(a)
            game_over = ale.game_over(with_truncation=False)
            if game_over:
                break
            if j == skip - 2:
                ale.getScreenGrayscale(raw[0])
        ale.getScreenGrayscale(raw[1])
        if skip == 1:
            self._emit(raw[1], out)
        else:
            if j < skip - 1:  # the game ended mid-skip: its final screen, unpooled
                raw[0] = raw[1]
            np.maximum(raw[0], raw[1], out=self._pooled)
            self._emit(self._pooled, out)
        self._steps += 1
        lives = ale.lives()
        life_lost, self._lives = lives < self._lives, lives
        terminated = game_over or (self._life_loss and life_lost)
        truncated = self._steps >= self._max_steps
        return float(reward), terminated, truncated, game_over or truncated

    def close(self) -> None:
        self.env.close()


class AleVectorEnv(VectorEnv):
    """ale-py's ``AtariVectorEnv`` (C++ worker threads) with ``stack_num=1``; we stack.

    Settings used: ``autoreset_mode='SameStep'`` (its ``info['final_obs']`` holds the last frame of
    a game that was reset), ``reward_clipping=False`` (we clip, returns stay unclipped),
    ``life_loss_info=terminal_on_life_loss`` (terminated on life loss WITHOUT a reset; its
    ``episodic_life`` would reset the whole game and is not used),
    ``max_num_frames_per_episode = max_episode_steps * frame_skip`` (it counts frames),
    ``noop_max = max(noop_max, 1)`` (0 is undefined there), ``num_threads = min(N, cpu count)``.
    With the emulator's randomness off (noop_max=1, no sticky actions) it is bit-identical to the
    gymnasium path (tests/test_envs_atari.py) except for ``final_obs`` of a finished game: when a
    game ends mid frame-skip ale-py repeats older frames, and at the time limit it cuts the step
    short; `AtariFrameEnv` shows the final screen. Those frames are never bootstrapped from.

    A game was reset (game over) where done and not a pure life loss: with life-loss terminals, a
    terminated, untruncated env whose lives dropped kept playing; after a real reset ``lives`` is
    the new game's (never lower than before).
    """

    def __init__(self, spec: EnvSpec, cfg, num_envs: int, seed: int = 0, num_threads: int | None = None):
        from ale_py.vector_env import AtariVectorEnv

        super().__init__(spec, num_envs, seed, clip_rewards=cfg.clip_rewards, flicker_prob=cfg.flicker_prob)
        threads = num_threads or min(num_envs, os.cpu_count() or 1)
        try:
            self._venv = AtariVectorEnv(
                spec.game, num_envs, num_threads=threads, autoreset_mode="SameStep",
                max_num_frames_per_episode=_max_steps(cfg) * cfg.frame_skip,
                repeat_action_probability=cfg.sticky_action_prob, full_action_space=cfg.full_action_space,
                img_height=cfg.screen_size, img_width=cfg.screen_size, grayscale=True, stack_num=1,
                frameskip=cfg.frame_skip, maxpool=True, noop_max=max(cfg.noop_max, 1),
                episodic_life=False, life_loss_info=cfg.terminal_on_life_loss, reward_clipping=False,
                use_fire_reset=True, **dict(cfg.kwargs))
        except TypeError as exc:
            raise BadInputError(f"env.kwargs {dict(cfg.kwargs)} not accepted by ale_py AtariVectorEnv: {exc} "
                             "(use env.backend: gymnasium for gym.make arguments)") from None
        self._life_loss = cfg.terminal_on_life_loss
        self._lives = np.zeros(num_envs, np.int32)
        self._max_steps = _max_steps(cfg)
        self._steps = np.zeros(num_envs, np.int64)  # agent steps since the game's reset
        n_act = self._venv.single_action_space.n
        if n_act != spec.num_actions:
            raise BadInputError(f"{spec.env_id}: AtariVectorEnv has {n_act} actions, spec says {spec.num_actions}")

    def _check(self, obs: np.ndarray) -> None:
        want = (self.num_envs, 1, *self.spec.frame_shape)
        if obs.shape != want or obs.dtype != np.uint8:
            raise BadInputError(f"{self.spec.env_id}: AtariVectorEnv returned {obs.dtype} {obs.shape}, "
                             f"expected uint8 {want}")

    def _reset_frames(self, seed: int | None) -> None:
        obs, info = self._venv.reset(seed=seed)  # int seed -> env i gets seed + i
        self._check(obs)
        np.copyto(self._frames, obs[:, 0])
        self._lives[...] = info["lives"]
        self._steps[...] = 0

    def _step_frames(self, actions: np.ndarray):
        obs, reward, terminated, truncated, info = self._venv.step(actions)
        # ale-py's arrays view memory owned by the C++ vectorizer (freed on close): copy them.
        terminated, truncated = np.array(terminated, dtype=bool), np.array(truncated, dtype=bool)
        self._check(obs)
        np.copyto(self._frames, obs[:, 0])
        # ale-py leaves `truncated` False when a life loss lands on the time limit: count ourselves.
        self._steps += 1
        truncated |= self._steps >= self._max_steps
        done = terminated | truncated
        lives = info["lives"]
        if self._life_loss:
            game_over = done & ~(terminated & ~truncated & (lives < self._lives))
        else:
            game_over = done
        if done.any():
            self._final_frames[done] = self._frames[done]  # life loss: the same frame ends the life
            if game_over.any():
                self._final_frames[game_over] = info["final_obs"][game_over, 0]
        self._lives[...] = lives
        self._steps[game_over] = 0
        return reward.astype(np.float64), terminated, truncated, game_over

    def _close(self) -> None:
        venv, self._venv = self._venv, None
        if venv is not None:
            venv.close()
            del venv  # the C++ destructor joins the worker threads
