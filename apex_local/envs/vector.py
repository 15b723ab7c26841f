"""Vector envs with our own frame stacking and same-step autoreset.

`VectorEnv` owns everything that must be identical on every backend: the frame stack
(zero padding at episode start, newest frame last), flickering, reward clipping and the
unclipped per-game episode statistics. A backend only produces single frames:

    _reset_frames(seed)      fill self._frames (N, *frame) with each env's first frame
    _step_frames(actions)    fill self._frames with the frame after the step (for an env that
                             was reset: the first frame of its next episode) and, where
                             terminated|truncated, self._final_frames with the last frame of the
                             finished episode; return (reward, terminated, truncated, game_over)

Timeline of one env with k=3 (f = frame, 0 = zero frame, | = episode end at step t):

    reset:  [0 0 f0]   step: [0 f0 f1]   step: [f0 f1 f2]   step t (terminated):
            obs = [0 0 g0]  (first obs of the next episode)
            info["final_obs"] = [f1 f2 f3]  (last obs of the finished one)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from apex_local.errors import BadInputError  # a ValueError; the CLI exits 2
from apex_local.envs.spec import EnvSpec

__all__ = ["VectorEnv", "PyLoopVectorEnv", "GymFrameEnv"]


class VectorEnv:
    """N environments stepped together; see docs/architecture.md "Observation contract".

    ``reset(seed=None) -> obs (N, k, *frame)``;
    ``step(actions int (N,)) -> (obs, reward float32 (N,), terminated bool (N,), truncated bool (N,), info)``.
    ``info``: ``final_obs`` (N, k, *frame), valid where terminated|truncated; ``game_over`` (N,) bool;
    ``episode_return`` (N,) float64 and ``episode_length`` (N,) int64, valid where game_over (unclipped
    game return summed over all lives). Returned arrays are fresh copies the caller may keep.
    Env i is seeded with ``seed + i`` on the first reset (or on ``reset(seed=s)``: ``s + i``).
    """

    def __init__(self, spec: EnvSpec, num_envs: int, seed: int = 0, *,
                 clip_rewards: bool = False, flicker_prob: float = 0.0):
        if num_envs < 1:
            raise BadInputError(f"num_envs must be >= 1, got {num_envs}")
        if not 0.0 <= flicker_prob <= 1.0:
            raise BadInputError(f"flicker_prob must be in [0, 1], got {flicker_prob}")
        self.spec = spec
        self.num_envs = num_envs
        self._seed = int(seed)
        self._needs_seed = True
        self._clip = clip_rewards
        self._flicker_prob = float(flicker_prob)
        self._flicker_rng = np.random.default_rng([self._seed, 0xF11C])
        n, k, shape, dtype = num_envs, spec.frame_stack, spec.frame_shape, spec.obs_dtype
        self._frames = np.zeros((n, *shape), dtype)
        self._final_frames = np.zeros((n, *shape), dtype)
        self._stack = np.zeros((n, k, *shape), dtype)
        self._final = np.zeros((n, k, *shape), dtype)
        self._ep_return = np.zeros(n, np.float64)
        self._ep_length = np.zeros(n, np.int64)
        self._started = False
        self._closed = False

    # ------------------------------------------------------------------ backend hooks
    def _reset_frames(self, seed: int | None) -> None:
        raise NotImplementedError

    def _step_frames(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    # ------------------------------------------------------------------ public API
    def reset(self, seed: int | None = None) -> np.ndarray:
        """Reset every env; returns obs (N, k, *frame) with only the newest slot non-zero."""
        if seed is None and self._needs_seed:
            seed = self._seed
        if seed is not None:
            self._flicker_rng = np.random.default_rng([int(seed), 0xF11C])
        self._needs_seed = False
        self._reset_frames(seed)
        if self._flicker_prob > 0:  # DRQN (Hausknecht & Stone 2015): obscure the whole frame w.p. p
            self._frames[self._flicker_rng.random(self.num_envs) < self._flicker_prob] = 0
        self._stack[...] = 0
        self._stack[:, -1] = self._frames
        self._ep_return[...] = 0
        self._ep_length[...] = 0
        self._started = True
        return self._stack.copy()

    def step(self, actions: Sequence[int] | np.ndarray):
        """Step every env with integer ``actions`` (N,) in [0, num_actions); same-step autoreset.

        Returns ``(obs, reward, terminated, truncated, info)``; ``reward`` is sign-clipped when
        ``clip_rewards`` (``info["episode_return"]`` never is). Raises ValueError on bad actions.
        """
        if not self._started:
            raise RuntimeError(f"{self.spec.env_id}: call reset() before step()")
        a = np.asarray(actions)
        if a.shape != (self.num_envs,) or a.dtype.kind not in "iu":
            raise BadInputError(f"{self.spec.env_id}: actions must be integers of shape ({self.num_envs},), "
                             f"got {a.dtype} {a.shape}")
        if a.min() < 0 or a.max() >= self.spec.num_actions:
            raise BadInputError(f"{self.spec.env_id}: actions must lie in [0, {self.spec.num_actions}), got {a}")
        raw_reward, terminated, truncated, game_over = self._step_frames(a.astype(np.int64, copy=False))
        done = terminated | truncated
        any_done = bool(done.any())
        if self._flicker_prob > 0:
            self._flicker(done, game_over, any_done)

        stack, k = self._stack, self.spec.frame_stack
        if any_done:  # the finished episode's last obs: its stack shifted by the final frame
            d = np.flatnonzero(done)
            self._final[d, :-1] = stack[d, 1:]
            self._final[d, -1] = self._final_frames[d]
        for j in range(k - 1):  # shift left in place (no temporaries); newest frame goes last
            stack[:, j] = stack[:, j + 1]
        stack[:, -1] = self._frames
        if any_done:
            stack[d, :-1] = 0  # zero padding at the start of the next episode

        # Per-game statistics, unclipped; a life loss (terminated, not game over) keeps accumulating.
        self._ep_return += raw_reward
        self._ep_length += 1
        ep_return = np.where(game_over, self._ep_return, 0.0)
        ep_length = np.where(game_over, self._ep_length, 0)
        if game_over.any():
            self._ep_return[game_over] = 0.0
            self._ep_length[game_over] = 0
        reward = (np.sign(raw_reward) if self._clip else raw_reward).astype(np.float32)
        info: dict[str, Any] = {
            "final_obs": self._final.copy(),  # rows valid where terminated | truncated
            "game_over": game_over,
            "episode_return": ep_return,
            "episode_length": ep_length,
        }
        return stack.copy(), reward, terminated, truncated, info

    def _flicker(self, done: np.ndarray, game_over: np.ndarray, any_done: bool) -> None:
        """Zero each new frame with probability p (Hausknecht & Stone 2015, "flickering Atari").

        An env that was reset this step shows two frames (the finished episode's last and the
        next episode's first): each gets its own draw. After a life loss without reset they are
        the same frame and share the draw.
        """
        hide = self._flicker_rng.random(self.num_envs) < self._flicker_prob
        if any_done:
            hide_final = hide.copy()
            reset = np.flatnonzero(game_over & done)
            if reset.size:
                hide_final[reset] = self._flicker_rng.random(reset.size) < self._flicker_prob
            self._final_frames[done & hide_final] = 0
        self._frames[hide] = 0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> "VectorEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort; close() is the API
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.env_id!r}, num_envs={self.num_envs}, obs={self.spec.obs_shape})"


class GymFrameEnv:
    """Adapts one gymnasium.Env to the frame interface: frames are checked and written in place.

    Box observations are cast to the spec dtype (float32, or uint8 for a uint8 Box);
    Discrete observations become one-hot float32 vectors. A shape or dtype that differs from
    the observation space raises ValueError naming the env id.
    """

    def __init__(self, env, env_id: str, frame_shape: tuple[int, ...], dtype: np.dtype,
                 action_start: int = 0, one_hot_start: int | None = None):
        self.env, self._id, self._shape, self._dtype = env, env_id, tuple(frame_shape), np.dtype(dtype)
        self._start, self._one_hot = int(action_start), one_hot_start

    def reset(self, seed: int | None, out: np.ndarray) -> None:
        obs, _ = self.env.reset(seed=seed)
        self._write(obs, out)

    def step(self, action: int, out: np.ndarray) -> tuple[float, bool, bool, bool]:
        """Returns (reward, terminated, truncated, needs_reset)."""
        obs, reward, terminated, truncated, _ = self.env.step(action + self._start)
        self._write(obs, out)
        return float(reward), bool(terminated), bool(truncated), bool(terminated or truncated)

    def _write(self, obs: Any, out: np.ndarray) -> None:
        if self._one_hot is not None:
            out[...] = 0
            out[int(obs) - self._one_hot] = 1
            return
        arr = np.asarray(obs)
        bad_dtype = (arr.dtype != self._dtype) if self._dtype == np.uint8 else (arr.dtype.kind not in "fiub")
        if arr.shape != self._shape or bad_dtype:
            raise BadInputError(
                f"env {self._id!r} returned an observation of shape {arr.shape} and dtype {arr.dtype}, "
                f"expected shape {self._shape} and dtype {self._dtype} (from its observation_space)")
        out[...] = arr

    def close(self) -> None:
        self.env.close()


class PyLoopVectorEnv(VectorEnv):
    """Steps a list of frame envs (`GymFrameEnv`, `AtariFrameEnv`) in a plain Python loop."""

    def __init__(self, spec: EnvSpec, envs: list, seed: int = 0, **kwargs):
        super().__init__(spec, len(envs), seed, **kwargs)
        self._envs = envs
        self._views = [self._frames[i] for i in range(len(envs))]  # per-env output slots

    def _reset_frames(self, seed: int | None) -> None:
        for i, env in enumerate(self._envs):
            env.reset(None if seed is None else seed + i, self._views[i])

    def _step_frames(self, actions: np.ndarray):
        n = self.num_envs
        reward = np.zeros(n, np.float64)
        terminated = np.zeros(n, bool)
        truncated = np.zeros(n, bool)
        game_over = np.zeros(n, bool)
        for i, (env, out, a) in enumerate(zip(self._envs, self._views, actions.tolist())):
            r, te, tr, needs_reset = env.step(a, out)
            reward[i] = r
            if te or tr:
                terminated[i], truncated[i] = te, tr
                self._final_frames[i] = out
                if needs_reset:  # same-step autoreset: out becomes the next episode's first frame
                    game_over[i] = True
                    env.reset(None, out)
        return reward, terminated, truncated, game_over

    def _close(self) -> None:
        for env in self._envs:
            env.close()
