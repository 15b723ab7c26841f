"""Replay = table + sampler + rate limiter: generations, invalid items, limits, builder, snapshot."""
from __future__ import annotations

import numpy as np
import pytest

from apex_local.config import config_from_dict
from apex_local.replay.accumulators import NStepAccumulator, SequenceAccumulator
from apex_local.replay.frames import ChunkError
from apex_local.replay.rate_limiter import RateLimiter
from apex_local.replay.replay import RateLimitedError, Replay, make_replay, replay_layout
from apex_local.replay.samplers import PrioritizedSampler, UniformSampler
from apex_local.replay.tables import TransitionTable
from test_accumulators import FakeVecEnv, run_random

F = (2, 2)


def k1_chunk(first_seq, n_items, priority=None):
    """n_items transitions (s -> s+1) over fresh frames first_seq .. first_seq + n_items (k=1)."""
    seqs = np.arange(first_seq, first_seq + n_items + 1)
    c = {"frames": np.full((seqs.size, *F), 7, np.uint8), "frame_stream": np.zeros(seqs.size, np.int32),
         "frame_seq": seqs, "stream": np.zeros(n_items, np.int32), "obs_seq": seqs[:-1, None],
         "next_seq": seqs[1:, None], "action": np.zeros(n_items, np.int64),
         "reward": np.ones(n_items, np.float32), "discount": np.full(n_items, 0.9, np.float32)}
    if priority is not None:
        c["priority"] = np.asarray(priority, np.float32)
    return c


def sampler_for(kind, capacity, seed=0):
    rng = np.random.default_rng(seed)
    return PrioritizedSampler(capacity, 0.6, 1e-6, rng) if kind == "prioritized" else UniformSampler(capacity, rng)


@pytest.mark.parametrize("kind", ["prioritized", "uniform"])
def test_stale_generation_priority_updates_are_dropped(kind):
    replay = Replay(TransitionTable(4, F, np.uint8, 1), sampler_for(kind, 4))
    assert replay.insert(0, k1_chunk(0, 4)) == 4
    res = replay.sample(8, beta=0.4)
    assert res.generations.tolist() == [1] * 8 and set(res.indices.tolist()) <= {0, 1, 2, 3}
    replay.insert(0, k1_chunk(10, 2))  # overwrites slots 0 and 1 (generation 2)
    applied = replay.update_priorities([0, 1, 2, 3], [1, 1, 1, 1], [5.0, 5.0, 5.0, 5.0])
    assert applied == 2 and replay.stale_updates == 2
    if kind == "prioritized":
        p = replay.sampler.state()["priorities"]
        assert p[0] == p[1] == pytest.approx(1.0)  # new items keep the max priority (1.0 ** alpha)
        assert p[2] == p[3] == pytest.approx((5.0 + 1e-6) ** 0.6)
    assert replay.update_priorities([0], [2], [3.0]) == 1
    assert replay.update_priorities([0], [2], [np.nan]) == 0  # non-finite: skipped, never written


def test_chunk_priorities_drive_sampling():
    replay = Replay(TransitionTable(8, F, np.uint8, 1), PrioritizedSampler(8, 1.0, 0.0, np.random.default_rng(0)))
    replay.insert(0, k1_chunk(0, 2, priority=[1e-9, 1.0]))
    res = replay.sample(200, beta=1.0)
    assert set(res.indices.tolist()) == {1}
    np.testing.assert_allclose(res.weights, 1e-9, rtol=1e-5)  # (p_i / p_min) ** -beta


@pytest.mark.parametrize("kind", ["prioritized", "uniform"])
def test_invalid_items_are_never_returned(kind):
    # frame ring of 30 frames for 150 item slots: old items lose their frames long before
    # their slots are reused, and must be invalidated at sample time.
    env = FakeVecEnv(2, k=2, frame_shape=F)
    acc = NStepAccumulator(2, n=2, gamma=0.9, frame_stack=2, frame_shape=F, frame_dtype=np.uint8)
    chunks = run_random(acc, env, 100, flush_every=2)
    replay = Replay(TransitionTable(150, F, np.uint8, 2, frame_capacity=30), sampler_for(kind, 150))
    for c in chunks:
        replay.insert(1, c)
        if replay.can_sample(16):
            res = replay.sample(16, beta=0.4)
            assert replay.table.valid(res.indices).all()
            # the batch dict carries index / generation / weight too
            assert res.batch["index"] is res.indices and res.batch["weight"] is res.weights
    assert replay.invalidated > 0
    assert replay.sampler.size < replay.size


