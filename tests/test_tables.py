"""Frame store + tables: stacks rebuilt exactly, generations, invalidity, chunk validation, memory."""
from __future__ import annotations

import numpy as np
import pytest

from apex_local.replay.accumulators import NStepAccumulator, SequenceAccumulator
from apex_local.replay.frames import ChunkError, layout_nbytes
from apex_local.replay.tables import SequenceTable, TransitionTable
from test_accumulators import FakeVecEnv, run_random

F = (3, 2)


def filled_transition_table(num_envs=3, k=4, steps=150, capacity=10_000, **kw):
    env = FakeVecEnv(num_envs, k=k, frame_shape=F)
    acc = NStepAccumulator(num_envs, n=3, gamma=0.9, frame_stack=k, frame_shape=F, frame_dtype=np.uint8)
    chunks = run_random(acc, env, steps, flush_every=3)
    table = TransitionTable(capacity, F, np.uint8, k, **kw)
    slots = [table.insert_chunk(7, c) for c in chunks]
    return env, chunks, table, slots


def snapshot(table):
    st = table.state_dict()
    cols = {k: v.copy() for k, v in st["columns"].items()}
    fr = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st["frames"].items()}
    return st["cursor"], st["size"], cols, fr


def assert_same(a, b):
    assert a[:2] == b[:2]
    for x, y in ((a[2], b[2]), (a[3], b[3])):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_gather_rebuilds_the_env_stacks():
    env, chunks, table, slots = filled_transition_table()
    idx = np.concatenate(slots)
    assert table.size == idx.size > 300
    batch = table.gather(idx)
    assert batch["obs"].shape == (idx.size, 4, *F) and batch["obs"].dtype == np.uint8
    c = {k: np.concatenate([ch[k] for ch in chunks]) for k in ("stream", "obs_seq", "next_seq", "reward")}
    for b in range(idx.size):
        s = int(c["stream"][b])
        np.testing.assert_array_equal(batch["obs"][b], env.stacks[(s, int(c["obs_seq"][b, -1]))])
        np.testing.assert_array_equal(batch["next_obs"][b], env.stacks[(s, int(c["next_seq"][b, -1]))])
    np.testing.assert_allclose(batch["reward"], c["reward"])
    assert table.valid(idx).all()
    # gather into preallocated (e.g. shared-memory) arrays, contiguous or not
    out = {key: np.zeros(shape, dt) for key, shape, dt in table.batch_layout(5)}
    strided = np.zeros((5, 8, *F), np.uint8)[:, ::2]
    out["next_obs"] = strided
    got = table.gather(idx[:5], out=out)
    assert got["obs"] is out["obs"] and got["next_obs"] is strided
    np.testing.assert_array_equal(out["obs"], batch["obs"][:5])
    np.testing.assert_array_equal(strided, batch["next_obs"][:5])
    np.testing.assert_array_equal(out["action"], batch["action"][:5])


def test_sequence_table_rebuilds_sequences():
    env = FakeVecEnv(2, k=1, frame_shape=F, seed=5)
    acc = SequenceAccumulator(2, burn_in=2, sequence_length=4, period=3, gamma=0.99, frame_shape=F,
                              frame_dtype=np.uint8, state_size=3)
    chunks = run_random(acc, env, 200, p_end=0.05, flush_every=4, recurrent=True)
    table = SequenceTable(1000, F, np.uint8, seq_len=6, state_size=3, period=3)
    idx = np.concatenate([table.insert_chunk(0, c) for c in chunks])
    batch = table.gather(idx)
    assert batch["obs"].shape == (idx.size, 7, 1, *F)
    c = {k: np.concatenate([ch[k] for ch in chunks]) for k in ("stream", "obs_seq", "mask", "state_h")}
    for b in range(idx.size):
        s = int(c["stream"][b])
        for j, q in enumerate(c["obs_seq"][b].tolist()):
            want = env.frames[s][q] if q >= 0 else np.zeros(F, np.uint8)
            np.testing.assert_array_equal(batch["obs"][b, j, 0], want)
    np.testing.assert_array_equal(batch["mask"], c["mask"])
    np.testing.assert_array_equal(batch["state_h"], c["state_h"])
    assert table.valid(idx).all()
    out = {key: np.zeros(shape, dt) for key, shape, dt in table.batch_layout(3)}
    got = table.gather(idx[:3], out=out)
    for key, val in got.items():
        assert val is out[key]
        np.testing.assert_array_equal(val, batch[key][:3])


