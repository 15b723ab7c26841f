"""Insert rings: an actor's insert messages through shared memory, only a reference over ZMQ.

An actor on the replay's host writes each encoded `Insert` (the same one-frame envelope that
would go over the socket, `codec.join_parts`) into its own ring segment
``apex_<run>_ins_<ring>`` (ring: ``actor<i>.p<pid>.<k>``, one per instance) and pushes a small `InsertRef` (ring, nonce, start, nbytes, end)
instead. The consumer (replay server, Gorila local replay) decodes the message straight out
of the ring (zero-copy, with every check of the inline path) and, once the message is stored,
publishes how far it has consumed. What this saves per Pong message of 50 transitions (~390 KB):
the copy into a fresh ZMQ frame, both I/O threads' socket copies and the receiver's allocation
(docs/architecture.md, "Insert rings").

Ring segment layout (little-endian)::

    [0, 8)      magic b"APXRING1"
    [8, 16)     nonce: u64, random per ring instance
    [16, 24)    capacity: u64, bytes of the data area
    [24, 32)    consumed: u64, absolute byte position up to which the consumer is done
                (written by the consumer only)
    [32, 40)    head: u64, absolute position after the last message written (written by the
                actor only; consumed == head: everything written has been consumed)
    [4096, 4096 + capacity)   data

Positions are absolute byte counters (they only grow); a message occupies
``[start, start + nbytes)`` at ``start % capacity`` and never wraps (the writer skips the tail
of the ring instead), and ``end`` (what ``consumed`` becomes once it is done) includes that
skipped tail and the 64-byte alignment. The writer reuses bytes only below ``consumed``, so a
message is never overwritten before the consumer has stored it. When the ring has no room (a
consumer that is slow, rate-limited or restarting), the writer returns None; the actor waits
for room a while (`InsertRingSender.frame`: the ring, sized to two send-queues of messages, is
then the queue a socket at its high-water mark would be) and then sends the message inline, so
a consumer that lost references (it died) never wedges the actor.

Ordering: one actor's messages arrive in order on its PUSH socket. The data is written before
the reference is sent (the ZMQ send / receive syscalls lie between it and the consumer's
reads). ``consumed`` is written after the consumer's last read of the message, and the writer
reads it with a plain load before reusing those bytes: ordered on x86-64 (TSO) only, as the
weights board's seqlock (CPython emits no fences); on weakly ordered CPUs the decode checks
are what would catch a message overwritten early.

Lost references (a consumer that died with a queue) cost nothing: the next stored message's
``end`` moves ``consumed`` past them. A route change (Gorila: another learner's replay) or a
larger ring makes a new instance in its own segment (`InsertRingSender`); the old one stays
until its consumer has consumed it (or `InsertRingSender.RETIRE_S`), so a consumer that has
not even mapped it yet (rate-limited, not reading its socket) still stores what it was sent.
"""
from __future__ import annotations

import os
import re
import stat
import struct
import time
from collections import OrderedDict, deque
from dataclasses import replace

import numpy as np

from apex_local.transport.codec import RING_REASONS, ProtocolError, envelope_size, join_parts
from apex_local.transport.shm import SHM_DIR, Segment, ShmError, segment_name

__all__ = ["RING_REASONS", "InsertRingSender", "InsertRingWriter", "InsertRingReader", "ring_segment_name",
           "HEADER_BYTES", "ring_enabled", "insert_frame"]

MAGIC = b"APXRING1"
HEADER_BYTES = 4096
ALIGN = 64
_HEAD = struct.Struct("<8sQQQ")  # magic, nonce, capacity, consumed
_CONSUMED_AT = 24
_WRITTEN_AT = 32
_RING_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MIN_CAPACITY = 64 * 1024
MAX_ATTACHED = 256  # rings a consumer keeps mapped (least recently used dropped beyond)


def ring_segment_name(run_id: str, ring: str) -> str:
    return segment_name(run_id, f"ins_{ring}")


