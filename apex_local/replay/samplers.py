"""Samplers: which stored items a batch contains, and their importance weights.

A sampler only knows slot indices in [0, capacity); the storage decides which slot an
item goes to and tells the sampler (``add`` for a new item, ``invalidate`` when an item
can no longer be rebuilt, e.g. its oldest frame was overwritten). Common interface::

    add(indices, td_abs=None) -> int            new items (priority from td_abs or max)
    set_priorities(indices, td_abs) -> int      learner feedback; returns #skipped
    invalidate(indices) -> None                 never sample these slots again
    sample(batch_size, beta) -> (int64 indices, float32 weights)
    size, capacity, max_priority, state(), restore(state)

Prioritized replay follows Schaul et al. 2016 (PER) §3.3 (proportional variant,
p_i = (|delta_i| + eps)^alpha, P(i) = p_i / sum_k p_k) and §3.4 (importance sampling,
w_i = (N P(i))^-beta / max_j w_j), as used by Ape-X (Horgan et al. 2018, §3) where
actors supply the initial priorities of new items.
"""
from __future__ import annotations

import json

from typing import TYPE_CHECKING, Mapping, Protocol

import numpy as np

from apex_local.replay.sum_tree import MinTree, SumTree, tree_size

if TYPE_CHECKING:  # pragma: no cover
    from apex_local.config import ReplayConfig

__all__ = ["PrioritizedSampler", "Sampler", "UniformSampler", "beta_schedule", "make_sampler"]

BufferSpecs = Mapping[str, tuple[tuple[int, ...], np.dtype]]


class Sampler(Protocol):
    capacity: int

    @property
    def size(self) -> int: ...
    @property
    def max_priority(self) -> float: ...
    def add(self, indices, td_abs=None) -> int: ...
    def set_priorities(self, indices, td_abs) -> int: ...
    def invalidate(self, indices) -> None: ...
    def sample(self, batch_size: int, beta: float = 0.0) -> tuple[np.ndarray, np.ndarray]: ...
    def state(self) -> dict: ...
    def restore(self, state: Mapping) -> None: ...


def _rng_state(rng: np.random.Generator) -> str:
    """The generator's state as JSON (a snapshot restores the exact draws that would follow)."""
    return json.dumps(rng.bit_generator.state)


def _set_rng_state(rng: np.random.Generator, state: str | None) -> None:
    if state is None:  # a state without it (older snapshot): keep the seeded generator
        return
    try:
        rng.bit_generator.state = json.loads(state)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"sampler rng state does not fit this generator "
                         f"({type(rng.bit_generator).__name__}): {exc}") from None


def _buffer(buffers: Mapping[str, np.ndarray] | None, name: str, shape, dtype) -> np.ndarray:
    """A caller-provided array (checked, cleared) or a fresh one."""
    if buffers is None or name not in buffers:
        return np.zeros(shape, dtype=dtype)
    buf = buffers[name]
    if buf.shape != tuple(shape) or buf.dtype != np.dtype(dtype) or not buf.flags.writeable:
        raise ValueError(f"buffers[{name!r}] must be a writeable {np.dtype(dtype)} array of shape "
                         f"{tuple(shape)}, got {buf.dtype} {buf.shape}")
    buf[...] = 0
    return buf


