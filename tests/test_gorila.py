"""Gorila (Nair et al. 2015): the parameter server's asynchronous SGD in-process (bit-equal to the
same optimizer steps taken sequentially, staleness rules, non-finite gradients, checkpoints), the
service on real sockets, and the whole topology as processes (learns CartPole, survives a killed
learner, exits cleanly; launched by honcho). The same with a local replay per learner
(``learner.gorila_replay: local``): validation of inserts, actor -> learner routing, run end at
the parameter server."""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch
import zmq

from service_harness import ROOT

from apex_local.agents.builders import make_learner
from apex_local.agents.checkpoint import load_checkpoint, save_checkpoint
from apex_local.config import ConfigError, config_from_dict, load_config, replace
from apex_local.envs import env_spec
from apex_local.metrics import Recorder
from apex_local.networks import flat_parameters, make_network
from apex_local.roles.paramserver import (ParameterServer, ParamServerService, flat_gradients, learner_label,
                                          num_flat_gradients, set_flat_gradients)
from apex_local.transport import Gradients, WeightsBoard, endpoints, segment_name

pytestmark = pytest.mark.timeout(420)

GORILA = ROOT / "configs" / "gorila_cartpole.yaml"


def _cfg(**overrides):
    return replace(load_config(GORILA), **overrides)


def _batch(seed: int, n: int = 32) -> dict:
    rng = np.random.default_rng(seed)
    return {"obs": rng.normal(size=(n, 1, 4)).astype(np.float32), "action": rng.integers(0, 2, n).astype(np.int64),
            "reward": rng.normal(size=n).astype(np.float32), "discount": np.full(n, 0.97, np.float32),
            "next_obs": rng.normal(size=(n, 1, 4)).astype(np.float32)}


def _grads(learner, seed: int) -> np.ndarray:
    result, ok = learner.compute_gradients(learner.to_batch(_batch(seed)))
    assert ok
    return flat_gradients(learner.online)


def _params(net) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- flat gradient layout

NETS = {
    "mlp": ({"torso": "mlp", "hidden_sizes": (8, 8), "head_hidden": 0}, (1, 4), np.float32),
    "dueling_noisy": ({"torso": "mlp", "hidden_sizes": (8,), "dueling": True, "noisy": True}, (1, 4), np.float32),
    "c51": ({"torso": "mlp", "hidden_sizes": (8,), "categorical": True, "num_atoms": 5}, (1, 4), np.float32),
    "lstm": ({"torso": "mlp", "hidden_sizes": (8,), "lstm_size": 6}, (1, 4), np.float32),
    "nature_cnn": ({"torso": "nature_cnn"}, (4, 84, 84), np.uint8),
}


@pytest.mark.parametrize("kind", list(NETS))
def test_gradient_layout_is_flat_parameters_order_without_buffers(kind):
    net_over, obs_shape, dtype = NETS[kind]
    cfg = config_from_dict({"network": net_over, "actor": {"exploration": "none" if net_over.get("noisy") else "linear"}})
    net = make_network(cfg.network, obs_shape, dtype, 3)
    names = [k for k, _ in net.named_parameters()]
    assert [k for k in net.state_dict() if k in set(names)] == names  # same order as flat_parameters
    # each parameter's slice of the gradient vector == its slice of the board vector (buffers skipped)
    flat_w = flat_parameters(net).numpy()
    pos_w, pos_g, sd = 0, 0, net.state_dict()
    params = dict(net.named_parameters())
    for k, v in sd.items():
        if not v.is_floating_point():
            continue
        n = v.numel()
        if k in params:
            for i, p in enumerate(net.parameters()):
                p.grad = torch.full_like(p, float(i))
            g = flat_gradients(net)
            idx = names.index(k)
            np.testing.assert_array_equal(g[pos_g:pos_g + n], np.full(n, float(idx), np.float32))
            np.testing.assert_array_equal(flat_w[pos_w:pos_w + n], params[k].detach().reshape(-1).numpy())
            pos_g += n
        pos_w += n
    assert pos_g == num_flat_gradients(net)
    g = np.random.default_rng(0).normal(size=pos_g).astype(np.float32)
    set_flat_gradients(net, g)
    np.testing.assert_array_equal(flat_gradients(net), g)


