"""R2D2 over the process topology: learning on velocity-masked CartPole with real processes,
sequences bit for bit across the replay's process boundary (sockets + shared-memory batch
slots), and burn-in without gradient through the learner's update.

Services run as subprocesses through tests/service_harness.py (`Topology`); the `topo`
fixture kills whatever is still running and removes the run's /dev/shm segments and ipc
files, whatever the test's outcome.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time

import numpy as np
import pytest
import torch
import yaml

from service_harness import ROOT

from apex_local.agents.learner import Learner
from apex_local.config import apply_overrides, config_from_dict
from apex_local.envs import env_spec, make_vector_env
from apex_local.losses import initial_sequence_priorities
from apex_local.replay import SequenceAccumulator
from apex_local.transport import (BatchReady, BatchSlots, Error, Insert, RequestClient, SampleRequest, endpoints,
                                  make_socket, new_context, segment_name, send_message)

R2D2_BASE = "configs/r2d2_cartpole_masked.yaml"
# the shipped file as it is (Ape-X ε ladder, 32 samples per insert) learns over the topology
LEARNING: dict = {}


def _config(overrides: dict):
    data = yaml.safe_load((ROOT / R2D2_BASE).read_text())
    return config_from_dict(apply_overrides(data, overrides))


# --------------------------------------------------------------------------- 1. learning


@pytest.mark.timeout(360)
def test_r2d2_processes_learn_masked_cartpole_and_exit_cleanly_on_sigint(topo):
    t = topo({**LEARNING, "run.max_env_steps": 10**9, "actor.eval_episodes": 5, "actor.eval_every_seconds": 2},
             base=R2D2_BASE)
    for role, idx in (("replay", 0), ("learner", 0), ("actor", 0), ("evaluator", 0)):
        t.start(role, idx)

    def discrepancy():
        m = t.metrics("learner")
        if m.get("apex_learner_updates_total", 0) >= 100 and "apex_learner_q_discrepancy" in m:
            return (m["apex_learner_q_discrepancy"],)  # a tuple: 0.0 is a valid measurement
        return None

    (dq,) = t.wait_for(discrepancy, 120, "apex_learner_q_discrepancy after >= 100 learner updates")
    assert math.isfinite(dq) and dq >= 0.0, dq  # R2D2 §3: ||q(s^) - q(s)|| / |max q| >= 0
    best = t.wait_for(lambda: (r := t.metrics("evaluator").get("apex_evaluator_return", 0)) >= 100 and r, 180,
                      "evaluation return >= 100 (random play on masked CartPole scores ~22)", interval=1.0)
    print(f"evaluation return {best}, Q-value discrepancy {dq:.4f}")
    rep = t.metrics("replay")
    assert rep.get("apex_replay_sampled_total", 0) > 0
    assert rep.get("apex_replay_rejected_messages_total", 0) == 0, t.dump()  # the actor's sequences all fit

    codes = t.stop(signal.SIGINT, timeout=3.0)
    print("exit (code, seconds):", codes)
    assert all(code == 0 for code, _ in codes.values()), (codes, t.dump())
    assert max(s for _, s in codes.values()) < 3.0, codes
    assert t.leftovers() == []


# --------------------------------------------------------------------------- 2. bit for bit

NUM_ENVS, STEPS, TRUNCATE_AT, BATCH = 4, 120, 25, 16
EXACT_OVERRIDES = {"env.num_envs": NUM_ENVS, "env.max_episode_steps": TRUNCATE_AT, "replay.capacity": 128,
                   "replay.min_size": 1, "replay.prioritized": True, "replay.alpha": 0.9, "learner.batch_size": BATCH,
                   "run.max_env_steps": 10**9, "replay.samples_per_insert": 0}  # sample freely: no limiter


def _same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.dtype, want.shape)
    assert got.tobytes() == want.tobytes(), f"{what}: not bit-identical\n got {got}\nwant {want}"


def _collect(cfg, seed: int = 3):
    """Random play on masked CartPole through a real SequenceAccumulator, giving every step a
    distinct random (h, c) and random actor Q-values. Returns the chunks as sent (the actor's
    ``q`` key popped, priorities computed as the actor does) and the per-env trajectories."""
    rc, lc = cfg.replay, cfg.learner
    spec = env_spec(cfg.env)
    H, A = cfg.network.lstm_size, spec.num_actions
    acc = SequenceAccumulator(NUM_ENVS, burn_in=rc.burn_in, sequence_length=rc.sequence_length,
                              period=rc.sequence_period, frame_shape=spec.frame_shape, frame_dtype=spec.obs_dtype,
                              state_size=H, gamma=rc.gamma)
    rng = np.random.default_rng(seed)
    venv = make_vector_env(cfg.env, NUM_ENVS, seed=seed)
    traj = [[] for _ in range(NUM_ENVS)]  # per env: one dict per env step
    chunks = []

    def flush():
        chunk = acc.flush()
        if chunk is None:
            return
        q = chunk.pop("q")  # as ActorService.flush: Q-values stay on the actor
        chunk["priority"] = np.asarray(initial_sequence_priorities(
            q, chunk["action"], chunk["reward"], chunk["discount"], chunk["mask"], burn_in=rc.burn_in,
            n_step=rc.n_step, eta=lc.priority_eta, value_rescale=lc.value_rescale, rescale_eps=lc.rescale_eps),
            np.float32)
        chunks.append(chunk)

    try:
        obs = venv.reset()
        acc.reset(obs)
        episode = np.zeros(NUM_ENVS, np.int64)
        ep_step = np.zeros(NUM_ENVS, np.int64)
        for _ in range(STEPS):
            action = rng.integers(0, A, NUM_ENVS)
            h = rng.standard_normal((NUM_ENVS, H)).astype(np.float32)
            c = rng.standard_normal((NUM_ENVS, H)).astype(np.float32)
            q = rng.standard_normal((NUM_ENVS, A)).astype(np.float32)
            nobs, reward, term, trunc, info = venv.step(action)
            q_final = rng.standard_normal((NUM_ENVS, A)).astype(np.float32) if trunc.any() else None
            acc.step(action, reward, term, trunc, nobs, info["final_obs"], state_h=h, state_c=c, q=q,
                     q_final=q_final)
            done = term | trunc
            for i in range(NUM_ENVS):
                nxt = info["final_obs"][i, -1] if done[i] else nobs[i, -1]
                traj[i].append(dict(obs=obs[i, -1].copy(), next_obs=nxt.copy(), action=int(action[i]),
                                    reward=np.float32(reward[i]), term=bool(term[i]), trunc=bool(trunc[i]) and
                                    not term[i], h=h[i], c=c[i], episode=int(episode[i]), ep_step=int(ep_step[i])))
            ep_step += 1
            episode[done] += 1
            ep_step[done] = 0
            obs = nobs
            if acc.pending >= 8:
                flush()
        flush()
    finally:
        venv.close()
    return chunks, traj


def _items(chunks):
    """Flatten the sent chunks into items (insertion order = replay slot order), each with its
    observations rebuilt from the chunks' frames (-1 = zero frame)."""
    frames = {}
    for ch in chunks:
        for stream, seq, frame in zip(ch["frame_stream"], ch["frame_seq"], ch["frames"]):
            key = (int(stream), int(seq))
            assert key not in frames, f"frame {key} sent twice"  # every frame exactly once
            frames[key] = frame
    zero = np.zeros_like(next(iter(frames.values())))
    items = []
    for ch in chunks:
        for j in range(len(ch["stream"])):
            it = {k: ch[k][j] for k in ("stream", "obs_seq", "action", "reward", "discount", "mask", "state_h",
                                        "state_c", "priority")}
            stream = int(it["stream"])
            it["obs"] = np.stack([zero if s == -1 else frames[(stream, int(s))] for s in it["obs_seq"]])[:, None]
            items.append(it)
    return items