def test_rate_limiter_is_respected():
    limiter = RateLimiter(1.0, 4, 4.0, batch_size=2)  # spi 1, min size 4, +-4 samples of slack
    replay = Replay(TransitionTable(64, F, np.uint8, 1), sampler_for("uniform", 64), limiter, min_size=4)
    seq = 0
    for _ in range(3):
        replay.insert(0, k1_chunk(seq, 1))
        seq += 2
    assert not replay.can_sample(2)
    with pytest.raises(RateLimitedError):
        replay.sample(2, beta=0.4)
    replay.insert(0, k1_chunk(seq, 1))
    seq += 2
    samples = 0
    while replay.can_sample(2):
        replay.sample(2, beta=0.4)
        samples += 2
    assert samples == 4 and limiter.samples == 4  # credit spi * 4 inserts, floor min_diff = 0
    with pytest.raises(RateLimitedError):
        replay.sample(2, beta=0.4)
    inserts = 0
    while replay.can_insert():
        replay.insert(0, k1_chunk(seq, 1))
        seq += 2
        inserts += 1
    assert inserts == 8  # up to max_diff = 8 samples of credit ahead
    size = replay.size
    with pytest.raises(RateLimitedError):
        replay.insert(0, k1_chunk(seq, 1))
    assert replay.size == size


def test_rejected_chunk_changes_nothing():
    replay = Replay(TransitionTable(8, F, np.uint8, 1), sampler_for("prioritized", 8))
    replay.insert(0, k1_chunk(0, 3))
    bad = k1_chunk(10, 2)
    bad["next_seq"] = bad["next_seq"] + 100
    with pytest.raises(ChunkError, match="next_seq"):
        replay.insert(0, bad)
    assert replay.size == 3 and replay.sampler.size == 3 and replay.inserted == 3


def _cfg(recurrent: bool):
    data = {"replay": {"capacity": 64, "min_size": 4, "n_step": 2}, "learner": {"batch_size": 4}}
    if recurrent:
        data["network"] = {"lstm_size": 3}
        data["run"] = {"method": "r2d2"}
        data["replay"].update(burn_in=1, sequence_length=3, sequence_period=2)
    return config_from_dict(data)


@pytest.mark.parametrize("recurrent", [False, True])
def test_make_replay_allocates_its_layout_and_samples_into_out(recurrent):
    cfg = _cfg(recurrent)
    calls = []

    def allocator(name, shape, dtype):
        calls.append((name, tuple(shape), np.dtype(dtype)))
        return np.zeros(shape, dtype)

    replay = make_replay(cfg, F, np.uint8, num_actions=3, allocator=allocator, rng=np.random.default_rng(0))
    assert sorted(calls) == sorted((n, tuple(s), np.dtype(d)) for n, s, d in replay_layout(cfg, F, np.uint8))
    env = FakeVecEnv(2, k=1, frame_shape=F)
    if recurrent:
        acc = SequenceAccumulator(2, 1, 3, 2, F, np.uint8, 3, gamma=0.99)
    else:
        acc = NStepAccumulator(2, 2, 0.99, 1, F, np.uint8)
    for c in run_random(acc, env, 60, flush_every=3, recurrent=recurrent):
        replay.insert(0, c)
    assert replay.can_sample(4)
    out = {key: np.zeros(shape, dt) for key, shape, dt in replay.batch_layout(4)}
    res = replay.sample(4, beta=0.4, out=out)
    for key in out:
        assert res.batch[key] is out[key]
    np.testing.assert_array_equal(out["index"], res.indices)
    np.testing.assert_array_equal(out["generation"], replay.table.generation[res.indices])
    assert out["obs"].shape == ((4, 5, 1, *F) if recurrent else (4, 1, *F))  # T + 1 = 1 + 3 + 1