# --------------------------------------------------------------------------- asynchronous SGD

@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_two_learners_equal_the_same_optimizer_steps_taken_sequentially(optimizer):
    cfg = _cfg(**{"learner.optimizer": optimizer, "learner.target_update_period": 2})
    spec = env_spec(cfg.env)
    ps = ParameterServer(cfg, spec)
    a, b, ref = make_learner(cfg, spec), make_learner(cfg, spec), make_learner(cfg, spec)
    assert _same(_params(ps.master), _params(a.online)) and _same(_params(a.online), _params(ref.online))

    def ref_step(learner):  # the reference: one optimizer step with exactly that learner's gradients
        for p_ref, p in zip(ref.online.parameters(), learner.online.parameters()):
            p_ref.grad = p.grad.clone()
        ref.optimizer.step()

    # both learners compute on v1; A's arrives first (staleness 0), B's second (staleness 1)
    ga, gb = _grads(a, 1), _grads(b, 2)
    assert ps.apply(ga, 1, "0") and ps.version == 2
    assert ps.apply(gb, 1, "1") and ps.version == 3
    ref_step(a)
    ref_step(b)
    assert _same(_params(ps.master), _params(ref.online))
    assert _same(_params(ps.target), _params(ref.online))  # target synced after 2 applied updates
    # A refreshes its parameters (v3) and pushes again
    a.load_flat_weights(ps.flat_master())
    ga = _grads(a, 3)
    assert ps.apply(ga, 3, "0")
    ref_step(a)
    assert _same(_params(ps.master), _params(ref.online))
    assert not _same(_params(ps.target), _params(ref.online))
    assert ps.applied == 3 and ps.received == {"0": 2, "1": 1}


STALE = [
    # policy, bound, staleness, applied, scale
    ("drop", 2, 0, True, 1.0),
    ("drop", 2, 2, True, 1.0),
    ("drop", 2, 3, False, None),
    ("drop", 2, -1, False, None),  # computed on a version the master never had (it restarted older)
    ("downweight", 2, 2, True, 1.0),
    ("downweight", 2, 3, True, 1 / 4),
    ("downweight", 0, 5, True, 1 / 6),
    ("downweight", 2, -1, False, None),
]


@pytest.mark.parametrize("policy,bound,staleness,applied,scale", STALE)
def test_stale_gradients_follow_the_policy(policy, bound, staleness, applied, scale):
    cfg = _cfg(**{"learner.gorila_stale_policy": policy, "learner.gorila_staleness_bound": bound,
                  "learner.publish_every": 1})
    spec = env_spec(cfg.env)
    ps, learner, ref = ParameterServer(cfg, spec), make_learner(cfg, spec), make_learner(cfg, spec)
    g = _grads(learner, 7)
    ps.version = 10
    before = _params(ps.master)
    assert ps.apply(g, 10 - staleness, "0") is applied
    if not applied:
        assert ps.dropped["stale"] == 1 and ps.version == 10 and _same(_params(ps.master), before)
        return
    assert ps.version == 11 and ps.dropped["stale"] == 0
    set_flat_gradients(ref.online, g, scale)
    ref.optimizer.step()
    assert _same(_params(ps.master), _params(ref.online))
    if scale != 1.0:  # and the scale mattered
        unscaled = make_learner(cfg, spec)
        set_flat_gradients(unscaled.online, g)
        unscaled.optimizer.step()
        assert not _same(_params(ps.master), _params(unscaled.online))


@pytest.mark.parametrize("bad,reason", [("nan", "non_finite"), ("inf", "non_finite"), ("short", "bad_message"),
                                        ("2d", "bad_message")])
