"""A Gorila learner process (Nair et al. 2015, Algorithm 1): samples from the shared replay server
exactly like the Ape-X learner, but never steps an optimizer itself.

    every learner.gorila_sync_every steps:  theta <- weights board, theta^- <- target board
    learner ──SampleRequest×K──► replay ──BatchReady(slot)──► loss, backward (Learner.compute_gradients)
            ──PUSH Gradients(grad, weights_version = version of theta)──► paramserver
            ──PriorityUpdate──► replay

The request / batch-slot / priority code is `LearnerService`'s (this class subclasses it and
replaces the training step, the weight publication and the checkpoint).

With ``learner.gorila_replay: local`` (Gorila §3 bundles) learner j instead hosts its own replay
in-process (`roles.gorila_replay.LocalReplay`, fed by the actors routed to it) and never talks
to the replay server:

    every step:  drain inserts ──► local Replay ──sample──► loss, backward ──PUSH Gradients(..., env_steps)──►
                 priorities straight into the local sampler

Env steps are then only known per learner: each gradient carries the env steps its replay
received since the previous one, and the parameter server, which sums them, ends the run. The parameter server
owns the weights, the target network and the checkpoint; learner j (honcho's ``learner.j+1``)
has no state worth saving, so a restarted learner just pulls the newest parameters.

Each learner heartbeats replay as ``learner.<index>`` with its own random incarnation; replay
tracks incarnations per sender and reclaims held batch slots only when one sender's
incarnation changes (that learner restarted). Slots held by a learner that died and never
came back stay held, so Gorila configs give ``replay.batch_slots >= (learners + 1) x
learner.prefetch``.
"""
from __future__ import annotations

import time

import numpy as np

from apex_local.agents.builders import make_learner
from apex_local.agents.checkpoint import CHECKPOINT_NAME
from apex_local.config import Config, run_dir
from apex_local.metrics import NullRecorder, Recorder
from apex_local.networks import load_flat_parameters, num_flat_parameters
from apex_local.replay import beta_schedule
from apex_local.roles.gorila_replay import LocalReplay, local_replay_enabled
from apex_local.roles.learner_loop import LearnerService
from apex_local.roles.paramserver import flat_gradients
from apex_local.transport import (Gradients, PriorityUpdate, RequestClient, WeightsBoard, endpoints, make_socket,
                                  new_context, segment_name, send_message)
from apex_local.transport.shm import ShmError


