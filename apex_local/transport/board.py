"""Weights board: one shared-memory segment, a seqlock and flat float32 parameters (DESIGN.md §3).

Layout (``HEADER_BYTES`` = 64, then ``numel`` float32)::

    uint64[0] seq      odd while a write is in progress
    uint64[1] version  weights version of the data (0 = nothing published yet)
    uint64[2] numel
    uint64[3] flags    reserved (0)
    uint64[4] magic    MAGIC ("APEXWGT1")
    uint64[5] writer pid
    uint64[6..7]       reserved

Writer (``publish``): seq <- seq+1 (odd); copy params; version <- v; seq <- seq+2 (even).
Reader (``read``): s1 <- seq; retry while odd; v <- version; copy params; s2 <- seq; the copy is
consistent iff s1 == s2. Bounded retries with a tiny sleep; None when nothing newer.

Memory ordering: every header access is a numpy scalar load/store on an 8-byte-aligned
uint64 view, which is one complete machine store/load, and each happens in its own CPython
call (a compiler barrier). On x86-64 (TSO) stores become visible in program order and loads
are not reordered with other loads, so the sequence above is a correct seqlock; glibc's
memcpy ends its non-temporal (streaming) large-copy path with an sfence, so the bulk copy is
also ordered before the final seq store. Weakly ordered CPUs (aarch64) would need real fences,
which CPython cannot express; there the finite check and version monotonicity are the only
safety nets.

Readers never get a version twice or one going backwards when they pass ``min_version``;
a board whose data is non-finite is refused (None, counted) and not re-read until its version
changes. If the writer restarts, it replaces the file; readers notice (inode) and reattach.
"""
from __future__ import annotations

import os
import struct
import time
from typing import Any

import numpy as np
import zmq

from apex_local.transport.shm import Segment, ShmError
from apex_local.transport.sockets import make_socket

HEADER_BYTES = 64
MAGIC = int.from_bytes(b"APEXWGT1", "little")
_SEQ, _VERSION, _NUMEL, _FLAGS, _MAGIC, _PID = range(6)

__all__ = ["WeightsBoard", "WeightsPublisher", "WeightsSubscriber", "HEADER_BYTES", "as_flat_float32"]


def as_flat_float32(params: Any) -> np.ndarray:
    """A flat float32 numpy view/copy of a numpy array or torch tensor (moved to the CPU)."""
    if hasattr(params, "detach"):  # torch.Tensor, without importing torch here
        params = params.detach().to("cpu").reshape(-1).numpy()
    return np.asarray(params, dtype=np.float32).reshape(-1)


class WeightsBoard:
    """Create with `create` (the learner / paramserver), `attach` everywhere else."""

    def __init__(self, segment: Segment) -> None:
        self._bind(segment)
        self.stats = {"reads": 0, "retries": 0, "torn": 0, "nonfinite": 0, "reattached": 0}
        self._refused_version = 0

    def _bind(self, segment: Segment) -> None:
        hdr = np.ndarray((8,), np.uint64, buffer=segment.mmap, offset=0)
        numel = int(hdr[_NUMEL])
        if int(hdr[_MAGIC]) != MAGIC or segment.size < HEADER_BYTES + 4 * numel:
            raise ShmError(f"segment {segment.name!r} is not a weights board (bad magic or size)")
        self.segment, self._hdr, self.numel = segment, hdr, numel
        self._data = np.ndarray((numel,), np.float32, buffer=segment.mmap, offset=HEADER_BYTES)

    @classmethod
    def create(cls, name: str, numel: int, *, replace: bool = True) -> "WeightsBoard":
        seg = Segment.create(name, HEADER_BYTES + 4 * int(numel), replace=replace)
        hdr = np.ndarray((8,), np.uint64, buffer=seg.mmap, offset=0)
        hdr[_NUMEL] = numel
        hdr[_PID] = os.getpid()
        hdr[_MAGIC] = MAGIC
        return cls(seg)

    @classmethod
    def attach(cls, name: str) -> "WeightsBoard":
        """Read-only mapping (a reader cannot corrupt the board); retry while the writer is
        still creating it (`ShmError`)."""
        return cls(Segment.attach(name, readonly=True))

    @property
    def version(self) -> int:
        """The latest published version (cheap; no copy). 0 = nothing published yet."""
        return int(self._hdr[_VERSION])

    def publish(self, params: Any, version: int) -> None:
        """Write ``params`` (numel float32s, numpy or torch) as ``version`` (>= 1).

        The writer does not check finiteness (the learner must not publish NaN; readers refuse it).
        """
        src = as_flat_float32(params)
        if src.shape[0] != self.numel:
            raise ValueError(f"publish: {src.shape[0]} parameters, board {self.segment.name!r} holds {self.numel}")
        if version < 1:
            raise ValueError(f"publish: version must be >= 1, got {version}")
        seq = int(self._hdr[_SEQ])
        self._hdr[_SEQ] = seq + 1  # odd: write in progress
        np.copyto(self._data, src)
        self._hdr[_VERSION] = version
        self._hdr[_SEQ] = seq + 2  # even: consistent

    def read(self, out: np.ndarray, min_version: int = 0, *, max_retries: int = 200) -> int | None:
        """Copy the parameters into ``out`` (float32, numel) if the board holds a version
        > ``min_version``; return that version, else None (nothing newer, refused as
        non-finite, or no consistent copy within ``max_retries``).

        ``out`` is scratch: its contents are meaningful only when a version is returned.
        """
        if not self.segment.owner and self.segment.replaced():
            self._reattach()
        for attempt in range(max_retries):
            s1 = int(self._hdr[_SEQ])
            if s1 & 1:
                self._backoff(attempt)
                continue
            v = int(self._hdr[_VERSION])
            if v <= min_version or v == self._refused_version:
                return None
            np.copyto(out, self._data)
            if int(self._hdr[_SEQ]) != s1:
                self._backoff(attempt)
                continue
            if not np.isfinite(out).all():
                self.stats["nonfinite"] += 1
                self._refused_version = v
                return None
            self.stats["reads"] += 1
            return v
        self.stats["torn"] += 1
        return None

    def _backoff(self, attempt: int) -> None:
        self.stats["retries"] += 1
        time.sleep(0 if attempt < 4 else 50e-6)

    def _reattach(self) -> None:
        try:
            seg = Segment.attach(self.segment.name, readonly=True)
        except ShmError:
            return  # the writer is between unlink and create; keep the old mapping for now
        old = self.segment
        try:
            self._bind(seg)
        except ShmError:  # header not written yet: try again on the next read
            seg.close()
            return
        self._refused_version = 0
        old.close()
        self.stats["reattached"] += 1

    def close(self) -> None:
        """Unmap; the creator also unlinks the segment."""
        self.segment.close()

    def __enter__(self) -> "WeightsBoard":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_PUB_HEADER = struct.Struct("<QQQ")  # magic, version, numel