def test_non_finite_and_malformed_gradients_are_dropped_and_counted(bad, reason):
    cfg = _cfg()
    ps = ParameterServer(cfg, env_spec(cfg.env))
    g = np.zeros(ps.num_params, np.float32)
    g = {"nan": np.where(np.arange(g.size) == 3, np.nan, g), "inf": np.where(np.arange(g.size) == 5, -np.inf, g),
         "short": g[:-1], "2d": g.reshape(1, -1)}[bad]
    before = _params(ps.master)
    assert ps.apply(g, 1, "0") is False
    assert ps.dropped[reason] == 1 and sum(ps.dropped.values()) == 1
    assert ps.version == 1 and ps.applied == 0 and _same(_params(ps.master), before)


def test_checkpoint_round_trip_restores_master_target_optimizer_and_counters(tmp_path):
    cfg = _cfg(**{"learner.target_update_period": 3})
    spec = env_spec(cfg.env)
    ps, learner = ParameterServer(cfg, spec), make_learner(cfg, spec)
    for i in range(4):
        ps.apply(_grads(learner, i), ps.version, str(i % 2))
    ps.apply(np.full(ps.num_params, np.nan, np.float32), ps.version, "1")
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"config": cfg.to_dict(), **ps.state_dict()})
    again = ParameterServer(cfg, spec)
    again.load_state_dict(load_checkpoint(path))
    assert (again.version, again.target_version, again.applied) == (5, 4, 4)
    assert again.dropped == ps.dropped and again.received == ps.received
    assert _same(_params(again.master), _params(ps.master)) and _same(_params(again.target), _params(ps.target))
    g = _grads(learner, 99)  # the optimizer state came back too: the next step is identical
    ps.apply(g, ps.version)
    again.apply(g, again.version)
    assert _same(_params(again.master), _params(ps.master))
    from apex_local.api import evaluate  # the checkpoint is Learner-compatible: `apex-local eval` reads it

    assert evaluate(cfg, path, episodes=1)["episodes"] == 1


def test_config_refuses_a_bound_that_could_drop_every_gradient():
    with pytest.raises(ConfigError, match="gorila_staleness_bound"):
        _cfg(**{"learner.gorila_staleness_bound": 3, "learner.publish_every": 10})
    _cfg(**{"learner.gorila_staleness_bound": 3, "learner.publish_every": 10,
            "learner.gorila_stale_policy": "downweight"})
    with pytest.raises(ConfigError, match="gorila_stale_policy"):
        _cfg(**{"learner.gorila_stale_policy": "ignore"})
    with pytest.raises(ConfigError, match="gorila_sync_every"):
        _cfg(**{"learner.gorila_sync_every": 0})
    assert learner_label("learner.3") == "3" and learner_label("x" * 60) == "other"


# --------------------------------------------------------------------------- service pieces in-process

def test_gorila_learner_sets_every_attribute_the_apex_learner_sets(tmp_path):
    from apex_local.roles.gorila_learner import GorilaLearnerService
    from apex_local.roles.learner_loop import LearnerService

    cfg = _cfg(**{"run.dir": str(tmp_path / "run")})
    spec, rid = env_spec(cfg.env), "g" + uuid.uuid4().hex[:10]
    apex = LearnerService(cfg, rid, spec, resume=False, log=lambda m: None)
    try:
        base = set(vars(apex))
    finally:
        apex.close()
    gorila = GorilaLearnerService(cfg, rid, spec, 1, log=lambda m: None)
    try:
        assert base - set(vars(gorila)) == set()
    finally:
        gorila.close()
        shutil.rmtree(endpoints(cfg, rid)["replay"][len("ipc://"):].rsplit("/", 1)[0], ignore_errors=True)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"apex_{rid}_")]


