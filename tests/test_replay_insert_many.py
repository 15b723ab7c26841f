"""Replay.insert_many (the replay server's batched insert) == Replay.insert one chunk after the
other: same table, frame ring, stream windows, priorities and per-chunk outcome, table-driven
over interleaved actors, bad chunks, gaps, restarts, small rings and sequence tables."""
from __future__ import annotations

import numpy as np
import pytest

from apex_local.replay import replay as replay_mod
from apex_local.replay.accumulators import NStepAccumulator, SequenceAccumulator
from apex_local.replay.frames import ChunkError
from apex_local.replay.replay import Replay
from apex_local.replay.samplers import PrioritizedSampler
from apex_local.replay.tables import SequenceTable, TransitionTable
from test_accumulators import FakeVecEnv, run_random
from test_replay_composite import F as F_K1, continued_chunk, k1_chunk

F = (3, 2)


def actor_chunks(actor: int, k: int = 4, steps: int = 120, envs: int = 3, priority: bool = True):
    """An actor's insert chunks (n-step, k-frame stacks), with or without priorities."""
    env = FakeVecEnv(envs, k=k, frame_shape=F)
    acc = NStepAccumulator(envs, n=3, gamma=0.9, frame_stack=k, frame_shape=F, frame_dtype=np.uint8)
    chunks = run_random(acc, env, steps, seed=10 + actor, flush_every=3)
    rng = np.random.default_rng(actor)
    for c in chunks:
        if priority:
            c["priority"] = rng.random(len(c["stream"])).astype(np.float32) + 0.01
    return [(actor, c) for c in chunks]


def interleave(*streams):
    out = []
    for i in range(max(map(len, streams))):
        out.extend(s[i] for s in streams if i < len(s))
    return out


def make(kind="transition", capacity=400, frame_capacity=None, k=4):
    """A prioritized replay; k = 1: for the k1_chunk / continued_chunk helpers (frames F_K1)."""
    if k == 1:
        table = TransitionTable(capacity, F_K1, np.uint8, 1, frame_capacity=frame_capacity)
    elif kind == "sequence":
        table = SequenceTable(capacity, F, np.uint8, seq_len=6, state_size=3, period=3,
                              frame_capacity=frame_capacity)
    else:
        table = TransitionTable(capacity, F, np.uint8, k, frame_capacity=frame_capacity)
    return Replay(table, PrioritizedSampler(capacity, 0.6, 1e-6, np.random.default_rng(0)))


def one_by_one(replay, parts):
    out = []
    for actor, chunk in parts:
        try:
            out.append(replay.insert(actor, chunk))
        except ChunkError as exc:
            out.append(exc)
    return out


def state(replay):
    st = replay.table.state_dict()
    return {"cursor": st["cursor"], "size": st["size"], "inserted": replay.inserted,
            "gap": replay.table.gap_items,
            **{f"col:{k}": np.array(v) for k, v in st["columns"].items()},
            **{f"frames:{k}": np.array(v) for k, v in st["frames"].items()},
            "priorities": np.array(replay.sampler.state()["priorities"])}


def assert_equal_outcomes(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, ChunkError):
            assert isinstance(y, ChunkError) and str(x) == str(y)
        else:
            assert x == y


def assert_same_state(a, b):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


def with_bad(parts, at, mutate):
    parts = list(parts)
    actor, c = parts[at]
    c = dict(c)
    mutate(c)
    parts[at] = (actor, c)
    return parts


def _neg_stream(c):
    c["stream"] = np.full_like(c["stream"], -1)


def _nan_reward(c):
    c["reward"] = np.full_like(c["reward"], np.nan)


def _unknown_ref(c):
    c["obs_seq"] = c["obs_seq"].copy()
    c["obs_seq"][0, -1] = 10 ** 6


def _drop_frames(c):
    del c["frames"]


def _no_priority(c):
    del c["priority"]


def _forward_ref(c):  # an item referencing a frame that only a later chunk brings
    c["obs_seq"] = c["obs_seq"].copy()
    c["obs_seq"][-1, -1] = c["frame_seq"].max() + 6  # k1_chunk i holds frames 10i .. 10i+4


def _frameless_item(stream=0, obs=-1, nxt=-1):
    """One k=1 item and no frames: refs to frames already sent (or -1 padding)."""
    c = {k: v[:0] for k, v in k1_chunk(0, 0).items()}
    c.update(stream=np.full(1, stream, np.int32), obs_seq=np.array([[obs]]), next_seq=np.array([[nxt]]),
             action=np.zeros(1, np.int64), reward=np.ones(1, np.float32), discount=np.ones(1, np.float32))
    return c


def _as_uint64(c):
    return {k: (v.astype(np.uint64) if k in ("frame_seq", "obs_seq", "next_seq") else v) for k, v in c.items()}


def _seq_restart(first, n):
    return lambda: [(0, continued_chunk(1, 5, np.ones(5))), (0, continued_chunk(first, n, np.ones(n)))]


