"""R2D2 loss (Kapturowski et al. 2019): recurrent n-step double Q-learning on stored sequences
with burn-in, stored state, value rescaling and mixed max/mean sequence priorities.

One sequence (T = burn_in + L steps, L = sequence_length), batch-major in SequenceBatch:

    obs      o_0 ... o_{b-1} | o_b ................ o_{T-1} | o_T   (o_T: bootstrap only)
    a, r, d  burn-in (b)     | learning steps t = b .. T-1  |
    state    (h, c) stored before o_0 (or zeros), unrolled over the burn-in under no_grad
    mask     1 for real steps, 0 for zero padding after the episode end (padding comes last)

n-step target for learning step t (m = steps used: stops at n, at the sequence end T, or at the
first padded step; d_j = gamma * (1 - terminal_j) already includes gamma):
    G_t = sum_{i<m} (prod_{j<i} d_{t+j}) r_{t+i} + (prod_{j<m} d_{t+j}) h^-1(Q_tgt(o_{t+m}, a*))
    y_t = h(G_t),  a* = argmax_a Q_online(o_{t+m}, a)        (h = identity without rescaling)
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

from apex_local.losses.common import huber, select, to_floats
from apex_local.losses.rescale import inverse_value_rescale, value_rescale as _h
from apex_local.losses.types import SequenceBatch

Array = Union[torch.Tensor, np.ndarray]


def n_step_targets(q_boot: torch.Tensor, reward: torch.Tensor, discount: torch.Tensor, mask: torch.Tensor,
                   n_step: int, *, value_rescale: bool = False, rescale_eps: float = 1e-3) -> torch.Tensor:
    """q_boot (B, L+1) = Q_tgt(o_j, a*_j) for every obs j; reward, discount, mask (B, L) -> y (B, L)."""
    batch, steps = reward.shape
    mask = mask.to(reward.dtype)
    v_boot = inverse_value_rescale(q_boot, rescale_eps) if value_rescale else q_boot  # h^-1(Q)
    pad = torch.zeros(batch, n_step, dtype=reward.dtype, device=reward.device)
    r_pad, d_pad, m_pad = (torch.cat([x, pad], dim=1) for x in (reward, discount, mask))
    g_t = torch.zeros_like(reward)
    disc = torch.ones_like(reward)  # prod_{j<i} d_{t+j}
    alive = torch.ones_like(reward)  # 1 while t+i is a real step inside the sequence
    used = torch.zeros_like(reward)  # m
    for i in range(n_step):
        alive = alive * m_pad[:, i:i + steps]
        g_t = g_t + alive * disc * r_pad[:, i:i + steps]  # + gamma^i r_{t+i} (cut at termination)
        disc = disc * (alive * d_pad[:, i:i + steps] + (1.0 - alive))
        used = used + alive
    boot_idx = torch.arange(steps, device=reward.device).unsqueeze(0) + used.long()  # t + m <= L
    g_t = g_t + disc * v_boot.gather(1, boot_idx)  # + prod d * h^-1(Q(o_{t+m}, a*))
    return _h(g_t, rescale_eps) if value_rescale else g_t  # y_t = h(G_t)


def sequence_priorities(td: Array, mask: Array, eta: float = 0.9) -> Array:
    """R2D2 §2.3: p = eta max_t |delta_t| + (1 - eta) mean_t |delta_t| over valid steps (0 if none).
    td, mask (B, T) numpy or torch -> (B,) of the same kind."""
    if isinstance(td, np.ndarray):
        valid = np.asarray(mask) > 0
        abs_td = np.where(valid, np.abs(td), 0.0)
        mean = abs_td.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
        top = abs_td.max(axis=1) if abs_td.shape[1] else np.zeros(abs_td.shape[0])
        return (eta * top + (1.0 - eta) * mean).astype(np.float32)
    valid = torch.as_tensor(mask, device=td.device) > 0
    abs_td = torch.where(valid, td.abs(), torch.zeros_like(td))
    mean = abs_td.sum(dim=1) / valid.sum(dim=1).clamp_min(1).to(td.dtype)
    top = abs_td.amax(dim=1) if abs_td.shape[1] else torch.zeros_like(mean)
    return eta * top + (1.0 - eta) * mean


def initial_sequence_priorities(q: Array, action: Array, reward: Array, discount: Array, mask: Array, *,
                                burn_in: int, n_step: int, eta: float = 0.9, value_rescale: bool = True,
                                rescale_eps: float = 1e-3) -> Array:
    """Actor-side priorities from its recorded q values (B, T+1, A) and the sequence's action,
    reward, discount, mask (B, T). No target net: the same q selects and evaluates the bootstrap
    (a* = argmax q, value max q). Returns (B,) numpy if q is numpy, else torch."""
    as_numpy = isinstance(q, np.ndarray)
    q_t, a_t, r_t, d_t, m_t = (torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x)
                               for x in (q, action, reward, discount, mask))
    q_t = q_t.float()[:, burn_in:]
    y = n_step_targets(q_t.max(dim=-1).values, r_t.float()[:, burn_in:], d_t.float()[:, burn_in:],
                       m_t.float()[:, burn_in:], n_step, value_rescale=value_rescale, rescale_eps=rescale_eps)
    td = y - select(q_t[:, :-1], a_t[:, burn_in:])
    prio = sequence_priorities(td, m_t[:, burn_in:], eta)
    return prio.numpy() if as_numpy else prio


def _start_state(net: torch.nn.Module, batch: SequenceBatch, stored_state: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if stored_state:
        return batch.state_h.float(), batch.state_c.float()
    return net.initial_state(batch.batch_size, batch.obs.device)


def r2d2_loss(online: torch.nn.Module, target: torch.nn.Module, batch: SequenceBatch, *, burn_in: int,
              n_step: int, value_rescale: bool = True, rescale_eps: float = 1e-3, eta: float = 0.9,
              stored_state: bool = True, double_q: bool = True, huber_delta: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Returns (loss, sequence priorities (B,), metrics {loss, q_mean, td_abs_mean, priority_mean}).

    Loss per step: 0.5 delta^2 (huber_delta = 0, the default) as in Ape-X (Horgan et al. 2018
    §3.1, l = 1/2 (G - q)^2), which R2D2 builds on, with value rescaling in place of reward
    clipping; huber_delta > 0 uses the Huber loss instead. Per sequence: masked mean over the
    learning steps; batch: mean of IS-weighted sequence losses.
    """
    steps = batch.sequence_steps
    if not 0 <= burn_in < steps:
        raise ValueError(f"burn_in ({burn_in}) must be in [0, T) with T = {steps} steps per sequence")
    obs = batch.obs.transpose(0, 1)  # time-major (T+1, B, k, *frame)
    state = _start_state(online, batch, stored_state)
    if burn_in > 0:
        with torch.no_grad():  # R2D2 §3: burn-in only produces a start state, no gradient
            _, state_b = online.unroll(obs[:burn_in], state)
        state_b = (state_b[0].detach(), state_b[1].detach())
    else:
        state_b = state
    q_online = online.unroll(obs[burn_in:], state_b)[0].q.transpose(0, 1)  # (B, L+1, A)
    a_tm1, r_t, d_t = batch.action[:, burn_in:], batch.reward[:, burn_in:], batch.discount[:, burn_in:]
    m_t = batch.mask[:, burn_in:].to(q_online.dtype)
    with torch.no_grad():
        q_target = target.unroll(obs, _start_state(target, batch, stored_state))[0].q.transpose(0, 1)
        q_target = q_target[:, burn_in:]
        # Double Q (van Hasselt et al. 2016): a* from the online net, value from the target net
        a_star = (q_online.detach() if double_q else q_target).argmax(dim=-1)
        y_t = n_step_targets(select(q_target, a_star), r_t, d_t, m_t, n_step,
                             value_rescale=value_rescale, rescale_eps=rescale_eps)
    qa_tm1 = select(q_online[:, :-1], a_tm1)
    td = y_t - qa_tm1  # delta_t = h(G_t) - Q(o_t, a_t)
    per_step = torch.where(m_t > 0, huber(td, huber_delta), torch.zeros_like(td))  # padding adds 0
    per_seq = per_step.sum(dim=1) / m_t.sum(dim=1).clamp_min(1.0)
    loss = (batch.weight * per_seq).mean()  # PER IS weights per sequence
    priorities = sequence_priorities(td.detach(), m_t, eta)  # R2D2 §2.3, eta = 0.9
    n_valid = m_t.sum().clamp_min(1.0)
    metrics = to_floats(loss=loss, q_mean=(qa_tm1.detach() * m_t).sum() / n_valid,
                        td_abs_mean=(td.detach().abs() * m_t).sum() / n_valid, priority_mean=priorities.mean())
    return loss, priorities, metrics