def _check_against_trajectories(items, traj, cfg):
    """Table-driven: every item is exactly the env's trajectory from a sequence start, never
    crossing an episode boundary, padded after a termination/truncation, with the state given at
    its first step; and every completable sequence was sent exactly once."""
    rc = cfg.replay
    T, B_in, P, gamma = rc.burn_in + rc.sequence_length, rc.burn_in, rc.sequence_period, np.float32(rc.gamma)
    by_state = {(i, rec["h"].tobytes()): g for i in range(NUM_ENVS) for g, rec in enumerate(traj[i])}
    seen = set()
    kinds = {"full": 0, "terminated": 0, "truncated": 0}
    for it in items:
        i = int(it["stream"])
        g = by_state.get((i, it["state_h"].tobytes()))
        assert g is not None, "stored state_h is not one the test gave (state round trip)"
        assert (i, g) not in seen, f"sequence env {i} step {g} sent twice"
        seen.add((i, g))
        run = traj[i]
        first = run[g]
        _same_bits(it["state_c"], first["c"], "state_c at the sequence's first step")
        assert first["ep_step"] % P == 0, "a sequence starts every sequence_period steps of an episode"
        steps = []
        for rec in run[g:g + T]:  # never past the episode's last step
            assert rec["episode"] == first["episode"]
            steps.append(rec)
            if rec["term"] or rec["trunc"]:
                break
        L = len(steps)
        assert L > B_in, "a sequence with no learning step was sent"
        mask = np.zeros(T, np.float32)
        mask[:L] = 1
        action = np.zeros(T, np.int64)
        action[:L] = [s["action"] for s in steps]
        reward = np.zeros(T, np.float32)
        reward[:L] = [s["reward"] for s in steps]
        discount = np.zeros(T, np.float32)  # gamma, 0 on the terminating step and on padding
        discount[:L] = [0.0 if s["term"] else gamma for s in steps]
        obs = np.zeros_like(it["obs"])
        obs[:L, 0] = [s["obs"] for s in steps]
        obs[L, 0] = steps[-1]["next_obs"]  # bootstrap obs: the final obs at an episode end
        for name, want in (("mask", mask), ("action", action), ("reward", reward), ("discount", discount),
                           ("obs", obs)):
            _same_bits(it[name], want, f"{name} of env {i} from step {g}")
        # mask/discount semantics on the item itself: after a discount-0 step only padding
        zero_disc = np.flatnonzero((it["discount"] == 0) & (it["mask"] == 1))
        if zero_disc.size:
            assert not it["mask"][zero_disc[0] + 1:].any()
            assert not it["discount"][zero_disc[0] + 1:].any()
        if L < T:
            assert np.all(it["obs_seq"][L + 1:] == -1)  # padding references the zero frame
            kinds["terminated" if steps[-1]["term"] else "truncated"] += 1
        else:
            kinds["full"] += 1
    # completeness: every sequence the accumulator could finish before the data ran out was sent
    expected = set()
    for i, run in enumerate(traj):
        for g, rec in enumerate(run):
            if rec["ep_step"] % P:
                continue
            ends = [d for d in range(g, min(g + T, len(run))) if run[d]["term"] or run[d]["trunc"]]
            length = ends[0] - g + 1 if ends else T
            complete = bool(ends) or g + T <= len(run) - 1  # a full one waits for Q of its bootstrap obs
            if complete and length > B_in:
                expected.add((i, g))
    assert seen == expected, (sorted(expected - seen), sorted(seen - expected))
    return kinds