def test_paramserver_service_applies_publishes_and_counts_bad_messages(tmp_path):
    cfg = _cfg(**{"run.dir": str(tmp_path / "run"), "learner.publish_every": 2, "learner.target_update_period": 3})
    spec, rid, rec = env_spec(cfg.env), "g" + uuid.uuid4().hex[:10], Recorder()
    svc = ParamServerService(cfg, rid, spec, rec, log=lambda m: None)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoints(cfg, rid)["paramserver"])
    try:
        board = WeightsBoard.attach(segment_name(rid, "weights"))
        assert board.version == 1
        n = svc.core.num_params
        good = np.full(n, 0.01, np.float32)
        for v in (1, 2, 3):
            push.send(Gradients(sender="learner.0", weights_version=v, batch_size=4, grad=good).to_frame())
        push.send(Gradients(sender="learner.1", grad=np.full(n, np.nan, np.float32)).to_frame())
        push.send(Gradients(sender="learner.1", grad=good[:-2]).to_frame())
        push.send_multipart([b"\x00garbage"])
        push.send(Gradients(sender="learner.1", weights_version=1, grad=good).to_frame())  # stale 3 <= 32
        end = time.monotonic() + 10
        while time.monotonic() < end and sum(svc.core.received.values()) + sum(svc.core.dropped.values()) < 7:
            svc.step(50)
        assert svc.core.applied == 4 and svc.core.version == 5
        assert rec.get("apex_paramserver_gradients_applied_total") == 4
        assert rec.get("apex_paramserver_gradients_dropped_total", reason="non_finite") == 1
        assert rec.get("apex_paramserver_gradients_dropped_total", reason="bad_message") == 2
        assert rec.get("apex_paramserver_gradients_received_total", learner="0") == 3
        assert board.version == 5  # published every 2 applied updates
        buf = np.empty(board.numel, np.float32)
        assert board.read(buf) == 5
        np.testing.assert_array_equal(buf, svc.core.flat_master())
        target = WeightsBoard.attach(segment_name(rid, "target"))
        assert target.version == 4
        target.close()
        board.close()
        svc.checkpoint()
        assert "paramserver" in load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    finally:
        push.close()
        ctx.term()
        svc.close()
        shutil.rmtree(endpoints(cfg, rid)["replay"][len("ipc://"):].rsplit("/", 1)[0], ignore_errors=True)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"apex_{rid}_")]
    again = ParamServerService(cfg, rid, spec, log=lambda m: None)  # resumes
    try:
        assert again.core.version == 5 and again.core.applied == 4
    finally:
        again.close()
        shutil.rmtree(endpoints(cfg, rid)["replay"][len("ipc://"):].rsplit("/", 1)[0], ignore_errors=True)


def _service(role: str, *args: str, config=None, timeout=60):
    env = dict(os.environ, APEX_CONFIG=str(config or ROOT / "configs" / "apex_cartpole.yaml"),
               APEX_RUN_ID="g" + uuid.uuid4().hex[:10], PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", f"services.{role}", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_apex_learner_with_index_above_0_exits_2():
    p = _service("learner", "--index", "1")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 2, out
    assert "exactly one learner" in out and "gorila" in out


def test_paramserver_idles_for_other_methods_and_exits_0_on_sigterm():
    p = _service("paramserver")
    line = p.stdout.readline()
    assert "idle" in line and "'apex'" in line, line
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=3) == 0 and time.monotonic() - t0 < 3


# --------------------------------------------------------------------------- processes

@pytest.fixture
def topo(topo):
    """conftest's `topo`, with the Gorila CartPole config as the default base."""
    return functools.partial(topo, base="configs/gorila_cartpole.yaml")