def chunk_k1(seqs, refs, stream=0, frame_value=None):
    """Hand-built k=1 chunk: frames ``seqs`` of ``stream`` and transitions refs[b] = (obs, next)."""
    seqs = np.asarray(seqs, np.int64)
    refs = np.asarray(refs, np.int64).reshape(-1, 2)
    frames = np.zeros((seqs.size, *F), np.uint8)
    frames[:] = (seqs if frame_value is None else np.full(seqs.size, frame_value))[:, None, None] % 250 + 1
    b = refs.shape[0]
    return {"frames": frames, "frame_stream": np.full(seqs.size, stream, np.int32), "frame_seq": seqs,
            "stream": np.full(b, stream, np.int32), "obs_seq": refs[:, :1], "next_seq": refs[:, 1:],
            "action": np.zeros(b, np.int64), "reward": np.arange(b, dtype=np.float32),
            "discount": np.full(b, 0.9, np.float32)}


def test_generation_increments_on_overwrite():
    table = TransitionTable(4, F, np.uint8, 1)
    s1 = table.insert_chunk(0, chunk_k1([0, 1, 2, 3], [(0, 1), (1, 2), (2, 3)]))
    assert s1.tolist() == [0, 1, 2] and table.generation.tolist() == [1, 1, 1, 0]
    s2 = table.insert_chunk(0, chunk_k1([4, 5, 6], [(3, 4), (4, 5), (5, 6)]))
    assert s2.tolist() == [3, 0, 1] and table.generation.tolist() == [2, 2, 1, 1]
    assert table.size == 4 and table.cursor == 6
    assert table.gather([0])["obs"][0, 0, 0, 0] == 5  # slot 0 now holds (4 -> 5)


def test_items_invalid_after_frame_ring_wraps():
    table = TransitionTable(100, F, np.uint8, 1, frame_capacity=6)
    table.insert_chunk(0, chunk_k1([0, 1, 2], [(0, 1), (1, 2)]))
    assert table.valid([0, 1]).tolist() == [True, True]
    table.insert_chunk(0, chunk_k1([3, 4, 5, 6], [(2, 3), (3, 4), (4, 5), (5, 6)]))  # frame 0 overwritten
    assert table.valid(range(6)).tolist() == [False, True, True, True, True, True]
    assert table.valid([99, -1]).tolist() == [False, False]  # never written
    np.testing.assert_array_equal(table.gather([5])["next_obs"][0, 0], np.full(F, 7))  # frame seq 6
    with pytest.raises(ChunkError, match="obs_seq"):  # frame 1 is gone from the ring now
        table.insert_chunk(0, chunk_k1([7], [(1, 7)]))


def test_stream_restart_and_zero_padding():
    table = TransitionTable(10, F, np.uint8, 2)
    c = chunk_k1([0, 1], [])
    c.update(stream=np.zeros(1, np.int32), obs_seq=np.array([[-1, 0]]), next_seq=np.array([[0, 1]]),
             action=np.zeros(1, np.int64), reward=np.zeros(1, np.float32), discount=np.ones(1, np.float32))
    table.insert_chunk(3, c)
    b = table.gather([0])
    assert (b["obs"][0, 0] == 0).all() and (b["obs"][0, 1] == 1).all() and (b["next_obs"][0, 1] == 2).all()
    table.insert_chunk(3, c)  # the actor restarted: seqs from 0 again are a new incarnation
    assert table.frame_store.num_streams == 1 and table.size == 2
    table.insert_chunk(4, c)  # another actor, same env index: another stream
    assert table.frame_store.num_streams == 2


def _bad(mutate):
    c = chunk_k1([10, 11, 12], [(10, 11), (11, 12)])
    mutate(c)
    return c


BAD_CHUNKS = [
    ("missing frames", lambda c: c.pop("frames"), "frames"),
    ("missing action", lambda c: c.pop("action"), "action"),
    ("frames dtype", lambda c: c.update(frames=c["frames"].astype(np.float32)), "frames"),
    ("frames shape", lambda c: c.update(frames=c["frames"][:, :2]), "frames"),
    ("frame_seq length", lambda c: c.update(frame_seq=c["frame_seq"][:2]), "frame_seq"),
    ("frame_seq float", lambda c: c.update(frame_seq=c["frame_seq"].astype(np.float64)), "frame_seq"),
    ("frame_seq not increasing", lambda c: c.update(frame_seq=np.array([10, 12, 11])), "frame_seq"),
    ("negative stream", lambda c: c.update(frame_stream=np.full(3, -1, np.int32)), "frame_stream"),
    ("reward length", lambda c: c.update(reward=np.zeros(3, np.float32)), "reward"),
    ("reward nan", lambda c: c.update(reward=np.array([0.0, np.nan], np.float32)), "reward"),
    ("reward int", lambda c: c.update(reward=np.zeros(2, np.int64)), "reward"),
    ("discount > 1", lambda c: c.update(discount=np.array([0.5, 1.5], np.float32)), "discount"),
    ("action float", lambda c: c.update(action=np.zeros(2, np.float32)), "action"),
    ("action >= num_actions", lambda c: c.update(action=np.array([0, 6])), "action"),
    ("obs_seq shape", lambda c: c.update(obs_seq=np.zeros((2, 2), np.int64)), "obs_seq"),
    ("obs_seq < -1", lambda c: c.update(obs_seq=np.array([[-2], [11]])), "obs_seq"),
    ("unknown seq", lambda c: c.update(next_seq=np.array([[11], [13]])), "next_seq"),
    ("seq too old", lambda c: c.update(obs_seq=np.array([[1], [11]])), "obs_seq"),
    ("other stream", lambda c: c.update(stream=np.array([0, 1], np.int32)), "obs_seq"),
    ("priority negative", lambda c: c.update(priority=np.array([1.0, -1.0], np.float32)), "priority"),
    ("stream 2-D", lambda c: c.update(stream=np.zeros((2, 1), np.int32)), "stream"),
]


