"""The replay: storage table + sampler + optional rate limiter, and the builder both wirings use.

Reverb-style composition (``Table(sampler, remover, rate_limiter)``; the remover is the
table's FIFO ring). The single-process trainer and ``services/replay.py`` both call
``make_replay`` (STYLE.md #2); only where the arrays live differs (``allocator``).

Invalid items (an item whose oldest frame was overwritten in the frame ring) are found
lazily: ``sample`` checks every drawn index, invalidates the bad ones in the sampler
(priority 0, never drawn again) and redraws the whole batch, so IS weights stay normalised
within one draw and an invalid item is never returned. ``update_priorities`` drops updates
for slots overwritten since they were sampled (generation mismatch, DESIGN.md §3) and for
items that became invalid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from apex_local.replay.frames import Allocator, ChunkError, Layout, layout_nbytes
from apex_local.replay.rate_limiter import RateLimiter
from apex_local.replay.samplers import PrioritizedSampler, UniformSampler, make_sampler
from apex_local.replay.tables import SequenceTable, TransitionTable

if TYPE_CHECKING:  # pragma: no cover
    from apex_local.config import Config

# Replay.insert_many merges consecutive chunks up to this many frames (~18 Pong chunks of 50
# transitions, 55 new frames each; per chunk, warm ring, best of 3 on the 2-core box: alone 324 us,
# groups of 8 106 us, 12 91, 16 83, 24 95: python -m bench.bench_replay_insert_group)
INSERT_GROUP_FRAMES = 1024

__all__ = ["INSERT_GROUP_FRAMES", "RateLimitedError", "Replay", "SampleResult", "make_replay", "make_table", "replay_layout",
           "replay_nbytes"]


def _sizes(chunk) -> tuple[int, int, bool] | None:
    """(frames, items, has priority) of a chunk, or None when it is not shaped like one."""
    try:
        return len(chunk["frames"]), len(chunk["stream"]), "priority" in chunk
    except (TypeError, KeyError, IndexError):
        return None


class RateLimitedError(RuntimeError):
    """``insert``/``sample`` called while the rate limiter (or min size) says no.

    Callers ask ``can_insert()``/``can_sample(batch_size)`` first and wait (the server queues
    the request; the local trainer does the other kind of work)."""


@dataclass
class SampleResult:
    batch: dict[str, np.ndarray]  # table keys + weight (B,) f32, index (B,) i64, generation (B,) i64
    indices: np.ndarray  # (B,) int64 slots
    generations: np.ndarray  # (B,) int64 generation of each slot when sampled
    weights: np.ndarray  # (B,) float32 importance-sampling weights (max-normalised)


class Replay:
    """``table`` (TransitionTable | SequenceTable), ``sampler`` over the same slots, and an
    optional ``RateLimiter``. Sampling also waits for ``min_size`` stored items. Nothing here
    blocks: a refused ``insert``/``sample`` raises RateLimitedError."""

    def __init__(self, table, sampler, rate_limiter: RateLimiter | None = None, *, min_size: int = 1,
                 max_redraws: int = 32) -> None:
        if sampler.capacity != table.capacity:
            raise ValueError(f"sampler capacity {sampler.capacity} != table capacity {table.capacity}")
        if int(min_size) < 1:
            raise ValueError(f"min_size must be >= 1, got {min_size!r}")
        self.table, self.sampler, self.rate_limiter = table, sampler, rate_limiter
        self.min_size, self.max_redraws = int(min_size), int(max_redraws)
        self.inserted = self.sampled = self.invalidated = self.stale_updates = 0

    @property
    def size(self) -> int:
        return self.table.size

    @property
    def capacity(self) -> int:
        return self.table.capacity

    def can_insert(self, n: int = 1) -> bool:
        """False while the rate limiter holds inserts back (server: stop reading actors)."""
        return self.rate_limiter is None or self.rate_limiter.can_insert(n)

    def can_sample(self, batch_size: int) -> bool:
        """True once ``min_size`` items are stored, some are valid, and the limiter agrees."""
        return (self.table.size >= self.min_size and self.sampler.size > 0
                and (self.rate_limiter is None or self.rate_limiter.can_sample(batch_size)))

    def insert(self, actor_id: int, chunk: Mapping) -> int:
        """Store a chunk (ChunkError, nothing stored, if it is malformed); returns its item count.

        New items get the chunk's ``priority`` (|TD| from the actor) or the max priority; the
        slots they overwrite lose their old priority. Admitted whole when ``can_insert()``."""
        if not self.can_insert():
            raise RateLimitedError("insert refused by the rate limiter (samples are behind); check can_insert()")
        return self._store([(actor_id, chunk)])

    def insert_many(self, parts: Sequence[tuple[int, Mapping]]) -> list[int | ChunkError]:
        """``insert`` of each (actor_id, chunk) in order, with the validation and writes of
        consecutive chunks done together (``TransitionTable.insert_chunks``): one chunk of 50
        Atari transitions costs ~0.3 ms alone, and a fraction of that in a group of 8.

        Returns, per part, its stored item count or the ChunkError that refused it (nothing of
        it stored; the other parts are unaffected). A group the table refuses is retried part
        by part, so the outcome per part is that of ``insert`` one after the other. Groups
        stay within ``INSERT_GROUP_FRAMES`` frames (and the stream window, the frame ring and
        the table), so that merging cannot resolve a frame the parts one by one could not.
        Admitted whole when ``can_insert()`` (the caller sizes ``parts`` to its limiter)."""
        if not self.can_insert():
            raise RateLimitedError("insert refused by the rate limiter (samples are behind); check can_insert()")
        out: list[int | ChunkError] = []
        store = self.table.frame_store
        max_frames = min(INSERT_GROUP_FRAMES, store.window, store.capacity)
        group: list[tuple[int, Mapping]] = []
        counts: list[int] = []  # items per part of the group
        frames = items = 0
        key = None
        for part in parts:
            size = _sizes(part[1])
            if size is None or (group and (frames + size[0] > max_frames or items + size[1] > self.capacity
                                           or size[2] != key)):
                out.extend(self._store_group(group, counts))
                group, counts, frames, items = [], [], 0, 0
            if size is None:  # not even shaped like a chunk: let insert_chunk name the problem
                out.extend(self._store_group([part], [0]))
                continue
            group.append(part)
            counts.append(size[1])
            frames, items, key = frames + size[0], items + size[1], size[2]
        out.extend(self._store_group(group, counts))
        return out

    def _store_group(self, group: list, counts: list[int]) -> list[int | ChunkError]:
        if not group:
            return []
        try:
            n = self._store(group)
        except ChunkError as exc:
            if len(group) == 1:
                return [exc]
            return [r for part, c in zip(group, counts) for r in self._store_group([part], [c])]
        if len(group) == 1:
            return [n]
        kept = self.table.last_kept
        if kept is None:
            return list(counts)
        return [int(k.sum()) for k in np.split(kept, np.cumsum(counts)[:-1])]

    def _store(self, parts: list) -> int:
        before = self.table.size
        slots = self.table.insert_chunks(parts)
        n = int(slots.size)
        if n:
            priority = self.table.last_priority
            if priority is not None and self.table.last_kept is not None:
                priority = np.asarray(priority)[self.table.last_kept]
            self.sampler.add(slots, priority)
        if self.rate_limiter is not None and n:
            self.rate_limiter.on_insert(n)
            overwritten = n - (self.table.size - before)
            if overwritten:
                self.rate_limiter.on_delete(overwritten)
        self.inserted += n
        return n

    def sample(self, batch_size: int, beta: float, out: Mapping[str, np.ndarray] | None = None) -> SampleResult:
        """Draw ``batch_size`` valid items (PER §3.4 weights with exponent ``beta``) and gather them,
        into ``out`` (any keys of ``batch_layout``) when given."""
        if not self.can_sample(batch_size):
            raise RateLimitedError(f"cannot sample {batch_size} now: size {self.table.size} (min {self.min_size}), "
                                   f"{self.sampler.size} valid, rate limiter "
                                   f"{'off' if self.rate_limiter is None else 'says wait'}; check can_sample()")
        for _ in range(self.max_redraws):
            idx, weights = self.sampler.sample(batch_size, beta)
            ok = self.table.valid(idx)
            if ok.all():
                break
            bad = np.unique(idx[~ok])
            self.sampler.invalidate(bad)  # priority 0 from now on
            self.invalidated += int(bad.size)
        else:
            raise RuntimeError(f"no batch of valid items after {self.max_redraws} draws "
                               f"({self.sampler.size} valid items left)")
        batch = self.table.gather(idx, out)
        generations = self.table.generation[idx]
        for key, val in (("weight", weights), ("index", idx), ("generation", generations)):
            if out is not None and key in out:
                out[key][...] = val
                val = out[key]
            batch[key] = val
        if self.rate_limiter is not None:
            self.rate_limiter.on_sample(batch_size)
        self.sampled += batch_size
        return SampleResult(batch, idx, generations, weights)

    def update_priorities(self, indices, generations, td_abs) -> int:
        """Learner feedback; returns how many priorities were written. Dropped: entries whose
        slot was overwritten since sampling (generation mismatch), items that became invalid,
        and non-finite/negative td (the sampler keeps the old priority)."""
        idx = np.asarray(indices, np.int64).ravel()
        gen = np.asarray(generations, np.int64).ravel()
        td = np.asarray(td_abs, np.float64).ravel()
        if not idx.size == gen.size == td.size:
            raise ValueError(f"indices ({idx.size}), generations ({gen.size}) and td_abs ({td.size}) differ in length")
        if idx.size and (idx.min() < 0 or idx.max() >= self.capacity):
            raise IndexError(f"indices must be in [0, {self.capacity}), got {idx.min()}..{idx.max()}")
        current = self.table.generation[idx] == gen
        self.stale_updates += int(idx.size - np.count_nonzero(current))
        valid = self.table.valid(idx)
        if np.any(current & ~valid):
            self.sampler.invalidate(np.unique(idx[current & ~valid]))
        keep = current & valid
        skipped = self.sampler.set_priorities(idx[keep], td[keep])
        return int(np.count_nonzero(keep)) - skipped

    def batch_layout(self, batch_size: int) -> Layout:
        """[(key, shape, dtype)] of a sampled batch (for shared-memory batch slots)."""
        return self.table.batch_layout(batch_size) + [
            ("weight", (batch_size,), np.dtype(np.float32)), ("index", (batch_size,), np.dtype(np.int64)),
            ("generation", (batch_size,), np.dtype(np.int64))]

    def state_dict(self) -> dict:
        """Table arrays (not copies), sampler and limiter state, counters."""
        return {"table": self.table.state_dict(), "sampler": self.sampler.state(),
                "rate_limiter": None if self.rate_limiter is None else self.rate_limiter.state(),
                "counters": {"inserted": self.inserted, "sampled": self.sampled,
                             "invalidated": self.invalidated, "stale_updates": self.stale_updates}}

    def load_state_dict(self, state: Mapping) -> None:
        self.table.load_state_dict(state["table"])
        self.sampler.restore(state["sampler"])
        if self.rate_limiter is not None and state.get("rate_limiter") is not None:
            self.rate_limiter.restore(state["rate_limiter"])
        for key, val in state.get("counters", {}).items():
            setattr(self, key, int(val))


# ---------------------------------------------------------------------- builders
def _table_args(cfg: "Config", frame_stack: int | None) -> tuple[type, dict]:
    r = cfg.replay
    if cfg.recurrent:
        if (cfg.env.frame_stack if frame_stack is None else frame_stack) != 1:
            raise ValueError(f"recurrent replay stores single frames: frame_stack must be 1, got "
                             f"{cfg.env.frame_stack if frame_stack is None else frame_stack} (env.frame_stack)")
        return SequenceTable, {"seq_len": r.burn_in + r.sequence_length, "state_size": cfg.network.lstm_size,
                               "period": r.sequence_period}
    k = cfg.env.frame_stack if frame_stack is None else int(frame_stack)
    # the window must reach back k + n + 2 frames of a stream (see TransitionTable)
    return TransitionTable, {"frame_stack": k, "stream_window": max(1024, 1 << (2 * (k + r.n_step + 2)).bit_length())}


def make_table(cfg: "Config", frame_shape: tuple, frame_dtype, frame_stack: int | None = None,
               num_actions: int | None = None, allocator: Allocator | None = None):
    """The storage ``cfg`` asks for: SequenceTable if the network is recurrent, else TransitionTable."""
    cls, kw = _table_args(cfg, frame_stack)
    if allocator is not None:
        kw["allocator"] = allocator
    return cls(cfg.replay.capacity, tuple(frame_shape), frame_dtype, num_actions=num_actions, **kw)


def replay_layout(cfg: "Config", frame_shape: tuple, frame_dtype, frame_stack: int | None = None) -> Layout:
    """Every array ``make_replay(..., allocator=...)`` will allocate, without allocating
    (``layout_nbytes`` of it = bytes to check against free /dev/shm)."""
    cls, kw = _table_args(cfg, frame_stack)
    kw.pop("stream_window", None)
    layout = cls.layout(cfg.replay.capacity, tuple(frame_shape), frame_dtype, **kw)
    sampler_cls = PrioritizedSampler if cfg.replay.prioritized else UniformSampler
    return layout + [(f"sampler_{name}", shape, dtype)
                     for name, (shape, dtype) in sampler_cls.buffer_specs(cfg.replay.capacity).items()]


def make_replay(cfg: "Config", frame_shape: tuple, frame_dtype, frame_stack: int | None = None,
                num_actions: int | None = None, allocator: Allocator | None = None,
                rng: np.random.Generator | None = None) -> Replay:
    """Table + sampler (+ rate limiter when ``replay.samples_per_insert`` > 0) from ``cfg``.

    ``frame_shape``/``frame_dtype``: one frame (EnvSpec.obs_shape[1:]); ``frame_stack``
    defaults to ``env.frame_stack``. With ``allocator`` every fixed-size array (table and
    sampler trees, names as in ``replay_layout``) comes from it.
    """
    table = make_table(cfg, frame_shape, frame_dtype, frame_stack, num_actions, allocator)
    r = cfg.replay
    buffers = None
    if allocator is not None:
        sampler_cls = PrioritizedSampler if r.prioritized else UniformSampler
        buffers = {name: allocator(f"sampler_{name}", shape, dtype)
                   for name, (shape, dtype) in sampler_cls.buffer_specs(r.capacity).items()}
    sampler = make_sampler(r, r.capacity, rng, buffers)
    limiter = None
    if r.samples_per_insert > 0:
        limiter = RateLimiter(r.samples_per_insert, r.min_size, r.spi_error_buffer,
                              batch_size=cfg.learner.batch_size)
    return Replay(table, sampler, limiter, min_size=r.min_size)


def replay_nbytes(cfg: "Config", frame_shape: tuple, frame_dtype, frame_stack: int | None = None) -> int:
    return layout_nbytes(replay_layout(cfg, frame_shape, frame_dtype, frame_stack))