def test_gorila_learns_survives_a_killed_learner_and_exits_cleanly(topo):
    t = topo({"run.max_env_steps": 10**9, "actor.eval_episodes": 5})
    for role, idx in (("replay", 0), ("paramserver", 0), ("learner", 0), ("learner", 1), ("actor", 0), ("actor", 1),
                      ("evaluator", 0)):
        t.start(role, idx)
    applied = lambda: t.metrics("paramserver").get("apex_paramserver_gradients_applied_total", 0)  # noqa: E731
    recv = lambda j: t.metrics("paramserver").get(  # noqa: E731
        f'apex_paramserver_gradients_received_total{{index="0",learner="{j}",role="paramserver"}}', 0)
    t.wait_for(lambda: recv(0) > 20 and recv(1) > 20, 120, "gradients from both learners")
    # random play scores ~22, the (seeded) initial weights ~88 on the evaluation seeds
    best = t.wait_for(lambda: (r := t.metrics("evaluator").get("apex_evaluator_return", 0)) >= 150 and r, 240,
                      "evaluation return >= 150", interval=1.0)
    assert t.metrics("evaluator").get("apex_evaluator_weights_version", 0) > 100  # trained weights, not v1
    print(f"evaluation return {best}")
    assert t.metrics("learner", 1).get("apex_learner_gradients_sent_total", 0) > 0

    t.procs["learner.1"].send_signal(signal.SIGKILL)  # one learner dies: the others go on
    t.procs["learner.1"].wait(timeout=5)
    del t.procs["learner.1"]
    time.sleep(1.0)
    a0, r1 = applied(), recv(1)
    t.wait_for(lambda: applied() > a0 + 200, 90, "applied updates continuing without learner 1")
    assert recv(1) <= r1 + 64  # at most what was queued when it died
    t.start("learner", 1)  # a restarted learner pulls the newest parameters and rejoins
    t.wait_for(lambda: recv(1) > r1 + 100, 90, "the restarted learner's gradients")

    codes = t.stop(signal.SIGINT, timeout=3.0)
    assert all(code == 0 for code, _ in codes.values()), (codes, t.dump())
    assert max(s for _, s in codes.values()) < 3.0, codes
    assert t.leftovers() == []
    state = load_checkpoint(t.tmp / "run" / "checkpoint.pt")  # the paramserver's final checkpoint
    assert state["paramserver"]["applied"] >= a0 + 200


@pytest.mark.skipif(shutil.which("honcho") is None, reason="honcho not installed")
def test_honcho_starts_gorila_with_two_learners_and_exits_0(topo):
    t = topo({"run.max_env_steps": 12_000, "replay.min_size": 500})
    code, text = t.run_honcho("actor=2,learner=2")
    assert code == 0, text[-4000:]
    assert "learner.1" in text and "learner.2" in text and "paramserver.1" in text
    assert "stopping (reached" in text and "applied updates, checkpoint" in text, text[-4000:]
    assert t.leftovers() == []


# --------------------------------------------------------------------------- local replay per learner

LOCAL = ROOT / "configs" / "gorila_cartpole_local.yaml"


def _local_cfg(**overrides):
    return replace(load_config(LOCAL), **overrides)


def test_config_local_replay_is_gorila_only_and_a_known_choice():
    assert _local_cfg().learner.gorila_replay == "local" and _cfg().learner.gorila_replay == "shared"
    with pytest.raises(ConfigError, match="gorila_replay 'local' needs run.method: gorila"):
        replace(load_config(ROOT / "configs" / "apex_cartpole.yaml"), **{"learner.gorila_replay": "local"})
    with pytest.raises(ConfigError, match="gorila_replay.*did you mean 'local'"):
        _cfg(**{"learner.gorila_replay": "locl"})


def _chunks(n_chunks: int, steps: int = 20) -> list[dict]:
    """Consecutive insert chunks of one CartPole-like actor (1 env, n=3): chunk k+1's first items
    refer to frames sent in chunk k (frames are sent once)."""
    from apex_local.replay.accumulators import NStepAccumulator

    acc = NStepAccumulator(num_envs=1, n=3, gamma=0.99, frame_stack=1, frame_shape=(4,), frame_dtype=np.float32)
    rng = np.random.default_rng(0)
    acc.reset(rng.normal(size=(1, 1, 4)).astype(np.float32))
    out = []
    for _ in range(n_chunks):
        for _ in range(steps):
            nxt = rng.normal(size=(1, 1, 4)).astype(np.float32)
            acc.step(np.array([1]), np.array([1.0]), np.array([False]), np.array([False]), nxt, nxt)
        out.append(acc.flush())
    return out


