"""Gorila's parameter server (Nair et al. 2015, §3-4): master parameters + optimizer, applied
asynchronously to the gradients N learners push.

    learner.j ──PUSH Gradients(grad, weights_version=v)──► PULL paramserver
                                                            apply(grad, v): ASGD step, version += 1
    paramserver ──publish every learner.publish_every applied updates──► weights board
                ──every learner.target_update_period applied updates──►  target board

Two layers (STYLE.md #1, #3):

* `ParameterServer` is pure (no sockets): ``apply(flat_grad, computed_on_version, learner_id)``
  is one asynchronous SGD step on the master net, with Gorila's staleness rule (§4: "the
  parameter server discards gradients that are too stale"). Tested in-process.
* `ParamServerService` wires it to the PULL socket and the two shared-memory boards, and
  checkpoints to ``run.dir``.

With ``learner.gorila_replay: local`` no replay server counts the actors' env steps: each
gradient carries the env steps its learner's own replay received since that learner's previous
gradient, the server sums them (``env_steps``, checkpointed) and `ParamServerService.done` ends
the run at ``run.max_env_steps``. With the shared replay the learners end the run, as in Ape-X.

Gradient vector layout (`flat_gradients` / `set_flat_gradients`): the trainable parameters in
``net.parameters()`` order, each flattened. That is the order of `networks.flat_parameters`
(state_dict order) with the buffers (e.g. the C51 support) left out: a module's state_dict
lists its own parameters, then its buffers, then its children, and ``parameters()`` walks the
same modules in the same order (tests/test_gorila.py checks this for every network kind).
"""
from __future__ import annotations

import os
import re
import time

import numpy as np
import torch
from torch import nn

from apex_local.config import Config, run_dir
from apex_local.metrics import NullRecorder, Recorder

DROP_REASONS = ("stale", "non_finite", "bad_message")
MAX_MESSAGES_PER_TICK = 64
_LEARNER = re.compile(r"^learner\.(\d{1,4})$")


# --------------------------------------------------------------------------- flat gradients

def _trainable(net: nn.Module) -> list[torch.Tensor]:
    return [p for p in net.parameters() if p.requires_grad]


def num_flat_gradients(net: nn.Module) -> int:
    """Length of `flat_gradients(net)` (the ``num_params`` of Gorila's `DecodeLimits`)."""
    return sum(p.numel() for p in _trainable(net))


@torch.no_grad()
def flat_gradients(net: nn.Module) -> np.ndarray:
    """The ``.grad`` of every trainable parameter (zeros where None) as one NEW float32 array
    (fresh memory)."""
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in _trainable(net)]
    flat = torch.cat(parts) if parts else torch.zeros(0)
    return flat.cpu().numpy().copy() if flat.device.type != "cpu" else flat.numpy()


@torch.no_grad()
def set_flat_gradients(net: nn.Module, flat, scale: float = 1.0) -> None:
    """Inverse of `flat_gradients`: ``p.grad = scale * flat[slice of p]`` (copied)."""
    flat = torch.as_tensor(np.asarray(flat, dtype=np.float32)).reshape(-1)
    params = _trainable(net)
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(f"set_flat_gradients: expected {total} values for this network, got {flat.numel()}")
    pos = 0
    for p in params:
        n = p.numel()
        g = flat[pos:pos + n].view_as(p).to(device=p.device, dtype=p.dtype, copy=True)
        if scale != 1.0:
            g.mul_(scale)
        p.grad = g
        pos += n


def learner_label(sender: str) -> str:
    """A low-cardinality metrics label for a peer-chosen sender name ('learner.3' -> '3')."""
    m = _LEARNER.match(sender or "")
    return m.group(1) if m else "other"


# --------------------------------------------------------------------------- the pure core

