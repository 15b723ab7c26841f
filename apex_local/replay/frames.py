"""Frames stored once: one global frame ring plus a per-stream map ``seq -> frame id``.

docs/architecture.md "Replay: frames stored once". Ape-X (Horgan et al. 2018) stores
1-2M transitions of stacked 84x84 Atari frames; storing each stack would cost k times the
frame bytes (twice, with next_obs). Here every env stream (actor_id, env index) numbers its
frames (``seq``); each new frame is written once into a global ring, and items reference
frames. On insert the references (stream-local ``seq``) are resolved to global frame ids
(``gid``: the running count of frames ever written, so slot = gid % capacity)::

    ring slot:   0     1     2   ...   C-1 | C (always zeros: the padding frame, gid -1)
    gid:       0,C,2C 1,C+1  ...           |
    a gid is still held  <=>  gid >= written - C      (the ring overwrites oldest first)

An item is valid while all its frames are held. Within one stream, frames arrive in seq
order, so an item's oldest frame is also its smallest gid.

Every array of fixed size comes from an injectable ``allocator(name, shape, dtype)`` so
the replay server can put storage in shared memory. The per-stream windows (a few KiB per
stream, growing with the number of streams) are ordinary process-local arrays; they go
into ``state_dict`` so a snapshot restores them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

__all__ = ["Allocator", "ChunkError", "FrameStore", "MergedParts", "default_allocator", "layout_nbytes"]

Allocator = Callable[[str, tuple, np.dtype], np.ndarray]
Layout = list[tuple[str, tuple, np.dtype]]


class ChunkError(ValueError):
    """An insert chunk that cannot be stored; the message names the offending field.

    Raised before anything is written: the table is unchanged after a rejected chunk.
    """


def default_allocator(name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """Process-local zeroed memory (lazily committed by the OS, like shared memory)."""
    return np.zeros(shape, dtype=dtype)


def layout_nbytes(layout: Layout) -> int:
    """Total bytes of a ``[(name, shape, dtype)]`` layout."""
    return int(sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize for _, shape, dt in layout))


@dataclass
class FramePlan:
    """The outcome of ``FrameStore.prepare``: everything ``commit`` needs, nothing written yet."""

    gid: np.ndarray  # (F,) gids the chunk's frames will get
    keys: list  # (actor_id, stream) of each stream in the chunk
    rows: np.ndarray  # window row of each stream, -1 = new stream
    new_rows: list  # indices into keys of the new streams to give rows, in the order to give them
    restarted: np.ndarray  # (streams,) bool: seqs went backwards, start a fresh window
    frame_loc: np.ndarray  # (F,) index into keys of each frame's stream
    refs: list  # resolved gid arrays, one per reference field
    drop: np.ndarray  # (B,) bool: items referencing frames the replay lost (a gap); not stored


@dataclass(frozen=True)
class MergedParts:
    """Who sent what, for several chunks merged into one (``Replay.insert_many``); build it with
    ``of(actor ids, frames per chunk, items per chunk)``."""

    frame_actor: np.ndarray  # (F,) actor of each frame
    item_actor: np.ndarray  # (B,) actor of each item
    item_frames_end: np.ndarray  # (B,) frames of the merged chunk up to the end of the item's own chunk
    frame_part: np.ndarray  # (F,) index of the chunk each frame came from
    item_part: np.ndarray  # (B,) index of the chunk each item came from
    part_has_frames: np.ndarray  # (P,) bool: chunk p brings frames (only those create stream rows)

    @classmethod
    def of(cls, actors, frames, items) -> "MergedParts":
        actors, f_n, b_n = (np.asarray(x, np.int64) for x in (actors, frames, items))
        part = np.arange(actors.size)
        return cls(np.repeat(actors, f_n), np.repeat(actors, b_n), np.repeat(np.cumsum(f_n), b_n),
                   np.repeat(part, f_n), np.repeat(part, b_n), f_n > 0)


_SEQ_LIMIT = 1 << 40  # seqs are < 2^40 so (stream index, seq) packs into one int64 key
_STREAM_LIMIT = 1 << 31  # merged chunks: (actor, stream) packs into one int64 as actor << 31 | stream


class FrameStore:
    """A ring of ``capacity`` frames plus, per stream, a window of the last ``stream_window``
    seqs mapped to gids.

    A reference is resolvable while its seq is within the stream's window and its frame is
    still in the ring. A stream whose frame seqs go backwards (the actor restarted) starts
    a fresh window: references to the old incarnation's frames become unknown.
    """

    def __init__(self, capacity: int, frame_shape: tuple, frame_dtype, *, stream_window: int = 1024,
                 allocator: Allocator = default_allocator) -> None:
        if int(capacity) < 1:
            raise ValueError(f"frame capacity must be >= 1, got {capacity!r}")
        if int(stream_window) < 1:
            raise ValueError(f"stream_window must be >= 1, got {stream_window!r}")
        self.capacity = int(capacity)
        self.frame_shape = tuple(int(d) for d in frame_shape)
        self.frame_dtype = np.dtype(frame_dtype)
        self.window = int(stream_window)
        (name, shape, dtype), = self.layout(self.capacity, self.frame_shape, self.frame_dtype)
        self.frames = allocator(name, shape, dtype)
        self.frames[self.capacity] = 0  # the padding frame (gid -1), never written again
        self.written = 0  # frames ever written = the next gid
        self._rows: dict[tuple[int, int], int] = {}
        self._win_seq = np.full((0, self.window), -1, np.int64)
        self._win_gid = np.zeros((0, self.window), np.int64)
        self._last_seq = np.zeros(0, np.int64)

    @staticmethod
    def layout(capacity: int, frame_shape: tuple, frame_dtype) -> Layout:
        """The allocator calls ``__init__`` makes: ring of ``capacity`` frames + 1 zero frame."""
        return [("frames", (int(capacity) + 1, *map(int, frame_shape)), np.dtype(frame_dtype))]

    @property
    def num_streams(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------ insert
    def prepare(self, actor_id: int | MergedParts, frame_stream: np.ndarray,
                frame_seq: np.ndarray, item_stream: np.ndarray, refs: list[tuple[str, np.ndarray]]) -> FramePlan:
        """Resolve each ``refs`` array (B, L) of seqs (-1 = padding) of items of ``item_stream``
        to gids, as if the chunk's frames (``frame_stream``, ``frame_seq``) were written first.

        ``actor_id``: the sending actor, or for several chunks merged into one (the replay's
        batched insert) a ``MergedParts``: a stream is then (actor, stream) per frame / item
        (streams < 2**31), an item may only use frames of its own or an earlier chunk, and a
        reference into a gap raises ChunkError instead of dropping the item (where the gap
        lies depends on the chunk boundaries: the caller retries the chunks one by one).

        Raises ChunkError (nothing changed) for non-increasing seqs within a stream, or a
        reference to a seq the store does not hold after this chunk (never sent, outside the
        stream window, or overwritten in the ring). Vectorised over streams and fields.

        One exception: a reference into a *gap* of its stream, a seq after the newest one the
        store holds for the stream (any seq, for a stream it has never seen) and before the
        first frame of this chunk, means the replay lost those frames (it restarted, from a
        snapshot or empty, while the actor kept going). Those items are marked in
        ``plan.drop`` and not stored; the rest of the chunk is, so an actor's stream heals
        with its next chunk instead of being refused forever.
        """
        n_new = frame_seq.shape[0]
        if n_new > self.capacity:
            raise ChunkError(f"frames: {n_new} frames exceed the frame ring capacity {self.capacity}")
        for name, a in [("frame_seq", frame_seq), *refs]:
            if a.size and a.max() >= _SEQ_LIMIT:
                raise ChunkError(f"{name}: seqs must be < 2**40, got {a.max()}")
        gid = self.written + np.arange(n_new, dtype=np.int64)
        held_from = self.written + n_new - self.capacity  # gids below this are gone after commit
        merged = actor_id if isinstance(actor_id, MergedParts) else None
        if merged is not None:  # key = actor << 31 | stream
            both = np.concatenate([frame_stream, item_stream]).astype(np.int64, copy=False)
            if both.size and both.max() >= _STREAM_LIMIT:
                raise ChunkError(f"stream: merged chunks need streams < 2**31, got {both.max()}")
            actors = np.concatenate([merged.frame_actor, merged.item_actor]).astype(np.int64, copy=False)
            if actors.size and (actors.min() < -_STREAM_LIMIT or actors.max() >= _STREAM_LIMIT):
                raise ChunkError("actor_id: merged chunks need actor ids in [-2**31, 2**31)")
            codes = (actors << 31) | both
            streams, inv = np.unique(codes, return_inverse=True)
            keys = [(c >> 31, c & (_STREAM_LIMIT - 1)) for c in streams.tolist()]
        else:
            streams, inv = np.unique(np.concatenate([frame_stream, item_stream]), return_inverse=True)
            keys = [(int(actor_id), s) for s in streams.tolist()]
        rows = np.array([self._rows.get(k, -1) for k in keys], np.int64)
        new = np.flatnonzero(rows < 0)
        if merged is not None and new.size:
            # one by one, chunk p gives rows to its new streams (sorted) when it brings frames: the
            # same order here, and no row for a stream only frameless chunks mention
            part = np.concatenate([merged.frame_part, merged.item_part])
            eligible = merged.part_has_frames[part]
            first_part = np.full(streams.size, np.iinfo(np.int64).max)
            np.minimum.at(first_part, inv[eligible], part[eligible])
            new = new[first_part[new] < np.iinfo(np.int64).max]
            new = new[np.lexsort((streams[new], first_part[new]))]
        elif not frame_seq.shape[0]:
            new = new[:0]  # commit writes nothing for a chunk without frames
        f_loc, i_loc = inv[:n_new], inv[n_new:]
        # chunk frames sorted by (stream, seq); the stable sort keeps chunk order within a stream
        order = np.argsort(f_loc, kind="stable")
        skey = (f_loc * _SEQ_LIMIT + frame_seq)[order]
        if n_new > 1 and np.any(skey[1:] <= skey[:-1]):
            bad = int(streams[f_loc[order][1:][skey[1:] <= skey[:-1]][0]])
            raise ChunkError(f"frame_seq: seqs of stream {bad} must increase strictly within a chunk")
        sgid = gid[order]
        restarted = np.zeros(streams.size, bool)
        if n_new:  # a stream whose first seq is not past its last one restarted (new actor process)
            grp = f_loc[order]
            first = np.flatnonzero(np.r_[True, grp[1:] != grp[:-1]])
            g = grp[first]
            known = rows[g] >= 0
            last = np.full(g.size, -1, np.int64)
            last[known] = self._last_seq[rows[g][known]]
            restarted[g] = known & (frame_seq[order][first] <= last)
        window_ok = (rows >= 0) & ~restarted
        # the gap of each stream: (newest seq held, first seq of this chunk), exclusive
        gap_lo = np.full(streams.size, -1, np.int64)
        gap_lo[window_ok] = self._last_seq[rows[window_ok]]
        gap_hi = np.full(streams.size, -1, np.int64)  # -1: no frames of that stream in the chunk, no gap
        if n_new:
            gap_hi[g] = frame_seq[order][first]
        n_items = item_stream.shape[0]
        drop = np.zeros(n_items, bool)
        newest = None  # merged: the newest seq of each stream among the chunks' frames (-1: none)
        if merged is not None and n_new:
            newest = np.full(streams.size, -1, np.int64)
            np.maximum.at(newest, f_loc, frame_seq)
        out = []
        for name, r in refs:
            real = r >= 0
            seq = r[real]
            loc = np.broadcast_to(i_loc[:, None], r.shape)[real]
            got = np.empty(seq.size, np.int64)
            found = np.zeros(seq.size, bool)
            if n_new:
                qkey = loc * _SEQ_LIMIT + seq
                pos = np.minimum(np.searchsorted(skey, qkey), n_new - 1)
                found = skey[pos] == qkey
                if merged is not None:  # not a frame that only a later chunk of the merge brings
                    end = np.broadcast_to(merged.item_frames_end[:, None], r.shape)[real]
                    found &= sgid[pos] < self.written + end
                got[found] = sgid[pos[found]]
            miss = np.flatnonzero(~found & window_ok[loc])
            if miss.size:
                row, want = rows[loc[miss]], seq[miss]
                slot = want % self.window
                wgid = self._win_gid[row, slot]
                ok = (self._win_seq[row, slot] == want) & (wgid >= held_from)
                got[miss[ok]] = wgid[ok]
                found[miss[ok]] = True
            if merged is not None and newest is not None and np.any(found & (seq <= newest[loc] - self.window)):
                # one by one, a frame of an earlier chunk W seqs newer may have taken this seq's window slot
                raise ChunkError(f"{name}: merged chunks span more than the stream window (insert them one by one)")
            lost = ~found & (seq > gap_lo[loc]) & (seq < gap_hi[loc])
            if lost.any():
                if merged is not None:
                    raise ChunkError(f"{name}: merged chunks reference a gap (insert them one by one)")
                item = np.broadcast_to(np.arange(n_items)[:, None], r.shape)[real]
                drop[item[lost]] = True
                found |= lost
                got[lost] = -1
            if not found.all():
                j = np.flatnonzero(~found)[0]
                raise ChunkError(
                    f"{name}: stream {int(streams[loc[j]])} references frame seq {int(seq[j])}, which the replay "
                    f"does not hold (never sent, older than the stream window of {self.window}, or overwritten)")
            gids = np.full(r.shape, -1, np.int64)
            gids[real] = got
            out.append(gids)
        return FramePlan(gid, keys, rows, new.tolist(), restarted, f_loc, out, drop)

    def commit(self, plan: FramePlan, frame_seq: np.ndarray, frames: np.ndarray | list[np.ndarray]) -> None:
        """Write the chunk's frames and register their seqs (after ``prepare`` succeeded).

        ``frames``: one array, or the frames of merged chunks as a list of arrays in order
        (written part by part: no concatenated copy)."""
        n_new = plan.gid.size
        if n_new == 0:
            return
        pos = self.written % self.capacity
        for part in (frames if isinstance(frames, list) else [frames]):
            m = part.shape[0]
            first = min(m, self.capacity - pos)  # contiguous copies, wrapping once
            self.frames[pos:pos + first] = part[:first]
            self.frames[:m - first] = part[first:]
            pos = (pos + m) % self.capacity
        rows = plan.rows.copy()
        for j in plan.new_rows:
            rows[j] = self._add_row(plan.keys[j])
        fresh = rows[plan.restarted]
        self._win_seq[fresh] = -1
        self._last_seq[fresh] = -1
        frow, slot = rows[plan.frame_loc], frame_seq % self.window
        # one entry per (row, slot): the last in chunk order, i.e. the newest seq
        keep = n_new - 1 - np.unique((frow * self.window + slot)[::-1], return_index=True)[1]
        self._win_seq[frow[keep], slot[keep]] = frame_seq[keep]
        self._win_gid[frow[keep], slot[keep]] = plan.gid[keep]
        np.maximum.at(self._last_seq, frow, frame_seq)
        self.written += n_new

    def _add_row(self, key: tuple[int, int]) -> int:
        row = len(self._rows)
        if row == self._win_seq.shape[0]:  # grow x2
            grow = max(4, row)
            self._win_seq = np.concatenate([self._win_seq, np.full((grow, self.window), -1, np.int64)])
            self._win_gid = np.concatenate([self._win_gid, np.zeros((grow, self.window), np.int64)])
            self._last_seq = np.concatenate([self._last_seq, np.full(grow, -1, np.int64)])
        self._rows[key] = row
        return row

    # ------------------------------------------------------------------ read
    def held(self, gids: np.ndarray) -> np.ndarray:
        """(B, L) gids -> (B,) True where every referenced frame is still in the ring."""
        lo = self.written - self.capacity
        return np.all((gids < 0) | (gids >= lo), axis=-1)

    def gather(self, gids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Frames for ``gids`` of any shape S -> array (*S, *frame_shape); gid -1 -> zeros.

        ``out`` (C-contiguous, right shape and dtype) receives the frames without a copy.
        """
        pos = gids % self.capacity
        pos[gids < 0] = self.capacity
        shape = (*gids.shape, *self.frame_shape)
        if out is None:
            return np.take(self.frames, pos.ravel(), axis=0, mode="clip").reshape(shape)
        if out.shape != shape or out.dtype != self.frame_dtype:
            raise ValueError(f"out must be {self.frame_dtype} {shape}, got {out.dtype} {out.shape}")
        if out.flags.c_contiguous:
            np.take(self.frames, pos.ravel(), axis=0, mode="clip", out=out.reshape(-1, *self.frame_shape))
        else:
            out[...] = self.frames[pos]
        return out

    # ------------------------------------------------------------------ snapshot
    def state_dict(self) -> dict:
        n = len(self._rows)
        keys = np.array(sorted(self._rows, key=self._rows.get), np.int64).reshape(n, 2)
        return {"frames": self.frames, "written": self.written, "stream_keys": keys,
                "win_seq": self._win_seq[:n].copy(), "win_gid": self._win_gid[:n].copy(),
                "last_seq": self._last_seq[:n].copy()}

    def load_state_dict(self, state: Mapping) -> None:
        frames = np.asarray(state["frames"])
        if frames.shape != self.frames.shape or frames.dtype != self.frames.dtype:
            raise ValueError(f"snapshot frames are {frames.dtype} {frames.shape}, this store holds "
                             f"{self.frames.dtype} {self.frames.shape}")
        if np.asarray(state["win_seq"]).shape[1:] != (self.window,):
            raise ValueError(f"snapshot stream window {np.asarray(state['win_seq']).shape[1:]} != ({self.window},)")
        self.frames[...] = frames
        self.written = int(state["written"])
        keys = np.asarray(state["stream_keys"], np.int64).reshape(-1, 2)
        self._rows = {(int(a), int(s)): i for i, (a, s) in enumerate(keys)}
        self._win_seq = np.array(state["win_seq"], np.int64)
        self._win_gid = np.array(state["win_gid"], np.int64)
        self._last_seq = np.array(state["last_seq"], np.int64)
