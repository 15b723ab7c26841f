"""Shared-memory segments, the allocator, run directories + janitor, and batch slots."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from apex_local.config import Config, TransportConfig
from apex_local.transport import (
    BatchSlots, Segment, ShmError, StaleSlotError, allocator, check_free_space, clean, ndarray_view,
    register_process, run_paths, segment_name)
from apex_local.transport.shm import SHM_DIR, free_bytes

ROOT = Path(__file__).resolve().parents[1]


def uid() -> str:
    return "t" + uuid.uuid4().hex[:10]


def run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)


@pytest.fixture
def name():
    n = segment_name(uid(), "seg")
    yield n
    Path(SHM_DIR, n).unlink(missing_ok=True)


def test_create_attach_view_and_owner_unlinks(name):
    seg = Segment.create(name, 4096)
    a = ndarray_view(seg, 64, (4, 4), np.float32)
    a[:] = 3.0
    other = Segment.attach(name)
    assert np.array_equal(ndarray_view(other, 64, (4, 4), np.float32), a)
    other.close()
    assert os.path.exists(seg.path)  # an attacher's close never unlinks
    seg.close()
    seg.close()  # idempotent
    assert not os.path.exists(seg.path)


def test_attach_only_process_exit_leaves_segment(name):
    with Segment.create(name, 4096) as seg:
        r = run_py(f"from apex_local.transport.shm import Segment\n"
                   f"s = Segment.attach({name!r}); s.mmap[0] = 42")  # exits without closing
        assert r.returncode == 0, r.stderr
        assert os.path.exists(seg.path) and seg.mmap[0] == 42
        r = run_py("from apex_local.transport.shm import Segment\n"  # no resource_tracker involved
                   f"s = Segment.attach({name!r}, readonly=True); assert s.mmap[0] == 42; s.close()")
        assert r.returncode == 0, r.stderr
        assert os.path.exists(seg.path)
    assert not os.path.exists(seg.path)


def test_creator_unlinks_at_exit(name):
    r = run_py(f"from apex_local.transport.shm import Segment\nSegment.create({name!r}, 100)\n"
               f"import os; assert os.path.exists('/dev/shm/{name}')")
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(os.path.join(SHM_DIR, name))


def test_create_existing_and_replace(name):
    first = Segment.create(name, 100)
    with pytest.raises(ShmError, match="already exists"):
        Segment.create(name, 100)
    second = Segment.create(name, 200, replace=True)
    assert first.replaced() and not second.replaced() and second.size == 200
    first.close()  # the old owner must not unlink its replacement
    assert os.path.exists(second.path)
    second.close()
    assert not os.path.exists(second.path)


def test_free_space_error_names_segment_and_sizes(name):
    avail = free_bytes()
    with pytest.raises(ShmError) as info:
        Segment.create(name, avail + (1 << 30))
    msg = str(info.value)
    assert name in msg and str(avail + (1 << 30)) in msg and "free in /dev/shm" in msg
    assert not os.path.exists(os.path.join(SHM_DIR, name))  # nothing allocated
    check_free_space(1024, name="tiny")  # fits


def test_view_bounds_and_alignment(name):
    with Segment.create(name, 128) as seg:
        with pytest.raises(ShmError, match="outside"):
            ndarray_view(seg, 64, (20,), np.float32)
        with pytest.raises(ShmError, match="aligned"):
            ndarray_view(seg, 3, (2,), np.float64)


def test_allocator_packs_arrays_into_named_segments():
    prefix = segment_name(uid(), "replay")
    with allocator(prefix) as alloc:
        frames = alloc("frames", (10, 84, 84), np.uint8)
        seqs = alloc("seq", 10, np.int64)
        frames[3] = 7
        seqs[:] = np.arange(10)
        assert os.path.exists(f"{SHM_DIR}/{prefix}_frames") and alloc.nbytes >= 10 * 84 * 84 + 80
        again = Segment.attach(f"{prefix}_seq")
        assert np.array_equal(ndarray_view(again, 0, 10, np.int64), np.arange(10))
        again.close()
        with pytest.raises(ShmError, match="twice"):
            alloc("seq", 3, np.int64)
    assert not os.path.exists(f"{SHM_DIR}/{prefix}_frames") and not os.path.exists(f"{SHM_DIR}/{prefix}_seq")


def test_run_paths_private_dir_and_pid_file(tmp_path):
    rid = uid()
    paths = run_paths(Config(transport=TransportConfig(ipc_dir=str(tmp_path))), rid)
    assert paths.ipc_dir == tmp_path / "apex-local" / rid
    assert stat.S_IMODE(paths.ipc_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(paths.base.stat().st_mode) == 0o700
    with register_process(paths, "actor", 3) as pf:
        assert pf.path == paths.ipc_dir / "actor.3.pid"
        assert pf.path.read_text().split()[0] == str(os.getpid())
    assert not pf.path.exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _fake_run(base: Path, rid: str, pid: int | None, segments=("board", "replay_frames")) -> list[str]:
    d = base / rid
    d.mkdir(parents=True)
    (d / "replay.sock").write_text("")
    if pid is not None:
        (d / "replay.0.pid").write_text(f"{pid}\n")
    names = [segment_name(rid, s) for s in segments]
    for n in names:
        Path(SHM_DIR, n).write_bytes(b"\0" * 16)
    return names


def test_janitor_removes_dead_runs_and_keeps_live_ones(tmp_path):
    dead, live, mapped = uid(), uid(), uid()
    dead_segs = _fake_run(tmp_path, dead, _dead_pid())
    live_segs = _fake_run(tmp_path, live, os.getpid())  # this test process is a live python process
    try:
        seg = Segment.create(segment_name(mapped, "board"), 64)  # no pid file, but mapped by us
        dry = clean(dead, dry_run=True, ipc_base_dir=tmp_path)
        assert sorted(dry.removed_segments) == sorted(dead_segs) and all(Path(SHM_DIR, s).exists() for s in dead_segs)
        report = clean(dead, ipc_base_dir=tmp_path)
        assert sorted(report.removed_segments) == sorted(dead_segs)
        assert not any(Path(SHM_DIR, s).exists() for s in dead_segs) and not (tmp_path / dead).exists()
        for rid in (live, mapped):
            r = clean(rid, ipc_base_dir=tmp_path)
            assert r.live_runs == [rid] and not r.removed_segments
        assert all(Path(SHM_DIR, s).exists() for s in live_segs) and (tmp_path / live / "replay.0.pid").exists()
        assert "live run" in str(r)
        seg.close()
    finally:
        for s in dead_segs + live_segs:
            Path(SHM_DIR, s).unlink(missing_ok=True)


def test_janitor_all_runs_in_private_dirs(tmp_path):
    shm, base = tmp_path / "shm", tmp_path / "ipc"
    shm.mkdir()
    base.mkdir()
    (shm / "apex_old_board").write_bytes(b"x")
    (shm / "apex_my_run_board").write_bytes(b"x")  # run ids with '_' are matched through their ipc dir
    (shm / "unrelated").write_bytes(b"x")
    (base / "my_run").mkdir()
    (base / "my_run" / "learner.0.pid").write_text(f"{os.getpid()}\n")
    report = clean(ipc_base_dir=base, shm_dir=str(shm))
    assert report.removed_segments == ["apex_old_board"] and report.live_runs == ["my_run"]
    assert sorted(p.name for p in shm.iterdir()) == ["apex_my_run_board", "unrelated"]


# ----------------------------------------------------------------------------- batch slots

LAYOUT = [("obs", (4, 3), np.uint8), ("action", (4,), np.int64), ("weight", (4,), np.float32)]


def test_slots_generations_and_held_slot_never_reused():
    name = segment_name(uid(), "slots")
    with BatchSlots.create(name, LAYOUT, 2) as server, BatchSlots.attach(name) as learner:
        a, b = server.acquire(), server.acquire()
        assert server.acquire() is None  # both in flight
        a.arrays["action"][:] = [1, 2, 3, 4]
        server.publish(a)
        server.publish(b)
        view = learner.view(a.slot_id, a.seq, server.epoch)
        assert np.array_equal(view["action"], [1, 2, 3, 4]) and not view["action"].flags.writeable
        assert learner.release(b.slot_id, b.seq)
        c = server.acquire()
        assert c.slot_id == b.slot_id and c.seq == b.seq + 1  # the released one, new generation
        assert server.acquire() is None  # slot a is still held by the learner
        with pytest.raises(StaleSlotError):
            learner.view(b.slot_id, b.seq, server.epoch)  # stale generation
        assert not learner.release(b.slot_id, b.seq)
        assert learner.release(a.slot_id, a.seq)
        assert server.acquire().slot_id == a.slot_id


def test_slots_detect_replay_restart():
    name = segment_name(uid(), "slots")
    server = BatchSlots.create(name, LAYOUT, 2)
    learner = BatchSlots.attach(name)
    s = server.acquire()
    server.publish(s)
    old_epoch = server.epoch
    server.close()  # replay dies; a new one starts with the same name
    server = BatchSlots.create(name, LAYOUT, 3)
    try:
        with pytest.raises(StaleSlotError, match="epoch"):
            learner.view(s.slot_id, s.seq, old_epoch)
        t = server.acquire()
        t.arrays["obs"][:] = 9
        server.publish(t)
        assert learner.view(t.slot_id, t.seq, server.epoch)["obs"].max() == 9  # reattached
        assert learner.num_slots == 3
        assert server.reclaim_all() == 1 and server.free_count() == 3
    finally:
        learner.close()
        server.close()
