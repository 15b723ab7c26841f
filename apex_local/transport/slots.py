"""Batch slots: a ring of K preallocated shared-memory batches owned by the replay server
(DESIGN.md §3, STYLE.md #7: move indices, not data).

Segment layout (one segment, every offset 64-byte aligned)::

    [0, 64)            uint64[8]: magic, K, epoch, layout bytes, slot stride, data offset
    [64, 64+4096)      msgpack layout [[name, dtype, shape], ...]  (attachers need no layout)
    [.., + 64*K)       per-slot header uint64[8]: seq, state
    [data offset, ..)  K slots of ``stride`` bytes; arrays at fixed offsets inside each slot

Protocol (``state`` has one writer at a time, so a single aligned 8-byte store suffices)::

    replay server                                     learner
    slot = acquire()      FREE -> FILLING, seq += 1
    gather into slot.arrays
    publish(slot)         FILLING -> READY
    reply BatchReady(slot_id, slot_seq, epoch)  ───►  arrays = view(slot_id, slot_seq, epoch)
                                                      copy out (pinned memory / GPU)
    acquire() skips it while READY           ◄─────  release(slot_id, slot_seq): READY -> FREE

* A slot the learner holds (READY) is never reused: ``acquire()`` only takes FREE slots and
  returns None when all K are in flight.
* ``epoch`` is random per created segment. After a replay restart the learner's mapping is
  stale: `view` notices the file was replaced (inode) and reattaches; a (slot_id, slot_seq,
  epoch) from before the restart raises `StaleSlotError`, as does a seq no longer current.
* ``release`` returns False if the slot was reclaimed meanwhile (the copy may be torn:
  discard it). ``reclaim_all`` (server) frees READY slots when the learner is known dead.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import msgpack
import numpy as np

from apex_local.transport.shm import Segment, ShmError, ndarray_view

MAGIC = int.from_bytes(b"APEXSLT1", "little")
_LAYOUT_AT, _LAYOUT_MAX, _ALIGN = 64, 4096, 64
_HDR_AT = _LAYOUT_AT + _LAYOUT_MAX
FREE, FILLING, READY = 0, 1, 2
_SEQ, _STATE = 0, 1

__all__ = ["BatchSlots", "Slot", "StaleSlotError", "FREE", "FILLING", "READY"]


class StaleSlotError(RuntimeError):
    """The (slot_id, slot_seq, epoch) no longer names the batch it was sent for."""


@dataclass
class Slot:
    slot_id: int
    seq: int
    arrays: dict[str, np.ndarray]


def _up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _plan(layout: Sequence[tuple[str, tuple[int, ...], Any]]) -> tuple[list[tuple[str, tuple, np.dtype, int]], int]:
    """[(name, shape, dtype, offset in slot)], slot stride."""
    plan, off = [], 0
    for name, shape, dtype in layout:
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in shape)
        plan.append((str(name), shape, dtype, off))
        off = _up(off + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    return plan, max(off, _ALIGN)


class BatchSlots:
    """Server: `create`, `acquire`, `publish`, `abort`, `reclaim_all`. Learner: `attach`, `view`, `release`."""

    def __init__(self, segment: Segment) -> None:
        g = np.ndarray((8,), np.uint64, buffer=segment.mmap, offset=0)
        if int(g[0]) != MAGIC:
            raise ShmError(f"segment {segment.name!r} is not a batch-slot ring (bad magic)")
        self.segment, self.num_slots, self.epoch = segment, int(g[1]), int(g[2])
        raw = bytes(segment.mmap[_LAYOUT_AT:_LAYOUT_AT + int(g[3])])
        self.layout = [(n, tuple(s), np.dtype(d)) for n, d, s in msgpack.unpackb(raw)]
        self._plan, self.stride = _plan(self.layout)
        self._data_at = int(g[5])
        self._hdr = ndarray_view(segment, _HDR_AT, (self.num_slots, 8), np.uint64)
        self._next = 0

    @classmethod
    def create(cls, name: str, layout: Sequence[tuple[str, Sequence[int], Any]], num_slots: int, *,
               replace: bool = True) -> "BatchSlots":
        """K = ``num_slots`` slots of ``layout`` = [(name, shape, dtype)], all FREE, fresh epoch."""
        if num_slots < 1:
            raise ValueError(f"BatchSlots: num_slots must be >= 1, got {num_slots}")
        blob = msgpack.packb([[n, np.dtype(d).str, [int(x) for x in s]] for n, s, d in layout])
        if len(blob) > _LAYOUT_MAX:
            raise ValueError(f"BatchSlots: layout description is {len(blob)} bytes > {_LAYOUT_MAX}")
        _, stride = _plan(layout)
        data_at = _up(_HDR_AT + 64 * num_slots)
        seg = Segment.create(name, data_at + stride * num_slots, replace=replace)
        seg.mmap[_LAYOUT_AT:_LAYOUT_AT + len(blob)] = blob
        g = np.ndarray((8,), np.uint64, buffer=seg.mmap, offset=0)
        g[1:6] = [num_slots, random.getrandbits(62) + 1, len(blob), stride, data_at]
        g[0] = MAGIC  # last: attachers see a complete header or none
        return cls(seg)

    @classmethod
    def attach(cls, name: str) -> "BatchSlots":
        return cls(Segment.attach(name))

    def arrays(self, slot_id: int) -> dict[str, np.ndarray]:
        base = self._data_at + slot_id * self.stride
        return {n: ndarray_view(self.segment, base + off, shape, dt) for n, shape, dt, off in self._plan}

    def state(self, slot_id: int) -> tuple[int, int]:
        """(seq, state) of a slot."""
        return int(self._hdr[slot_id, _SEQ]), int(self._hdr[slot_id, _STATE])

    # ------------------------------------------------------------------ server side

    def acquire(self) -> Slot | None:
        """A FREE slot, now FILLING with a new seq, with writable views; None if all K are in flight."""
        for i in range(self.num_slots):
            sid = (self._next + i) % self.num_slots
            if int(self._hdr[sid, _STATE]) == FREE:
                self._next = (sid + 1) % self.num_slots
                seq = int(self._hdr[sid, _SEQ]) + 1
                self._hdr[sid, _SEQ] = seq
                self._hdr[sid, _STATE] = FILLING
                return Slot(sid, seq, self.arrays(sid))
        return None

    def publish(self, slot: Slot) -> None:
        """FILLING -> READY: the learner owns it until it releases it."""
        self._expect(slot.slot_id, slot.seq, FILLING)
        self._hdr[slot.slot_id, _STATE] = READY

    def abort(self, slot: Slot) -> None:
        """Give back a slot that was acquired but will not be sent (FILLING or READY -> FREE)."""
        if int(self._hdr[slot.slot_id, _SEQ]) == slot.seq:
            self._hdr[slot.slot_id, _STATE] = FREE

    def free_count(self) -> int:
        return int((self._hdr[:, _STATE] == FREE).sum())

    def reclaim_all(self) -> int:
        """READY -> FREE for every slot (only when the learner is known gone); returns how many."""
        ready = self._hdr[:, _STATE] == READY
        self._hdr[ready, _STATE] = FREE
        return int(ready.sum())

    # ------------------------------------------------------------------ learner side

    def view(self, slot_id: int, slot_seq: int, epoch: int | None = None,
             writable: bool = False) -> dict[str, np.ndarray]:
        """Read-only views of a READY slot (``writable``: left writable, for torch tensors made
        over them, which must still never be written). Reattaches when the server restarted (new
        epoch); raises `StaleSlotError` if the triple does not name the current batch."""
        if not self.segment.owner and self.segment.replaced() and not self._reattach():
            raise StaleSlotError(f"the batch-slot segment {self.segment.name!r} is gone (replay restarting?)")
        if epoch is not None and epoch != self.epoch:
            raise StaleSlotError(f"slot {slot_id} seq {slot_seq} is from replay epoch {epoch}; the batch-slot "
                                     f"ring is at epoch {self.epoch} (replay restarted)")
        self._expect(slot_id, slot_seq, READY)
        views = self.arrays(slot_id)
        if not writable:
            for a in views.values():
                a.flags.writeable = False
        return views

    def release(self, slot_id: int, slot_seq: int) -> bool:
        """READY -> FREE. False if the slot no longer holds that seq (reclaimed: discard the copy)."""
        if not 0 <= slot_id < self.num_slots or self.state(slot_id) != (slot_seq, READY):
            return False
        self._hdr[slot_id, _STATE] = FREE
        return True

    def _expect(self, slot_id: int, slot_seq: int, state: int) -> None:
        if not 0 <= slot_id < self.num_slots:
            raise StaleSlotError(f"slot id {slot_id} outside [0, {self.num_slots})")
        seq, st = self.state(slot_id)
        if (seq, st) != (slot_seq, state):
            raise StaleSlotError(f"slot {slot_id}: expected seq {slot_seq} in state {state}, found seq {seq} "
                                 f"in state {st}")

    def _reattach(self) -> bool:
        try:
            fresh = BatchSlots.attach(self.segment.name)
        except ShmError:
            return False
        old = self.segment
        self.__dict__.update(fresh.__dict__)
        old.close()
        return True

    def close(self) -> None:
        """Unmap; the server (creator) also unlinks."""
        self.segment.close()

    def __enter__(self) -> "BatchSlots":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
