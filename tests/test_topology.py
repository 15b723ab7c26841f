"""Ape-X as real processes: replay + learner + actors + evaluator, through plain subprocesses
and through honcho; bad messages on the replay socket; clean shutdown."""
from __future__ import annotations

import os
import shutil
import signal
import time

import numpy as np
import pytest
import zmq

from apex_local.transport import Insert, InsertRef, endpoints
from apex_local.transport.codec import join_parts

pytestmark = pytest.mark.timeout(420)


def test_apex_processes_learn_and_exit_cleanly_on_sigint(topo):
    t = topo({"run.max_env_steps": 10**9, "actor.eval_episodes": 5})
    for role, idx in (("replay", 0), ("learner", 0), ("actor", 0), ("actor", 1), ("evaluator", 0)):
        t.start(role, idx)
    t.wait_for(lambda: t.metrics("replay").get("apex_replay_size", 0) >= t.cfg.replay.min_size, 90, "replay fill")
    t.wait_for(lambda: t.metrics("learner").get("apex_learner_updates_total", 0) > 50, 90, "learner updates")
    first = {i: t.metrics("actor", i).get("apex_actor_weights_version", 0) for i in (0, 1)}
    for i in (0, 1):  # each actor adopts newer weights
        t.wait_for(lambda: t.metrics("actor", i).get("apex_actor_weights_version", 0) > first[i] + 5, 60,
                   f"actor {i} adopting newer weights")
    best = t.wait_for(lambda: (r := t.metrics("evaluator").get("apex_evaluator_return", 0)) >= 150 and r, 300,
                      "evaluation return >= 150 (random CartPole play scores ~22)", interval=1.0)
    print(f"evaluation return {best}")
    assert t.metrics("replay").get("apex_replay_sampled_total", 0) > 0
    # CartPole's ~3 KiB messages go inline (transport.insert_ring_min_kb: 64): no ring taken
    assert t.metrics("replay").get("apex_replay_ring_messages_total", 1) == 0
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"apex_{t.run_id}_ins_")]

    codes = t.stop(signal.SIGINT, timeout=3.0)
    assert all(code == 0 for code, _ in codes.values()), (codes, t.dump())
    assert max(s for _, s in codes.values()) < 3.0, codes
    assert t.leftovers() == []
    assert (t.tmp / "run" / "checkpoint.pt").is_file()  # final checkpoint on SIGINT


@pytest.mark.skipif(shutil.which("honcho") is None, reason="honcho not installed")
def test_honcho_start_runs_to_max_env_steps_and_exits_0(topo):
    t = topo({"run.max_env_steps": 12_000, "replay.min_size": 500})
    code, text = t.run_honcho("actor=2")
    assert code == 0, text[-4000:]
    assert "actor.1" in text and "actor.2" in text
    assert "stopping (reached" in text, text[-4000:]
    assert t.leftovers() == []


def _garbage(cfg, spec_frame_shape):
    good_frames = np.zeros((2, *spec_frame_shape), np.float32)
    chunk = {"frames": good_frames, "frame_stream": np.zeros(2, np.int32), "frame_seq": np.arange(2, dtype=np.int64),
             "stream": np.zeros(1, np.int32), "obs_seq": np.zeros((1, 1), np.int64),
             "next_seq": np.ones((1, 1), np.int64), "action": np.zeros(1, np.int64),
             "reward": np.zeros(1, np.float32), "discount": np.ones(1, np.float32)}
    wrong_shape = dict(chunk, frames=np.zeros((2, 7), np.float32))
    nan = dict(chunk, reward=np.array([np.nan], np.float32))
    wrong_dtype = dict(chunk, action=np.zeros(1, np.float64))
    return {
        "bad_header": [[b"\x00garbage"], [join_parts([b"\xff" * 100])]],
        "frame_count": [[b"\xff" * 100, b"x"], Insert(actor_id=9, chunk=chunk).encode()],  # multipart: protocol 1
        "bad_shape": [[Insert(actor_id=9, chunk=wrong_shape).to_frame()]],
        "non_finite": [[Insert(actor_id=9, chunk=nan).to_frame()]],
        "bad_dtype": [[Insert(actor_id=9, chunk=wrong_dtype).to_frame()]],
        # references into insert rings: a path for a ring id, a ring nobody made, and the good
        # actor's ring with a made-up nonce (it must not disturb that actor's own references)
        "bad_ref": [[InsertRef(ring="../../etc/passwd", nonce=1, start=0, nbytes=64, end=64).to_frame()]],
        "stale_ref": [[InsertRef(ring="nosuch", nonce=1, start=0, nbytes=64, end=64).to_frame()],
                      [InsertRef(ring="actor0", nonce=12345, start=0, nbytes=64, end=64).to_frame()]],
    }


