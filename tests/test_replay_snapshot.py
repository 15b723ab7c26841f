"""Replay snapshots: a round trip restores everything sampling and inserting depend on; a
truncated, foreign or mismatched file is refused naming it; a full disk keeps the old one."""
from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest

from apex_local.replay.accumulators import SequenceAccumulator
from apex_local.replay.replay import make_replay
from apex_local.replay.snapshot import SnapshotError, load_snapshot, save_snapshot, snapshot_nbytes
from test_accumulators import FakeVecEnv, run_random
from test_replay_composite import F, _cfg, k1_chunk


def filled(recurrent: bool):
    cfg = _cfg(recurrent)
    replay = make_replay(cfg, F, np.uint8, rng=np.random.default_rng(0))
    if recurrent:
        r = cfg.replay
        env = FakeVecEnv(2, k=1, frame_shape=F)
        acc = SequenceAccumulator(2, burn_in=r.burn_in, sequence_length=r.sequence_length, period=r.sequence_period,
                                  frame_shape=F, frame_dtype=np.uint8, state_size=cfg.network.lstm_size,
                                  gamma=0.99)
        for c in run_random(acc, env, 80, flush_every=4, recurrent=True):
            replay.insert(3, c)
    else:
        for i in range(6):
            replay.insert(0, k1_chunk(10 * i, 5, priority=np.arange(5) + i + 1))
    res = replay.sample(4, beta=0.4)
    replay.update_priorities(res.indices, res.generations, [9.0] * 4)
    return cfg, replay


@pytest.mark.parametrize("recurrent", [False, True])
def test_round_trip_restores_items_priorities_counters_and_stream_windows(tmp_path, recurrent):
    cfg, replay = filled(recurrent)
    path = save_snapshot(tmp_path / "s.npz", replay.state_dict(), {"env_steps": 123})
    assert 0.5 * snapshot_nbytes(replay.state_dict()) < path.stat().st_size <= snapshot_nbytes(replay.state_dict())
    state, meta = load_snapshot(path)
    assert meta == {"env_steps": 123}
    copy = make_replay(cfg, F, np.uint8, rng=np.random.default_rng(0))
    copy.load_state_dict(state)
    assert (copy.size, copy.inserted, copy.sampled) == (replay.size, replay.inserted, replay.sampled) != (0, 0, 0)
    np.testing.assert_array_equal(copy.sampler.state()["priorities"], replay.sampler.state()["priorities"])
    np.testing.assert_array_equal(copy.table.generation, replay.table.generation)
    idx = np.arange(copy.size)
    for key, val in replay.table.gather(idx).items():
        np.testing.assert_array_equal(copy.table.gather(idx)[key], val, err_msg=key)
    # both draw the same batch from here on (same sampler state, same rng seed)
    a = copy.sample(4, 0.4)
    b = make_replay(cfg, F, np.uint8, rng=np.random.default_rng(0))
    b.load_state_dict(replay.state_dict())
    np.testing.assert_array_equal(a.indices, b.sample(4, 0.4).indices)
    if not recurrent:  # the stream windows came back: a chunk continuing stream 0 is whole
        before = copy.table.gap_items
        copy.insert(0, k1_chunk(55, 2))  # frames 55.. ; its first item refers back to 54 (pre-snapshot)
        assert copy.table.gap_items == before


def test_no_pickle_on_disk_or_in_loading(tmp_path):
    with pytest.raises(ValueError, match="object array"):
        save_snapshot(tmp_path / "s.npz", {"x": np.array([object()], dtype=object)})
    assert not (tmp_path / "s.npz").exists()
    path = save_snapshot(tmp_path / "s.npz", {"a": np.arange(3), "b": {"c": 1.5, "d": None, "e": "x"}})
    state, _ = load_snapshot(path)
    assert state["b"] == {"c": 1.5, "d": None, "e": "x"} and state["a"].tolist() == [0, 1, 2]
    with zipfile.ZipFile(path) as z:  # plain .npy members; np.load refuses pickled ones
        for name in z.namelist():
            if name.endswith(".npy"):
                np.load(z.open(name), allow_pickle=False)


@pytest.mark.parametrize("damage, match", [
    ("truncate", "unreadable"),
    ("foreign", "not an apex-local replay snapshot"),
    ("missing", "no replay snapshot"),
])
def test_bad_files_are_refused_naming_the_path(tmp_path, damage, match):
    path = save_snapshot(tmp_path / "s.npz", {"a": np.arange(1000)})
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "foreign":
        np.savez(path, a=np.arange(3))
        os.replace(str(path) + ".npz" if not path.exists() else path, path)
    else:
        path.unlink()
    with pytest.raises(SnapshotError, match=match) as info:
        load_snapshot(path)
    assert str(path) in str(info.value)


def test_disk_full_keeps_the_previous_snapshot(tmp_path, monkeypatch):
    path = save_snapshot(tmp_path / "s.npz", {"a": np.arange(10)}, {"n": 1})

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(os, "statvfs", lambda _p: Full())
    with pytest.raises(SnapshotError, match="could not write replay snapshot .*previous snapshot.*kept"):
        save_snapshot(path, {"a": np.arange(10_000)}, {"n": 2})
    monkeypatch.undo()
    assert load_snapshot(path)[1] == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temp file left


def test_layout_mismatch_is_refused():
    cfg, replay = filled(False)
    state = replay.state_dict()
    other = make_replay(_cfg(True), F, np.uint8)
    with pytest.raises(ValueError, match="table"):
        other.load_state_dict(state)
