"""The Ape-X / R2D2 learner process: samples from the replay server, trains, sends priorities
back and publishes weights to the shared-memory board (and, for remote actors, on a PUB
socket: `transport.weights_over_pub`).

    learner ──SampleRequest×K──► replay      (K = learner.prefetch requests in flight)
            ◄──BatchReady(slot)──            CPU, feed-forward: loss + backward read the slot in
                                             place, release it, then the optimizer step (if it
                                             was reclaimed meanwhile, discard the update);
                                             GPU / recurrent: copy the slot out, release, update
            ──PriorityUpdate──►              (index, generation): stale ones are dropped
    learner ──publish(flat, version)──► weights board  (every learner.publish_every updates)

The run ends when the actors' env steps (counted by replay, read with InfoRequest) reach
``run.max_env_steps`` or ``run.max_updates`` is reached: a final checkpoint is written and
the process exits 0, so honcho takes the run down cleanly.
"""
from __future__ import annotations

import random
import time

import numpy as np

from apex_local.agents.builders import make_learner
from apex_local.agents.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from apex_local.config import Config, run_dir
from apex_local.metrics import NullRecorder, Recorder
from apex_local.losses import DISCREPANCY_EVERY, q_value_discrepancy
from apex_local.networks import num_flat_parameters
from apex_local.replay import beta_schedule
from apex_local.transport import (BatchReady, BatchSlots, Error, Heartbeat, Info, InfoRequest, PriorityUpdate,
                                  RequestClient, SampleRequest, StaleSlotError, WeightsBoard, WeightsPublisher,
                                  endpoints, new_context, segment_name, weights_over_pub)
from apex_local.transport.shm import ShmError




