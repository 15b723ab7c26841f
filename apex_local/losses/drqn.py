"""DRQN updates (Hausknecht & Stone 2015, §4 "Stable Recurrent Updates") on our sequence replay.

The paper has two ways to train the LSTM from replay:

* Bootstrapped Sequential Updates: whole episodes are replayed from their start, the hidden
  state carried forward. Our replay stores fixed-length sequences, not episodes, so
  mode='sequential' starts each sequence from the state the ACTOR carried from the episode
  start (SequenceBatch.state_h / state_c, recorded by the actor with the parameters it had then).
  Sequences that begin at the episode start have a zero stored state and are exactly the
  paper's; later ones see that carried state (with stale parameters), not one recomputed.
* Bootstrapped Random Updates: a random point in an episode, a fixed number of steps, the
  hidden state zeroed at the start. mode='random' starts every sampled sequence from zeros.

In both modes: no burn-in by default (every step gets a gradient), no value rescaling, targets
from the target network unrolled from the same start state, targets and loss on every real
(mask = 1) step; 1-step max targets and the Huber (clipped-error, Mnih et al. 2015) loss by
default. It is `r2d2_loss` with those flags; priorities are R2D2's eta mix (ignored by a uniform
sampler).
"""
from __future__ import annotations

import torch

from apex_local.losses.r2d2 import r2d2_loss
from apex_local.losses.types import SequenceBatch

DRQN_MODES = ("sequential", "random")


def drqn_loss(online: torch.nn.Module, target: torch.nn.Module, batch: SequenceBatch, *,
              mode: str = "random", n_step: int = 1, double_q: bool = False, burn_in: int = 0,
              huber_delta: float = 1.0, value_rescale: bool = False, rescale_eps: float = 1e-3,
              eta: float = 0.9) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Returns (loss, priorities (B,), metrics) as `r2d2_loss`. mode: 'sequential' | 'random'."""
    if mode not in DRQN_MODES:
        raise ValueError(f"learner.drqn_update: {mode!r} is not a DRQN mode; choose one of {', '.join(DRQN_MODES)}")
    return r2d2_loss(online, target, batch, burn_in=burn_in, n_step=n_step, value_rescale=value_rescale,
                     rescale_eps=rescale_eps, eta=eta, stored_state=(mode == "sequential"),
                     double_q=double_q, huber_delta=huber_delta)
