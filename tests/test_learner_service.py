"""LearnerService resume rules (in-process; no replay server needed to construct it)."""
from __future__ import annotations

import uuid

import numpy as np

from apex_local.agents.checkpoint import load_checkpoint, save_checkpoint
from apex_local.config import Config, replace
from apex_local.envs import env_spec
from apex_local.roles.learner_loop import LearnerService


def _service(tmp_path, max_env_steps=1000):
    cfg = replace(Config(), **{"run.dir": str(tmp_path), "run.max_env_steps": max_env_steps,
                               "network.hidden_sizes": [8], "transport.ipc_dir": str(tmp_path / "ipc")})
    return LearnerService(cfg, "u" + uuid.uuid4().hex[:8], env_spec(cfg.env), log=lambda m: None)


def _checkpoint(tmp_path, env_steps):
    svc = _service(tmp_path)
    svc.learner.updates = 77
    save_checkpoint(svc.ckpt_path, {"config": svc.cfg.to_dict(), "learner": svc.learner.state_dict(),
                                    "env_steps": env_steps})
    svc.close()


def test_unfinished_run_resumes(tmp_path):
    _checkpoint(tmp_path, env_steps=500)
    svc = _service(tmp_path)
    try:
        assert svc.learner.updates == 77 and svc.env_steps == 500
        assert svc.learner.weights_version >= 1
    finally:
        svc.close()


def test_finished_run_starts_fresh_and_keeps_the_old_checkpoint(tmp_path):
    _checkpoint(tmp_path, env_steps=1000)
    svc = _service(tmp_path)
    try:
        assert svc.learner.updates == 0 and svc.env_steps == 0
        kept = load_checkpoint(tmp_path / "checkpoint.finished.pt")
        assert kept["env_steps"] == 1000 and kept["learner"]["updates"] == 77
        assert np.isfinite(svc.learner.flat_weights()).all()
    finally:
        svc.close()


def _slot_batch(svc, rng):
    """The replay server's side: a batch-slot ring of the run, one READY slot with a batch."""
    from apex_local.replay import make_replay
    from apex_local.transport import BatchReady, BatchSlots, segment_name

    cfg, spec = svc.cfg, env_spec(svc.cfg.env)
    replay = make_replay(cfg, spec.frame_shape, spec.obs_dtype, spec.frame_stack, spec.num_actions)
    slots = BatchSlots.create(segment_name(svc.run_id, "slots"), replay.batch_layout(cfg.learner.batch_size), 2)
    slot = slots.acquire()
    for k, a in slot.arrays.items():
        a[...] = rng.integers(0, 2, a.shape) if a.dtype.kind in "iu" else rng.random(a.shape)
    slot.arrays["discount"][...] = 0.99
    slots.publish(slot)
    msg = BatchReady(request_id=1, slot_id=slot.slot_id, slot_seq=slot.seq, epoch=slots.epoch,
                     batch_size=cfg.learner.batch_size)
    return slots, slot, msg


def test_cpu_learner_trains_in_the_slot_like_on_a_copy_and_frees_it(tmp_path):
    """The in-place path (no copy of the batch) gives the weights the copy path gives, sends
    the batch's index / generation, and leaves the slot FREE."""
    import torch

    from apex_local.transport.slots import FREE

    svc = _service(tmp_path)
    slots = None
    try:
        assert svc._in_slot()
        slots, slot, msg = _slot_batch(svc, np.random.default_rng(0))
        expected = {k: np.array(v) for k, v in slot.arrays.items()}
        ref = copy_of(svc.learner)
        ref.update(ref.to_batch(expected))
        sent = []
        svc.client.send = sent.append
        ring = svc._slot_ring()
        real_release = ring.release

        def release_then_refill(slot_id, slot_seq):  # the server reuses the slot at once
            ok = real_release(slot_id, slot_seq)
            for a in slot.arrays.values():
                a[...] = np.nan if a.dtype.kind == "f" else 1
            return ok

        ring.release = release_then_refill
        svc._train_in_slot(msg)  # nothing of the slot may be read after its release
        assert svc.learner.updates == 1
        for a, b in zip(svc.learner.online.parameters(), ref.online.parameters()):
            assert torch.equal(a, b)
        assert np.array_equal(sent[0].index, expected["index"]) and np.array_equal(sent[0].generation,
                                                                                     expected["generation"])
        assert slots.state(slot.slot_id)[1] == FREE
    finally:
        if slots is not None:
            slots.close()
        svc.close()


def test_an_update_on_a_slot_reclaimed_meanwhile_is_discarded(tmp_path):
    """Another learner restarting makes the server reclaim every held slot; a batch read in place
    while that happened may be torn, so its update is dropped: no step, no priorities."""
    import torch

    svc = _service(tmp_path)
    slots = None
    try:
        slots, slot, msg = _slot_batch(svc, np.random.default_rng(1))
        before = [p.detach().clone() for p in svc.learner.online.parameters()]
        grads = svc.learner.compute_gradients

        def reclaimed_during(batch):
            out = grads(batch)
            slots.reclaim_all()  # the server, while the loss was being computed
            return out

        svc.learner.compute_gradients = reclaimed_during
        sent = []
        svc.client.send = sent.append
        svc._train_in_slot(msg)
        assert svc.learner.updates == 0 and sent == []
        assert all(torch.equal(a, b) for a, b in zip(svc.learner.online.parameters(), before))
        assert all(p.grad is None for p in svc.learner.online.parameters())
    finally:
        if slots is not None:
            slots.close()
        svc.close()


def test_gorila_and_recurrent_learners_copy_batches_out(tmp_path):
    from apex_local.roles.gorila_learner import GorilaLearnerService

    assert GorilaLearnerService.TRAIN_IN_SLOT is False
    from apex_local.config import load_config

    cfg = load_config("configs/r2d2_cartpole_masked.yaml", [f"run.dir={tmp_path}", "network.lstm_size=8",
                                                             f"transport.ipc_dir={tmp_path / 'ipc'}"])
    svc = LearnerService(cfg, "u" + uuid.uuid4().hex[:8], env_spec(cfg.env), log=lambda m: None)
    try:
        assert not svc._in_slot()
    finally:
        svc.close()


def copy_of(learner):
    import copy

    return copy.deepcopy(learner)