def test_replay_state_dict_round_trip():
    cfg = _cfg(False)
    replay = make_replay(cfg, F, np.uint8, rng=np.random.default_rng(0))
    for i in range(5):
        replay.insert(0, k1_chunk(10 * i, 5, priority=np.arange(5) + i))
    res = replay.sample(4, beta=0.4)
    replay.update_priorities(res.indices, res.generations, [9.0] * 4)
    copy = make_replay(cfg, F, np.uint8, rng=np.random.default_rng(0))
    copy.load_state_dict(replay.state_dict())
    assert copy.size == replay.size and copy.inserted == replay.inserted == 25
    np.testing.assert_array_equal(copy.sampler.state()["priorities"], replay.sampler.state()["priorities"])
    idx = np.arange(copy.size)
    for key, val in replay.table.gather(idx).items():
        np.testing.assert_array_equal(copy.table.gather(idx)[key], val)
    later = k1_chunk(46, 1)  # frames 46, 47; the first item refers back to 45, sent before the snapshot
    for key in ("stream", "obs_seq", "next_seq", "action", "reward", "discount"):
        later[key] = np.concatenate([later[key][:0], later[key]])
    later["obs_seq"] = np.array([[45]])
    later["next_seq"] = np.array([[46]])
    assert copy.insert(0, later) == 1


def continued_chunk(first_frame, n_items, priority):
    """What an actor sends mid-stream (k=1): frames first_frame .. first_frame + n_items - 1, and
    n_items transitions whose first one starts at the previous chunk's last frame."""
    seqs = np.arange(first_frame, first_frame + n_items)
    c = {"frames": (seqs[:, None, None] % 250 * np.ones((1, *F))).astype(np.uint8),
         "frame_stream": np.zeros(n_items, np.int32), "frame_seq": seqs, "stream": np.zeros(n_items, np.int32),
         "obs_seq": (seqs - 1)[:, None], "next_seq": seqs[:, None], "action": np.zeros(n_items, np.int64),
         "reward": np.ones(n_items, np.float32), "discount": np.full(n_items, 0.9, np.float32),
         "priority": np.asarray(priority, np.float32)}
    return c


# (chunks sent to a fresh replay as (first_frame, n_items), stored items, gap items)
GAP_CASES = [
    # the replay restarted empty while the actor was at frame 100: its first item references
    # frame 99, which the replay never got; it is skipped, the other two are stored
    ([(100, 3)], 2, 1),
    # ... and from the next chunk on, the stream is whole again
    ([(100, 3), (103, 3)], 5, 1),
    # messages lost in between (replay restored a snapshot taken at frame 5, actor at 50)
    ([(1, 5), (50, 2)], 4 + 1, 1 + 1),
    # an actor process restarted (seqs start over): a new stream, nothing lost but its first item
    ([(1, 5), (1, 2)], 4 + 1, 1 + 1),
]


@pytest.mark.parametrize("chunks, stored, gap", GAP_CASES)
def test_items_referencing_frames_the_replay_lost_are_skipped(chunks, stored, gap):
    replay = Replay(TransitionTable(64, F, np.uint8, 1), sampler_for("prioritized", 64))
    done = 0
    for i, (first, n) in enumerate(chunks):
        done += replay.insert(0, continued_chunk(first, n, priority=np.arange(1, n + 1) * (i + 1)))
    assert done == replay.size == replay.inserted == stored
    assert replay.table.gap_items == gap
    # the kept items got their own priorities (the skipped item's is not shifted onto another)
    got = replay.sampler.state()["priorities"][: replay.size] ** (1 / 0.6)
    assert got[-1] == pytest.approx(len(chunks) * chunks[-1][1], rel=1e-4)
    assert got[0] == pytest.approx(2.0, rel=1e-4)  # item 1 of the first chunk (item 0 was skipped)


@pytest.mark.parametrize("obs_seq, match", [
    (30, "obs_seq"),  # after the newest frame and not in the chunk: never sent
    (2, "obs_seq"),  # behind the chunk but not in a gap: the replay had it and it is gone
])
def test_references_outside_a_gap_are_still_refused(obs_seq, match):
    replay = Replay(TransitionTable(64, F, np.uint8, 1, frame_capacity=4), sampler_for("prioritized", 64))
    for first in (1, 3, 5, 7):  # frames 1..8 (the ring keeps 5..8); frame 0 never came: 1 gap item
        replay.insert(0, continued_chunk(first, 2, priority=np.ones(2)))
    bad = continued_chunk(9, 2, priority=np.ones(2))
    bad["obs_seq"] = bad["obs_seq"].copy()
    bad["obs_seq"][1] = obs_seq
    with pytest.raises(ChunkError, match=match):
        replay.insert(0, bad)
    assert replay.size == 7 and replay.table.gap_items == 1
