"""n-step (double) DQN loss: Mnih et al. 2015, van Hasselt et al. 2016, Horgan et al. 2018 (Ape-X).

    s_tm1 --a_tm1--> ... n steps ... --> s_t
    r_t = sum_{i<m} gamma^i r_{tm1+i+1},   d_t = gamma^m or 0 (terminated within the window)
"""
from __future__ import annotations

import torch

from apex_local.losses.common import huber, select, to_floats
from apex_local.losses.types import TransitionBatch


def dqn_targets(q_t_target: torch.Tensor, q_t_online: torch.Tensor, r_t: torch.Tensor,
                d_t: torch.Tensor, double_q: bool = True) -> torch.Tensor:
    """y = r_t + d_t * Q_target(s_t, a*) with a* = argmax Q_online(s_t) (double, van Hasselt
    et al. 2016, Eq. 4) or a* = argmax Q_target(s_t) (Mnih et al. 2015, Eq. 2). (B,)"""
    a_t = (q_t_online if double_q else q_t_target).argmax(dim=-1)
    return r_t + d_t * select(q_t_target, a_t)


def dqn_loss(online: torch.nn.Module, target: torch.nn.Module, batch: TransitionBatch, *,
             double_q: bool = True, huber_delta: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Returns (loss scalar, priorities (B,) = |td| detached, metrics {loss, q_mean, td_abs_mean}).

    huber_delta = 0 -> 0.5 td^2 (Ape-X, Horgan et al. 2018 §3.1).
    """
    q_tm1 = online(batch.obs).q  # (B, A)
    with torch.no_grad():
        q_t_target = target(batch.next_obs).q
        q_t_online = online(batch.next_obs).q if double_q else q_t_target
        # n-step target: y = r_t + gamma^n Q_target(s_t, a*) (discount already holds gamma^n or 0)
        y_t = dqn_targets(q_t_target, q_t_online, batch.reward, batch.discount, double_q)
    qa_tm1 = select(q_tm1, batch.action)
    # delta = y - Q(s_tm1, a_tm1); the loss is symmetric in delta, so huber(Q, target y)
    # PER (Schaul et al. 2016): the IS weight w_i scales each sample's loss.
    loss = (batch.weight * huber(qa_tm1, huber_delta, target=y_t)).mean()
    priorities = (y_t - qa_tm1.detach()).abs()
    metrics = to_floats(loss=loss, q_mean=qa_tm1.mean(), td_abs_mean=priorities.mean())
    return loss, priorities, metrics