@pytest.mark.parametrize("kind", ["ipc", "tcp"])
def test_replay_drops_bad_messages_while_a_good_actor_continues(topo, kind):
    from service_harness import free_port_block

    t = topo({"run.max_env_steps": 10**9, "transport.max_message_bytes": 1 << 20, "transport.kind": kind,
              "transport.insert_ring_min_kb": 0,  # CartPole's ~3 KiB messages through the ring too
              "transport.base_port": free_port_block()})
    for role in ("replay", "learner", "actor"):
        t.start(role, 0)
    t.wait_for(lambda: t.metrics("replay").get("apex_replay_inserted_total", 0) > 0, 90, "first inserts")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoints(t.cfg, t.run_id)["replay"])
    cases = _garbage(t.cfg, (4,))
    for _ in range(20):
        for frames_list in cases.values():
            for frames in frames_list:
                push.send_multipart(frames)
    push.send(b"\x00" * (2 << 20))  # over MAXMSGSIZE: ZMQ drops the connection, server unaffected
    before = t.metrics("replay").get("apex_replay_inserted_total", 0)
    for reason in cases:
        t.wait_for(lambda: t.metrics("replay").get(
            f'apex_replay_rejected_messages_total{{index="0",reason="{reason}",role="replay"}}', 0) >= 20, 30,
            f"rejections counted as {reason}")
    t.wait_for(lambda: t.metrics("replay").get("apex_replay_inserted_total", 0) > before + 200, 60,
               "good inserts continuing")
    # the actor's inserts came through its shared-memory insert ring (ipc, and tcp on loopback)
    assert t.metrics("replay").get("apex_replay_ring_messages_total", 0) > 0, t.dump()
    assert "apex_actor_ring_full_total" in t.metrics("actor")  # exported from the start (0 while there is room)
    push.close()
    ctx.term()
    codes = t.stop(signal.SIGTERM)
    assert all(code == 0 for code, _ in codes.values()), (codes, t.dump())
    assert t.leftovers() == []


def test_pong_pixels_flow_through_shared_memory(topo):
    """The Atari path: uint8 84x84 frames stored once in shm replay, Nature-CNN learner, actor on
    AtariVectorEnv. Tiny sizes; checks plumbing, not learning."""
    t = topo({"replay.capacity": 4000, "replay.min_size": 300, "learner.batch_size": 16, "learner.prefetch": 2,
              "actor.sync_every": 20, "run.max_env_steps": 10**9, "env.num_envs": 2},
             base="configs/apex_pong.yaml")
    for role in ("replay", "learner", "actor"):
        t.start(role, 0)
    t.wait_for(lambda: t.metrics("learner").get("apex_learner_updates_total", 0) >= 20, 180, "Pong learner updates")
    t.wait_for(lambda: t.metrics("actor").get("apex_actor_weights_version", 0) >= 2, 60, "actor adopting weights")
    rep = t.metrics("replay")
    assert rep.get("apex_replay_rejected_messages_total", 0) == 0, t.dump()
    assert rep["apex_replay_size"] >= 300
    assert rep["apex_replay_ring_messages_total"] > 0  # the frames came through the actor's insert ring
    codes = t.stop(signal.SIGTERM)
    assert all(code == 0 for code, _ in codes.values()), (codes, t.dump())
    assert t.leftovers() == []


def test_actor_survives_env_errors_and_keeps_sending(topo):
    t = topo({"env.id": "tests.flaky_env:FlakyCartPole", "env.kwargs": {"fail_every": 400},
              "run.max_env_steps": 10**9, "replay.samples_per_insert": 0})
    for role in ("replay", "learner", "actor"):
        t.start(role, 0)
    t.wait_for(lambda: t.metrics("actor").get("apex_actor_env_errors_total", 0) >= 2, 120, "two env errors")
    before = t.metrics("replay").get("apex_replay_inserted_total", 0)
    t.wait_for(lambda: t.metrics("replay").get("apex_replay_inserted_total", 0) > before + 500, 60,
               "inserts continuing after the errors")
    assert "simulated emulator crash" in t.log("actor.0")
    codes = t.stop(signal.SIGTERM)
    assert all(code == 0 for code, _ in codes.values()), (codes, t.dump())
    assert t.leftovers() == []


@pytest.mark.skipif(shutil.which("honcho") is None, reason="honcho not installed")
def test_sigint_to_honcho_stops_every_process_with_0_within_3s(topo):
    """Fault 9 (docs/reliability.md): Ctrl-C in the terminal reaches honcho, which SIGTERMs
    each process group and SIGKILLs whatever is left after 5 s; none may be left."""
    t = topo({"run.max_env_steps": 10**9, "replay.min_size": 300, "learner.checkpoint_every_seconds": 0})
    p = t.start_honcho("actor=2")
    try:
        t.wait_for(lambda: t.metrics("learner").get("apex_learner_updates_total", 0) >= 20, 120, "learner updates")
        t.wait_for(lambda: t.metrics("evaluator").get("apex_evaluator_episodes_total", 0) >= 1, 60, "an evaluation")
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        code = p.wait(timeout=15)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = t.honcho_log()
    stopped = [line for line in text.splitlines() if "stopped (rc=" in line]
    print(f"SIGINT to honcho: honcho exit {code} after {took:.2f}s; "
          + "; ".join(s.split("|", 1)[1].strip() for s in stopped))
    assert len(stopped) == 6, text[-3000:]  # replay, learner, 2 actors, evaluator, paramserver
    assert all("stopped (rc=0)" in s for s in stopped), text[-3000:]
    assert "SIGKILL" not in text, text[-3000:]
    assert took < 3.0, (took, text[-3000:])
    assert (t.tmp / "run" / "checkpoint.pt").is_file()  # the final one: periodic checkpoints are off
    assert "stopping (signal SIGTERM); checkpoint" in text
    assert t.leftovers() == []