@pytest.mark.timeout(180)
def test_sequences_cross_the_process_boundary_bit_for_bit(topo):
    cfg = _config(EXACT_OVERRIDES)
    chunks, traj = _collect(cfg)
    items = _items(chunks)
    kinds = _check_against_trajectories(items, traj, cfg)
    # the data exercises every case: full-length, terminated + padded, truncated (time limit) + padded
    assert min(kinds.values()) > 0, kinds
    n = len(items)
    assert BATCH < n <= cfg.replay.capacity

    t = topo({**EXACT_OVERRIDES, "replay.min_size": n}, base=R2D2_BASE)  # no batch before all are stored
    t.start("replay", 0)
    t.wait_for(lambda: t.metrics("replay").get("apex_replay_capacity", 0) > 0, 90, "replay server up")
    slots = BatchSlots.attach(segment_name(t.run_id, "slots"))  # created by the replay server before it binds
    eps = endpoints(t.cfg, t.run_id)
    ctx = new_context()
    push = make_socket(ctx, "push", t.cfg.transport, connect=eps["replay"])

    def orphan(msg):  # a duplicate reply after a Lazy Pirate resend: give its slot back, as the learner does
        if isinstance(msg, BatchReady):
            slots.release(msg.slot_id, msg.slot_seq)

    client = RequestClient(ctx, eps["replay_sample"], t.cfg.transport, max_in_flight=1, on_orphan=orphan)
    batches = []
    try:
        for k, chunk in enumerate(chunks):
            msg = Insert(sender="test.0", actor_id=0, env_steps=NUM_ENVS * STEPS if k == 0 else 0,
                         chunk={key: np.array(v) for key, v in chunk.items()})
            deadline = time.monotonic() + 30
            while not send_message(push, msg):  # SNDTIMEO: the connection may still be coming up
                assert time.monotonic() < deadline, "replay does not take inserts"
        beta = 0.6
        deadline = time.monotonic() + 60
        while len(batches) < 24:
            assert time.monotonic() < deadline, f"only {len(batches)} batches in 60 s\n{t.dump()}"
            client.request(SampleRequest(batch_size=BATCH, beta=beta))
            got = []
            while not got:
                assert time.monotonic() < deadline, f"no reply in time\n{t.dump()}"
                got = client.poll(200)
            (reply,) = got
            if isinstance(reply, Error):
                assert reply.reason == "not_ready" and reply.retry_after_ms > 0, (reply.reason, reply.detail)
                time.sleep(reply.retry_after_ms / 1000.0)
                continue
            assert isinstance(reply, BatchReady) and reply.batch_size == BATCH
            view = slots.view(reply.slot_id, reply.slot_seq, reply.epoch)
            batch = {k: np.array(v) for k, v in view.items()}  # copy out, then hand the slot back
            assert slots.release(reply.slot_id, reply.slot_seq)
            batches.append(batch)
    finally:
        slots.close()
        client.close()
        push.close(linger=0)
        ctx.term()

    by_state = {it["state_h"].tobytes(): (slot, it) for slot, it in enumerate(items)}
    prio = np.array([it["priority"] for it in items], np.float64)
    p = (prio + cfg.replay.priority_eps) ** cfg.replay.alpha
    sampled = set()
    for batch in batches:
        assert batch["obs"].shape == (BATCH, cfg.replay.burn_in + cfg.replay.sequence_length + 1, 1, 2)
        for b in range(BATCH):
            slot, it = by_state[batch["state_h"][b].tobytes()]
            sampled.add(slot)
            for name in ("obs", "action", "reward", "discount", "mask", "state_h", "state_c"):
                _same_bits(batch[name][b], it[name], f"sampled {name} (replay slot {slot})")
            assert batch["index"][b] == slot and batch["generation"][b] == 1  # inserted once, in send order
            # PER §3.4 with the actor's priorities: w = (p_i / p_min)^-beta
            np.testing.assert_allclose(batch["weight"][b], (p[slot] / p.min()) ** -beta, rtol=1e-5)
    assert len(sampled) >= n // 3, f"{len(sampled)} of {n} sequences sampled"
    print(f"{n} sequences sent ({kinds}), {len(sampled)} distinct sampled in {len(batches)} batches of {BATCH}")

    rep = t.metrics("replay")
    assert rep.get("apex_replay_inserted_total", 0) == n
    assert rep.get("apex_replay_rejected_messages_total", 0) == 0, t.dump()
    codes = t.stop(signal.SIGINT, timeout=3.0)
    assert all(code == 0 for code, _ in codes.values()), (codes, t.dump())
    assert t.leftovers() == []


