"""The fault matrix (docs/reliability.md): each fault injected into real processes, each test
under a minute. Faults 9 (SIGINT to honcho) and 10 (an env raising) sit with the topology
tests they extend (tests/test_topology.py), the unit-level halves of 3 and 6 in
tests/test_agents.py, 7's in tests/test_sockets.py and tests/test_metrics.py."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zmq

from service_harness import ROOT, Topology, free_port_block

from apex_local.monitoring.procstats import resident_bytes
from apex_local.transport import Insert, endpoints
from apex_local.transport.codec import join_parts

pytestmark = pytest.mark.timeout(240)


def rss_bytes(pid: int) -> int:
    rss = resident_bytes(pid)  # anon + file + shmem = VmRSS
    assert rss, f"no RSS for {pid}"
    return sum(rss.values())


def sigkill(t: Topology, name: str) -> None:
    p = t.procs[name]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=10)


def counter(t: Topology, role: str, name: str, index: int = 0) -> float:
    return t.metrics(role, index).get(name, 0.0)


def wait_growth(t: Topology, role: str, name: str, by: float, timeout: float, what: str, index: int = 0) -> float:
    start = counter(t, role, name, index)
    t.wait_for(lambda: counter(t, role, name, index) >= start + by, timeout, what)
    return start


def assert_clean_exit(t: Topology, sig=signal.SIGTERM) -> None:
    codes = t.stop(sig, timeout=3.0)
    assert all(code == 0 for code, _ in codes.values()), (codes, t.dump())
    assert t.leftovers() == []


FAST = {"run.max_env_steps": 10**9, "replay.min_size": 300, "replay.samples_per_insert": 0,
        "learner.checkpoint_every_seconds": 0}


# ---------------------------------------------------------------- 1. actor SIGKILLed mid-send
def test_1_actor_killed_mid_send_inserts_nothing_partial_and_a_restarted_actor_rejoins(topo):
    # actor 1 sends large messages (2000 transitions, ~200 KB), so kills land mid-send
    t = topo(dict(FAST))
    for role, i in (("replay", 0), ("learner", 0), ("actor", 0)):
        t.start(role, i)
    t.start("actor", 1, "--set", "actor.flush_every=2000")
    wait_growth(t, "learner", "apex_learner_updates_total", 30, 90, "learner updates")
    rng = random.Random(0)
    for _ in range(3):
        t.wait_for(lambda: counter(t, "actor", "apex_actor_env_steps_total", 1) > 2000, 60, "actor 1 stepping")
        time.sleep(rng.uniform(0.05, 0.6))
        sigkill(t, "actor.1")
        t.start("actor", 1, "--set", "actor.flush_every=2000")
    version = counter(t, "learner", "apex_learner_weights_version")
    # the restarted actor adopts current weights, the rest keeps training
    t.wait_for(lambda: counter(t, "actor", "apex_actor_weights_version", 1) >= version, 60,
               f"restarted actor adopting weights >= v{version:.0f}")
    wait_growth(t, "learner", "apex_learner_updates_total", 30, 60, "learner still training")
    wait_growth(t, "replay", "apex_replay_inserted_total", 2000, 60, "restarted actor's inserts arriving")
    rep = t.metrics("replay")
    assert rep.get("apex_replay_rejected_messages_total", 0) == 0, t.dump()  # no partial message got through
    assert rep.get("apex_replay_gap_items_total", 0) == 0  # a restarted actor starts new streams
    # each restarted actor adopted the insert rings its killed predecessor left (SIGKILL unlinks
    # nothing) and removes them once the replay has stored what they held (or after 60 s)
    assert "adopted" in t.log("actor.1"), t.log("actor.1")
    live = t.procs["actor.1"].pid
    dead_rings = lambda: [f for f in os.listdir("/dev/shm")  # noqa: E731
                          if f.startswith(f"apex_{t.run_id}_ins_actor1.") and f".p{live}." not in f]
    t.wait_for(lambda: not dead_rings(), 90, "the killed actors' insert rings removed")
    assert_clean_exit(t)


# ---------------------------------------------------------------- 2. replay killed and restarted
def test_2_replay_killed_and_restarted_restores_its_snapshot_and_training_resumes(topo):
    t = topo(dict(FAST, **{"replay.snapshot_every_seconds": 1.0}))
    for role in ("replay", "learner", "actor"):
        t.start(role, 0)
    wait_growth(t, "learner", "apex_learner_updates_total", 30, 90, "learner updates")
    wait_growth(t, "replay", "apex_replay_snapshots_total", 2, 30, "two snapshots with data in them")
    sigkill(t, "replay.0")
    # the actor blocks (send times out, retries) within bounded memory; the learner waits
    actor_pid = t.procs["actor.0"].pid
    rss0 = rss_bytes(actor_pid)
    blocked0 = counter(t, "actor", "apex_actor_send_blocked_seconds_total")
    time.sleep(3.0)
    assert rss_bytes(actor_pid) - rss0 < 32 << 20
    assert counter(t, "actor", "apex_actor_send_blocked_seconds_total") > blocked0 + 1.0  # counted while blocked
    t0 = time.monotonic()
    t.start("replay", 0)
    t.wait_for(lambda: "restored " in t.log("replay.0"), 30, "snapshot restored")
    restored = t.log("replay.0").rsplit("restored ", 1)[1].split(" items")[0]
    assert int(restored) >= t.cfg.replay.min_size, t.log("replay.0")
    wait_growth(t, "learner", "apex_learner_updates_total", 30, 60, "training after the restart")
    resumed = time.monotonic() - t0
    wait_growth(t, "replay", "apex_replay_inserted_total", 200, 60, "actor inserts after the restart")
    print(f"replay restart: {restored} items restored, training resumed {resumed:.1f}s after the restart")
    assert resumed < 30
    # the actor's streams heal: the items spanning the outage are skipped, not the whole stream
    rep = t.metrics("replay")
    assert rep.get("apex_replay_rejected_messages_total", 0) == 0, t.dump()
    # a clean stop writes a final snapshot that the next start restores exactly
    stop = t.procs["replay.0"]
    stop.send_signal(signal.SIGTERM)
    assert stop.wait(timeout=10) == 0
    size = int(t.log("replay.0").rsplit("snapshot: ", 1)[1].split(" items")[0])
    t.start("replay", 0)
    t.wait_for(lambda: t.log("replay.0").count("restored") >= 2, 30, "second restore")
    assert t.log("replay.0").rsplit("restored ", 1)[1].startswith(f"{size} items")
    assert_clean_exit(t)


def test_2b_replay_restarted_without_snapshot_heals_the_actor_streams(topo):
    t = topo(dict(FAST))
    for role in ("replay", "learner", "actor"):
        t.start(role, 0)
    wait_growth(t, "learner", "apex_learner_updates_total", 30, 90, "learner updates")
    sigkill(t, "replay.0")
    time.sleep(1.0)
    t0 = time.monotonic()
    t.start("replay", 0)
    wait_growth(t, "learner", "apex_learner_updates_total", 30, 60, "training after an empty restart")
    print(f"training resumed {time.monotonic() - t0:.1f}s after an empty replay restart")
    rep = t.metrics("replay")
    assert rep.get("apex_replay_rejected_messages_total", 0) == 0, t.dump()
    assert 0 < rep.get("apex_replay_gap_items_total", 0) <= t.cfg.env.num_envs * 4  # a few items per stream
    assert_clean_exit(t)


# ---------------------------------------------------------------- 3. learner killed and restarted
def test_3_learner_killed_resumes_from_its_last_checkpoint(topo):
    t = topo(dict(FAST, **{"learner.checkpoint_every_updates": 40}))
    for role in ("replay", "learner", "actor"):
        t.start(role, 0)
    ckpt = t.tmp / "run" / "checkpoint.pt"
    t.wait_for(lambda: ckpt.is_file() and counter(t, "learner", "apex_learner_updates_total") >= 100, 90,
               "learner past a checkpoint")
    sigkill(t, "learner.0")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state"]["learner"]
    saved_updates, saved_version = int(saved["updates"]), int(saved["weights_version"])
    assert saved_updates >= 40
    t.start("learner", 0)
    t.wait_for(lambda: "resumed from" in t.log("learner.0"), 60, "resume")
    line = [x for x in t.log("learner.0").splitlines() if "resumed from" in x][-1]
    assert f"{saved_updates} updates, weights v{saved_version}" in line, line
    # counters continue from the checkpoint, and actors adopt versions past it
    t.wait_for(lambda: counter(t, "learner", "apex_learner_updates_total") >= saved_updates + 20, 60,
               "updates continuing from the checkpoint")
    t.wait_for(lambda: counter(t, "actor", "apex_actor_weights_version") > saved_version, 60,
               "actor adopting post-restart weights")
    assert_clean_exit(t)


# ---------------------------------------------------------------- 4. fuzzing the replay socket
def fuzz_messages(n: int, seed: int = 0):
    """n malformed messages (each a list of ZMQ frames): garbage, truncated, oversized, wrong
    dtype, wrong shape, NaN, extra parts, multipart (protocol 1) messages."""
    rng = np.random.default_rng(seed)
    good = {"frames": np.zeros((3, 4), np.float32), "frame_stream": np.zeros(3, np.int32),
            "frame_seq": np.arange(3, dtype=np.int64), "stream": np.zeros(2, np.int32),
            "obs_seq": np.array([[0], [1]], np.int64), "next_seq": np.array([[1], [2]], np.int64),
            "action": np.zeros(2, np.int64), "reward": np.zeros(2, np.float32),
            "discount": np.ones(2, np.float32)}
    frames = Insert(actor_id=77, chunk=good).encode()
    out = []
    for i in range(n):
        k = i % 8
        if k == 0:
            out.append([rng.bytes(int(rng.integers(1, 300)))])  # random bytes
        elif k == 1:
            cut = [bytes(frames[0])[: int(rng.integers(1, len(frames[0])))]] + list(frames[1:])
            out.append([join_parts(cut)])  # cut header
        elif k == 2:
            whole = bytes(join_parts(frames))
            out.append([whole[: int(rng.integers(1, len(whole)))]])  # cut frame
        elif k == 3:
            out.append([Insert(actor_id=77, chunk=dict(good, action=np.zeros(2, np.float64))).to_frame()])  # dtype
        elif k == 4:
            out.append([Insert(actor_id=77, chunk=dict(good, frames=np.zeros((3, 5), np.float32))).to_frame()])
        elif k == 5:
            out.append([Insert(actor_id=77, chunk=dict(good, reward=np.array([np.nan, 1], np.float32))).to_frame()])
        elif k == 6:
            out.append([join_parts(list(frames) + [b"extra"] * int(rng.integers(1, 60)))])  # extra / too many parts
        else:
            out.append(list(frames))  # a multipart message (protocol 1)
    return out


def test_4_fuzzing_the_replay_socket_changes_nothing_and_counts_every_message(topo):
    t = topo(dict(FAST, **{"transport.max_message_bytes": 1 << 20}))
    for role in ("replay", "learner", "actor"):  # actors act once the learner has published weights
        t.start(role, 0)
    t.wait_for(lambda: counter(t, "replay", "apex_replay_inserted_total") > 500, 60, "good inserts")
    actor = t.procs.pop("actor.0")  # good data in, then the actor stops: the contents are fixed from here
    actor.send_signal(signal.SIGTERM)
    assert actor.wait(timeout=5) == 0
    time.sleep(0.5)
    before = t.metrics("replay")
    pid = t.procs["replay.0"].pid
    rss0 = rss_bytes(pid)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoints(t.cfg, t.run_id)["replay"])
    msgs = fuzz_messages(1000)
    for m in msgs:
        push.send_multipart(m)
    t.wait_for(lambda: t.metrics("replay").get("apex_replay_rejected_messages_total", 0) >= 1000, 60,
               "1000 rejections counted")
    push.send(b"\x00" * (2 << 20))  # over MAXMSGSIZE: ZMQ drops that connection, the server is unaffected
    push.close()
    ctx.term()
    time.sleep(0.5)
    after = t.metrics("replay")
    assert t.procs["replay.0"].poll() is None, t.log("replay.0")
    assert after["apex_replay_rejected_messages_total"] == 1000  # each counted once, by reason
    reasons = {k: v for k, v in after.items() if k.startswith("apex_replay_rejected_messages_total{") and v}
    assert len(reasons) >= 4, reasons
    for key in ("apex_replay_size", "apex_replay_inserted_total", "apex_replay_env_steps_total"):
        assert after[key] == before[key], key  # contents unchanged
    assert rss_bytes(pid) - rss0 < 64 << 20, "replay memory grew while fuzzed"
    assert_clean_exit(t)


# ---------------------------------------------------------------- 5. slow consumer
def test_5_stalled_replay_bounds_actor_memory_and_sigterm_still_works(topo):
    t = topo(dict(FAST))
    for role in ("replay", "learner", "actor"):
        t.start(role, 0)
    t.wait_for(lambda: counter(t, "replay", "apex_replay_inserted_total") > 500, 60, "inserts")
    replay = t.procs["replay.0"]
    os.kill(replay.pid, signal.SIGSTOP)  # the consumer stops reading: queues fill to the high-water mark
    try:
        pid = t.procs["actor.0"].pid
        time.sleep(1.5)
        rss0, blocked0 = rss_bytes(pid), counter(t, "actor", "apex_actor_send_blocked_seconds_total")
        time.sleep(4.0)
        blocked = counter(t, "actor", "apex_actor_send_blocked_seconds_total") - blocked0
        grew = rss_bytes(pid) - rss0
        print(f"stalled replay: actor blocked {blocked:.2f}s of 4s, RSS grew {grew / 2**20:.1f} MiB")
        assert grew < 16 << 20
        assert blocked > 2.0  # the stall shows in apex_actor_send_blocked_seconds_total while it lasts
        t0 = time.monotonic()
        t.procs["actor.0"].send_signal(signal.SIGTERM)
        assert t.procs["actor.0"].wait(timeout=3.0) == 0
        assert time.monotonic() - t0 < 3.0
        assert "stopping (signal SIGTERM)" in t.log("actor.0")
    finally:
        os.kill(replay.pid, signal.SIGCONT)
    assert_clean_exit(t)


# ---------------------------------------------------------------- 6. non-finite loss
def test_6_non_finite_losses_are_skipped_then_the_learner_stops_with_exit_3(topo):
    # lr 1e30: the first Adam step makes the net overflow, every loss after it is inf/nan
    t = topo(dict(FAST, **{"learner.lr": 1e30, "learner.max_nonfinite_in_row": 25, "learner.publish_every": 1,
                           "learner.checkpoint_every_updates": 1}))
    for role in ("replay", "learner", "actor"):
        t.start(role, 0)
    learner = t.procs["learner.0"]
    code = None
    end = time.monotonic() + 120
    while time.monotonic() < end and code is None:
        code = learner.poll()
        time.sleep(0.2)
    assert code == 3, (code, t.log("learner.0")[-2000:])
    log = t.log("learner.0")
    assert "non-finite" in log and "25" in log, log[-2000:]
    ckpt = torch.load(t.tmp / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)["state"]["learner"]
    for name, tensor in ckpt["online"].items():
        assert torch.isfinite(tensor).all(), f"non-finite {name} reached the checkpoint"
    del t.procs["learner.0"]
    assert_clean_exit(t)


# ---------------------------------------------------------------- 7. port already in use
@pytest.mark.parametrize("which", ["zmq", "metrics"])
def test_7_port_in_use_exits_within_3s_naming_the_port(topo, which):
    base = free_port_block()
    t = topo({"transport.kind": "tcp", "transport.base_port": base})
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", base if which == "zmq" else t.metrics_base))
    blocker.listen()
    try:
        t0 = time.monotonic()
        p = t.start("replay", 0)
        code = p.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        blocker.close()
    log = t.log("replay.0")
    port = base if which == "zmq" else t.metrics_base
    assert code == 4, log
    assert str(port) in log and "in use" in log, log
    print(f"port in use ({which}): exit {code} after {took:.2f}s (including interpreter start)")
    assert took < 15  # the process starts python + torch; the check itself is immediate
    assert t.leftovers() == []


# ---------------------------------------------------------------- 8. whole stack SIGKILLed
def test_8_clean_removes_a_killed_runs_leftovers_and_leaves_a_live_run_alone(topo):
    dead, live = topo(dict(FAST)), topo(dict(FAST))
    for t in (dead, live):
        for role in ("replay", "learner", "actor"):
            t.start(role, 0)
    for t in (dead, live):
        wait_growth(t, "learner", "apex_learner_updates_total", 10, 90, "updates")
    for name in list(dead.procs):
        sigkill(dead, name)
    assert dead.leftovers(), "SIGKILL should leave shared memory and sockets behind"
    out = subprocess.run([sys.executable, "-m", "apex_local.cli", "clean"], cwd=ROOT, env=live.env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert dead.run_id in out.stdout + out.stderr
    assert dead.leftovers() == []
    assert live.leftovers(), "clean removed a live run's files"
    wait_growth(live, "learner", "apex_learner_updates_total", 10, 60, "the live run still training")
    # the next start of a killed run needs no clean either: stale sockets and segments are replaced
    for role in ("replay", "learner", "actor"):
        dead.start(role, 0)
    wait_growth(dead, "learner", "apex_learner_updates_total", 10, 90, "killed run restarted without clean")
    assert_clean_exit(live)
    assert_clean_exit(dead)


# ---------------------------------------------------------------- security
def _listening_inodes() -> dict[int, str]:
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A":  # LISTEN
                out[int(f[9])] = f[1]
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net shows them


@pytest.mark.parametrize("kind", ["ipc", "tcp"])
def test_nothing_listens_beyond_loopback_and_ipc_files_are_private(topo, kind):
    t = topo(dict(FAST, **{"transport.kind": kind, "transport.base_port": free_port_block()}))
    for role in ("replay", "learner", "actor", "evaluator"):
        t.start(role, 0)
    wait_growth(t, "learner", "apex_learner_updates_total", 5, 90, "updates")
    listening = _listening_inodes()
    found = []
    for name, p in t.procs.items():
        for inode in _socket_inodes(p.pid) & listening.keys():
            addr, port = listening[inode].split(":")
            found.append((name, addr, int(port, 16)))
            assert addr in LOOPBACK, f"{name} listens on {listening[inode]} (not loopback)"
    ports = {port for _, _, port in found}
    assert any(p == t.metrics_base for p in ports)  # the metrics endpoints were seen, on loopback
    if kind == "tcp":
        assert t.cfg.transport.base_port in ports
    else:
        from apex_local.transport.rundir import ipc_base

        d = ipc_base(t.cfg.transport.ipc_dir) / t.run_id
        assert d.stat().st_mode & 0o777 == 0o700
        assert {p.name for p in d.iterdir()} >= {"replay.sock", "replay_sample.sock"}
    assert_clean_exit(t)


def test_the_wire_has_no_pickle_and_decoding_is_bounded():
    import apex_local.transport.codec as codec
    import apex_local.transport.protocol as protocol

    for mod in (codec, protocol):
        src = open(mod.__file__).read()
        assert "import pickle" not in src and "pickle.loads" not in src and "allow_pickle=True" not in src
    assert "max_str_len" in open(codec.__file__).read()  # msgpack limits on every header
