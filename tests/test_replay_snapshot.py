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
from service_harness import ROOT
from test_accumulators import FakeVecEnv, run_random
from test_replay_composite import F, _cfg, continued_chunk, k1_chunk


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
    copy = make_replay(cfg, F, np.uint8, rng=np.random.default_rng(99))
    copy.load_state_dict(state)
    assert (copy.size, copy.inserted, copy.sampled) == (replay.size, replay.inserted, replay.sampled) != (0, 0, 0)
    np.testing.assert_array_equal(copy.sampler.state()["priorities"], replay.sampler.state()["priorities"])
    np.testing.assert_array_equal(copy.table.generation, replay.table.generation)
    idx = np.arange(copy.size)
    for key, val in replay.table.gather(idx).items():
        np.testing.assert_array_equal(copy.table.gather(idx)[key], val, err_msg=key)
    # the restored copy draws what the original draws next (sampler rng state is in the snapshot)
    copy.load_state_dict(load_snapshot(path)[0])  # a generator seeded differently is overwritten too
    for _ in range(3):
        np.testing.assert_array_equal(copy.sample(4, 0.4).indices, replay.sample(4, 0.4).indices)
    if not recurrent:  # the stream windows came back: a chunk continuing stream 0 is whole
        size, gaps = copy.size, copy.table.gap_items
        copy.insert(0, continued_chunk(56, 2, priority=[1.0, 1.0]))  # its first item refers to frame 55
        assert copy.table.gap_items == gaps and copy.size == size + 2
        stripped = make_replay(cfg, F, np.uint8)
        state["table"]["frames"]["stream_keys"] = np.zeros((0, 2), np.int64)  # windows lost: the check bites
        for key in ("win_seq", "win_gid", "last_seq"):
            state["table"]["frames"][key] = state["table"]["frames"][key][:0]
        stripped.load_state_dict(state)
        stripped.insert(0, continued_chunk(56, 2, priority=[1.0, 1.0]))
        assert stripped.table.gap_items == 1


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


# ---------------------------------------------------------------- the replay server's use of them
def _server_cfg(tmp_path, **overrides):
    import yaml

    from apex_local.config import apply_overrides, config_from_dict

    data = yaml.safe_load(open(ROOT / "configs" / "apex_cartpole.yaml"))
    o = {"run.dir": str(tmp_path / "run"), "replay.capacity": 256, "replay.min_size": 32, "replay.snapshot_every_seconds": 60,
         "metrics.enabled": False, "transport.ipc_dir": str(tmp_path / "ipc"), "run.max_env_steps": 10_000}
    o.update(overrides)
    return config_from_dict(apply_overrides(data, o))


def _server(cfg, logs, restore=True):
    import uuid

    from apex_local.envs import env_spec
    from apex_local.roles.replay_server import ReplayServer

    return ReplayServer(cfg, "s" + uuid.uuid4().hex[:8], env_spec(cfg.env), log=logs.append, restore=restore)


def _cartpole_chunk(first, n):
    seqs = np.arange(first, first + n + 1)
    return {"frames": np.random.default_rng(first).normal(size=(seqs.size, 4)).astype(np.float32),
            "frame_stream": np.zeros(seqs.size, np.int32), "frame_seq": seqs, "stream": np.zeros(n, np.int32),
            "obs_seq": seqs[:-1, None], "next_seq": seqs[1:, None], "action": np.zeros(n, np.int64),
            "reward": np.ones(n, np.float32), "discount": np.full(n, 0.99, np.float32)}


def test_server_restores_bumps_generations_and_refuses_other_layouts(tmp_path):
    logs: list[str] = []
    cfg = _server_cfg(tmp_path)
    s = _server(cfg, logs)
    try:
        s.replay.insert(0, _cartpole_chunk(0, 40))
        s.env_steps = 40
        gen = s.replay.table.generation.copy()
        assert s.snapshot()
    finally:
        s.close()
    s = _server(cfg, logs)
    try:
        assert s.replay.size == 40 and s.env_steps == 40
        np.testing.assert_array_equal(s.replay.table.generation, gen + 1)  # old in-flight updates are stale
    finally:
        s.close()
    assert any("restored 40 items, 40 env steps" in line for line in logs)
    fresh = _server(cfg, logs, restore=False)  # --fresh / APEX_FRESH=1
    try:
        assert fresh.replay.size == 0
    finally:
        fresh.close()
    with pytest.raises(SnapshotError, match=r"different replay .*'n_step': 3.*'n_step': 5.*--fresh"):
        _server(_server_cfg(tmp_path, **{"replay.n_step": 5}), logs)


def test_server_keeps_a_finished_runs_snapshot_aside_and_starts_empty(tmp_path):
    logs: list[str] = []
    cfg = _server_cfg(tmp_path, **{"run.max_env_steps": 30})
    s = _server(cfg, logs)
    try:
        s.replay.insert(0, _cartpole_chunk(0, 40))
        s.env_steps = 40
        assert s.snapshot()
    finally:
        s.close()
    run = tmp_path / "run"
    (run / ".replay_snapshot.npz.tmp4242").write_bytes(b"half a snapshot")  # a writer SIGKILLed mid-write
    s = _server(cfg, logs)
    try:
        assert s.replay.size == 0
    finally:
        s.close()
    assert sorted(p.name for p in run.iterdir()) == ["replay_snapshot.finished.npz"]
    assert any("finished run" in line for line in logs)


def test_a_failed_snapshot_is_counted_and_serving_goes_on(tmp_path, monkeypatch):
    import apex_local.roles.replay_server as rs

    logs: list[str] = []
    s = _server(_server_cfg(tmp_path), logs)
    try:
        def boom(*a, **k):
            raise MemoryError("no room")

        monkeypatch.setattr(rs, "save_snapshot", boom)
        assert s.snapshot() is False
        assert any("snapshot failed (MemoryError)" in line for line in logs)
        s.replay.insert(0, _cartpole_chunk(0, 5))  # still usable
        assert s.replay.size == 5
    finally:
        s.close()