# --------------------------------------------------------------------------- 3. burn-in, end to end

# tests/test_losses_r2d2.py::test_burn_in_carries_no_gradient already checks r2d2_loss itself
# (gradient w.r.t. burn-in observations exactly 0, non-zero on learning steps); here the same
# property is checked through the learner's own update step (Learner.loss -> r2d2_loss with the
# config's burn-in, backward, gradient clipping, optimizer step), as the learner service runs it.

def test_learner_update_sends_no_gradient_into_burn_in_observations():
    cfg = _config({"learner.max_grad_norm": 40.0})
    rc = cfg.replay
    T, burn = rc.burn_in + rc.sequence_length, rc.burn_in
    assert burn > 0 and cfg.learner.stored_state
    spec = env_spec(cfg.env)
    learner = Learner(cfg, spec.obs_shape, spec.obs_dtype, spec.num_actions)
    H, B = cfg.network.lstm_size, 6
    rng = np.random.default_rng(0)
    mask = np.ones((B, T), np.float32)
    mask[0, burn + 3:] = 0  # sequence 0: terminated at step burn + 2, then padding
    discount = np.where(mask > 0, np.float32(rc.gamma), np.float32(0)).astype(np.float32)
    discount[0, burn + 2] = 0.0
    arrays = {"obs": rng.standard_normal((B, T + 1, 1, 2)).astype(np.float32),
              "action": rng.integers(0, spec.num_actions, (B, T)), "reward": np.ones((B, T), np.float32) * mask,
              "discount": discount, "mask": mask,
              "state_h": rng.standard_normal((B, H)).astype(np.float32),
              "state_c": rng.standard_normal((B, H)).astype(np.float32),
              "weight": rng.uniform(0.2, 1.0, B).astype(np.float32),
              "index": np.arange(B), "generation": np.ones(B, np.int64)}
    arrays["obs"][0, burn + 4:] = 0.0
    batch = learner.to_batch(arrays)
    obs = batch.obs.clone().requires_grad_(True)
    state_h = batch.state_h.clone().requires_grad_(True)
    state_c = batch.state_c.clone().requires_grad_(True)
    batch = dataclasses.replace(batch, obs=obs, state_h=state_h, state_c=state_c)
    before = learner.flat_weights().copy()

    result = learner.update(batch)

    assert not result.skipped and learner.updates == 1
    assert result.priorities.shape == (B,) and np.all(np.isfinite(result.priorities))
    assert not np.array_equal(learner.flat_weights(), before)  # the step was taken
    assert obs.grad is not None
    assert torch.count_nonzero(obs.grad[:, :burn]) == 0  # burn-in: exactly no gradient
    learning = obs.grad[:, burn:T].abs().flatten(2).sum(-1)  # (B, T - burn)
    real = torch.as_tensor(mask[:, burn:]) > 0
    assert torch.all(learning[real] > 0), learning  # every real learning step gets a gradient
    assert torch.count_nonzero(learning[~real]) == 0  # padding gets none
    for s in (state_h, state_c):  # the stored state reaches the loss only through the burn-in
        assert s.grad is None or torch.count_nonzero(s.grad) == 0

    # not vacuous: the burn-in observations do change what is learned (through the start state)
    twin = Learner(cfg, spec.obs_shape, spec.obs_dtype, spec.num_actions)
    altered = dict(arrays, obs=arrays["obs"].copy())
    altered["obs"][:, :burn] += 1.0
    loss_a = twin.loss(twin.to_batch(arrays))[0].item()
    loss_b = twin.loss(twin.to_batch(altered))[0].item()
    assert loss_a != pytest.approx(loss_b, rel=1e-6, abs=0)