@pytest.mark.parametrize("name,mutate,field", BAD_CHUNKS, ids=[b[0] for b in BAD_CHUNKS])
def test_bad_chunks_rejected_without_changing_the_table(name, mutate, field):
    table = TransitionTable(8, F, np.uint8, 1, num_actions=6, stream_window=4)
    table.insert_chunk(0, chunk_k1([0, 1, 2], [(0, 1), (1, 2)]))
    table.insert_chunk(0, chunk_k1(range(3, 10), [(8, 9)]))  # seqs 0..9 sent; the window holds 6..9
    before = snapshot(table)
    with pytest.raises(ChunkError, match=field):
        table.insert_chunk(0, _bad(mutate))
    assert_same(before, snapshot(table))
    with pytest.raises(ChunkError, match="mapping"):
        table.insert_chunk(0, [1, 2])
    table.insert_chunk(0, _bad(lambda c: None))  # a good chunk still goes in afterwards
    assert table.cursor == 5


def test_sequence_table_rejects_bad_mask_and_state():
    table = SequenceTable(4, F, np.uint8, seq_len=2, state_size=2)
    good = {"frames": np.ones((3, *F), np.uint8), "frame_stream": np.zeros(3, np.int32),
            "frame_seq": np.arange(3), "stream": np.zeros(1, np.int32), "obs_seq": np.array([[0, 1, 2]]),
            "action": np.zeros((1, 2), np.int64), "reward": np.zeros((1, 2), np.float32),
            "discount": np.ones((1, 2), np.float32), "mask": np.array([[1.0, 0.0]], np.float32),
            "state_h": np.zeros((1, 2), np.float32), "state_c": np.zeros((1, 2), np.float32)}
    for key, val in (("mask", np.array([[1.0, 0.5]], np.float32)), ("state_c", np.zeros((1, 3), np.float32)),
                     ("state_h", np.array([[np.inf, 0]], np.float32)), ("obs_seq", np.array([[0, 1]]))):
        with pytest.raises(ChunkError, match=key):
            table.insert_chunk(0, {**good, key: val})
    assert table.size == 0 and table.frame_store.written == 0
    assert table.insert_chunk(0, good).tolist() == [0]


def test_memory_layout_at_one_million_atari_transitions():
    cap, frame_bytes = 1_000_000, 84 * 84
    layout = TransitionTable.layout(cap, (84, 84), np.uint8, 4)
    total = layout_nbytes(layout)
    assert total == TransitionTable.nbytes_required(cap, (84, 84), np.uint8, 4)
    assert total <= 1.1 * cap * frame_bytes + 100 * cap
    frames = dict((name, shape) for name, shape, _ in layout)["frames"]
    assert frames[0] >= cap  # at least one frame per transition
    # DESIGN.md §4: "1M transitions cost about 7 GB" (not 28-56 GB)
    assert 7.0e9 < total < 7.7e9


def test_state_dict_round_trip():
    env, chunks, table, slots = filled_transition_table(num_envs=2, steps=60, capacity=50)
    state = {k: v for k, v in table.state_dict().items()}
    copy = TransitionTable(50, F, np.uint8, 4)
    copy.load_state_dict(state)
    idx = np.arange(table.size)
    for key, val in table.gather(idx).items():
        np.testing.assert_array_equal(copy.gather(idx)[key], val)
    assert copy.valid(idx).tolist() == table.valid(idx).tolist()
    # the restored stream windows resolve refs to frames sent before the snapshot
    last = chunks[-1]
    c = {"frames": np.zeros((0, *F), np.uint8), "frame_stream": np.zeros(0, np.int32),
         "frame_seq": np.zeros(0, np.int64), "stream": last["stream"][-1:], "obs_seq": last["next_seq"][-1:],
         "next_seq": last["next_seq"][-1:], "action": np.zeros(1, np.int64), "reward": np.zeros(1, np.float32),
         "discount": np.ones(1, np.float32)}
    assert copy.insert_chunk(7, c).size == 1
    with pytest.raises(ChunkError, match="obs_seq"):
        copy.insert_chunk(8, c)  # another actor: no such frames
    with pytest.raises(ValueError, match="sequence"):
        SequenceTable(50, F, np.uint8, 2, 2).load_state_dict(state)