def test_local_replay_validates_inserts_like_the_replay_server_and_counts_drops_by_reason(tmp_path):
    from apex_local.roles.gorila_replay import LocalReplay, learner_replay_endpoint
    from apex_local.transport import Insert, new_context

    cfg = _local_cfg(**{"run.dir": str(tmp_path / "run"), "replay.min_size": 10, "replay.samples_per_insert": 0})
    spec, rid, rec = env_spec(cfg.env), "g" + uuid.uuid4().hex[:10], Recorder()
    ctx = new_context()
    local = LocalReplay(cfg, rid, spec, 1, ctx, rec, log=lambda m: None)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(learner_replay_endpoint(cfg, rid, 1))
    assert local.endpoint == learner_replay_endpoint(cfg, rid, 1) and local.endpoint.endswith("gorila_replay.1.sock")
    try:
        c0, c1 = _chunks(2)
        ins = lambda c, steps: Insert(sender="actor.0", actor_id=0, env_steps=steps, chunk=c).to_frame()  # noqa: E731
        push.send(ins(c0, 20))
        backwards = dict(c1, frame_seq=c1["frame_seq"][::-1].copy())  # well-formed arrays, seqs not increasing
        push.send(ins(backwards, 20))  # refused by the table as a whole: bad_chunk
        push.send_multipart([b"\x00garbage"])  # bad_header
        push.send(Gradients(sender="learner.0", grad=np.zeros(3, np.float32)).to_frame())  # unknown_kind
        wrong = dict(c1, action=c1["action"].astype(np.float32))  # bad_dtype, refused before the table sees it
        push.send(ins(wrong, 20))
        push.send(ins(c1, 20))  # still fine: nothing of the bad messages was stored
        end = time.monotonic() + 10
        while time.monotonic() < end and local.replay.inserted < len(c0["action"]) + len(c1["action"]):
            local.wait(50)
            local.drain()
        assert local.replay.inserted == len(c0["action"]) + len(c1["action"]) == rec.get(
            "apex_learner_replay_inserted_total")
        assert local.env_steps == 40 == rec.get("apex_learner_replay_env_steps_total")
        assert local.rejected == {"bad_chunk": 1, "bad_header": 1, "unknown_kind": 1, "bad_dtype": 1}
        for reason, n in local.rejected.items():
            assert rec.get("apex_learner_replay_rejected_messages_total", reason=reason) == n
        assert rec.get("apex_learner_replay_size") == local.replay.size > 0
        batch = local.sample(8, 0.4)  # the keys of a replay-server batch slot
        assert set(batch) >= {"obs", "action", "reward", "discount", "next_obs", "weight", "index", "generation"}
        assert local.info()["size"] == local.replay.size
    finally:
        push.close()
        local.close()
        ctx.term()
    assert not os.path.exists(local.endpoint[len("ipc://"):])  # the socket file is removed
    shutil.rmtree(endpoints(cfg, rid)["replay"][len("ipc://"):].rsplit("/", 1)[0], ignore_errors=True)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"apex_{rid}_")]  # process memory only


