"""Insert rings (transport/insert_ring.py): an actor's insert messages through its shared-memory
ring, a reference over ZMQ. Positions, wrap-around, a full ring, every bad reference, a ring
replaced under the same name, and a real PUSH/PULL drain whose stored state equals inline
inserts."""
from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pytest
import zmq

from apex_local.config import load_config
from apex_local.replay import make_replay
from apex_local.roles.replay_server import drain_inserts, insert_limits
from apex_local.transport import Insert, InsertRef, InsertSpec, ProtocolError, decode_frame
from apex_local.transport.codec import DecodeLimits, envelope_size, join_parts
from apex_local.transport.insert_ring import (
    ALIGN, HEADER_BYTES, InsertRingReader, InsertRingWriter, insert_frame, ring_enabled, ring_segment_name)
from apex_local.transport.shm import Segment
from test_replay_insert_many import assert_same_state

RING = 64 * 1024  # the smallest ring


@pytest.fixture
def run_id():
    rid = f"tring{uuid.uuid4().hex[:10]}"
    yield rid
    left = [f for f in os.listdir("/dev/shm") if f.startswith(f"apex_{rid}_")]
    for f in left:
        os.unlink(os.path.join("/dev/shm", f))
    assert left == [], f"segments left behind: {left}"


def blob(n: int, fill: int) -> list:
    """Message parts whose envelope is a little over ``n`` bytes."""
    return [b"h" * 8, np.full(n, fill, np.uint8)]


