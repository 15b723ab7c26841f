"""Actor-side builders of replay insert chunks (docs/architecture.md, "Replay: frames stored once").

``NStepAccumulator``: Ape-X n-step transitions with initial priorities computed from the
actor's own Q-values (Horgan et al. 2018, §3 and Algorithm 1). ``SequenceAccumulator``: R2D2
fixed-length overlapping sequences with the stored recurrent state (Kapturowski et al. 2019,
§2.3). Both number each env's frames (``seq``, monotonic across episodes, env index = stream)
and put every new frame into exactly one chunk, no later than the first chunk whose items
reference it (usually earlier: frames go out at the flush after the step that produced them).
Both expect the same-step-autoreset vector env of apex_local.envs (zero-padded stacks).
"""
from __future__ import annotations

import numpy as np

__all__ = ["NStepAccumulator", "SequenceAccumulator"]


class _Outbox:
    """Frame numbering and the buffers of frames and items waiting for ``flush``."""

    def __init__(self, num_envs: int, frame_shape: tuple, frame_dtype) -> None:
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs!r}")
        self.num_envs = int(num_envs)
        self.frame_shape = tuple(int(d) for d in frame_shape)
        self.frame_dtype = np.dtype(frame_dtype)
        self._next_seq = np.zeros(self.num_envs, np.int64)  # next frame seq per env (= stream)
        self._frames: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._items: list[dict] = []
        self._pending = 0
        self._started = False
        self._with_q: bool | None = None  # fixed by the first step(): q on every step or on none
        self.dropped = 0  # items abandoned by a mid-episode reset()
        self._cast_ok = None  # the last observation dtype found storable as frame_dtype
        self._envs = np.arange(self.num_envs)

    @property
    def pending(self) -> int:
        """Complete items buffered for the next ``flush``."""
        return self._pending

    def _new_frames(self, envs: np.ndarray, frames: np.ndarray) -> np.ndarray:
        """Number and buffer (a copy of) one new frame for each of ``envs``; returns their seqs."""
        seq = self._next_seq[envs].copy()
        self._next_seq[envs] += 1
        self._frames.append((envs.astype(np.int32), seq, np.array(frames, dtype=self.frame_dtype)))
        return seq.copy()

    def _emit(self, items: dict) -> None:
        n = len(items["stream"])
        if n:
            self._items.append(items)
            self._pending += n

    def _obs(self, x, name: str, k: int) -> np.ndarray:
        a = np.asarray(x)
        want = (self.num_envs, k, *self.frame_shape)
        if a.shape != want:
            raise ValueError(f"{name}: expected shape {want}, got {a.shape}")
        if a.dtype is not self._cast_ok and not np.can_cast(a.dtype, self.frame_dtype, "same_kind"):
            raise ValueError(f"{name}: dtype {a.dtype} cannot be stored as {self.frame_dtype}")
        self._cast_ok = a.dtype  # (checked once per dtype: this runs every env step)
        return a

    def _vec(self, x, name: str, dtype) -> np.ndarray:
        a = np.asarray(x)
        if a.shape != (self.num_envs,):
            raise ValueError(f"{name}: expected shape ({self.num_envs},), got {a.shape}")
        return a.astype(dtype, copy=False)

    def _check_q(self, q, q_final, truncated: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        if self._with_q is None:
            self._with_q = q is not None
        if self._with_q != (q is not None):
            raise ValueError("q must be given on every step() or on none")
        if q is None:
            return None, None
        q = np.asarray(q, np.float64)
        if q.ndim != 2 or q.shape[0] != self.num_envs:
            raise ValueError(f"q: expected shape ({self.num_envs}, num_actions), got {q.shape}")
        if truncated.any():
            if q_final is None:
                raise ValueError("q_final is required on a step with a truncated episode when q is given")
            q_final = np.asarray(q_final, np.float64)
            if q_final.shape != q.shape:
                raise ValueError(f"q_final: expected shape {q.shape}, got {q_final.shape}")
        return q, q_final

    def flush(self) -> dict | None:
        """The chunk of all buffered frames and complete items (None if there is neither)."""
        if not self._frames and not self._items:
            return None
        envs, seqs, frames = zip(*self._frames) if self._frames else ((), (), ())
        chunk = {"frames": _cat(frames, (0, *self.frame_shape), self.frame_dtype),
                 "frame_stream": _cat(envs, (0,), np.int32), "frame_seq": _cat(seqs, (0,), np.int64)}
        for key, (tail, dtype) in self._item_spec().items():
            chunk[key] = _cat([it[key] for it in self._items], (0, *tail), dtype)
        self._frames, self._items, self._pending = [], [], 0
        return chunk


def _cat(parts, empty_shape: tuple, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(empty_shape, dtype)


class NStepAccumulator(_Outbox):
    """n-step transitions (Ape-X, Horgan et al. 2018 §3: n = 3) from a vector env.

    For the transition taken at episode step t with m = min(n, steps left in the episode)::

        reward   R_t = sum_{i<m} gamma^i r_{t+i}
        discount d_t = 0 if the episode terminated within the window, else gamma^m
                       (time-limit truncation bootstraps from the final obs: d_t = gamma^m)
        obs      s_t (k frame refs)      next_obs  s_{t+m} (the final obs at an episode end)

    Initial priority (Ape-X Algorithm 1, line 8): |R_t + d_t max_a Q(s_{t+m}, a) - Q(s_t, a_t)|
    from the q arrays passed to ``step``. One-step delay: a window that did not end needs
    max_a Q(s_{t+n}), which is passed with the *next* ``step`` (q = Q-values of the obs that
    action is taken in), so with q such a transition becomes complete (``pending``) one call
    after its window filled; episode ends complete at once (terminated: no bootstrap;
    truncated: ``q_final`` = Q(final obs)). Without q (on every call), no ``priority`` key
    is sent and the replay uses its max priority. Episodes shorter than n just emit their m < n
    transitions at the end. Frame refs are k seqs per stack, -1 for the zero padding of the
    first k-1 stacks of an episode.
    """

    def __init__(self, num_envs: int, n: int, gamma: float, frame_stack: int, frame_shape: tuple,
                 frame_dtype) -> None:
        super().__init__(num_envs, frame_shape, frame_dtype)
        if int(n) < 1 or int(frame_stack) < 1:
            raise ValueError(f"n and frame_stack must be >= 1, got n={n!r}, frame_stack={frame_stack!r}")
        if not 0.0 <= float(gamma) <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        self.n, self.gamma, self.frame_stack = int(n), float(gamma), int(frame_stack)
        num, k = self.num_envs, self.frame_stack
        self._stack = np.full((num, k), -1, np.int64)  # refs of the current obs s_t
        self._t = np.zeros(num, np.int64)  # episode step of the next action
        self._w_len = np.zeros(num, np.int64)  # steps in the window (not yet emitted), <= n
        self._w_obs = np.full((num, self.n, k), -1, np.int64)  # ring over t % n
        self._w_act = np.zeros((num, self.n), np.int64)
        self._w_rew = np.zeros((num, self.n), np.float64)
        self._w_qsa = np.zeros((num, self.n), np.float64)  # Q(s_t, a_t)
        self._held: dict | None = None  # full windows waiting for max_a Q(s_{t+n})
        self._gpow = self.gamma ** np.arange(self.n)  # g^i, i < n

    def _item_spec(self) -> dict:
        k = (self.frame_stack,)
        spec = {"stream": ((), np.int32), "obs_seq": (k, np.int64), "next_seq": (k, np.int64),
                "action": ((), np.int64), "reward": ((), np.float32), "discount": ((), np.float32)}
        if self._with_q:
            spec["priority"] = ((), np.float32)
        return spec

    def reset(self, obs) -> None:
        """Start every env's episode at ``obs`` (N, k, *f) from ``venv.reset``. Partial episodes
        of an earlier reset are abandoned (their unfinished transitions counted in ``dropped``)."""
        obs = self._obs(obs, "obs", self.frame_stack)
        if self._started:
            self.dropped += int(self._w_len.sum()) + (0 if self._held is None else len(self._held["stream"]))
        envs = np.arange(self.num_envs)
        self._stack[:] = -1
        self._stack[:, -1] = self._new_frames(envs, obs[:, -1])
        self._t[:] = 0
        self._w_len[:] = 0
        self._held = None
        self._started = True

    def step(self, action, reward, terminated, truncated, next_obs, final_obs=None, q=None,
             q_final=None) -> None:
        """Record one vector-env step (arrays as documented in the class and architecture.md)."""
        if not self._started:
            raise RuntimeError("NStepAccumulator.step before reset(obs)")
        num, n, g = self.num_envs, self.n, self.gamma
        a_t = self._vec(action, "action", np.int64)
        r_t = self._vec(reward, "reward", np.float64)
        term = self._vec(terminated, "terminated", bool)
        trunc = self._vec(truncated, "truncated", bool) & ~term  # both set: terminal wins
        done = term | trunc
        any_done = bool(done.any())
        next_obs = self._obs(next_obs, "next_obs", self.frame_stack)
        if any_done:
            final_obs = self._obs(final_obs, "final_obs", self.frame_stack)
        q_t, q_final = self._check_q(q, q_final, trunc)
        if q_t is not None and self._held is not None:  # one-step delay: max_a Q(s_{t+n}) is q_t now
            held, self._held = self._held, None
            boot = q_t[held["stream"]].max(axis=1)
            self._emit_with_priority(held, boot)
        envs = self._envs
        slot = self._t % n
        self._w_obs[envs, slot] = self._stack
        self._w_act[envs, slot] = a_t
        self._w_rew[envs, slot] = r_t
        if q_t is not None:
            self._w_qsa[envs, slot] = q_t[envs, a_t]
        self._w_len += 1
        # new frame of s_{t+1}: the final obs where the episode ended
        last = np.where(done.reshape(-1, *[1] * len(self.frame_shape)), final_obs[:, -1], next_obs[:, -1]) \
            if any_done else next_obs[:, -1]
        s_tp1 = np.concatenate([self._stack[:, 1:], self._new_frames(envs, last)[:, None]], axis=1)
        full = np.flatnonzero(self._w_len == n) if not any_done else np.flatnonzero(~done & (self._w_len == n))
        if full.size:  # R_t = sum_{i<n} g^i r_{t+i}, d_t = g^n, next = s_{t+n}
            order = (self._t[full, None] - n + 1 + np.arange(n)) % n  # window slots, oldest first
            old = order[:, 0]
            items = {"stream": full, "obs_seq": self._w_obs[full, old], "next_seq": s_tp1[full],
                     "action": self._w_act[full, old],
                     "reward": (self._w_rew[full[:, None], order] * self._gpow).sum(axis=1),
                     "discount": np.full(full.size, g ** n), "qsa": self._w_qsa[full, old]}
            self._w_len[full] -= 1
            if q_t is None:
                self._emit(items)
            else:
                self._held = items
        ended = np.flatnonzero(done) if any_done else ()
        for i in ended:
            boot = q_final[i].max() if (q_t is not None and trunc[i]) else 0.0
            self._emit_tail(i, bool(term[i]), s_tp1[i], boot)
        self._t += 1
        if any_done:  # the next episode's first obs: k-1 zero frames + its first frame
            s_tp1[ended] = -1
            s_tp1[ended, -1] = self._new_frames(ended, next_obs[ended, -1])
            self._w_len[ended] = 0
            self._t[ended] = 0
        self._stack = s_tp1

    def _emit_tail(self, i: int, terminated: bool, final_stack: np.ndarray, boot: float) -> None:
        """All w <= n transitions left in env i's window at its episode end (m = w .. 1)."""
        w, n, g = int(self._w_len[i]), self.n, self.gamma
        order = (self._t[i] - w + 1 + np.arange(w)) % n
        rew = self._w_rew[i, order]
        ret = np.zeros(w)
        acc = 0.0
        for j in range(w - 1, -1, -1):  # R_j = r_j + g R_{j+1}, up to the episode end
            acc = rew[j] + g * acc
            ret[j] = acc
        m = w - np.arange(w)
        items = {"stream": np.full(w, i), "obs_seq": self._w_obs[i, order],
                 "next_seq": np.tile(final_stack, (w, 1)), "action": self._w_act[i, order], "reward": ret,
                 "discount": np.zeros(w) if terminated else g ** m, "qsa": self._w_qsa[i, order]}
        if self._with_q:
            self._emit_with_priority(items, np.full(w, boot))
        else:
            self._emit(items)

    def _emit_with_priority(self, items: dict, boot: np.ndarray) -> None:
        # Ape-X Alg. 1 line 8: |R_t + d_t max_a Q(s_{t+m}, a) - Q(s_t, a_t)|
        items["priority"] = np.abs(items["reward"] + items["discount"] * boot - items["qsa"])
        self._emit(items)


class SequenceAccumulator(_Outbox):
    """R2D2 sequences (Kapturowski et al. 2019, §2.3, burn-in §3) of T = burn_in + sequence_length steps.

    Burn-in is a prefix *in addition to* the paper's sequence length m = 80 (its hyper-parameter
    table: length 80 plus a burn-in prefix of 40; replay period 40), matching ReplayConfig where
    ``sequence_length`` excludes the burn-in: T = 40 + 80 = 120 by default. A sequence starts
    every ``period`` steps of an episode (0, P, 2P, ...) and holds T actions/rewards/discounts/
    masks, T+1 obs refs (the last is the bootstrap obs o_{s+T}) and the recurrent state
    (h, c) the actor had *before* acting at its first step (stored state, §3).

    Timeline: burn_in 2, sequence_length 4 (T = 6), period 3, an episode whose step 10
    terminates it (obs 11 = final obs). b = burn-in step, l = learning step, o = bootstrap obs
    only, p = padding (mask 0, discount 0, obs ref -1)::

        episode step  0 1 2 3 4 5 6 7 8 9 10 11
        start 0       b b l l l l o
        start 3             b b l l l l o
        start 6                   b b l l l  o   p      5 real steps + 1 padding step
        start 9                         b b  o   p p p p  2 real steps <= burn_in: not emitted

    ``gamma`` (keyword, required) is the per-step discount the chunk carries (losses/types.py:
    SequenceBatch.discount includes gamma): gamma, 0 on the terminating step and on padding
    (truncation still bootstraps: gamma); n-step targets are formed by the loss inside the
    sequence. Never crossing an episode boundary: at an episode end every open sequence is
    emitted with its remaining steps padded. A sequence whose real steps all lie in the
    burn-in has nothing to learn from and is not emitted (counted in ``skipped``); with
    burn_in 0 an episode of L steps gives ceil(L / P) sequences, one padded sequence when
    L <= P. If q is given (every step), chunk key ``q`` (B, T+1, A) holds Q(o_s .. o_{s+T})
    for the actor's priority (R2D2 §2.3: eta max|d| + (1 - eta) mean|d|); the actor pops it
    before sending. Q of the bootstrap obs arrives with the next step (or as ``q_final`` at a
    truncation; zeros at a termination), so with q a full sequence is complete one call after
    its last step.
    """

    def __init__(self, num_envs: int, burn_in: int, sequence_length: int, period: int, frame_shape: tuple,
                 frame_dtype, state_size: int, *, gamma: float) -> None:
        super().__init__(num_envs, frame_shape, frame_dtype)
        if int(burn_in) < 0 or int(sequence_length) < 1 or int(period) < 1 or int(state_size) < 1:
            raise ValueError(f"need burn_in >= 0, sequence_length >= 1, period >= 1, state_size >= 1; got "
                             f"{burn_in!r}, {sequence_length!r}, {period!r}, {state_size!r}")
        if int(period) > int(sequence_length):
            raise ValueError(f"period {period} > sequence_length {sequence_length}: some steps would never "
                             "be learned from")
        if not 0.0 <= float(gamma) <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        self.burn_in, self.period, self.gamma = int(burn_in), int(period), float(gamma)
        self.seq_len = self.burn_in + int(sequence_length)  # T
        self.state_size = int(state_size)
        num, ring = self.num_envs, self.seq_len + 1  # ring of the last T+1 steps (obs s..s+T)
        self._r_seq = np.full((num, ring), -1, np.int64)
        self._r_act = np.zeros((num, ring), np.int64)
        self._r_rew = np.zeros((num, ring), np.float32)
        self._r_disc = np.zeros((num, ring), np.float32)
        self._r_q: np.ndarray | None = None  # (num, ring, A) once q is seen
        self._cur = np.full(num, -1, np.int64)  # seq of the current obs o_e
        self._t = np.zeros(num, np.int64)  # episode step e
        self._open: list[list[tuple[int, np.ndarray, np.ndarray]]] = [[] for _ in range(num)]
        self.skipped = 0

    def _item_spec(self) -> dict:
        t, h = (self.seq_len,), (self.state_size,)
        spec = {"stream": ((), np.int32), "obs_seq": ((self.seq_len + 1,), np.int64),
                "action": (t, np.int64), "reward": (t, np.float32), "discount": (t, np.float32),
                "mask": (t, np.float32), "state_h": (h, np.float32), "state_c": (h, np.float32)}
        if self._with_q:
            spec["q"] = ((self.seq_len + 1, self._r_q.shape[2]), np.float32)
        return spec

    def reset(self, obs) -> None:
        """Start every env's episode at ``obs`` (N, 1, *f); open sequences are abandoned."""
        obs = self._obs(obs, "obs", 1)
        self.dropped += sum(len(o) for o in self._open)
        self._open = [[] for _ in range(self.num_envs)]
        self._cur[:] = self._new_frames(np.arange(self.num_envs), obs[:, -1])
        self._t[:] = 0
        self._started = True

    def step(self, action, reward, terminated, truncated, next_obs, final_obs=None, state_h=None,
             state_c=None, q=None, q_final=None) -> None:
        """Record one step; ``state_h``/``state_c`` (N, H) = recurrent state before acting."""
        if not self._started:
            raise RuntimeError("SequenceAccumulator.step before reset(obs)")
        num, T, ring = self.num_envs, self.seq_len, self.seq_len + 1
        a_t = self._vec(action, "action", np.int64)
        r_t = self._vec(reward, "reward", np.float32)
        term = self._vec(terminated, "terminated", bool)
        trunc = self._vec(truncated, "truncated", bool) & ~term
        done = term | trunc
        next_obs = self._obs(next_obs, "next_obs", 1)
        if done.any():
            final_obs = self._obs(final_obs, "final_obs", 1)
        if state_h is None or state_c is None:
            raise ValueError("state_h and state_c (the recurrent state before acting) are required")
        h_t, c_t = (np.asarray(s, np.float32) for s in (state_h, state_c))
        if h_t.shape != (num, self.state_size) or c_t.shape != h_t.shape:
            raise ValueError(f"state_h/state_c: expected ({num}, {self.state_size}), got {h_t.shape}, {c_t.shape}")
        q_t, q_final = self._check_q(q, q_final, trunc)
        envs, e = np.arange(num), self._t
        slot = e % ring
        self._r_seq[envs, slot] = self._cur
        self._r_act[envs, slot] = a_t
        self._r_rew[envs, slot] = r_t
        self._r_disc[envs, slot] = np.where(term, 0.0, self.gamma)
        if q_t is not None:
            if self._r_q is None:
                self._r_q = np.zeros((num, ring, q_t.shape[1]), np.float32)
            self._r_q[envs, slot] = q_t
        for i in np.flatnonzero(e % self.period == 0):
            self._open[i].append((int(e[i]), h_t[i].copy(), c_t[i].copy()))
        if q_t is not None:  # sequences s = e - T: Q(o_{s+T}) = q_t has just arrived
            self._emit_full(e - T)
        last = np.where(done.reshape(-1, *[1] * len(self.frame_shape)), final_obs[:, -1], next_obs[:, -1]) \
            if done.any() else next_obs[:, -1]
        self._cur = self._new_frames(envs, last)  # o_{e+1}
        self._r_seq[envs, (e + 1) % ring] = self._cur
        ended = np.flatnonzero(done)
        if q_t is not None and ended.size:
            boot = np.where(trunc[ended, None], q_final[ended] if q_final is not None else 0.0, 0.0)
            self._r_q[ended, (e[ended] + 1) % ring] = boot
        if q_t is None:  # sequences s = e - T + 1 end with o_{e+1}
            self._emit_full(e - T + 1)
        for i in ended:
            for start, h0, c0 in self._open[i]:
                self._emit_seq(i, start, int(e[i]) + 1 - start, h0, c0)
            self._open[i] = []
        self._t += 1
        if ended.size:
            self._cur[ended] = self._new_frames(ended, next_obs[ended, -1])
            self._t[ended] = 0

    def _emit_full(self, starts: np.ndarray) -> None:
        """Emit the full-length sequence of each env that started at episode step ``starts[i]``."""
        for i in np.flatnonzero((starts >= 0) & (starts % self.period == 0)):
            if self._open[i] and self._open[i][0][0] == starts[i]:
                start, h0, c0 = self._open[i].pop(0)
                self._emit_seq(i, start, self.seq_len, h0, c0)

    def _emit_seq(self, i: int, start: int, length: int, h0: np.ndarray, c0: np.ndarray) -> None:
        """Sequence of env i from episode step ``start`` with ``length`` <= T real steps."""
        if length <= self.burn_in:
            self.skipped += 1
            return
        T, ring = self.seq_len, self.seq_len + 1
        idx = (start + np.arange(length + 1)) % ring  # obs start .. start+length
        obs = np.full((1, T + 1), -1, np.int64)
        obs[0, :length + 1] = self._r_seq[i, idx]
        cols = {}
        for key, src in (("action", self._r_act), ("reward", self._r_rew), ("discount", self._r_disc)):
            cols[key] = np.zeros((1, T), src.dtype)
            cols[key][0, :length] = src[i, idx[:length]]
        mask = np.zeros((1, T), np.float32)
        mask[0, :length] = 1.0
        items = {"stream": np.array([i]), "obs_seq": obs, **cols, "mask": mask,
                 "state_h": h0[None], "state_c": c0[None]}
        if self._with_q:
            q = np.zeros((1, T + 1, self._r_q.shape[2]), np.float32)
            q[0, :length + 1] = self._r_q[i, idx]
            items["q"] = q
        self._emit(items)