def test_actor_route_follows_the_live_learners_from_their_pid_files():
    from apex_local.roles.gorila_replay import LearnerRoute, insert_route, learner_replay_endpoint
    from apex_local.transport.rundir import _stat, run_paths

    cfg, rid = _local_cfg(), "g" + uuid.uuid4().hex[:10]
    paths = run_paths(cfg, rid)
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(3)]
    try:
        assert insert_route(_cfg(), rid, 0) is None  # shared replay: actors feed the replay server
        routes = [LearnerRoute(cfg, rid, i, check_every=0) for i in range(3)]
        assert [r.learner for r in routes] == [0, 0, 0]  # no learner up yet: learner 0's endpoint

        def pid_file(j, p):
            paths.pid_file("learner", j).write_text(f"{p.pid} {_stat(p.pid)[1]}\n")

        pid_file(0, sleepers[0])
        pid_file(1, sleepers[1])
        (paths.ipc_dir / "learner.7.pid").write_text("garbage")  # unreadable: ignored
        (paths.ipc_dir / "learner.8.pid").write_text("999999999 1\n")  # no such process: ignored
        assert [r.moved() for r in routes] == [True, True, True]  # learner 0 became a live process
        assert [r.learner for r in routes] == [0, 1, 0]  # actor i -> live[i mod 2]
        assert [r.endpoint for r in routes] == [learner_replay_endpoint(cfg, rid, j) for j in (0, 1, 0)]
        assert [r.moved() for r in routes] == [False, False, False]
        sleepers[1].kill()  # learner 1 dies: its actor moves to learner 0
        sleepers[1].wait()
        assert [r.moved() for r in routes] == [False, True, False] and routes[1].learner == 0
        pid_file(1, sleepers[2])  # learner 1 restarted (a new process): actor 1 goes back to it
        assert [r.moved() for r in routes] == [False, True, False] and routes[1].learner == 1
        slow = LearnerRoute(cfg, rid, 1, check_every=60)
        sleepers[2].kill()
        sleepers[2].wait()
        assert not slow.moved() and slow.learner == 1  # checks at most every check_every seconds
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
        shutil.rmtree(paths.ipc_dir, ignore_errors=True)


def test_paramserver_sums_reported_env_steps_ends_local_runs_and_restarts_finished_ones(tmp_path):
    from apex_local.transport import send_message

    cfg = _local_cfg(**{"run.dir": str(tmp_path / "run"), "run.max_env_steps": 1000})
    spec, rid, rec = env_spec(cfg.env), "g" + uuid.uuid4().hex[:10], Recorder()
    svc = ParamServerService(cfg, rid, spec, rec, log=lambda m: None)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoints(cfg, rid)["paramserver"])
    try:
        n = svc.core.num_params
        good = np.full(n, 0.01, np.float32)
        send_message(push, Gradients(sender="learner.0", weights_version=1, env_steps=600, grad=good))
        send_message(push, Gradients(sender="learner.1", weights_version=0, env_steps=300, grad=good))  # stale
        end = time.monotonic() + 10
        while time.monotonic() < end and sum(svc.core.received.values()) < 2:
            svc.step(50)
        assert svc.core.env_steps == 900 == rec.get("apex_paramserver_env_steps_total")  # a dropped one counts too
        assert not svc.done()
        send_message(push, Gradients(sender="learner.1", weights_version=svc.core.version, env_steps=100, grad=good))
        while time.monotonic() < end and not svc.done():
            svc.step(50)
        assert svc.done() and svc.core.env_steps == 1000
        svc.checkpoint()
    finally:
        push.close()
        ctx.term()
        svc.close()
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["env_steps"] == 1000
    again = ParamServerService(cfg, rid, spec, log=lambda m: None)  # that run had finished: a new one starts
    try:
        assert again.core.env_steps == 0 and again.core.applied == 0 and not again.done()
        assert (tmp_path / "run" / "checkpoint.finished.pt").is_file()
    finally:
        again.close()
        shutil.rmtree(endpoints(cfg, rid)["replay"][len("ipc://"):].rsplit("/", 1)[0], ignore_errors=True)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"apex_{rid}_")]


