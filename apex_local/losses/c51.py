"""C51 distributional loss (Bellemare et al. 2017) with double-Q action selection and n-step
returns as in Rainbow (Hessel et al. 2018).
"""
from __future__ import annotations

import torch

from apex_local.losses.common import select, to_floats
from apex_local.losses.types import TransitionBatch


def categorical_projection(next_probs: torch.Tensor, rewards: torch.Tensor, discounts: torch.Tensor,
                           support: torch.Tensor) -> torch.Tensor:
    """Project the distribution r + d z onto the fixed support (Bellemare et al. 2017, Alg. 1).

    next_probs (B, N), rewards (B,), discounts (B,), support (N,) evenly spaced -> (B, N).
    Non-finite rewards/discounts give NaN rows (never an out-of-range index).
    """
    n = support.shape[0]
    v_min, v_max = support[0], support[-1]
    dz = (v_max - v_min) / (n - 1)
    # Alg. 1: T z_j = [r + gamma z_j] clipped to [V_min, V_max]
    tz = (rewards.unsqueeze(-1) + discounts.unsqueeze(-1) * support.unsqueeze(0)).clamp(v_min, v_max)
    # b_j = (T z_j - V_min) / dz in [0, N-1]; l = floor(b), u = ceil(b)
    b = torch.nan_to_num((tz - v_min) / dz, nan=0.0).clamp(0, n - 1)
    lower, upper = b.floor(), b.ceil()
    # m_l += p_j (u - b), m_u += p_j (b - l); when b is an integer, l == u and both would be 0,
    # so the whole mass p_j goes to l instead.
    m_lower = next_probs * (upper - b + (lower == upper).to(b.dtype))
    m_upper = next_probs * (b - lower)
    proj = torch.zeros_like(next_probs)
    proj.scatter_add_(1, lower.long(), m_lower)
    proj.scatter_add_(1, upper.long(), m_upper)
    # Keep non-finite inputs visible to the learner's is_finite check (NaN * 0 = NaN).
    return proj + 0.0 * (rewards + discounts).unsqueeze(-1)


def c51_loss(online: torch.nn.Module, target: torch.nn.Module, batch: TransitionBatch, *,
             double_q: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Cross-entropy between the projected target distribution and p(s_tm1, a_tm1).

    Returns (loss = mean_i w_i CE_i, priorities = CE_i detached (B,) (Rainbow, Hessel et al.
    2018: KL-based priority; CE = KL + H(m) with m constant), metrics {loss, q_mean, ce_mean}).
    """
    support = online.support
    if support is None:
        raise TypeError("c51_loss needs a categorical network (network.categorical: true)")
    out_tm1 = online(batch.obs)
    log_p_tm1 = select(out_tm1.log_probs, batch.action)  # log p(s_tm1, a_tm1): (B, N)
    with torch.no_grad():
        out_t = target(batch.next_obs)
        # Double-Q selection (Rainbow): a* = argmax_a sum_i z_i p_i(s_t, a; online); else target.
        q_select = online(batch.next_obs).q if double_q else out_t.q
        a_t = q_select.argmax(dim=-1)
        p_t = select(out_t.log_probs, a_t).exp()  # p(s_t, a*; target): (B, N)
        # m = Phi_z(r_t + d_t z), d_t = gamma^n or 0 at termination
        m_t = categorical_projection(p_t, batch.reward, batch.discount, support)
    # Alg. 1: loss = -sum_i m_i log p_i(s_tm1, a_tm1)
    ce = -(m_t * log_p_tm1).sum(dim=-1)
    loss = (batch.weight * ce).mean()
    priorities = ce.detach()
    metrics = to_floats(loss=loss, q_mean=select(out_tm1.q, batch.action).mean(), ce_mean=priorities.mean())
    return loss, priorities, metrics