DISCREPANCY_EVERY = 100  # learner updates between Q-value discrepancy measurements (topology and local)


@torch.no_grad()
def q_value_discrepancy(online: torch.nn.Module, batch: SequenceBatch, burn_in: int,
                        step: int = 0) -> float:
    """R2D2 §3, Delta Q = ||q(s^_t) - q(s_t)||_2 / |max_{a,j} q(s^_j)_a|, mean over the batch.

    s^ = the stored state unrolled over the burn-in, s = the zero state unrolled over the same
    burn-in with the current network; compared at learning step t = burn_in + step, the max over
    the valid learning steps j of the stored-state unroll (|max|, as in the paper). Sequences whose step t is padding are
    skipped (0.0 if none). Noise is switched off (eval mode) for the measurement and restored.
    """
    t = burn_in + step
    if not 0 <= t < batch.sequence_steps:
        raise ValueError(f"burn_in + step ({t}) must be < T = {batch.sequence_steps}")
    was_training = online.training
    online.eval()
    try:
        obs = batch.obs.transpose(0, 1)[: batch.sequence_steps]
        q_hat = online.unroll(obs, _start_state(online, batch, True))[0].q.transpose(0, 1)
        q_zero = online.unroll(obs, _start_state(online, batch, False))[0].q.transpose(0, 1)
    finally:
        online.train(was_training)
    valid = (batch.mask[:, burn_in:] > 0).unsqueeze(-1)
    q_learn = q_hat[:, burn_in:]
    top = torch.where(valid, q_learn, torch.full_like(q_learn, -torch.inf)).flatten(1).amax(dim=1)
    scale = top.abs().clamp_min(1e-8)  # |max_{a,j} q(s^_j)_a|
    delta = (q_hat[:, t] - q_zero[:, t]).norm(dim=-1) / scale
    keep = batch.mask[:, t] > 0
    return float(delta[keep].mean()) if bool(keep.any()) else 0.0