def ring_enabled(transport_cfg) -> bool:
    """Rings need the replay's /dev/shm: ipc, or tcp to a loopback address without CURVE, and
    weights from the shared-memory board (so this actor already shares /dev/shm with the run;
    a loopback tcp port may be an ssh tunnel or another container's, whose /dev/shm is not)."""
    t = transport_cfg
    if getattr(t, "insert_ring_mb", 0) <= 0 or t.weights_transport != "board":
        return False
    if t.kind == "ipc":
        return True
    return t.host in ("127.0.0.1", "localhost", "::1") and not t.curve_server_cert


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class InsertRingWriter:
    """The actor's side: ``put(parts) -> (start, nbytes, end)`` or None when the ring is full."""

    def __init__(self, run_id: str, ring: str, capacity_bytes: int) -> None:
        if not _RING_ID.match(ring):
            raise ValueError(f"ring id {ring!r}: use 1-64 characters of [A-Za-z0-9_.-]")
        capacity = _aligned(int(capacity_bytes))
        if capacity < MIN_CAPACITY:
            raise ValueError(f"insert ring of {capacity_bytes} bytes is too small (at least 64 KiB)")
        self.ring, self.capacity = ring, capacity
        self.nonce = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
        self.segment = Segment.create(ring_segment_name(run_id, ring), HEADER_BYTES + capacity, replace=True)
        _HEAD.pack_into(self.segment.mmap, 0, MAGIC, self.nonce, capacity, 0)
        self._consumed = np.ndarray((1,), np.uint64, buffer=self.segment.mmap, offset=_CONSUMED_AT)
        self._written = np.ndarray((1,), np.uint64, buffer=self.segment.mmap, offset=_WRITTEN_AT)
        self._data = np.ndarray((capacity,), np.uint8, buffer=self.segment.mmap, offset=HEADER_BYTES)
        self.head = 0  # absolute position of the next write

    @property
    def consumed(self) -> int:
        return int(self._consumed[0])

    def put(self, parts, nbytes: int | None = None) -> tuple[int, int, int] | None:
        """Write the envelope of ``parts`` (`Message.encode`; ``nbytes``: its `envelope_size`, if
        known); (start, nbytes, end), or None when it does not fit in the free part of the ring
        now (the caller sends it inline)."""
        nbytes = envelope_size(parts) if nbytes is None else nbytes
        pos = self.head % self.capacity
        start = self.head if pos + nbytes <= self.capacity else self.head + (self.capacity - pos)
        end = start + _aligned(nbytes)
        if end - self.consumed > self.capacity:
            return None
        off = start % self.capacity
        join_parts(parts, out=self._data[off:off + nbytes])
        self.head = end
        self._written[0] = end
        return start, nbytes, end

    def close(self) -> None:
        self._consumed = self._written = self._data = None
        self.segment.close()


class _Orphan:
    """A ring instance left by a dead actor of the same ring id (SIGKILL: no atexit), adopted by
    its successor: unlinked once its consumer has consumed what was written (the references the
    dead actor sent are still stored) or when it is retired for too long, as a retired instance."""

    def __init__(self, segment: Segment) -> None:
        self.segment, self.ring = segment, segment.name
        magic, _, capacity, consumed = _HEAD.unpack_from(segment.mmap, 0) if segment.size >= 40 else (b"",) * 4
        ok = magic == MAGIC and segment.size == HEADER_BYTES + capacity
        self._header = np.ndarray((2,), np.uint64, buffer=segment.mmap, offset=_CONSUMED_AT) if ok else None

    @property
    def consumed(self) -> int:
        return int(self._header[0]) if self._header is not None else 0

    @property
    def head(self) -> int:
        return int(self._header[1]) if self._header is not None else 0

    def close(self) -> None:
        self._header = None
        try:
            if not self.segment.replaced():
                os.unlink(self.segment.path)
        except OSError:  # gone meanwhile, or not ours to remove after all
            pass
        self.segment.close()


