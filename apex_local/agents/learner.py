"""The learner: online and target networks, optimizer and one update step.

One class for every wiring (STYLE.md #2): the single-process trainer, the Ape-X/R2D2 learner
service and the Gorila learner call ``update`` / ``compute_gradients`` on batches they got
from replay. No sockets here.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from apex_local.agents.optim import make_adam
from apex_local.config import Config
from apex_local.errors import NonFiniteLossError
from apex_local.losses import c51_loss, dqn_loss, drqn_loss, r2d2_loss
from apex_local.losses.types import SequenceBatch, TransitionBatch
from apex_local.networks import flat_parameters, load_flat_parameters, make_network


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class UpdateResult:
    priorities: np.ndarray | None  # (B,) new |TD| / sequence priorities; None when skipped
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    discarded: bool = False  # skipped because ``before_step`` said the batch may be torn


class Learner:
    """Owns the nets and the optimizer. ``update(batch)`` does one gradient step.

    A non-finite loss or gradient skips the step (counted in ``nonfinite_total``); after
    ``learner.max_nonfinite_in_row`` in a row ``NonFiniteLossError`` is raised (exit code 3).
    """

    def __init__(self, cfg: Config, obs_shape: tuple, obs_dtype, num_actions: int,
                 device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        torch.manual_seed(cfg.run.seed)
        self.online = make_network(cfg.network, obs_shape, obs_dtype, num_actions).to(self.device)
        self.target = copy.deepcopy(self.online)
        for p in self.target.parameters():
            p.requires_grad_(False)
        lc = cfg.learner
        # the module tree walk of parameters() costs ~7 us a call, several calls per update
        self._params = list(self.online.parameters())
        if lc.optimizer == "adam":
            # fused: one kernel for all parameters instead of ~10 ops per tensor; on a small net the
            # per-op overhead is the cost (CartPole MLP on CPU: 184 -> 57 us per step). Same update
            # rule; and without torch.optim.Optimizer around it (agents/optim.py): no torch._dynamo
            # import at start (~1.4 s), ~0.15 ms less per step.
            self.optimizer = make_adam(self.online.parameters(), self.device, lr=lc.lr, eps=lc.adam_eps)
        else:
            self.optimizer = torch.optim.RMSprop(self.online.parameters(), lr=lc.lr, eps=lc.adam_eps,
                                                 alpha=0.95, centered=True)
        self.updates = 0
        self.weights_version = 0
        self.nonfinite_total = 0
        self._nonfinite_in_row = 0

    # ------------------------------------------------------------------ loss
    def loss(self, batch):
        lc, rc = self.cfg.learner, self.cfg.replay
        if self.online.recurrent:
            if lc.drqn_update != "none":
                return drqn_loss(self.online, self.target, batch, mode=lc.drqn_update,
                                 burn_in=rc.burn_in, n_step=rc.n_step, double_q=lc.double_q,
                                 huber_delta=lc.huber_delta, value_rescale=lc.value_rescale,
                                 rescale_eps=lc.rescale_eps, eta=lc.priority_eta)
            return r2d2_loss(self.online, self.target, batch, burn_in=rc.burn_in, n_step=rc.n_step,
                             value_rescale=lc.value_rescale, rescale_eps=lc.rescale_eps,
                             eta=lc.priority_eta, stored_state=lc.stored_state, double_q=lc.double_q)
        if self.online.categorical:
            return c51_loss(self.online, self.target, batch, double_q=lc.double_q)
        return dqn_loss(self.online, self.target, batch, double_q=lc.double_q, huber_delta=lc.huber_delta)

    def to_batch(self, arrays: dict[str, np.ndarray]):
        cls = SequenceBatch if self.online.recurrent else TransitionBatch
        return cls.from_numpy(arrays).to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ update
    def compute_gradients(self, batch) -> tuple[UpdateResult, bool]:
        """Forward + backward only (Gorila learners push these gradients). Returns (result, ok)."""
        if not self.online.training:  # (train() walks every submodule: not free at 1k updates/s)
            self.online.train()
        loss, priorities, metrics = self.loss(batch)
        if not torch.isfinite(loss):
            return self._nonfinite("loss"), False
        self._zero_grad()
        loss.backward()
        if self.cfg.learner.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self._params, self.cfg.learner.max_grad_norm)
        else:
            norm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in self._params if p.grad is not None))
        if not torch.isfinite(norm):
            self._zero_grad()
            return self._nonfinite("gradient"), False
        self._nonfinite_in_row = 0
        prio = priorities.detach().float().cpu().numpy()
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["grad_norm"] = float(norm)
        return UpdateResult(prio, metrics), True

    def _zero_grad(self) -> None:
        """``optimizer.zero_grad(set_to_none=True)`` without its profiler scope and per-group
        bookkeeping (~50 us of a ~1 ms CartPole update): the optimizer holds exactly these."""
        for p in self._params:
            p.grad = None

    def update(self, batch, before_step=None) -> UpdateResult:
        """One gradient step. ``before_step()``, called between backward and the optimizer step,
        may return False to discard the update (a batch read in place from a shared-memory slot
        that was reclaimed meanwhile: its data may be torn)."""
        result, ok = self.compute_gradients(batch)
        if not ok:
            return result
        if before_step is not None and not before_step():
            self._zero_grad()
            return UpdateResult(None, {"discarded": 1.0}, skipped=True, discarded=True)
        self.optimizer.step()
        self.updates += 1
        if self.updates % self.cfg.learner.target_update_period == 0:
            self.sync_target()
        return result

    def _nonfinite(self, what: str) -> UpdateResult:
        self.nonfinite_total += 1
        self._nonfinite_in_row += 1
        limit = self.cfg.learner.max_nonfinite_in_row
        if self._nonfinite_in_row >= limit:
            raise NonFiniteLossError(
                f"{self._nonfinite_in_row} non-finite {what}s in a row (learner.max_nonfinite_in_row="
                f"{limit}); check the learning rate, rewards and observations")
        return UpdateResult(None, {"nonfinite": 1.0}, skipped=True)

    def sync_target(self) -> None:
        self.target.load_state_dict(self.online.state_dict())

    # ------------------------------------------------------------------ weights
    def flat_weights(self) -> np.ndarray:
        return flat_parameters(self.online).detach().cpu().numpy()

    def next_weights_version(self) -> int:
        self.weights_version += 1
        return self.weights_version

    def load_flat_weights(self, flat) -> None:
        load_flat_parameters(self.online, torch.as_tensor(flat))

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {
            "online": self.online.state_dict(), "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(), "updates": self.updates,
            "weights_version": self.weights_version, "nonfinite_total": self.nonfinite_total,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
        self.weights_version = int(state["weights_version"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        rng = state.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