def _check_td(td_abs, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(td as float64, mask of usable entries: finite and >= 0)."""
    td = np.asarray(td_abs, dtype=np.float64).ravel()
    if td.size != n:
        raise ValueError(f"{n} indices but {td.size} td_abs values")
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(td) & (td >= 0)
    return td, ok


class _ValidSet:
    """Which slots hold a sampleable item, and how many (shared by both samplers)."""

    def __init__(self, capacity: int, buffers: Mapping[str, np.ndarray] | None) -> None:
        if int(capacity) < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        self.capacity = int(capacity)
        unknown = set(buffers or {}) - set(self.buffer_specs(capacity))
        if unknown:
            raise ValueError(f"unknown buffers {sorted(unknown)}; expected {sorted(self.buffer_specs(capacity))}")
        self._valid = _buffer(buffers, "valid", (self.capacity,), np.bool_)
        self._size = 0

    @property
    def size(self) -> int:
        """Number of valid (added and not invalidated) items."""
        return self._size

    def _indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= self.capacity):
            raise IndexError(f"indices must be in [0, {self.capacity}), got min {idx.min()} "
                             f"max {idx.max()}")
        return idx

    def _mark(self, idx: np.ndarray, valid: bool) -> None:
        uniq = np.unique(idx)
        changed = np.count_nonzero(self._valid[uniq] != valid)
        self._size += changed if valid else -changed
        self._valid[uniq] = valid


class PrioritizedSampler(_ValidSet):
    """Proportional prioritized sampling with a sum tree and a min tree (PER §3.3-3.4).

    ``max_priority`` is the largest |td| + eps written so far (starts at 1.0, never
    decreases, as in OpenAI baselines); a new item without a priority gets
    p = max_priority^alpha, so it is replayed at least once soon (PER Algorithm 1, line 6).
    Invalid and never-written slots hold p = 0 in the sum tree (never sampled) and +inf in
    the min tree (never the minimum). ``buffers`` may supply the arrays named by
    ``buffer_specs(capacity)`` (e.g. shared memory); they are cleared.
    """

    def __init__(self, capacity: int, alpha: float, priority_eps: float,
                 rng: np.random.Generator | None = None,
                 buffers: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__(capacity, buffers)
        if not (np.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
        if not (np.isfinite(priority_eps) and priority_eps >= 0):
            raise ValueError(f"priority_eps must be finite and >= 0, got {priority_eps!r}")
        self.alpha = float(alpha)
        self.priority_eps = float(priority_eps)
        self._rng = rng if rng is not None else np.random.default_rng()
        buffers = buffers or {}
        self._sum = SumTree(capacity, np.float64, buffers.get("sum"))
        self._min = MinTree(capacity, np.float64, buffers.get("min"))
        self._max_priority = 1.0

    @staticmethod
    def buffer_specs(capacity: int) -> BufferSpecs:
        """Name -> (shape, dtype) of each array ``buffers`` may provide."""
        n = tree_size(capacity)
        return {"sum": ((n,), np.dtype(np.float64)), "min": ((n,), np.dtype(np.float64)),
                "valid": ((int(capacity),), np.dtype(np.bool_))}

    @property
    def max_priority(self) -> float:
        return self._max_priority

    @property
    def total_priority(self) -> float:
        return self._sum.total

    def _write(self, idx: np.ndarray, raw: np.ndarray) -> None:
        """Store p = raw^alpha, raw = |td| + eps (PER §3.3, proportional variant)."""
        p = raw ** self.alpha
        self._sum.update(idx, p)
        self._min.update(idx, np.where(p > 0, p, np.inf))  # min over non-zero priorities
        if raw.size:
            self._max_priority = max(self._max_priority, float(raw.max()))

    def add(self, indices, td_abs=None) -> int:
        """Register newly written items. ``td_abs`` None (or a non-finite/negative entry)
        -> max priority. Returns how many given td_abs entries were unusable. Adding to a
        slot that is still valid (ring overwrite) replaces its item: no invalidate needed."""
        idx = self._indices(indices)
        raw = np.full(idx.size, self._max_priority)
        skipped = 0
        if td_abs is not None:
            td, ok = _check_td(td_abs, idx.size)
            raw[ok] = td[ok] + self.priority_eps
            skipped = int(idx.size - np.count_nonzero(ok))
        self._mark(idx, True)
        self._write(idx, raw)
        return skipped

    def set_priorities(self, indices, td_abs) -> int:
        """Learner feedback: p_i = (|td_i| + eps)^alpha for the sampled items.

        Non-finite or negative td entries are skipped (the item keeps its old priority);
        the count is returned for the learner's metrics. Slots that are not valid any more
        (invalidated or never added since) are left alone: a stale update must not revive
        them. Duplicate indices: the last entry wins.
        """
        idx = self._indices(indices)
        td, ok = _check_td(td_abs, idx.size)
        keep = ok & self._valid[idx]
        if keep.any():
            self._write(idx[keep], td[keep] + self.priority_eps)
        return int(idx.size - np.count_nonzero(ok))

    def invalidate(self, indices) -> None:
        """Priority 0: these slots are never sampled until ``add`` is called for them."""
        idx = self._indices(indices)
        self._mark(idx, False)
        self._sum.update(idx, 0.0)
        self._min.update(idx, np.inf)

    def sample(self, batch_size: int, beta: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``batch_size`` indices (stratified, with replacement) and IS weights.

        PER §3.4: w_i = (N P(i))^-beta / max_j w_j. The max weight over the whole buffer
        belongs to the smallest priority, max_j w_j = (N p_min / total)^-beta, so N and
        the total cancel: w_i = (p_i / p_min)^-beta, in (0, 1]. Raises RuntimeError when
        no valid item has a priority > 0.
        """
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        if self._size == 0 or not self._sum.total > 0:
            raise RuntimeError(f"nothing to sample: {self._size} valid items, "
                               f"total priority {self._sum.total}")
        idx = self._sum.sample(batch_size, self._rng)
        p_min = self._min.min
        weights = (self._sum.get(idx) / p_min) ** (-float(beta))
        # clip to (0, 1]: a float32 weight must not underflow to 0 for a huge p_i / p_min
        return idx, np.clip(weights, np.finfo(np.float32).tiny, 1.0).astype(np.float32)

    def state(self) -> dict:
        """Copies of the priorities and validity, for a replay snapshot."""
        return {"kind": "prioritized", "priorities": self._sum.leaves.copy(),
                "valid": self._valid.copy(), "max_priority": self._max_priority, "rng": _rng_state(self._rng)}

    def restore(self, state: Mapping) -> None:
        if state.get("kind") != "prioritized":
            raise ValueError(f"not a prioritized sampler state: kind {state.get('kind')!r}")
        p = np.asarray(state["priorities"], dtype=np.float64)
        valid = np.asarray(state["valid"], dtype=bool)
        p = np.where(valid, p, 0.0)
        self._sum.set_all(p)
        self._min.set_all(np.where(p > 0, p, np.inf))
        self._valid[:] = valid
        self._size = int(np.count_nonzero(valid))
        self._max_priority = float(state["max_priority"])
        _set_rng_state(self._rng, state.get("rng"))


class UniformSampler(_ValidSet):
    """Uniform sampling (with replacement) over valid items; all weights are 1.

    Rejection sampling over [0, high), high = 1 + the largest index ever added, so a ring
    that is still filling costs nothing extra; if fewer than 1/8 of those slots are valid
    it falls back to listing them (O(capacity), rare: only when most items are invalid).
    """

    _DENSE_ENOUGH = 0.125

    def __init__(self, capacity: int, rng: np.random.Generator | None = None,
                 buffers: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__(capacity, buffers)
        self._rng = rng if rng is not None else np.random.default_rng()
        self._high = 0

    @staticmethod
    def buffer_specs(capacity: int) -> BufferSpecs:
        return {"valid": ((int(capacity),), np.dtype(np.bool_))}

    @property
    def max_priority(self) -> float:
        return 1.0

    def add(self, indices, td_abs=None) -> int:
        """Register new items; ``td_abs`` is only checked (count of unusable entries)."""
        idx = self._indices(indices)
        skipped = 0 if td_abs is None else int(idx.size - np.count_nonzero(_check_td(td_abs, idx.size)[1]))
        if idx.size:
            self._mark(idx, True)
            self._high = max(self._high, int(idx.max()) + 1)
        return skipped

    def set_priorities(self, indices, td_abs) -> int:
        """No priorities to keep; returns the count of non-finite/negative td (as prioritized)."""
        idx = self._indices(indices)
        return int(idx.size - np.count_nonzero(_check_td(td_abs, idx.size)[1]))

    def invalidate(self, indices) -> None:
        self._mark(self._indices(indices), False)

    def sample(self, batch_size: int, beta: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """``batch_size`` indices drawn uniformly from valid items; ``beta`` is ignored."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if self._size == 0:
            raise RuntimeError("nothing to sample: 0 valid items")
        high, rng = self._high, self._rng
        density = self._size / high
        if density == 1.0:  # every slot below high is valid
            idx = rng.integers(0, high, batch_size, dtype=np.int64)
        elif density < self._DENSE_ENOUGH:
            valid = np.flatnonzero(self._valid[:high])
            idx = valid[rng.integers(0, valid.size, batch_size)]
        else:  # accepted draws are i.i.d. uniform over the valid slots
            idx = np.empty(batch_size, dtype=np.int64)
            got = 0
            while got < batch_size:
                need = batch_size - got
                cand = rng.integers(0, high, int(need / density * 1.25) + 16, dtype=np.int64)
                cand = cand[self._valid[cand]][:need]
                idx[got:got + cand.size] = cand
                got += cand.size
        return idx.astype(np.int64, copy=False), np.ones(batch_size, dtype=np.float32)

    def state(self) -> dict:
        return {"kind": "uniform", "valid": self._valid.copy(), "rng": _rng_state(self._rng)}

    def restore(self, state: Mapping) -> None:
        if state.get("kind") != "uniform":
            raise ValueError(f"not a uniform sampler state: kind {state.get('kind')!r}")
        self._valid[:] = np.asarray(state["valid"], dtype=bool)
        self._size = int(np.count_nonzero(self._valid))
        _set_rng_state(self._rng, state.get("rng"))
        nz = np.flatnonzero(self._valid)
        self._high = int(nz[-1]) + 1 if nz.size else 0


def make_sampler(replay_cfg: "ReplayConfig", capacity: int,
                 rng: np.random.Generator | None = None,
                 buffers: Mapping[str, np.ndarray] | None = None) -> PrioritizedSampler | UniformSampler:
    """The sampler ``replay.prioritized`` asks for, over ``capacity`` slots."""
    if replay_cfg.prioritized:
        return PrioritizedSampler(capacity, replay_cfg.alpha, replay_cfg.priority_eps, rng, buffers)
    return UniformSampler(capacity, rng, buffers)


def beta_schedule(cfg: "ReplayConfig", update: int) -> float:
    """IS exponent at learner ``update``: linear from ``beta`` to ``beta_final`` over
    ``beta_anneal_updates`` updates, then constant (PER §3.4: anneal beta to 1 by the end
    of learning); ``beta_anneal_updates == 0`` keeps ``beta`` constant."""
    if cfg.beta_anneal_updates <= 0:
        return float(cfg.beta)
    frac = min(max(update, 0) / cfg.beta_anneal_updates, 1.0)
    return float(cfg.beta + frac * (cfg.beta_final - cfg.beta))