class _Attached:
    __slots__ = ("segment", "ring", "nonce", "capacity", "data", "consumed", "last_end", "last_used")

    def __init__(self, segment: Segment, ring: str, nonce: int, capacity: int) -> None:
        self.segment, self.ring, self.nonce, self.capacity = segment, ring, nonce, capacity
        self.data = memoryview(segment.mmap)[HEADER_BYTES:HEADER_BYTES + capacity]
        self.consumed = np.ndarray((1,), np.uint64, buffer=segment.mmap, offset=_CONSUMED_AT)
        self.last_end = int(self.consumed[0])
        self.last_used = time.monotonic()

    def close(self) -> None:
        try:
            self.data.release()
        except BufferError:
            pass  # arrays decoded from it are still alive: the mapping goes with the last of them
        self.consumed = None
        self.segment.close()


def _open_ring(name: str, ring: str, nonce: int) -> _Attached:
    """Map the ring file ``name`` if it is this instance: a regular file of this user (not a
    link, a directory or another user's file: its contents could change under the checks)
    with a sane header and the nonce ``nonce``; else `ProtocolError`, never another error."""
    path = os.path.join(SHM_DIR, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ProtocolError("stale_ref", f"insert ring {ring!r} does not exist (its actor stopped, or its "
                                         "/dev/shm is not this process's)") from None
    except OSError as exc:
        raise ProtocolError("bad_ref", f"insert ring {ring!r}: {exc}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        raise ProtocolError("bad_ref", f"insert ring {ring!r}: {path} is not a regular file of this user")
    try:
        seg = Segment.attach(name)
    except (ShmError, OSError, ValueError) as exc:
        raise ProtocolError("stale_ref" if isinstance(exc, FileNotFoundError) else "bad_ref",
                            f"insert ring {ring!r}: {exc}") from None
    try:
        magic, seg_nonce, capacity, _ = _HEAD.unpack_from(seg.mmap, 0) if seg.size >= _HEAD.size else (b"",) * 4
        if (magic != MAGIC or capacity < MIN_CAPACITY or capacity % ALIGN
                or seg.size != HEADER_BYTES + capacity):
            raise ProtocolError("bad_ref", f"insert ring {ring!r} is not an insert ring of this version "
                                           f"({seg.size} bytes)")
        if seg_nonce != nonce:
            raise ProtocolError("stale_ref", f"insert ring {ring!r}: no instance with that nonce (the actor "
                                             "restarted, or retired it long ago, or a made-up reference)")
        return _Attached(seg, ring, nonce, capacity)
    except BaseException:
        seg.close()
        raise


class InsertRingReader:
    """The consumer's side: ``view(ring, nonce, start, nbytes, end)`` -> the message bytes
    (a memoryview into the ring, valid until ``release``), or `ProtocolError` ('stale_ref' for
    a ring that is gone or was replaced, 'bad_ref' for positions that cannot be right, or a
    file under the ring's name that is not a ring of this user).

    Rings are attached per instance, (ring id, nonce): references into an actor's previous
    instance (retired by the actor until consumed, `InsertRingSender`) are served from its
    mapping, or from its file when not mapped yet, and a reference with a made-up nonce never
    disturbs the live instance. An instance whose file is gone or replaced is unmapped once it
    has been idle `IDLE_CLOSE_S`."""

    IDLE_CLOSE_S = 5.0

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.rings: OrderedDict[tuple[str, int], _Attached] = OrderedDict()
        self._done: dict[tuple[str, int], int] = {}  # instance -> end of the newest message handled, unpublished
        self._limits = None  # (the limits given, the same accepting only 'insert')
        self._next_sweep = 0.0
        self.resolved = 0  # messages decoded from a ring

    def _attach(self, ring: str, nonce: int) -> _Attached:
        key = (ring, nonce)
        got = self.rings.get(key)
        if got is not None:
            self.rings.move_to_end(key)
            got.last_used = time.monotonic()
            return got
        att = _open_ring(ring_segment_name(self.run_id, ring), ring, nonce)
        self.rings[key] = att
        while len(self.rings) > MAX_ATTACHED:
            old_key, old = self.rings.popitem(last=False)
            self._publish(old_key, old)
            old.close()
        return att

    def view(self, ring: str, nonce: int, start: int, nbytes: int, end: int) -> memoryview:
        if not _RING_ID.match(ring):
            raise ProtocolError("bad_ref", f"insert ring id {ring[:64]!r} is not a ring id")
        att = self._attach(ring, nonce)
        off = start % att.capacity
        if not (0 < nbytes <= att.capacity and off + nbytes <= att.capacity and start % ALIGN == 0
                and end == start + _aligned(nbytes) and start >= att.last_end
                and end - att.last_end <= att.capacity):
            raise ProtocolError("bad_ref", f"insert ring {ring!r}: reference [{start}, +{nbytes}) end {end} does not "
                                           f"fit a {att.capacity}-byte ring consumed up to {att.last_end}")
        att.last_end = end
        self._done[(ring, nonce)] = end
        return att.data[off:off + nbytes]

    def resolve(self, ref, limits):
        """The `Insert` the `InsertRef` ``ref`` points at, decoded from the ring with every check
        of the inline path (``limits``, restricted to 'insert'); `ProtocolError` for a bad
        reference or a bad message. Its arrays are views into the ring, valid until `release`."""
        from apex_local.transport.protocol import decode_frame

        if self._limits is None or self._limits[0] is not limits:
            self._limits = (limits, replace(limits, kinds=frozenset({"insert"})))
        msg = decode_frame(self.view(ref.ring, ref.nonce, ref.start, ref.nbytes, ref.end), self._limits[1])
        if msg.KIND != "insert":  # pragma: no cover - the limits admit inserts only
            raise ProtocolError("unknown_kind", f"insert ring {ref.ring!r} holds a {msg.KIND!r} message")
        for a in msg.chunk.values():  # read-only, as arrays decoded from a received frame are
            a.flags.writeable = False
        self.resolved += 1
        return msg

    def release(self) -> None:
        """Publish ``consumed`` for every ring read since the last call: call once the messages
        viewed are stored (their arrays are no longer needed). Also unmaps, at most once a
        second, instances that are idle and whose file is gone or replaced."""
        for key in list(self._done):
            self._publish(key)
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + 1.0
            for key, att in list(self.rings.items()):
                if now - att.last_used > self.IDLE_CLOSE_S and att.segment.replaced():
                    del self.rings[key]
                    att.close()

    def _publish(self, key: tuple[str, int], att: _Attached | None = None) -> None:
        end = self._done.pop(key, None)
        att = att or self.rings.get(key)
        if end is not None and att is not None and att.consumed is not None:
            att.consumed[0] = end

    def close(self) -> None:
        for key in list(self._done):
            self._publish(key)
        for a in self.rings.values():
            a.close()
        self.rings.clear()

    def __repr__(self) -> str:  # pragma: no cover
        return f"InsertRingReader({len(self.rings)} rings attached)"


def insert_frame(msg, writer: InsertRingWriter | None) -> np.ndarray:
    """The frame to push for the `Insert` ``msg``: an `InsertRef` when ``writer``'s ring takes the
    message, else the message itself (no ring, or the ring is full for now)."""
    return _ref_or_inline(msg, msg.encode(), writer)


def _ref_or_inline(msg, parts, writer: InsertRingWriter | None, nbytes: int | None = None) -> np.ndarray:
    got = writer.put(parts, nbytes) if writer is not None else None
    if got is None:
        return join_parts(parts)
    return _ref_frame(msg, writer, *got)


def _ref_frame(msg, writer: InsertRingWriter, start: int, nbytes: int, end: int) -> np.ndarray:
    from apex_local.transport.protocol import InsertRef

    return InsertRef(sender=msg.sender, weights_version=msg.weights_version, ring=writer.ring,
                     nonce=writer.nonce, start=start, nbytes=nbytes, end=end).to_frame()


class InsertRingSender:
    """An actor's ring, made at its first message and sized to its messages: room for
    ``2 x queue`` of them (``queue`` = the socket's send high-water mark; the ring takes at most
    ``2 x queue`` unconsumed messages, what the send and receive queues would hold inline),
    rounded up to a power of two, at least 256 KiB and at most ``max_bytes``
    (``transport.insert_ring_mb``): a Pong actor's is the 32 MiB cap. Messages below
    ``min_message_bytes`` (``transport.insert_ring_min_kb``; CartPole's) go inline. A message
    that outgrows the ring makes a larger instance; ``reset()`` (a route
    change) drops the instance and the next message makes a new one. Failing to make one (a full
    /dev/shm, even after unlinking the retired instances) sends inline, is logged, and is tried
    again after `RETIRE_S`.

    Each instance has its own segment, ring id ``<ring>.p<pid>.<k>`` (k counts this sender's
    instances; a name that exists is skipped, never replaced). A replaced instance is retired,
    not unlinked: references to it may still sit unread in a replay's queue (a rate-limited
    replay does not read its socket, so it may not have mapped the instance yet). It is unlinked
    once its consumer has consumed all of it, after `RETIRE_S`, or beyond `MAX_RETIRED` retired
    instances of this sender (oldest first). The instances a dead predecessor (a killed actor of
    the same ring id, or an earlier process with this pid) left behind are adopted at the first
    message and go the same way (but not by count), so what it sent before dying is still
    stored. Retired instances are swept at each message and by ``sweep()`` (the actor calls it
    while a send is blocked)."""

    MIN_BYTES = 256 * 1024
    RETIRE_S = 60.0  # a consumer this far behind (or dead) loses the references it still has queued
    MAX_RETIRED = 4

    def __init__(self, run_id: str, ring: str, max_bytes: int, queue: int, log=print,
                 min_message_bytes: int = 0) -> None:
        self.run_id, self.ring_id, self.max_bytes, self.queue, self.log = run_id, ring, int(max_bytes), int(queue), log
        self.min_message_bytes = int(min_message_bytes)  # smaller messages go inline
        self.writer: InsertRingWriter | None = None
        self.retired: list[tuple[InsertRingWriter | _Orphan, float]] = []  # (instance, when retired), oldest first
        self.instances = 0  # next k
        self.adopted = False
        self.failed_at: float | None = None  # when making an instance last failed
        self.pid = os.getpid()
        self.full = 0  # messages sent inline because the ring had no room (the replay is behind)
        self._ends: deque[int] = deque()  # ends of the current instance's messages not known consumed

    def _want(self, nbytes: int) -> int:
        want = max(self.MIN_BYTES, 2 * self.queue * _aligned(nbytes))
        return min(1 << (want - 1).bit_length(), _aligned(self.max_bytes))

    def frame(self, msg, wait_s: float = 0.0, stop=None) -> np.ndarray:
        """The frame to push for the `Insert` ``msg`` (`insert_frame` through this actor's ring).
        ``wait_s``: when the ring has no room, wait up to this long for the replay to consume
        (``stop()`` True ends the wait), as a send to a socket at its high-water mark would,
        before sending inline: inline messages would queue behind the ring's (a reference is
        ~120 bytes, so the kernel's socket buffer holds hundreds of them), and the actor would run
        that much further ahead of a rate-limited replay."""
        parts = msg.encode()
        if self.retired:
            self.sweep()
        if self.max_bytes < MIN_CAPACITY or (
                self.failed_at is not None and time.monotonic() - self.failed_at < self.RETIRE_S):
            return join_parts(parts)
        nbytes = envelope_size(parts)
        if nbytes < self.min_message_bytes:
            return join_parts(parts)
        want = self._want(nbytes)
        # a new instance at the first message, and when a queue of messages this size no longer fits
        if self.writer is None or (self.writer.capacity < want and self.queue * _aligned(nbytes) > self.writer.capacity):
            self._replace(want)
        writer = self.writer
        if writer is None:
            return join_parts(parts)
        got = self._put(writer, parts, nbytes)
        if got is None and wait_s > 0:
            deadline, delay = time.monotonic() + wait_s, 0.002
            while got is None and time.monotonic() < deadline and not (stop is not None and stop()):
                time.sleep(delay)
                delay = min(2 * delay, 0.02)  # 2 x queue messages are queued: no hurry
                got = self._put(writer, parts, nbytes)
        if got is None:
            self.full += 1
            return join_parts(parts)
        return _ref_frame(msg, writer, *got)

    def _put(self, writer: InsertRingWriter, parts, nbytes: int) -> tuple[int, int, int] | None:
        """``writer.put``, or None while ``2 x queue`` messages are not consumed yet (what the
        socket's send and receive queues would hold inline)."""
        ends, consumed = self._ends, writer.consumed
        while ends and ends[0] <= consumed:
            ends.popleft()
        if len(ends) >= 2 * self.queue:
            return None
        got = writer.put(parts, nbytes)
        if got is not None:
            ends.append(got[2])
        return got

    def _replace(self, capacity: int) -> None:
        self.reset()
        self._ends.clear()
        if not self.adopted:
            self.adopted = True
            self._adopt_orphans()
        try:
            try:
                self.writer = self._create(capacity)
            except ShmError:  # e.g. /dev/shm short: give up the retired instances and try once more
                if not self.retired:
                    raise
                self._close_retired()
                self.writer = self._create(capacity)
            self.failed_at = None
        except (ShmError, OSError) as exc:  # inline inserts still work
            self.failed_at = time.monotonic()
            self.log(f"no insert ring ({exc}); sending inserts inline (trying again in {self.RETIRE_S:.0f} s)")

    def _create(self, capacity: int) -> InsertRingWriter:
        while os.path.lexists(os.path.join(SHM_DIR, ring_segment_name(self.run_id, self._name(self.instances)))):
            self.instances += 1  # another process's (adopted, or a live one's): never replaced
        k = self.instances
        self.instances += 1
        return InsertRingWriter(self.run_id, self._name(k), capacity)

    def _name(self, k: int) -> str:
        return f"{self.ring_id}.p{self.pid}.{k}"

    def _adopt_orphans(self) -> None:
        """Retire the instances of dead actors with this ring id (``<ring>.p<pid>.<k>``, pid not
        a live process, or this process's pid: it was an earlier process's); a live process's
        (two actors given one index) are left alone, as are files of another user."""
        from apex_local.transport.rundir import process_alive

        prefix = ring_segment_name(self.run_id, f"{self.ring_id}.p")
        try:
            names = os.listdir(SHM_DIR)
        except OSError:
            return
        found = []
        for name in names:
            m = re.fullmatch(r"(\d+)\.(\d+)", name[len(prefix):]) if name.startswith(prefix) else None
            if m is not None:
                found.append((int(m.group(1)), int(m.group(2)), name))
        now = time.monotonic()
        adopted = 0
        for pid, _, name in sorted(found):  # oldest first, by (pid, k) as numbers
            if pid != self.pid and process_alive(pid):
                continue
            path = os.path.join(SHM_DIR, name)
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    continue
                if st.st_size == 0:  # killed between creating and sizing it: nothing was ever in it
                    os.unlink(path)
                    continue
                self.retired.append((_Orphan(Segment.attach(name)), now))
                adopted += 1
            except (ShmError, OSError, ValueError):
                continue  # gone meanwhile, or not ours to read
        if adopted:
            self.log(f"adopted {adopted} insert ring(s) of a stopped actor {self.ring_id!r}; "
                     "unlinked once their queued messages are stored")

    def sweep(self, now: float | None = None) -> None:
        """Unlink retired instances that are consumed or older than `RETIRE_S`, and this
        sender's own beyond `MAX_RETIRED` (oldest first)."""
        now = time.monotonic() if now is None else now
        keep = []
        for w, since in self.retired:
            if w.consumed >= w.head or now - since > self.RETIRE_S:
                w.close()
            else:
                keep.append((w, since))
        own = [i for i, (w, _) in enumerate(keep) if not isinstance(w, _Orphan)]
        drop = set(own[:max(0, len(own) - self.MAX_RETIRED)])
        for i in drop:
            keep[i][0].close()
        self.retired = [e for i, e in enumerate(keep) if i not in drop]

    def _close_retired(self) -> None:
        for w, _ in self.retired:
            w.close()
        self.retired = []

    @property
    def capacity(self) -> int:
        return self.writer.capacity if self.writer is not None else 0

    def reset(self) -> None:
        """Retire the current instance (the next message makes a new one)."""
        if self.writer is not None:
            self.retired.append((self.writer, time.monotonic()))
            self.writer = None
            self.sweep()

    def close(self) -> None:
        """Unlink every instance, retired ones too (the actor is stopping: references still
        queued at a replay are lost, as are the messages in its own socket's queue)."""
        self.reset()
        self._close_retired()