def test_put_then_view_gives_the_envelope_zero_copy(run_id):
    w, r = InsertRingWriter(run_id, "a0", RING), InsertRingReader(run_id)
    try:
        parts = blob(1000, 7)
        start, nbytes, end = w.put(parts)
        assert (start, nbytes) == (0, envelope_size(parts)) and end == -(-nbytes // ALIGN) * ALIGN
        view = r.view("a0", w.nonce, start, nbytes, end)
        assert bytes(view) == bytes(join_parts(parts))
        assert np.shares_memory(np.frombuffer(view, np.uint8), np.frombuffer(r.rings[("a0", w.nonce)].segment.mmap, np.uint8))
        w._data[start + nbytes - 1] = 99  # the writer's mapping and the reader's are the same memory
        assert view[-1] == 99
        assert w.consumed == 0  # nothing published before release
        r.release()
        assert w.consumed == end
    finally:
        r.close()
        w.close()


def test_positions_wrap_without_splitting_a_message_and_reuse_consumed_space(run_id):
    w, r = InsertRingWriter(run_id, "a0", RING), InsertRingReader(run_id)
    try:
        seen = []
        for i in range(40):  # ~20 KiB messages: 3 per lap of a 64 KiB ring, wrapping many times
            parts = blob(20_000 + 97 * i, i)
            got = w.put(parts)
            assert got is not None, i
            start, nbytes, end = got
            assert start % RING + nbytes <= RING and start % ALIGN == 0  # never split at the end
            assert not seen or start >= seen[-1][2]  # absolute positions only grow
            view = r.view("a0", w.nonce, start, nbytes, end)
            assert bytes(view) == bytes(join_parts(parts)), i
            seen.append(got)
            r.release()
            assert w.consumed == end
        assert seen[-1][2] > 10 * RING
    finally:
        r.close()
        w.close()


def test_a_full_ring_refuses_and_the_message_goes_inline(run_id):
    w, r = InsertRingWriter(run_id, "a0", RING), InsertRingReader(run_id)
    try:
        got = [w.put(blob(20_000, i)) for i in range(3)]
        assert all(g is not None for g in got)
        assert w.put(blob(20_000, 3)) is None  # 3 x ~20 KiB in flight: no room
        assert w.put(blob(RING, 0)) is None  # bigger than the ring: never fits
        # insert_frame: the same refusal sends the message itself
        msg = Insert(sender="actor.0", actor_id=0, chunk={"frames": np.zeros((3, 84, 84), np.uint8)})
        frame = insert_frame(msg, w)
        assert bytes(frame) == bytes(msg.to_frame())
        # the consumer handles the first: its space comes back, in order
        r.view("a0", w.nonce, *got[0])
        r.release()
        assert w.put(blob(20_000, 4)) is not None
    finally:
        r.close()
        w.close()


def test_insert_frame_sends_a_reference_the_reader_resolves(run_id):
    spec = InsertSpec((4,), np.float32, 1, 2)
    limits = DecodeLimits(insert=spec, kinds=frozenset({"insert", "insert_ref"}))
    chunk = {"frames": np.arange(12, dtype=np.float32).reshape(3, 4), "frame_stream": np.zeros(3, np.int32),
             "frame_seq": np.arange(3, dtype=np.int64), "stream": np.zeros(2, np.int32),
             "obs_seq": np.array([[0], [1]], np.int64), "next_seq": np.array([[1], [2]], np.int64),
             "action": np.array([0, 1]), "reward": np.ones(2, np.float32), "discount": np.full(2, .99, np.float32)}
    msg = Insert(sender="actor.0", weights_version=3, actor_id=0, env_steps=2, episode_returns=[5.0],
                 episode_lengths=[2], chunk=chunk)
    w, r = InsertRingWriter(run_id, "actor0", RING), InsertRingReader(run_id)
    try:
        ref = decode_frame(insert_frame(msg, w), limits)
        assert isinstance(ref, InsertRef) and (ref.ring, ref.nonce) == ("actor0", w.nonce)
        out = r.resolve(ref, limits)
        assert isinstance(out, Insert) and out.fields() == msg.fields() and out.weights_version == 3
        for k, a in chunk.items():
            assert np.array_equal(out.chunk[k], a) and out.chunk[k].dtype == a.dtype, k
        assert r.resolved == 1
        # a ring holds what the inline path would check: a bad message in it is rejected the same way
        bad = Insert(actor_id=0, chunk=dict(chunk, reward=np.array([np.nan, 1], np.float32)))
        ref = decode_frame(insert_frame(bad, w), limits)
        with pytest.raises(ProtocolError) as info:
            r.resolve(ref, limits)
        assert info.value.reason == "non_finite"
        r.release()  # the bad message's space is handed back too
        assert w.consumed == ref.end
    finally:
        r.close()
        w.close()


@pytest.mark.parametrize("case,reason", [
    ("ring_id_is_a_path", "bad_ref"),
    ("ring_id_empty", "bad_ref"),
    ("no_such_ring", "stale_ref"),
    ("wrong_nonce", "stale_ref"),
    ("misaligned_start", "bad_ref"),
    ("nbytes_zero", "bad_ref"),
    ("nbytes_over_capacity", "bad_ref"),
    ("crosses_the_end", "bad_ref"),
    ("end_not_start_plus_aligned_nbytes", "bad_ref"),
    ("before_the_last_one", "bad_ref"),
    ("a_lap_ahead", "bad_ref"),
    ("not_a_ring_segment", "bad_ref"),
])
def test_bad_references_are_rejected_by_reason(run_id, case, reason):
    w, r = InsertRingWriter(run_id, "a0", RING), InsertRingReader(run_id)
    other = None
    try:
        start, nbytes, end = w.put(blob(1000, 1))
        r.view("a0", w.nonce, start, nbytes, end)  # a first good one: the reader is at `end`
        s2, n2, e2 = w.put(blob(1000, 2))
        args = {
            "ring_id_is_a_path": ("../../x", w.nonce, s2, n2, e2),
            "ring_id_empty": ("", w.nonce, s2, n2, e2),
            "no_such_ring": ("a1", w.nonce, s2, n2, e2),
            "wrong_nonce": ("a0", w.nonce ^ 1, s2, n2, e2),
            "misaligned_start": ("a0", w.nonce, s2 + 8, n2, e2 + 8),
            "nbytes_zero": ("a0", w.nonce, s2, 0, e2),
            "nbytes_over_capacity": ("a0", w.nonce, s2, RING + 64, s2 + RING + 64),
            "crosses_the_end": ("a0", w.nonce, RING - 64, 128, RING + 64),
            "end_not_start_plus_aligned_nbytes": ("a0", w.nonce, s2, n2, e2 + ALIGN),
            "before_the_last_one": ("a0", w.nonce, start, nbytes, end),
            "a_lap_ahead": ("a0", w.nonce, e2 + RING, n2, e2 + RING + (e2 - s2)),
            "not_a_ring_segment": ("junk", 0, 0, 64, 64),
        }[case]
        if case == "not_a_ring_segment":
            other = Segment.create(ring_segment_name(run_id, "junk"), HEADER_BYTES + RING)
        with pytest.raises(ProtocolError) as info:
            r.view(*args)
        assert info.value.reason == reason
        assert bytes(r.view("a0", w.nonce, s2, n2, e2)) == bytes(join_parts(blob(1000, 2)))  # still serves a0
    finally:
        r.close()
        w.close()
        if other is not None:
            other.close()


def test_a_replaced_ring_is_mapped_beside_the_old_one_until_the_old_is_idle(run_id):
    """An actor restart (or route change) makes a new instance under the same name: references
    still queued for the old one are served from its mapping, the new one is mapped too, and
    the old mapping goes once it is idle and its file is gone. An old reference after that, or
    one the reader never mapped, is stale."""
    w, r = InsertRingWriter(run_id, "a0", RING), InsertRingReader(run_id)
    w2 = None
    try:
        old = w.put(blob(1000, 1))
        r.view("a0", w.nonce, *old)
        old2, old3 = w.put(blob(1000, 2)), w.put(blob(1000, 3))
        old_nonce = w.nonce
        w.close()
        w2 = InsertRingWriter(run_id, "a0", RING)  # the actor restarted (or changed replay)
        assert w2.nonce != old_nonce
        new = w2.put(blob(1000, 4))
        assert bytes(r.view("a0", w2.nonce, *new)) == bytes(join_parts(blob(1000, 4)))
        assert bytes(r.view("a0", old_nonce, *old2)) == bytes(join_parts(blob(1000, 2)))  # still queued: served
        r.release()
        assert len(r.rings) == 2
        r.IDLE_CLOSE_S, r._next_sweep = 0.0, 0.0
        r.rings[("a0", old_nonce)].last_used -= 1
        r.release()  # the old instance: idle and its file replaced -> unmapped; the live one stays
        assert list(r.rings) == [("a0", w2.nonce)]
        with pytest.raises(ProtocolError) as info:
            r.view("a0", old_nonce, *old3)
        assert info.value.reason == "stale_ref"
    finally:
        r.close()
        if w2 is not None:
            w2.close()


def test_a_made_up_nonce_does_not_disturb_the_live_ring(run_id):
    """A reference with a wrong nonce is stale and leaves the live instance as it was: its
    mapping, and nothing published before the messages viewed are stored."""
    w, r = InsertRingWriter(run_id, "a0", RING), InsertRingReader(run_id)
    try:
        first = w.put(blob(1000, 1))
        r.view("a0", w.nonce, *first)
        live = r.rings[("a0", w.nonce)]
        with pytest.raises(ProtocolError) as info:
            r.view("a0", w.nonce ^ 12345, *w.put(blob(1000, 2)))
        assert info.value.reason == "stale_ref"
        assert w.consumed == 0 and list(r.rings.values()) == [live]  # nothing published early
        r.release()
        assert w.consumed == first[2]
    finally:
        r.close()
        w.close()


@pytest.mark.parametrize("what", ["capacity_zero", "directory", "symlink", "short_file"])
def test_a_file_that_is_not_a_ring_is_bad_ref_never_an_error(run_id, what):
    """Whatever lies under a ring's name, the reader answers ProtocolError (the replay counts it
    and goes on), never ZeroDivisionError, IsADirectoryError or a mapping of someone's file."""
    import struct

    from apex_local.transport.insert_ring import MAGIC

    path = os.path.join("/dev/shm", ring_segment_name(run_id, "x"))
    seg = None
    try:
        if what == "capacity_zero":  # right magic, capacity 0, size exactly the header
            seg = Segment.create(ring_segment_name(run_id, "x"), HEADER_BYTES)
            struct.pack_into("<8sQQQ", seg.mmap, 0, MAGIC, 7, 0, 0)
        elif what == "directory":
            os.mkdir(path)
        elif what == "symlink":
            os.symlink("/etc/hostname", path)
        else:
            with open(path, "wb") as f:
                f.write(b"APXRING1")
        r = InsertRingReader(run_id)
        with pytest.raises(ProtocolError) as info:
            r.view("x", 7, 0, 64, 64)
        assert info.value.reason == "bad_ref"
        r.close()
    finally:
        if seg is not None:
            seg.close()
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        elif os.path.lexists(path):
            os.unlink(path)


def test_a_reader_keeps_serving_an_attached_ring_after_its_writer_exits(run_id):
    """Messages still queued when an actor stops are stored, once the reader had mapped its
    ring (the mapping outlives the name)."""
    w, r = InsertRingWriter(run_id, "a0", RING), InsertRingReader(run_id)
    try:
        first = w.put(blob(1000, 1))
        r.view("a0", w.nonce, *first)
        second, nonce = w.put(blob(1000, 2)), w.nonce
        w.close()
        assert not os.path.exists(os.path.join("/dev/shm", ring_segment_name(run_id, "a0")))
        assert bytes(r.view("a0", nonce, *second)) == bytes(join_parts(blob(1000, 2)))
    finally:
        r.close()


def test_ring_writer_checks_its_arguments(run_id):
    with pytest.raises(ValueError, match="ring id"):
        InsertRingWriter(run_id, "a/b", RING)
    with pytest.raises(ValueError, match="too small"):
        InsertRingWriter(run_id, "a0", 1000)


@pytest.mark.parametrize("overrides,expected", [
    ({}, True),  # ipc (the default): same host
    ({"transport.insert_ring_mb": 0}, False),
    ({"transport.kind": "tcp"}, True),  # 127.0.0.1
    ({"transport.kind": "tcp", "transport.weights_transport": "pub"}, False),  # maybe a tunnel: not our /dev/shm
    ({"transport.kind": "tcp", "transport.host": "10.0.0.2", "transport.allow_plaintext_remote": "true"},
     False),  # a remote replay
])
def test_rings_are_used_only_when_the_replay_shares_this_host(overrides, expected):
    cfg = load_config("configs/apex_cartpole.yaml", [f"{k}={v}" for k, v in overrides.items()])
    assert ring_enabled(cfg.transport) is expected


def _chunks(n_msgs: int, seed: int = 0):
    """Two actors' CartPole-like streams: frames once, 1-step transitions."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n_msgs):
        for actor in (0, 1):
            seqs = np.arange(5 * j, 5 * j + 5, dtype=np.int64)
            t = seqs[:-1] if j == 0 else np.arange(5 * j - 1, 5 * j + 4, dtype=np.int64)
            out.append((actor, {
                "frames": rng.standard_normal((5, 4)).astype(np.float32), "frame_stream": np.zeros(5, np.int32),
                "frame_seq": seqs, "stream": np.zeros(t.size, np.int32), "obs_seq": t[:, None],
                "next_seq": t[:, None] + 1, "action": rng.integers(0, 2, t.size),
                "reward": np.ones(t.size, np.float32), "discount": np.full(t.size, 0.99, np.float32),
                "priority": rng.random(t.size).astype(np.float32) + 0.1}))
    return out


def test_drain_over_push_pull_stores_the_same_as_inline_inserts(run_id):
    """Refs (through rings), inline messages (a full ring) and garbage refs mixed on one socket:
    the replay ends up exactly as if every good message had been inserted inline, the bad refs
    are rejected by reason, and consumed moves past everything stored."""
    cfg = load_config("configs/apex_cartpole.yaml", ["replay.capacity=400", "replay.min_size=1",
                                                     "replay.samples_per_insert=0"])

    class Spec:
        frame_shape, obs_dtype, frame_stack, num_actions = (4,), np.dtype(np.float32), 1, 2

    limits = insert_limits(cfg, Spec)
    msgs = [Insert(sender=f"actor.{a}", actor_id=a, env_steps=5, chunk=c) for a, c in _chunks(30)]
    ref_replay = make_replay(cfg, (4,), np.float32, 1, 2, rng=np.random.default_rng(1))
    for m in msgs:
        ref_replay.insert(m.actor_id, m.chunk)

    replay = make_replay(cfg, (4,), np.float32, 1, 2, rng=np.random.default_rng(1))
    writers = {a: InsertRingWriter(run_id, f"actor{a}", RING) for a in (0, 1)}
    reader = InsertRingReader(run_id)
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for s in (pull, push):
        s.setsockopt(zmq.LINGER, 0)
    rejected = []
    try:
        pull.bind("inproc://rings")
        push.connect("inproc://rings")
        sent_refs = 0
        for i, m in enumerate(msgs):
            if i % 7 == 3:  # garbage between the good ones
                push.send(InsertRef(ring="actor9", nonce=1, start=0, nbytes=64, end=64).to_frame())
            frame = insert_frame(m, writers[m.actor_id] if i % 5 else None)  # every 5th inline
            sent_refs += decode_frame(frame, limits).KIND == "insert_ref"
            push.send(frame)
            if i % 4 == 3:  # the consumer keeps up now and then (rings of 64 KiB, ~1.2 KiB messages)
                stored = list(drain_inserts(pull, limits, replay, lambda r, d: rejected.append(r), rings=reader))
                assert all(n > 0 for _, n in stored)
        while list(drain_inserts(pull, limits, replay, lambda r, d: rejected.append(r), rings=reader)):
            pass
        assert sent_refs > 0 and reader.resolved == sent_refs
        assert rejected == ["stale_ref"] * sum(1 for i in range(len(msgs)) if i % 7 == 3)
        assert replay.size == ref_replay.size and replay.inserted == ref_replay.inserted
        assert_same_state(replay, ref_replay)
        for w in writers.values():  # everything handed back
            assert w.consumed == w.head
    finally:
        pull.close()
        push.close()
        ctx.term()
        reader.close()
        for w in writers.values():
            w.close()


class _Msg:
    """A stand-in Insert: its envelope is ~``n`` bytes."""

    def __init__(self, n: int) -> None:
        self.sender, self.weights_version, self.n = "actor.0", 0, n

    def encode(self):
        return blob(self.n, 5)


def test_sender_sizes_the_ring_to_its_messages_and_grows_it(run_id):
    from apex_local.transport.insert_ring import InsertRingSender

    limits = DecodeLimits(kinds=frozenset({"insert_ref"}))
    s, r = InsertRingSender(run_id, "a0", 32 << 20, queue=64), InsertRingReader(run_id)
    try:
        assert s.capacity == 0  # nothing made before the first message
        small = decode_frame(s.frame(_Msg(3000)), limits)
        assert isinstance(small, InsertRef) and s.capacity == 512 * 1024  # 2 x 64 x ~3 KiB, a power of two
        assert small.ring == f"a0.p{os.getpid()}.0"  # each instance its own segment
        first_nonce = small.nonce
        assert bytes(r.view(small.ring, small.nonce, small.start, small.nbytes, small.end)) == bytes(
            join_parts(blob(3000, 5)))
        queued = decode_frame(s.frame(_Msg(3000)), limits)  # still in the first instance
        big = decode_frame(s.frame(_Msg(20_000)), limits)  # 64 of these no longer fit: a larger instance
        assert big.nonce != first_nonce and big.ring == f"a0.p{os.getpid()}.1" and s.capacity == 4 << 20
        assert bytes(r.view(queued.ring, queued.nonce, queued.start, queued.nbytes, queued.end)) == bytes(
            join_parts(blob(3000, 5)))  # the old instance's queued reference is still served
        assert bytes(r.view(big.ring, big.nonce, big.start, big.nbytes, big.end)) == bytes(join_parts(blob(20_000, 5)))
        huge = decode_frame(s.frame(_Msg(600_000)), limits)  # capped at max_bytes
        assert s.capacity == 32 << 20 and isinstance(huge, InsertRef)
        s.reset()  # a route change: the next message makes a new instance
        assert s.capacity == 0 and decode_frame(s.frame(_Msg(3000)), limits).nonce not in (first_nonce, big.nonce)
    finally:
        r.close()
        s.close()
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(ring_segment_name(run_id, "a0"))]


def test_route_change_keeps_the_old_instance_until_its_unread_references_are_stored(run_id):
    """A rate-limited replay has not read (nor mapped) the old instance when the actor moves to
    another replay: its queued references must still be served (CI flake: 'stale_ref' at the
    learner an actor had just left), and the old instance goes once they are consumed."""
    from apex_local.transport.insert_ring import InsertRingSender

    limits = DecodeLimits(kinds=frozenset({"insert_ref"}))
    s = InsertRingSender(run_id, "a1", 32 << 20, queue=64)
    old_reader, new_reader = InsertRingReader(run_id), InsertRingReader(run_id)
    shm = lambda: sorted(f for f in os.listdir("/dev/shm") if f.startswith(ring_segment_name(run_id, "a1")))  # noqa: E731
    try:
        queued = [decode_frame(s.frame(_Msg(3000 + i)), limits) for i in range(3)]  # unread by old_reader
        s.reset()  # route change before the old replay read anything
        moved = decode_frame(s.frame(_Msg(5000)), limits)
        assert moved.ring != queued[0].ring and len(shm()) == 2
        assert bytes(new_reader.view(moved.ring, moved.nonce, moved.start, moved.nbytes, moved.end)) == bytes(
            join_parts(blob(5000, 5)))
        new_reader.release()
        for i, ref in enumerate(queued):  # the old replay catches up: every reference served
            assert bytes(old_reader.view(ref.ring, ref.nonce, ref.start, ref.nbytes, ref.end)) == bytes(
                join_parts(blob(3000 + i, 5)))
        old_reader.release()  # consumed all of it ...
        s.frame(_Msg(5000))
        assert shm() == [ring_segment_name(run_id, moved.ring)]  # ... so the next message unlinks it
    finally:
        old_reader.close()
        new_reader.close()
        s.close()
    assert shm() == []


@pytest.mark.parametrize("case", ["timeout", "too_many", "close"])
def test_retired_instances_are_unlinked_after_a_while_beyond_a_count_and_at_close(run_id, case):
    from apex_local.transport.insert_ring import InsertRingSender

    s = InsertRingSender(run_id, "a2", 32 << 20, queue=64)
    shm = lambda: sorted(f for f in os.listdir("/dev/shm") if f.startswith(ring_segment_name(run_id, "a2")))  # noqa: E731
    try:
        rounds = s.MAX_RETIRED + 2 if case == "too_many" else 1
        for _ in range(rounds):  # instances whose references nobody reads (a dead consumer)
            s.frame(_Msg(3000))
            s.reset()
        if case == "timeout":
            assert len(s.retired) == 1
            s.sweep(now=time.monotonic() + s.RETIRE_S + 1)
            assert s.retired == [] and shm() == []
        elif case == "too_many":
            assert len(s.retired) == s.MAX_RETIRED and len(shm()) == s.MAX_RETIRED
            assert [w.ring for w, _ in s.retired] == [f"a2.p{os.getpid()}.{k}" for k in range(2, rounds)]  # the oldest went
        else:
            s.frame(_Msg(3000))
            assert len(shm()) == 2
    finally:
        s.close()
    assert shm() == [] and s.retired == []


def test_a_restarted_actor_adopts_its_dead_predecessors_rings_and_leaves_a_live_ones_alone(run_id):
    """A SIGKILLed actor unlinks nothing: its successor (same ring id) adopts its instances, so
    the references the dead one sent are still served, and unlinks each once it is consumed
    (or after RETIRE_S); an instance of a live process with that ring id is never touched."""
    import subprocess
    import sys

    from apex_local.transport.insert_ring import InsertRingSender, InsertRingWriter

    limits = DecodeLimits(kinds=frozenset({"insert_ref"}))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    shm = lambda: sorted(f for f in os.listdir("/dev/shm") if f.startswith(ring_segment_name(run_id, "a3.")))  # noqa: E731
    r = InsertRingReader(run_id)
    made = []
    try:
        # what a killed actor left: two instances, one with a reference it sent and nobody read,
        # one fully consumed; and a live actor's instance under the same ring id
        w_sent = InsertRingWriter(run_id, f"a3.p{dead_pid}.0", 1 << 20)
        w_done = InsertRingWriter(run_id, f"a3.p{dead_pid}.1", 1 << 20)
        w_live = InsertRingWriter(run_id, f"a3.p{live.pid}.0", 1 << 20)
        made += [w_sent, w_done, w_live]
        ref = decode_frame(insert_frame(_Msg(3000), w_sent), limits)
        done = decode_frame(insert_frame(_Msg(3000), w_done), limits)
        r.view(done.ring, done.nonce, done.start, done.nbytes, done.end)
        r.release()
        for w in made:  # SIGKILL: nothing unlinked (the writers are dropped without close)
            w.segment.owner = False
        assert len(shm()) == 3

        logs = []
        s = InsertRingSender(run_id, "a3", 32 << 20, queue=64, log=logs.append)
        try:
            mine = decode_frame(s.frame(_Msg(3000)), limits)
            assert len(s.retired) == 2 and "adopted 2 insert ring(s)" in logs[0]
            s.sweep()  # the consumed orphan goes, the one with a queued reference stays
            assert [w.segment.name for w, _ in s.retired] == [ring_segment_name(run_id, ref.ring)]
            assert ring_segment_name(run_id, ref.ring) in shm()
            assert ring_segment_name(run_id, f"a3.p{live.pid}.0") in shm()  # the live one's stays
            # the dead actor's queued reference is still served
            assert bytes(r.view(ref.ring, ref.nonce, ref.start, ref.nbytes, ref.end)) == bytes(join_parts(blob(3000, 5)))
            r.release()
            s.frame(_Msg(3000))  # both orphans consumed: unlinked
            assert s.retired == [] and shm() == sorted([ring_segment_name(run_id, mine.ring),
                                                         ring_segment_name(run_id, f"a3.p{live.pid}.0")])
        finally:
            s.close()
        assert shm() == [ring_segment_name(run_id, f"a3.p{live.pid}.0")]
    finally:
        live.kill()
        live.wait()
        r.close()
        for w in made:
            w.segment.owner = True
            w.close()
    assert shm() == []


def test_a_sender_adopts_an_earlier_process_s_rings_under_its_own_pid_and_never_replaces_them(run_id):
    """pid reuse: a file under this process's pid was an earlier (dead) process's; its queued
    reference is still served and the sender's own instance takes the next free name."""
    from apex_local.transport.insert_ring import InsertRingSender, InsertRingWriter

    limits = DecodeLimits(kinds=frozenset({"insert_ref"}))
    r = InsertRingReader(run_id)
    old = InsertRingWriter(run_id, f"a5.p{os.getpid()}.0", 1 << 20)
    ref = decode_frame(insert_frame(_Msg(3000), old), limits)
    old.segment.owner = False  # its process "died"
    s = InsertRingSender(run_id, "a5", 32 << 20, queue=64, log=lambda m: None)
    try:
        mine = decode_frame(s.frame(_Msg(3000)), limits)
        assert mine.ring == f"a5.p{os.getpid()}.1" and len(s.retired) == 1
        assert bytes(r.view(ref.ring, ref.nonce, ref.start, ref.nbytes, ref.end)) == bytes(join_parts(blob(3000, 5)))
        r.release()
        s.frame(_Msg(3000))
        assert s.retired == [] and not os.path.exists(os.path.join("/dev/shm", ring_segment_name(run_id, ref.ring)))
    finally:
        r.close()
        s.close()
        old.segment.owner = True
        old.close()


def test_a_full_dev_shm_gives_up_retired_rings_first_then_goes_inline_and_tries_again_later(run_id, monkeypatch):
    from apex_local.transport import insert_ring
    from apex_local.transport.shm import ShmError

    real = insert_ring.InsertRingWriter
    room = {"instances": 2}  # /dev/shm holds two instances of this size

    def writer(run, ring, capacity):
        mine = [f for f in os.listdir("/dev/shm") if f.startswith(ring_segment_name(run_id, "a6."))]
        if len(mine) >= room["instances"]:
            raise ShmError("needs 524288 bytes but only 0 are free")
        return real(run, ring, capacity)

    monkeypatch.setattr(insert_ring, "InsertRingWriter", writer)
    logs = []
    s = insert_ring.InsertRingSender(run_id, "a6", 32 << 20, queue=64, log=logs.append)
    limits = DecodeLimits(kinds=frozenset({"insert_ref"}))
    try:
        decode_frame(s.frame(_Msg(3000)), limits)
        s.reset()  # retired with an unread reference
        decode_frame(s.frame(_Msg(3000)), limits)
        s.reset()
        assert len(s.retired) == 2
        third = decode_frame(s.frame(_Msg(3000)), limits)  # no room: the retired ones go, then it fits
        assert isinstance(third, InsertRef) and s.retired == [] and not logs
        room["instances"] = 0
        s.reset()
        assert bytes(s.frame(_Msg(3000))) == bytes(join_parts(blob(3000, 5)))  # no ring at all: inline
        assert len(logs) == 1 and "inline" in logs[0]
        room["instances"] = 2
        assert bytes(s.frame(_Msg(3000))) == bytes(join_parts(blob(3000, 5)))  # not retried at once ...
        s.failed_at -= s.RETIRE_S + 1
        assert isinstance(decode_frame(s.frame(_Msg(3000)), limits), InsertRef)  # ... but later
        assert len(logs) == 1
    finally:
        s.close()


@pytest.mark.parametrize("limit", ["count", "bytes"])
def test_sender_bounds_unconsumed_messages_like_a_socket_queue_and_counts_what_went_inline(run_id, limit):
    """At most 2 x queue unconsumed messages in the ring (the send + receive queues a socket
    would hold; references are tiny, so the kernel buffers would hold hundreds more), and no
    more than fit in its bytes; the rest goes inline and is counted."""
    from apex_local.transport.insert_ring import InsertRingSender

    if limit == "count":  # queue 2: 4 messages of ~3 KiB in a 256 KiB ring
        s, size = InsertRingSender(run_id, "a4", 32 << 20, queue=2), 3000
        room = 4
    else:  # a 256 KiB cap: ~12 messages of ~20 KiB, far fewer than 2 x 64
        s, size = InsertRingSender(run_id, "a4", 256 << 10, queue=64), 20_000
        room = (256 << 10) // (-(-envelope_size(blob(size, 5)) // ALIGN) * ALIGN)
    r = InsertRingReader(run_id)
    refs_only = DecodeLimits(kinds=frozenset({"insert_ref"}))
    inline = bytes(join_parts(blob(size, 5)))
    try:
        frames = [bytes(s.frame(_Msg(size))) for _ in range(40)]  # nobody consumes
        assert s.capacity == 256 * 1024
        assert frames.count(inline) == s.full == 40 - room and room < 40
        refs = [decode_frame(f, refs_only) for f in frames if f != inline]
        assert len(refs) == room
        for ref in refs[:2]:  # two consumed: room for two more
            r.view(ref.ring, ref.nonce, ref.start, ref.nbytes, ref.end)
        r.release()
        full = s.full
        assert all(isinstance(decode_frame(s.frame(_Msg(size)), refs_only), InsertRef) for _ in range(2))
        assert bytes(s.frame(_Msg(size))) == inline and s.full == full + 1
    finally:
        r.close()
        s.close()


def test_sender_waits_for_room_before_going_inline(run_id):
    import threading

    from apex_local.transport.insert_ring import InsertRingSender

    s, r = InsertRingSender(run_id, "a7", 32 << 20, queue=1), InsertRingReader(run_id)
    refs_only = DecodeLimits(kinds=frozenset({"insert_ref"}))
    inline = bytes(join_parts(blob(3000, 5)))
    try:
        refs = [decode_frame(s.frame(_Msg(3000)), refs_only) for _ in range(2)]  # 2 x queue: full now

        def consume_later():
            time.sleep(0.2)
            r.view(refs[0].ring, refs[0].nonce, refs[0].start, refs[0].nbytes, refs[0].end)
            r.release()

        th = threading.Thread(target=consume_later)
        th.start()
        t0 = time.monotonic()
        got = s.frame(_Msg(3000), wait_s=10.0)  # waits for the consumer, then goes through the ring
        waited = time.monotonic() - t0
        th.join()
        assert isinstance(decode_frame(got, refs_only), InsertRef) and s.full == 0 and 0.15 < waited < 5
        t0 = time.monotonic()
        assert bytes(s.frame(_Msg(3000), wait_s=0.1)) == inline and s.full == 1  # nobody consumes: inline
        assert time.monotonic() - t0 >= 0.1
        t0 = time.monotonic()
        assert bytes(s.frame(_Msg(3000), wait_s=10.0, stop=lambda: True)) == inline  # shutdown: no wait
        assert time.monotonic() - t0 < 1.0 and s.full == 2
    finally:
        r.close()
        s.close()


def test_messages_below_the_minimum_go_inline_and_take_no_ring(run_id):
    from apex_local.transport.insert_ring import InsertRingSender

    s = InsertRingSender(run_id, "a8", 32 << 20, queue=64, min_message_bytes=64 << 10)
    try:
        assert bytes(s.frame(_Msg(3000))) == bytes(join_parts(blob(3000, 5))) and s.capacity == 0
        assert not [f for f in os.listdir("/dev/shm") if f.startswith(ring_segment_name(run_id, "a8."))]
        big = decode_frame(s.frame(_Msg(100_000)), DecodeLimits(kinds=frozenset({"insert_ref"})))
        assert isinstance(big, InsertRef) and s.capacity > 0 and s.full == 0
    finally:
        s.close()


def test_sender_without_room_in_dev_shm_sends_inline(run_id, monkeypatch):
    from apex_local.transport import insert_ring
    from apex_local.transport.shm import ShmError

    def no_space(*a, **k):
        raise ShmError("needs 524288 bytes but only 0 are free")

    logs = []
    monkeypatch.setattr(insert_ring, "InsertRingWriter", no_space)
    s = insert_ring.InsertRingSender(run_id, "a0", 32 << 20, queue=64, log=logs.append)
    for _ in range(3):
        assert bytes(s.frame(_Msg(3000))) == bytes(join_parts(blob(3000, 5)))
    assert len(logs) == 1 and "inline" in logs[0]
    s.close()