CASES = {
    "one actor": lambda: actor_chunks(0),
    "three actors interleaved": lambda: interleave(actor_chunks(0), actor_chunks(1), actor_chunks(2)),
    "no priorities": lambda: interleave(actor_chunks(0, priority=False), actor_chunks(1, priority=False)),
    "mixed priorities": lambda: with_bad(interleave(actor_chunks(0), actor_chunks(1)), 3, _no_priority),
    "bad stream in the middle": lambda: with_bad(interleave(actor_chunks(0), actor_chunks(1)), 4, _neg_stream),
    "NaN reward": lambda: with_bad(actor_chunks(0), 2, _nan_reward),
    "unknown frame ref": lambda: with_bad(actor_chunks(0), 5, _unknown_ref),
    "reference to a later chunk's frame": lambda: with_bad(
        [(0, k1_chunk(10 * i, 4, priority=np.ones(4))) for i in range(4)], 1, _forward_ref),
    "not a chunk": lambda: with_bad(actor_chunks(0), 1, _drop_frames),
    "first chunk bad": lambda: with_bad(actor_chunks(0), 0, _drop_frames),
    # the replay lost frames (it restarted) / an actor restarted (seqs start over)
    "gap at the start": lambda: [(0, continued_chunk(100, 3, np.ones(3))), (0, continued_chunk(103, 3, np.ones(3)))],
    "messages lost in between": lambda: [(0, continued_chunk(1, 5, np.arange(1, 6))),
                                         (0, continued_chunk(50, 2, np.ones(2)))],
    "actor restarted": _seq_restart(1, 2),
    "k=1 fresh frames": lambda: [(3, k1_chunk(10 * i, 4, priority=np.ones(4))) for i in range(6)],
    # new streams get window rows in the order one-by-one inserts give them (snapshots equal)
    "three actors, descending order": lambda: interleave(actor_chunks(2), actor_chunks(1), actor_chunks(0)),
    "k=1 frameless chunk naming a new stream": lambda: [(0, k1_chunk(0, 3)), (0, _frameless_item(stream=5))],
    # a later chunk's frame W seqs newer takes an old frame's window slot, one by one
    "k=1 seq jump of a stream window": lambda: [(0, k1_chunk(0, 4)), (0, k1_chunk(4 + 1024, 2)),
                                               (0, _frameless_item(obs=3, nxt=4))],
    "k=1 actor ids beyond 2**32": lambda: [(2 ** 33, k1_chunk(0, 3, np.ones(3))),
                                          (2 ** 33, continued_chunk(4, 2, np.ones(2))),
                                          (2 ** 32 + 3, k1_chunk(0, 3, np.ones(3)))],
    "k=1 uint64 seqs next to int64": lambda: [(0, k1_chunk(0, 3, np.ones(3))), (0, _as_uint64(
        continued_chunk(4, 2, np.ones(2))))],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_insert_many_equals_one_by_one(case):
    k = 1 if case.startswith(("gap", "messages", "actor", "k=1", "reference")) else 4
    parts = CASES[case]()
    a, b = make(k=k), make(k=k)
    expect = one_by_one(a, parts)
    got = b.insert_many(parts)
    assert not any("frames: expected" in str(r) for r in expect)  # the case builds what it means to
    assert_equal_outcomes(got, expect)
    assert_same_state(a, b)
    if case.startswith(("bad", "NaN", "unknown", "not a", "first")):  # (later chunks may depend on it)
        assert any(isinstance(r, ChunkError) for r in got)
    # and the replay samples the same afterwards (same sum tree, same rng state)
    if a.can_sample(8):
        np.testing.assert_array_equal(a.sample(8, 0.4).indices, b.sample(8, 0.4).indices)


@pytest.mark.parametrize("frame_capacity", [40, 64, 200])
def test_small_frame_ring_same_as_one_by_one(frame_capacity):
    """Frames overwritten within a group (or referenced after the ring moved on) make a group
    fall back to one chunk at a time: the outcome is still the sequential one."""
    parts = interleave(actor_chunks(0, steps=200), actor_chunks(1, steps=200))
    a, b = make(frame_capacity=frame_capacity), make(frame_capacity=frame_capacity)
    expect = one_by_one(a, parts)
    got = b.insert_many(parts)
    assert_equal_outcomes(got, expect)
    assert_same_state(a, b)


def test_sequence_table_same_as_one_by_one():
    env = FakeVecEnv(2, k=1, frame_shape=F)
    acc = SequenceAccumulator(2, burn_in=2, sequence_length=4, period=3, gamma=0.99, frame_shape=F,
                              frame_dtype=np.uint8, state_size=3)
    chunks = run_random(acc, env, 200, p_end=0.05, flush_every=4, recurrent=True)
    parts = [(4, c) for c in chunks]
    a, b = make("sequence", capacity=100), make("sequence", capacity=100)
    expect = one_by_one(a, parts)
    got = b.insert_many(parts)
    assert all(not isinstance(r, ChunkError) for r in got)
    assert_equal_outcomes(got, expect)
    assert_same_state(a, b)


def test_groups_merge_consecutive_chunks_within_the_frame_bound(monkeypatch):
    """One table insert per group of consecutive chunks, each group <= INSERT_GROUP_FRAMES frames."""
    monkeypatch.setattr(replay_mod, "INSERT_GROUP_FRAMES", 40)
    parts = interleave(actor_chunks(0), actor_chunks(1))
    replay = make()
    calls = []
    inner = replay.table.insert_chunks

    def spy(group):
        calls.append(sum(len(c["frames"]) for _, c in group))
        return inner(group)

    monkeypatch.setattr(replay.table, "insert_chunks", spy)
    got = replay.insert_many(parts)
    assert all(isinstance(n, int) for n in got) and sum(got) == replay.inserted
    assert len(calls) < len(parts) / 2  # merged ...
    assert max(calls) <= 40  # ... within the bound
    assert sum(calls) == sum(len(c["frames"]) for _, c in parts)  # every chunk written exactly once


def test_a_refused_group_is_retried_chunk_by_chunk(monkeypatch):
    parts = with_bad(actor_chunks(0), 3, _neg_stream)[:6]
    replay = make()
    sizes = []
    inner = replay.table.insert_chunks

    def spy(group):
        sizes.append(len(group))
        return inner(group)

    monkeypatch.setattr(replay.table, "insert_chunks", spy)
    got = replay.insert_many(parts)
    assert sizes == [6, 1, 1, 1, 1, 1, 1]
    assert [isinstance(r, ChunkError) for r in got] == [False, False, False, True, False, False]
    assert "stream" in str(got[3])


@pytest.mark.parametrize("seed", range(6))
def test_random_faults_and_group_sizes_same_as_one_by_one(seed):
    """Interleaved actors, a few chunks broken at random (each kind above), dropped messages and
    random group sizes (as many as the server found queued): always the sequential outcome."""
    rng = np.random.default_rng(seed)
    parts = interleave(*(actor_chunks(a, steps=150) for a in range(3)))
    faults = [_neg_stream, _nan_reward, _unknown_ref, _drop_frames, _no_priority]
    for at in rng.choice(len(parts), size=4, replace=False):
        parts = with_bad(parts, int(at), faults[rng.integers(len(faults))])
    parts = [p for p in parts if rng.random() > 0.05]  # messages lost on the way
    ring = int(rng.choice([60, 150, 0]))
    a, b = make(frame_capacity=ring or None), make(frame_capacity=ring or None)
    expect = one_by_one(a, parts)
    got, i = [], 0
    while i < len(parts):
        n = int(rng.integers(1, 12))
        got.extend(b.insert_many(parts[i:i + n]))
        i += n
    assert_equal_outcomes(got, expect)
    assert_same_state(a, b)


def test_drain_inserts_stores_queued_messages_in_groups_with_the_one_by_one_outcome(tmp_path, monkeypatch):
    """The replay server's reader (roles.replay_server.drain_inserts) over a real PUSH/PULL pair:
    two actors' messages with a bad chunk and garbage among them, read up to ``group`` at a
    time, end in the same replay as inserting the good ones one by one; each refusal is
    reported once, with its reason."""
    import zmq

    from apex_local.roles import replay_server
    from apex_local.transport import DecodeLimits, Insert, InsertSpec

    parts = with_bad(interleave(actor_chunks(0, steps=60), actor_chunks(1, steps=60)), 5, _unknown_ref)
    limits = DecodeLimits(insert=InsertSpec(F, np.uint8, 4, 3), kinds=frozenset({"insert"}))
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        for s in (pull, push):
            s.setsockopt(zmq.LINGER, 0)
        addr = f"ipc://{tmp_path}/inserts.sock"
        pull.bind(addr)
        push.connect(addr)
        for i, (actor, chunk) in enumerate(parts):
            push.send(Insert(sender=f"actor.{actor}", actor_id=actor, env_steps=1, chunk=chunk).to_frame())
            if i == 8:
                push.send(b"\x00garbage")
        replay, rejected, stored = make(), [], []
        sizes = []
        inner = replay.table.insert_chunks
        monkeypatch.setattr(replay.table, "insert_chunks", lambda g: sizes.append(len(g)) or inner(g))
        deadline = 50
        while len(stored) + len(rejected) < len(parts) + 1 and deadline:
            pull.poll(100)
            for msg, n in replay_server.drain_inserts(pull, limits, replay, lambda r, d: rejected.append(r), group=6):
                stored.append(n)
            deadline -= 1
        expect_replay = make()
        expect = one_by_one(expect_replay, parts)
        assert stored == [n for n in expect if not isinstance(n, ChunkError)]
        assert sorted(rejected) == sorted(["bad_header"] + ["bad_chunk"] * sum(isinstance(n, ChunkError) for n in expect))
        assert_same_state(replay, expect_replay)
        assert max(sizes) > 1  # queued messages were stored together
    finally:
        pull.close()
        push.close()
        ctx.term()
