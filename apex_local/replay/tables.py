"""Replay storage: fixed-capacity columnar rings of items whose frames live in a FrameStore.

``TransitionTable`` holds Ape-X n-step transitions (Horgan et al. 2018, §3), and
``SequenceTable`` R2D2 sequences (Kapturowski et al. 2019, §2.3). Both take the insert chunks
of docs/architecture.md ("Replay: frames stored once"), validate them completely before
writing anything (``ChunkError`` names the field; the table is unchanged after a rejected
chunk), and write items round-robin over slots ``0..capacity-1``. ``generation[slot]``
counts the writes to a slot, so a priority update for an item that has been overwritten
since it was sampled can be recognised and dropped. ``valid(indices)`` is False for an item
whose oldest frame has been overwritten in the frame ring (it can no longer be rebuilt).

Bytes per transition with k-frame stacks: frames ~ frame_bytes * (1 + margin) plus
2k int64 frame ids + action 8 + reward 4 + discount 4 + generation 8 (88 bytes at k=4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from apex_local.replay.frames import (Allocator, ChunkError, FrameStore, Layout, MergedParts, default_allocator,
                                      layout_nbytes)

__all__ = ["ChunkError", "SequenceTable", "TransitionTable", "default_frame_capacity"]

_INT, _FLOAT = "iu", "f"


def default_frame_capacity(base_frames: int, frame_nbytes: int) -> int:
    """Frame ring size for items that need about ``base_frames`` distinct frames.

    The margin covers frames the items do not account for: the reset frame of every episode
    (1/L of an episode of L steps), frames sent before the items that reference them (n + 1
    steps per stream) and frames of short or padded sequences. Image frames: base/16 + 4096
    (1M transitions of 84x84 uint8 cost 1.067 x the unique frame bytes). Small frames
    (<= 256 bytes, e.g. CartPole's 16) cost less than the references, so the ring doubles.
    """
    base = int(base_frames)
    return base + (base if frame_nbytes <= 256 else base // 16) + 4096


@dataclass(frozen=True)
class Column:
    """One per-item field: chunk key, per-item shape, storage dtype, accepted dtype kinds,
    value check ('ref' | 'action' | 'finite' | 'unit' | 'binary'), and for frame references the
    batch key of the rebuilt frames (e.g. obs_seq -> obs)."""

    name: str
    tail: tuple
    dtype: type
    kinds: str
    check: str
    batch_key: str | None = None


class _ItemTable:
    """Ring of items + generation counters + a FrameStore (shared by both tables)."""

    kind = ""

    def __init__(self, capacity: int, frame_shape: tuple, frame_dtype, columns: list[Column],
                 frame_capacity: int, stream_window: int, allocator: Allocator,
                 num_actions: int | None) -> None:
        if int(capacity) < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        if num_actions is not None and int(num_actions) < 1:
            raise ValueError(f"num_actions must be >= 1, got {num_actions!r}")
        self.capacity = int(capacity)
        self.num_actions = None if num_actions is None else int(num_actions)
        self.frame_store = FrameStore(frame_capacity, frame_shape, frame_dtype,
                                 stream_window=stream_window, allocator=allocator)
        self.frame_shape, self.frame_dtype = self.frame_store.frame_shape, self.frame_store.frame_dtype
        self._columns = columns
        self._data = {name: allocator(name, shape, dtype)
                      for name, shape, dtype in self._item_layout(self.capacity, columns)}
        self.generation = self._data["generation"]
        self.generation[...] = 0
        self.cursor = 0  # items ever written; the next slot is cursor % capacity
        self.size = 0
        self.gap_items = 0  # items skipped because they referenced frames the replay lost
        self.last_kept = None  # (B,) mask of the last chunk's stored items; None = all
        self.last_priority = None  # (B,) the last insert's priorities (all its items), if it had them

    @staticmethod
    def _item_layout(capacity: int, columns: list[Column]) -> Layout:
        return [(c.name, (capacity, *c.tail), np.dtype(c.dtype)) for c in columns] + [
            ("generation", (capacity,), np.dtype(np.int64))]

    @classmethod
    def _full_layout(cls, capacity, frame_shape, frame_dtype, columns, frame_capacity) -> Layout:
        return FrameStore.layout(frame_capacity, frame_shape, frame_dtype) + cls._item_layout(capacity, columns)

    def batch_layout(self, batch_size: int) -> Layout:
        """[(key, shape, dtype)] of what ``gather`` returns for ``batch_size`` items."""
        out = []
        for c in self._columns:
            if c.batch_key is None:
                out.append((c.name, (batch_size, *c.tail), np.dtype(c.dtype)))
            else:
                out.append((c.batch_key, self._frames_shape(batch_size, c), self.frame_dtype))
        return out

    def _frames_shape(self, batch_size: int, c: Column) -> tuple:
        """Batch shape of the frames rebuilt from reference column ``c``."""
        return (batch_size, *c.tail, *self.frame_shape)

    def _frames_view(self, dst: np.ndarray) -> np.ndarray:
        """``dst`` (of ``_frames_shape``) as (B, L, *frame_shape), a view."""
        return dst

    # ------------------------------------------------------------------ insert
    def insert_chunk(self, actor_id: int, chunk: Mapping) -> np.ndarray:
        """Validate ``chunk`` fully, then write its frames and items; returns the int64 slots
        written. Keys besides the documented ones (e.g. ``priority``) are ignored here
        (``priority`` is checked, then used by the sampler). Items that reference frames the
        replay lost (see ``FrameStore.prepare``) are skipped: ``last_kept`` is then the (B,)
        mask of the items stored (None when all were), and ``gap_items`` counts the skipped."""
        return self.insert_chunks([(actor_id, chunk)])

    def insert_chunks(self, parts: Sequence[tuple[int, Mapping]]) -> np.ndarray:
        """``insert_chunk`` for several (actor_id, chunk) at once, as ONE chunk: validated and
        written with one set of array operations (the per-chunk cost of a small insert is
        mostly per-call overhead). Slots and ``last_kept`` cover the concatenated items.

        All or nothing: a ChunkError stores nothing and, for more than one part, does not say
        which part is bad. When every part would be accepted by ``insert_chunk`` in order, the
        result is the same, except that a group can be refused where the parts one by one are
        not (e.g. a stream that restarts between two parts); ``Replay.insert_many`` then
        retries them one by one. Parts must all carry ``priority`` or all not."""
        if not parts:
            raise ChunkError("insert_chunks: no chunks")
        frame_parts, cols, n_frames, b = [], {}, 0, 0
        with_priority = None
        sizes = []  # (actor, frames, items) per part
        for actor_id, chunk in parts:
            if not isinstance(chunk, Mapping):
                raise ChunkError(f"chunk: expected a mapping of arrays, got {type(chunk).__name__}")
            frames = _field(chunk, "frames", None, "")
            if frames.dtype != self.frame_dtype or frames.ndim != 1 + len(self.frame_shape) \
                    or frames.shape[1:] != self.frame_shape:
                raise ChunkError(f"frames: expected {self.frame_dtype} (F, {', '.join(map(str, self.frame_shape))}),"
                                 f" got {frames.dtype} {frames.shape}")
            f_i = frames.shape[0]
            stream = np.asarray(chunk.get("stream", np.zeros(0, np.int32)))
            b_i = stream.shape[0] if stream.ndim == 1 else -1
            got = {"frame_stream": _field(chunk, "frame_stream", (f_i,), _INT),
                   "frame_seq": _field(chunk, "frame_seq", (f_i,), _INT),
                   "stream": _field(chunk, "stream", (b_i,), _INT)}
            for c in self._columns:
                got[c.name] = _field(chunk, c.name, (b_i, *c.tail), c.kinds)
            has_p = "priority" in chunk
            if with_priority is None:
                with_priority = has_p
            elif has_p != with_priority:
                raise ChunkError("priority: merged chunks must all carry priorities or all not")
            if has_p:
                got["priority"] = _field(chunk, "priority", (b_i,), _FLOAT)
            for key, a in got.items():
                cols.setdefault(key, []).append(a)
            frame_parts.append(frames)
            n_frames += f_i
            b += b_i
            sizes.append((int(actor_id), f_i, b_i))
        merged = {key: (v[0] if len(v) == 1 else _concat(key, v)) for key, v in cols.items()}
        frame_stream = _checked(merged["frame_stream"], "frame_stream", "stream")
        frame_seq = _checked(merged["frame_seq"], "frame_seq", "seq")
        stream = _checked(merged["stream"], "stream", "stream")
        if b > self.capacity:
            raise ChunkError(f"stream: {b} items exceed the table capacity {self.capacity}")
        values = {c.name: self._checked(c, merged[c.name]) for c in self._columns}
        if with_priority:
            _checked(merged["priority"], "priority", "priority")
        refs = [(c.name, values[c.name]) for c in self._columns if c.batch_key is not None]
        actor = parts[0][0] if len(parts) == 1 else MergedParts.of(*zip(*sizes))
        plan = self.frame_store.prepare(actor, frame_stream, frame_seq, stream, refs)
        # ---- nothing has been written so far; from here on nothing can fail
        self.frame_store.commit(plan, frame_seq, frame_parts if len(frame_parts) > 1 else frame_parts[0])
        for (name, _), gids in zip(refs, plan.refs):
            values[name] = gids
        self.last_kept = None  # items of a gap (frames the replay lost) are not stored
        if plan.drop.any():
            self.last_kept = ~plan.drop
            self.gap_items += int(plan.drop.sum())
            values = {name: v[self.last_kept] for name, v in values.items()}
            b = int(self.last_kept.sum())
        slots = (self.cursor + np.arange(b, dtype=np.int64)) % self.capacity
        for name, v in values.items():
            self._data[name][slots] = v
        self.generation[slots] += 1
        self.cursor += b
        self.size = min(self.capacity, self.size + b)
        self.last_priority = merged.get("priority") if with_priority else None
        return slots

    def _checked(self, c: Column, a: np.ndarray) -> np.ndarray:
        if c.check == "action" and a.size and self.num_actions is not None and a.max() >= self.num_actions:
            raise ChunkError(f"{c.name}: values must be < num_actions {self.num_actions}, got {a.max()}")
        return _checked(a, c.name, c.check)

    # ------------------------------------------------------------------ read
    def _indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= self.size):
            raise IndexError(f"indices must be in [0, {self.size}) (table size), got {idx.min()}..{idx.max()}")
        return idx

    def gather(self, indices, out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Rebuild the batch for slots ``indices`` (vectorised: one take per column).

        ``out`` may hold preallocated arrays (e.g. a shared-memory batch slot) for any of the
        ``batch_layout`` keys; those are filled in place and returned in the dict.
        """
        idx = self._indices(indices)
        out = {} if out is None else out
        batch = {}
        for c in self._columns:
            if c.batch_key is None:
                dst = out.get(c.name)
                batch[c.name] = self._data[c.name][idx] if dst is None else np.take(
                    self._data[c.name], idx, axis=0, out=dst, mode="clip")
                continue
            dst, want = out.get(c.batch_key), self._frames_shape(idx.size, c)
            if dst is None:
                batch[c.batch_key] = self.frame_store.gather(self._data[c.name][idx]).reshape(want)
                continue
            if dst.shape != want or dst.dtype != self.frame_dtype:
                raise ValueError(f"out[{c.batch_key!r}] must be {self.frame_dtype} {want}, got {dst.dtype} {dst.shape}")
            self.frame_store.gather(self._data[c.name][idx], out=self._frames_view(dst))
            batch[c.batch_key] = dst
        return batch

    def valid(self, indices) -> np.ndarray:
        """(B,) bool: the slot holds an item and all its frames are still in the ring."""
        idx = np.asarray(indices, dtype=np.int64).ravel()
        ok = (idx >= 0) & (idx < self.size)
        safe = np.where(ok, idx, 0)
        gids = np.concatenate([self._data[c.name][safe] for c in self._columns if c.batch_key], axis=1)
        return ok & self.frame_store.held(gids)

    # ------------------------------------------------------------------ snapshot
    def state_dict(self) -> dict:
        """Arrays (not copies: save them before inserting again) and counters."""
        return {"kind": self.kind, "cursor": self.cursor, "size": self.size,
                "columns": dict(self._data), "frames": self.frame_store.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"snapshot is a {state.get('kind')!r} table, this is a {self.kind!r} table")
        for name, arr in self._data.items():
            src = np.asarray(state["columns"][name])
            if src.shape != arr.shape or src.dtype != arr.dtype:
                raise ValueError(f"snapshot column {name!r} is {src.dtype} {src.shape}, "
                                 f"expected {arr.dtype} {arr.shape}")
        self.frame_store.load_state_dict(state["frames"])
        for name, arr in self._data.items():
            arr[...] = state["columns"][name]
        self.cursor, self.size = int(state["cursor"]), int(state["size"])


class TransitionTable(_ItemTable):
    """Ape-X n-step transitions: obs/next_obs as k-frame stacks rebuilt from single frames.

    ``gather`` -> obs (B, k, *f), action (B,) int64, reward (B,) f32, discount (B,) f32,
    next_obs (B, k, *f). ``stream_window`` must exceed how far back (in frames of one stream)
    an item reaches from the newest frame of its stream: k + n + 2 for n-step transitions.
    """

    kind = "transition"

    def __init__(self, capacity: int, frame_shape: tuple, frame_dtype, frame_stack: int, *,
                 allocator: Allocator = default_allocator, frame_capacity: int | None = None,
                 stream_window: int = 1024, num_actions: int | None = None) -> None:
        if int(frame_stack) < 1:
            raise ValueError(f"frame_stack must be >= 1, got {frame_stack!r}")
        self.frame_stack = int(frame_stack)
        fc = frame_capacity or self.default_frame_capacity(capacity, frame_shape, frame_dtype)
        super().__init__(capacity, frame_shape, frame_dtype, self.columns(frame_stack), fc,
                         stream_window, allocator, num_actions)

    @staticmethod
    def columns(frame_stack: int) -> list[Column]:
        k = (int(frame_stack),)
        return [Column("obs_seq", k, np.int64, _INT, "ref", "obs"),
                Column("action", (), np.int64, _INT, "action"),
                Column("reward", (), np.float32, _FLOAT, "finite"),
                Column("discount", (), np.float32, _FLOAT, "unit"),
                Column("next_seq", k, np.int64, _INT, "ref", "next_obs")]

    @staticmethod
    def default_frame_capacity(capacity: int, frame_shape: tuple, frame_dtype) -> int:
        return default_frame_capacity(capacity, int(np.prod(frame_shape)) * np.dtype(frame_dtype).itemsize)

    @classmethod
    def layout(cls, capacity: int, frame_shape: tuple, frame_dtype, frame_stack: int,
               frame_capacity: int | None = None) -> Layout:
        """[(name, shape, dtype)] of every allocator call, without allocating."""
        fc = frame_capacity or cls.default_frame_capacity(capacity, frame_shape, frame_dtype)
        return cls._full_layout(int(capacity), frame_shape, frame_dtype, cls.columns(frame_stack), fc)

    @classmethod
    def nbytes_required(cls, *args, **kwargs) -> int:
        """Bytes the allocator will be asked for (same arguments as ``layout``)."""
        return layout_nbytes(cls.layout(*args, **kwargs))


class SequenceTable(_ItemTable):
    """R2D2 sequences of T = burn_in + sequence_length steps (Kapturowski et al. 2019, §2.3).

    Item: obs_seq (T+1) frame refs (the +1 is the bootstrap observation), action, reward,
    discount, mask (T), and the recurrent state (state_h, state_c) (H,) stored at the
    sequence's first step. ``gather`` -> obs (B, T+1, 1, *f) (frame_stack 1), action (B, T)
    int64, reward/discount/mask (B, T) f32, state_h/state_c (B, H) f32. ``period`` (steps
    between sequence starts) only sizes the default frame ring: ~period new frames per item.
    """

    kind = "sequence"

    def __init__(self, capacity: int, frame_shape: tuple, frame_dtype, seq_len: int, state_size: int, *,
                 period: int | None = None, allocator: Allocator = default_allocator,
                 frame_capacity: int | None = None, stream_window: int | None = None,
                 num_actions: int | None = None) -> None:
        if int(seq_len) < 1 or int(state_size) < 1:
            raise ValueError(f"seq_len and state_size must be >= 1, got {seq_len!r}, {state_size!r}")
        self.seq_len, self.state_size = int(seq_len), int(state_size)
        fc = frame_capacity or self.default_frame_capacity(capacity, frame_shape, frame_dtype, seq_len, period)
        window = stream_window or 1 << max(8, (2 * (self.seq_len + 2)).bit_length())
        super().__init__(capacity, frame_shape, frame_dtype, self.columns(seq_len, state_size), fc,
                         window, allocator, num_actions)

    def _frames_shape(self, batch_size: int, c: Column) -> tuple:
        return (batch_size, self.seq_len + 1, 1, *self.frame_shape)  # frame_stack 1

    def _frames_view(self, dst: np.ndarray) -> np.ndarray:
        return dst[:, :, 0]

    @staticmethod
    def columns(seq_len: int, state_size: int) -> list[Column]:
        t, h = (int(seq_len),), (int(state_size),)
        return [Column("obs_seq", (t[0] + 1,), np.int64, _INT, "ref", "obs"),
                Column("action", t, np.int64, _INT, "action"),
                Column("reward", t, np.float32, _FLOAT, "finite"),
                Column("discount", t, np.float32, _FLOAT, "unit"),
                Column("mask", t, np.float32, _FLOAT + "b" + _INT, "binary"),
                Column("state_h", h, np.float32, _FLOAT, "finite"),
                Column("state_c", h, np.float32, _FLOAT, "finite")]

    @staticmethod
    def default_frame_capacity(capacity: int, frame_shape: tuple, frame_dtype, seq_len: int,
                               period: int | None = None) -> int:
        per_item = int(period or seq_len)
        return default_frame_capacity(int(capacity) * per_item + int(seq_len) + 1,
                                      int(np.prod(frame_shape)) * np.dtype(frame_dtype).itemsize)

    @classmethod
    def layout(cls, capacity: int, frame_shape: tuple, frame_dtype, seq_len: int, state_size: int,
               period: int | None = None, frame_capacity: int | None = None) -> Layout:
        fc = frame_capacity or cls.default_frame_capacity(capacity, frame_shape, frame_dtype, seq_len, period)
        return cls._full_layout(int(capacity), frame_shape, frame_dtype, cls.columns(seq_len, state_size), fc)

    @classmethod
    def nbytes_required(cls, *args, **kwargs) -> int:
        return layout_nbytes(cls.layout(*args, **kwargs))


# ---------------------------------------------------------------------- chunk field checks
def _field(chunk: Mapping, name: str, shape: tuple | None, kinds: str) -> np.ndarray:
    if name not in chunk:
        raise ChunkError(f"{name}: missing from the chunk")
    a = np.asarray(chunk[name])
    if kinds and a.dtype.kind not in kinds:
        want = {"iu": "an integer", "f": "a float"}.get(kinds, f"one of kinds {kinds!r}")
        raise ChunkError(f"{name}: dtype {a.dtype} is not {want} dtype")
    if shape is not None and a.shape != shape:
        raise ChunkError(f"{name}: shape {a.shape}, expected {shape} (B items / F frames as in the chunk)")
    return a


def _concat(name: str, arrays: list[np.ndarray]) -> np.ndarray:
    """One field of merged chunks. Integer fields of different dtypes become int64 (numpy would
    make uint64 + int64 float64)."""
    if len({a.dtype for a in arrays}) > 1 and all(a.dtype.kind in _INT for a in arrays):
        for a in arrays:
            if a.dtype.kind == "u" and a.size and a.max() >= 2 ** 63:
                raise ChunkError(f"{name}: values must be < 2**63, got {a.max()}")
        arrays = [a.astype(np.int64, copy=False) for a in arrays]
    return np.concatenate(arrays)


def _checked(a: np.ndarray, name: str, check: str) -> np.ndarray:
    if a.size == 0:
        return a
    if check in ("stream", "seq", "action") and a.min() < 0:
        raise ChunkError(f"{name}: values must be >= 0, got {a.min()}")
    if check == "ref" and a.min() < -1:
        raise ChunkError(f"{name}: frame refs must be >= -1 (-1 = zero padding), got {a.min()}")
    if check in ("finite", "unit", "priority") and not np.all(np.isfinite(a)):
        raise ChunkError(f"{name}: non-finite values")
    if check in ("unit", "binary") and (a.min() < 0 or a.max() > 1):
        raise ChunkError(f"{name}: values must be in [0, 1], got {a.min()}..{a.max()}")
    if check == "binary" and not np.all((a == 0) | (a == 1)):
        raise ChunkError(f"{name}: values must be 0 or 1")
    if check == "priority" and a.min() < 0:
        raise ChunkError(f"{name}: values must be >= 0, got {a.min()}")
    return a