class ParameterServer:
    """Master net + optimizer (built by `agents.Learner`: same network, optimizer, lr and eps as
    the learner config; on ``device``, default ``run.device``). ``version`` = 1 + applied updates
    (1 = the initial parameters).

    ``apply`` never raises on bad data: a gradient of the wrong length, non-finite, or staler
    than ``learner.gorila_staleness_bound`` (policy 'drop') is counted in ``dropped[reason]``
    and False is returned. With policy 'downweight' a gradient beyond the bound is scaled by
    1 / (1 + staleness). A gradient from a version the master has not reached (a paramserver
    restarted from an older checkpoint) is 'stale' under either policy.
    """

    def __init__(self, cfg: Config, spec, device: str | None = None) -> None:
        from apex_local.agents.builders import make_learner

        self.cfg = cfg
        self._learner = make_learner(cfg, spec, device)
        self.master, self.target, self.optimizer = self._learner.online, self._learner.target, self._learner.optimizer
        self.num_params = num_flat_gradients(self.master)
        self.version = 1
        self.target_version = 1
        self.applied = 0
        self.dropped = {r: 0 for r in DROP_REASONS}
        self.received: dict[str, int] = {}
        self.env_steps = 0  # reported by learners with local replay (Gradients.env_steps)

    def apply(self, flat_grad, computed_on_version: int, learner_id: str | int = "0") -> bool:
        """One asynchronous SGD step with a learner's gradient; True if it was applied."""
        key = str(learner_id)
        self.received[key] = self.received.get(key, 0) + 1
        g = np.asarray(flat_grad)
        if g.ndim != 1 or g.shape[0] != self.num_params:
            return self._drop("bad_message")
        if not np.isfinite(g).all():
            return self._drop("non_finite")
        staleness = self.version - int(computed_on_version)
        scale = 1.0
        lc = self.cfg.learner
        if staleness < 0:
            return self._drop("stale")
        if staleness > lc.gorila_staleness_bound:
            if lc.gorila_stale_policy == "drop":
                return self._drop("stale")
            scale = 1.0 / (1.0 + staleness)  # downweight
        set_flat_gradients(self.master, g, scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        self.applied += 1
        self._learner.updates = self.applied
        self._learner.weights_version = self.version
        if self.applied % lc.target_update_period == 0:  # Algorithm 1: every global N steps
            self.target.load_state_dict(self.master.state_dict())
            self.target_version = self.version
        return True

    def staleness(self, computed_on_version: int) -> int:
        return self.version - int(computed_on_version)

    def _drop(self, reason: str) -> bool:
        self.dropped[reason] += 1
        return False

    def flat_master(self) -> np.ndarray:
        return self._learner.flat_weights()

    def flat_target(self) -> np.ndarray:
        from apex_local.networks import flat_parameters

        return flat_parameters(self.target).detach().cpu().numpy()

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """Learner-compatible ``learner`` entry (so `apex-local eval` reads a Gorila checkpoint
        like an Ape-X one: master = online) plus the server's own counters."""
        return {"learner": self._learner.state_dict(),
                "paramserver": {"version": self.version, "target_version": self.target_version,
                                "applied": self.applied, "dropped": dict(self.dropped),
                                "received": dict(self.received), "env_steps": self.env_steps},
                "env_steps": self.env_steps}

    def load_state_dict(self, state: dict) -> None:
        self._learner.load_state_dict(state["learner"])
        ps = state["paramserver"]
        self.version, self.target_version = int(ps["version"]), int(ps["target_version"])
        self.applied = int(ps["applied"])
        self.dropped = {r: int(ps["dropped"].get(r, 0)) for r in DROP_REASONS}
        self.received = {str(k): int(v) for k, v in ps["received"].items()}
        self.env_steps = int(ps.get("env_steps", 0))


# --------------------------------------------------------------------------- the service

class ParamServerService:
    """Binds PULL at ``endpoints()['paramserver']``, owns the weights and target boards
    (``segment_name(run_id, 'weights' | 'target')``). What blocks: nothing here; when the
    server falls behind, learners block on their PUSH high-water mark (transport.send_hwm)."""

    def __init__(self, cfg: Config, run_id: str, spec, recorder: Recorder | None = None, log=print,
                 resume: bool = True) -> None:
        from apex_local.agents.checkpoint import CHECKPOINT_NAME, load_checkpoint
        from apex_local.networks import num_flat_parameters
        from apex_local.transport import (DecodeLimits, WeightsBoard, endpoints, make_socket, new_context,
                                          segment_name)

        self.cfg, self.run_id, self.log = cfg, run_id, log
        self.rec = recorder or NullRecorder()
        self.core = ParameterServer(cfg, spec)
        self.ckpt_path = run_dir(cfg) / CHECKPOINT_NAME
        self.counts_env_steps = cfg.learner.gorila_replay == "local"
        if resume and self.ckpt_path.is_file():
            state = load_checkpoint(self.ckpt_path)
            if self.counts_env_steps and int(state.get("env_steps", 0)) >= cfg.run.max_env_steps:
                done = self.ckpt_path.with_name("checkpoint.finished.pt")  # as LearnerService: a new run
                self.ckpt_path.replace(done)
                log(f"the run in {self.ckpt_path.parent} had finished; kept it as {done.name}, starting fresh")
            elif "paramserver" in state:
                self.core.load_state_dict(state)
                log(f"resumed from {self.ckpt_path}: {self.core.applied} applied updates, v{self.core.version}")
            else:
                log(f"{self.ckpt_path} is not a Gorila checkpoint; starting fresh")
        self.limits = DecodeLimits(max_message_bytes=cfg.transport.max_message_bytes,
                                   num_params=self.core.num_params, kinds=frozenset({"gradients"}))
        numel = num_flat_parameters(self.core.master)
        self.ctx = new_context()
        self.pull = self.board = self.target_board = None
        self._endpoint = endpoints(cfg, run_id)["paramserver"]
        self._bound = False
        try:
            self.board = WeightsBoard.create(segment_name(run_id, "weights"), numel)
            self.target_board = WeightsBoard.create(segment_name(run_id, "target"), numel)
            self.pull = make_socket(self.ctx, "pull", cfg.transport, bind=self._endpoint)
            self._bound = True
        except BaseException:
            self.close()
            raise
        for reason in DROP_REASONS:
            self.rec.inc("apex_paramserver_gradients_dropped_total", 0, reason=reason)
        self.rec.inc("apex_paramserver_env_steps_total", self.core.env_steps)
        self.publish()
        self.publish_target()

    def publish(self) -> None:
        self.board.publish(self.core.flat_master(), self.core.version)
        self.rec.set("apex_paramserver_weights_version", self.core.version)

    def publish_target(self) -> None:
        self.target_board.publish(self.core.flat_target(), self.core.target_version)

    def step(self, timeout_ms: int = 50, budget_s: float = 0.2) -> int:
        """Apply what arrived (at most MAX_MESSAGES_PER_TICK messages, for at most ``budget_s``, so
        the caller sees a shutdown request soon); returns how many were applied."""
        from apex_local.transport import ProtocolError, recv_message, wait_readable

        if not wait_readable([self.pull], timeout_ms):
            return 0
        applied, end = 0, time.monotonic() + budget_s
        for _ in range(MAX_MESSAGES_PER_TICK):
            if time.monotonic() > end:
                break
            try:
                got = recv_message(self.pull, self.limits)
            except ProtocolError as exc:  # the codec refuses NaN/inf arrays: count those as non_finite
                reason = "non_finite" if exc.reason == "non_finite" else "bad_message"
                self.core.dropped[reason] += 1
                self.rec.inc("apex_paramserver_gradients_dropped_total", reason=reason)
                continue
            if got is None:
                break
            msg = got[1]
            who = learner_label(msg.sender)
            if msg.env_steps:  # counted whether or not the gradient is applied
                self.core.env_steps += msg.env_steps
                self.rec.inc("apex_paramserver_env_steps_total", msg.env_steps)
            self.rec.inc("apex_paramserver_gradients_received_total", learner=who)
            staleness = self.core.staleness(msg.weights_version)
            self.rec.observe("apex_paramserver_staleness", max(0, staleness))
            target_before = self.core.target_version
            before = dict(self.core.dropped)
            if self.core.apply(msg.grad, msg.weights_version, who):
                applied += 1
                self.rec.inc("apex_paramserver_gradients_applied_total")
                if self.core.applied % self.cfg.learner.publish_every == 0:
                    self.publish()
                if self.core.target_version != target_before:
                    self.publish_target()
            else:
                for reason, n in self.core.dropped.items():
                    if n != before[reason]:
                        self.rec.inc("apex_paramserver_gradients_dropped_total", n - before[reason], reason=reason)
        return applied

    def done(self) -> bool:
        """Local-replay runs end here, at ``run.max_env_steps`` summed over the learners."""
        return self.counts_env_steps and self.core.env_steps >= self.cfg.run.max_env_steps

    def checkpoint(self) -> None:
        from apex_local.agents.checkpoint import save_checkpoint

        save_checkpoint(self.ckpt_path, {"config": self.cfg.to_dict(), **self.core.state_dict(),
                                         "saved_at": time.time()})

    def close(self) -> None:
        if self.pull is not None:
            self.pull.close(linger=0)
        self.ctx.term()
        if self._bound and self._endpoint.startswith("ipc://"):  # ZMQ leaves ipc socket files behind
            try:
                os.unlink(self._endpoint[len("ipc://"):])
            except FileNotFoundError:
                pass
        for b in (self.board, self.target_board):
            if b is not None:
                b.close()