def test_gorila_local_replay_learns_reroutes_around_a_killed_learner_and_exits_cleanly(topo):
    # insert_ring_min_kb 0: CartPole's small messages through the insert rings, whose instances
    # must follow the route changes (a rate-limited learner an actor left still stores its queue)
    t = topo({"run.max_env_steps": 10**9, "actor.eval_episodes": 5, "transport.insert_ring_min_kb": 0},
             base="configs/gorila_cartpole_local.yaml")
    for role, idx in (("replay", 0), ("paramserver", 0), ("learner", 0), ("learner", 1), ("actor", 0), ("actor", 1),
                      ("evaluator", 0)):
        t.start(role, idx)
    m = lambda role, name, i=0: t.metrics(role, i).get(name, 0)  # noqa: E731
    recv = lambda j: t.metrics("paramserver").get(  # noqa: E731
        f'apex_paramserver_gradients_received_total{{index="0",learner="{j}",role="paramserver"}}', 0)
    inserted = lambda j: m("learner", "apex_learner_replay_inserted_total", j)  # noqa: E731
    rejected = lambda j: m("learner", "apex_learner_replay_rejected_messages_total", j)  # noqa: E731
    t.wait_for(lambda: recv(0) > 20 and recv(1) > 20, 120, "gradients from both learners")
    assert inserted(0) > 0 and inserted(1) > 0 and m("learner", "apex_learner_replay_size", 1) > 0
    assert "idle" in t.log("replay.0")  # the replay server has nothing to do ...
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"apex_{t.run_id}_replay")]  # ... and owns nothing
    best = t.wait_for(lambda: (r := m("evaluator", "apex_evaluator_return")) >= 150 and r, 240,
                      "evaluation return >= 150", interval=1.0)  # random play ~22, initial weights ~88
    print(f"evaluation return {best}")
    assert m("evaluator", "apex_evaluator_weights_version") > 100
    # the env steps the paramserver counts are the actors' (minus what is still in flight)
    steps = m("paramserver", "apex_paramserver_env_steps_total")
    acted = m("actor", "apex_actor_env_steps_total", 0) + m("actor", "apex_actor_env_steps_total", 1)
    assert 0.5 * acted < steps <= acted, (steps, acted)

    t.procs["learner.1"].send_signal(signal.SIGKILL)  # actor 1's learner dies: actor 1 feeds learner 0
    t.procs["learner.1"].wait(timeout=5)
    del t.procs["learner.1"]
    t.wait_for(lambda: "feeding learner 0's replay" in t.log("actor.1"), 30, "actor 1 rerouted to learner 0")
    a1 = m("actor", "apex_actor_env_steps_total", 1)
    t.wait_for(lambda: m("actor", "apex_actor_env_steps_total", 1) > a1 + 1000, 60, "actor 1 acting on")
    t.start("learner", 1)  # restarted: actor 1 goes back to it, its new replay fills and it trains again
    t.wait_for(lambda: "feeding learner 1's replay" in t.log("actor.1"), 30, "actor 1 back on learner 1")
    r1 = recv(1)
    t.wait_for(lambda: inserted(1) > 2000 and recv(1) > r1 + 50, 120, "the restarted learner's replay and gradients")
    assert rejected(0) == 0 and rejected(1) == 0  # rerouting never split an actor's frames between replays

    codes = t.stop(signal.SIGINT, timeout=3.0)
    assert all(code == 0 for code, _ in codes.values()), (codes, t.dump())
    assert max(s for _, s in codes.values()) < 3.0, codes
    assert t.leftovers() == []  # no segments, no socket files (gorila_replay.<j>.sock), no pid files


@pytest.mark.skipif(shutil.which("honcho") is None, reason="honcho not installed")
def test_honcho_starts_gorila_with_local_replay_and_the_paramserver_ends_the_run(topo):
    t = topo({"run.max_env_steps": 12_000, "replay.min_size": 500}, base="configs/gorila_cartpole_local.yaml")
    code, text = t.run_honcho("actor=2,learner=2")
    assert code == 0, text[-4000:]
    assert "replay.1" in text and "idle" in text and "learner.2" in text
    assert "paramserver.1" in text and "stopping (reached" in text, text[-4000:]
    state = load_checkpoint(t.tmp / "run" / "checkpoint.pt")
    assert state["env_steps"] >= 12_000 and state["paramserver"]["received"].keys() == {"0", "1"}
    assert t.leftovers() == [], text[-4000:]