class GorilaLearnerService(LearnerService):
    TRAIN_IN_SLOT = False  # its _train_on pushes gradients (no optimizer step to hold back): copy out

    def __init__(self, cfg: Config, run_id: str, spec, index: int = 0, recorder: Recorder | None = None,
                 log=print) -> None:
        # The attributes LearnerService.__init__ sets, minus the weights board it would create (the
        # parameter server owns it here); tests/test_gorila.py checks that none is missing.
        self.cfg, self.run_id, self.log, self.index = cfg, run_id, log, index
        self.rec = recorder or NullRecorder()
        self.learner = make_learner(cfg, spec)
        self.ckpt_path = run_dir(cfg) / CHECKPOINT_NAME  # written by the parameter server
        self.env_steps = 0
        self.ctx = new_context()
        eps = endpoints(cfg, run_id)
        self.client = self.local = None
        self.push = make_socket(self.ctx, "push", cfg.transport, connect=eps["paramserver"])
        try:
            if local_replay_enabled(cfg):  # this learner's own replay; the replay server is not used
                self.local = LocalReplay(cfg, run_id, spec, index, self.ctx, self.rec, log)
            else:
                self.client = RequestClient(self.ctx, eps["replay_sample"], cfg.transport,
                                            max_in_flight=cfg.learner.prefetch + 1, on_orphan=self._orphan)
        except BaseException:
            self.push.close(linger=0)
            self.ctx.term()
            raise
        self.env_steps_reported = 0  # local replay: env steps already reported to the paramserver
        self.slots = None
        self._pinned = None
        self._init_loop_state(f"learner.{index}")
        # Gorila state
        self.board: WeightsBoard | None = None  # attached read-only (the paramserver's)
        self.target_board: WeightsBoard | None = None
        self._buf = np.empty(num_flat_parameters(self.learner.online), np.float32)
        self.params_version = 0  # board version theta came from (0 = none yet)
        self.target_version = 0
        self.gradients_sent = self.gradients_unsent = 0
        self.sender = f"learner.{index}"

    # ------------------------------------------------------------------ parameters from the server
    def _attach(self) -> bool:
        try:
            if self.board is None:
                self.board = WeightsBoard.attach(segment_name(self.run_id, "weights"))
            if self.target_board is None:
                self.target_board = WeightsBoard.attach(segment_name(self.run_id, "target"))
        except (ShmError, FileNotFoundError):
            return False
        return True

    def _read(self, board: WeightsBoard, have: int) -> int | None:
        got = board.read(self._buf, min_version=have)
        if got is None and board.version < have:  # the paramserver restarted from an older checkpoint
            got = board.read(self._buf, min_version=0)
        return got

    def sync(self) -> bool:
        """theta <- newest published master, theta^- <- newest target (Algorithm 1). True once
        parameters have been received at least once."""
        if not self._attach():
            return False
        got = self._read(self.board, self.params_version)
        if got is not None:
            load_flat_parameters(self.learner.online, self._buf)
            self.params_version = self.learner.weights_version = got
            self.rec.set("apex_learner_weights_version", got)
        got = self._read(self.target_board, self.target_version)
        if got is not None:
            load_flat_parameters(self.learner.target, self._buf)
            self.target_version = got
        return self.params_version > 0 and self.target_version > 0

    # ------------------------------------------------------------------ LearnerService overrides
    def publish(self) -> None:
        """Learners never publish: the parameter server owns the boards."""

    def checkpoint(self) -> None:
        """Nothing to save: the parameter server's checkpoint holds the master, target and optimizer."""

    def done(self) -> bool:
        if self.local is not None:  # only the parameter server knows the run's env steps
            run = self.cfg.run
            return run.max_updates > 0 and self.learner.updates >= run.max_updates
        return super().done()

    def step(self) -> None:
        if self.params_version == 0 and not self.sync():
            if self.local is not None:
                self.local.drain()  # actors may be up before the parameter server
            time.sleep(0.05)  # the parameter server is not up yet
            return
        if self.local is None:
            super().step()
            return
        self.local.drain()
        self.env_steps = self.local.env_steps
        now = time.monotonic()
        if now - self._info_last > self._info_every:
            self.replay_info, self._info_last = self.local.info(), now
        t0 = time.monotonic()
        arrays = self.local.sample(self.cfg.learner.batch_size, beta_schedule(self.cfg.replay, self.learner.updates))
        if arrays is None:  # below replay.min_size or rate limited: wait for inserts
            self.local.wait(20)
            return
        self.rec.observe("apex_learner_batch_wait_seconds", time.monotonic() - t0)
        self._train_on(arrays)

    def _train_on(self, arrays: dict) -> None:
        if self.learner.updates % self.cfg.learner.gorila_sync_every == 0:
            self.sync()
        batch = self.learner.to_batch(arrays)
        result, ok = self.learner.compute_gradients(batch)  # raises NonFiniteLossError (exit 3) when stuck
        if not ok:
            self.rec.inc("apex_learner_nonfinite_losses_total")
            return
        steps = self.local.env_steps - self.env_steps_reported if self.local is not None else 0
        msg = Gradients(sender=self.sender, weights_version=self.params_version, env_steps=steps,
                        batch_size=int(arrays["index"].shape[0]), grad=flat_gradients(self.learner.online))
        if send_message(self.push, msg):  # (copied into the message's one frame)
            self.gradients_sent += 1
            self.env_steps_reported += steps
            self.rec.inc("apex_learner_gradients_sent_total")
        else:  # the parameter server is gone or far behind (send_timeout_ms); steps go with the next
            self.gradients_unsent += 1
        prio = result.priorities
        ok = np.isfinite(prio)
        if self.local is not None:
            self.local.update_priorities(arrays["index"][ok], arrays["generation"][ok], prio[ok])
        else:
            self.client.send(PriorityUpdate(index=arrays["index"][ok], generation=arrays["generation"][ok],
                                            priority=prio[ok].astype(np.float32)))
        self.learner.updates += 1
        self.metrics = result.metrics
        self.rec.inc("apex_learner_updates_total")
        self.rec.set("apex_learner_loss", result.metrics.get("loss", 0.0))
        self.rec.set("apex_learner_td_abs_mean", result.metrics.get("td_abs_mean", result.metrics.get("loss", 0.0)))
        self.rec.set("apex_learner_q_mean", result.metrics.get("q_mean", 0.0))

    def close(self) -> None:
        self.push.close(linger=0)
        if self.client is not None:
            self.client.close()
        if self.local is not None:
            self.local.close()
        self.ctx.term()
        for seg in (self.slots, self.board, self.target_board):
            if seg is not None:
                seg.close()