class LearnerService:
    weights_pub: WeightsPublisher | None = None  # PUB for remote actors (weights_over_pub: README "Remote actors")

    def __init__(self, cfg: Config, run_id: str, spec, recorder: Recorder | None = None, log=print,
                 resume: bool = True) -> None:
        self.cfg, self.run_id, self.log = cfg, run_id, log
        self.rec = recorder or NullRecorder()
        self.learner = make_learner(cfg, spec)
        self.ckpt_path = run_dir(cfg) / CHECKPOINT_NAME
        self.env_steps = 0
        if resume and self.ckpt_path.is_file():
            state = load_checkpoint(self.ckpt_path)
            if int(state.get("env_steps", 0)) >= cfg.run.max_env_steps:
                # that run finished: a new `honcho start` is a new run, not a resume
                done = self.ckpt_path.with_name("checkpoint.finished.pt")
                self.ckpt_path.replace(done)
                log(f"the run in {self.ckpt_path.parent} had finished; kept it as {done.name}, starting fresh")
            else:
                self.learner.load_state_dict(state["learner"])
                self.env_steps = int(state.get("env_steps", 0))
                log(f"resumed from {self.ckpt_path}: {self.learner.updates} updates, "
                    f"weights v{self.learner.weights_version}, {self.env_steps} env steps")
        self.board = WeightsBoard.create(segment_name(run_id, "weights"), num_flat_parameters(self.learner.online))
        self.ctx = new_context()
        self.client = RequestClient(self.ctx, endpoints(cfg, run_id)["replay_sample"], cfg.transport,
                                    max_in_flight=cfg.learner.prefetch + 1, on_orphan=self._orphan)
        if weights_over_pub(cfg.transport):
            self.weights_pub = WeightsPublisher(self.ctx, endpoints(cfg, run_id)["weights"], cfg.transport,
                                                self.board.numel)
        self.slots: BatchSlots | None = None
        self._pinned = None
        self._init_loop_state("learner.0")
        self.publish()

    def _init_loop_state(self, sender: str) -> None:
        """State of the request loop (shared with the Gorila learner)."""
        self.incarnation = random.getrandbits(62)  # a new value tells replay this learner restarted
        self.sender = sender
        self.metrics: dict[str, float] = {}
        self.replay_info: dict = {}
        self.retry_at = 0.0
        self._info_every = 0.5
        self._info_last = 0.0

    # ------------------------------------------------------------------ weights
    def publish(self) -> None:
        version = self.learner.next_weights_version()
        flat = self.learner.flat_weights()
        self.board.publish(flat, version)
        if self.weights_pub is not None:
            self.weights_pub.publish(flat, version)
        self.rec.set("apex_learner_weights_version", version)

    # ------------------------------------------------------------------ batches
    def _slot_ring(self) -> BatchSlots:
        if self.slots is None:
            self.slots = BatchSlots.attach(segment_name(self.run_id, "slots"))
        return self.slots

    def _orphan(self, msg) -> None:
        if isinstance(msg, BatchReady):  # a duplicate after a resend: give its slot back
            try:
                self._slot_ring().release(msg.slot_id, msg.slot_seq)
            except (StaleSlotError, ShmError):
                pass

    # batches are trained on in place in their shared-memory slot (no copy of the ~29 MB of a
    # Pong batch of 512) on a CPU feed-forward learner; the Gorila learner and R2D2 copy them out
    TRAIN_IN_SLOT = True

    def _in_slot(self) -> bool:
        return self.TRAIN_IN_SLOT and self.learner.device.type == "cpu" and not self.learner.online.recurrent

    def _train_in_slot(self, msg: BatchReady) -> None:
        """Loss and backward on the slot's memory (index / generation copied: the priority update
        is sent after the slot is free), release, then the optimizer step, unless the release
        says the server reclaimed the slot meanwhile (another learner restarted): the batch
        may be torn, so the update is discarded (counted)."""
        ring = self._slot_ring()
        try:
            # writable: torch warns on tensors over read-only arrays; the loss only reads them
            view = ring.view(msg.slot_id, msg.slot_seq, msg.epoch, writable=True)
        except StaleSlotError:
            return
        arrays = dict(view, index=np.array(view["index"]), generation=np.array(view["generation"]))
        released: list[bool] = []

        def release() -> bool:
            released.append(ring.release(msg.slot_id, msg.slot_seq))
            return released[0]

        try:
            self._train_on(arrays, before_step=release)
        finally:
            if not released:  # a non-finite loss (or an error) ended the update before the step
                release()

    def _take_batch(self, msg: BatchReady):
        """Copy the slot out (the loss must not read shared memory the server may reuse), into
        pinned host memory when training on a GPU, then free the slot (DESIGN.md §3)."""
        ring = self._slot_ring()
        view = ring.view(msg.slot_id, msg.slot_seq, msg.epoch)
        if self.learner.device.type == "cuda":
            import torch

            if self._pinned is None:
                self._pinned = {k: torch.from_numpy(np.empty(v.shape, v.dtype)).pin_memory() for k, v in view.items()}
            arrays = {k: self._pinned[k].numpy() for k in view}
            for k, v in view.items():
                arrays[k][...] = v  # the update synchronises before the next batch reuses these
        else:
            arrays = {k: np.array(v) for k, v in view.items()}
        if not ring.release(msg.slot_id, msg.slot_seq):
            return None  # reclaimed while we copied: the copy may be torn
        return arrays

    def _train_on(self, arrays: dict, before_step=None) -> None:
        batch = self.learner.to_batch(arrays)
        result = self.learner.update(batch, before_step=before_step)
        if result.discarded:
            self.rec.inc("apex_learner_discarded_batches_total")
            return
        if result.skipped:
            self.rec.inc("apex_learner_nonfinite_losses_total")
            return
        prio = result.priorities
        ok = np.isfinite(prio)
        self.client.send(PriorityUpdate(index=arrays["index"][ok], generation=arrays["generation"][ok],
                                        priority=prio[ok].astype(np.float32)))
        self.metrics = result.metrics
        self.rec.inc("apex_learner_updates_total")
        self.rec.set("apex_learner_loss", result.metrics.get("loss", 0.0))
        self.rec.set("apex_learner_td_abs_mean", result.metrics.get("td_abs_mean", result.metrics.get("loss", 0.0)))
        self.rec.set("apex_learner_q_mean", result.metrics.get("q_mean", 0.0))
        if self.learner.updates % self.cfg.learner.publish_every == 0:
            self.publish()
        if self.learner.online.recurrent and self.learner.updates % DISCREPANCY_EVERY == 0:
            # R2D2 §3: Q at the sequence start from the stored state vs a state recomputed by
            # unrolling the burn-in with the current network (representational drift).
            d = q_value_discrepancy(self.learner.online, batch, self.cfg.replay.burn_in)
            self.metrics["q_discrepancy"] = d
            self.rec.set("apex_learner_q_discrepancy", d)

    # ------------------------------------------------------------------ loop
    def done(self) -> bool:
        run = self.cfg.run
        return self.env_steps >= run.max_env_steps or (run.max_updates > 0 and self.learner.updates >= run.max_updates)

    def step(self) -> None:
        """One turn of the loop: keep K requests in flight, handle replies, train."""
        now = time.monotonic()
        if self.weights_pub is not None:
            self.weights_pub.tick()  # late subscribers get the newest weights even while not training
        if now - self._info_last > self._info_every and self.client.can_request:
            self.client.request(InfoRequest())
            self.client.send(Heartbeat(sender=self.sender, incarnation=self.incarnation))
            self._info_last = now
        while now >= self.retry_at and self.client.in_flight < self.cfg.learner.prefetch:
            beta = beta_schedule(self.cfg.replay, self.learner.updates)
            self.client.request(SampleRequest(batch_size=self.cfg.learner.batch_size, beta=beta))
        t0 = time.monotonic()
        replies = self.client.poll(50)
        waited = time.monotonic() - t0  # time spent waiting, not training
        for msg in replies:
            if isinstance(msg, BatchReady):
                self.rec.observe("apex_learner_batch_wait_seconds", waited)
                waited = 0.0
                if self._in_slot():
                    self._train_in_slot(msg)
                    continue
                try:
                    arrays = self._take_batch(msg)
                except StaleSlotError:
                    arrays = None
                if arrays is not None:
                    self._train_on(arrays)
            elif isinstance(msg, Info):
                self.replay_info = msg.data
                self.env_steps = max(self.env_steps, int(msg.data.get("env_steps", 0)))
            elif isinstance(msg, Error):
                self.retry_at = time.monotonic() + msg.retry_after_ms / 1000.0
                if msg.reason != "not_ready":
                    self.log(f"replay refused a request: {msg.reason}: {msg.detail}")

    def checkpoint(self) -> None:
        save_checkpoint(self.ckpt_path, {"config": self.cfg.to_dict(), "learner": self.learner.state_dict(),
                                         "env_steps": self.env_steps})

    def close(self) -> None:
        if self.weights_pub is not None:
            self.weights_pub.close()
        self.client.close()
        self.ctx.term()
        if self.slots is not None:
            self.slots.close()
        self.board.close()