class WeightsPublisher:
    """The board's bytes over ZMQ PUB for actors on another host (`transport.weights_transport:
    pub`; CURVE-protected with `transport.curve_*`). ``transport`` is a `TransportConfig`.

    One single-frame message per version (subscribers CONFLATE, which cannot keep multipart
    messages): ``<QQQ`` magic, version, numel, then numel raw float32. Each message is a fresh
    buffer handed to ZMQ by reference (no copy by ZMQ, no pickle); `tick` re-sends the newest
    one when nothing was published for ``resend_seconds``, so a subscriber that joins while the
    learner is not training (replay filling) still gets weights (PUB has no history).
    """

    def __init__(self, ctx: Any, endpoint: str, transport: Any, numel: int, *, resend_seconds: float = 1.0) -> None:
        self.numel = int(numel)
        self.resend_seconds = resend_seconds
        self.sock = make_socket(ctx, "pub", transport, bind=endpoint)
        self._last: np.ndarray | None = None
        self._sent_at = 0.0

    def publish(self, params: Any, version: int) -> bool:
        src = as_flat_float32(params)
        if src.shape[0] != self.numel:
            raise ValueError(f"publish: {src.shape[0]} parameters, publisher holds {self.numel}")
        buf = np.empty(_PUB_HEADER.size + 4 * self.numel, np.uint8)  # fresh: ZMQ may still be sending the last
        _PUB_HEADER.pack_into(buf, 0, MAGIC, int(version), self.numel)
        buf[_PUB_HEADER.size:].view(np.float32)[:] = src
        self._last = buf
        return self._send()

    def tick(self) -> bool:
        """Re-send the newest message if nothing was sent for ``resend_seconds``; True if sent."""
        if self._last is None or time.monotonic() - self._sent_at < self.resend_seconds:
            return False
        return self._send()

    def _send(self) -> bool:
        self._sent_at = time.monotonic()
        try:  # PUB never blocks: a subscriber whose queue is full misses this one
            self.sock.send(self._last, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def close(self) -> None:
        self.sock.close(linger=0)


class WeightsSubscriber:
    """Receives the newest `WeightsPublisher` message (CONFLATE keeps only the last one)."""

    def __init__(self, ctx: Any, endpoint: str, transport: Any, numel: int) -> None:
        self.numel = int(numel)
        # a frame much bigger than a weights message is refused by ZMQ before it is read (bounded
        # decode); the 64 KiB slack covers CURVE's per-message overhead and handshake commands,
        # which the same limit applies to (the exact size is checked in `read`)
        self.sock = make_socket(ctx, "sub", transport, connect=endpoint,
                                max_message_bytes=_PUB_HEADER.size + 4 * self.numel + (1 << 16))
        self.stats = {"reads": 0, "rejected": 0}

    def read(self, out: np.ndarray, min_version: int = 0) -> int | None:
        """Like `WeightsBoard.read`; non-blocking."""
        try:
            frame = self.sock.recv(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        buf = frame.buffer
        if len(buf) != _PUB_HEADER.size + 4 * self.numel:
            self.stats["rejected"] += 1
            return None
        magic, version, numel = _PUB_HEADER.unpack_from(buf, 0)
        data = np.frombuffer(buf, np.float32, offset=_PUB_HEADER.size)
        if magic != MAGIC or numel != self.numel or not np.isfinite(data).all():
            self.stats["rejected"] += 1
            return None
        if version <= min_version:
            return None
        np.copyto(out, data)
        self.stats["reads"] += 1
        return version

    def close(self) -> None:
        self.sock.close(linger=0)
