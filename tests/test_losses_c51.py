"""C51 projection (Bellemare et al. 2017, Alg. 1) and cross-entropy loss, hand-worked."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apex_local.config import NetworkConfig
from apex_local.losses import TransitionBatch, c51_loss, categorical_projection, is_finite
from apex_local.networks import QOut, make_network

Z3 = torch.tensor([-1.0, 0.0, 1.0])  # dz = 1


def _project(p, r, d, z):
    return categorical_projection(torch.tensor(p), torch.tensor(r), torch.tensor(d), z)


# (probs, reward, discount, expected) on Z3 = [-1, 0, 1]
CASES_3 = [
    # Tz = 0.5 + 0.5 z = [0, 0.5, 1] -> b = [1, 1.5, 2]: b integer for atoms 0 and 2 (l == u, mass kept)
    # atom1 = 0.2 + 0.3*0.5 = 0.35, atom2 = 0.3*0.5 + 0.5 = 0.65
    ([0.2, 0.3, 0.5], 0.5, 0.5, [0.0, 0.35, 0.65]),
    # clip at v_max: Tz = 2 + z = [1, 2, 3] -> all 1 -> b = 2 (integer)
    ([0.2, 0.3, 0.5], 2.0, 1.0, [0.0, 0.0, 1.0]),
    # clip at v_min: Tz = -5 + 0.9 z = [-5.9, -5, -4.1] -> all -1
    ([0.2, 0.3, 0.5], -5.0, 0.9, [1.0, 0.0, 0.0]),
    # discount 0 (terminal): Tz = 0.25 everywhere -> b = 1.25 -> 0.75 on atom1, 0.25 on atom2
    ([0.6, 0.1, 0.3], 0.25, 0.0, [0.0, 0.75, 0.25]),
    # discount 0 and r on an atom: all mass on that atom
    ([0.6, 0.1, 0.3], -1.0, 0.0, [1.0, 0.0, 0.0]),
    # identity: r = 0, d = 1
    ([0.6, 0.1, 0.3], 0.0, 1.0, [0.6, 0.1, 0.3]),
]


@pytest.mark.parametrize("p,r,d,expected", CASES_3)
def test_projection_3_atoms(p, r, d, expected):
    out = _project([p], [r], [d], Z3)
    torch.testing.assert_close(out, torch.tensor([expected]), atol=1e-6, rtol=0)


def test_projection_is_vectorized_over_the_batch():
    p, r, d, expected = (list(x) for x in zip(*CASES_3))
    torch.testing.assert_close(_project(p, r, d, Z3), torch.tensor(expected), atol=1e-6, rtol=0)


def test_projection_5_atoms_unit_spacing():
    z = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    # Tz = 0.3 + 0.5 z = [-0.7, -0.2, 0.3, 0.8, 1.3]; b = Tz + 2 = [1.3, 1.8, 2.3, 2.8, 3.3]
    # p0=.1 @1.3 -> a1 .07 a2 .03 | p1=.2 @1.8 -> a1 .04 a2 .16 | p2=.3 @2.3 -> a2 .21 a3 .09
    # p3=.25 @2.8 -> a2 .05 a3 .20 | p4=.15 @3.3 -> a3 .105 a4 .045
    out = _project([[0.1, 0.2, 0.3, 0.25, 0.15]], [0.3], [0.5], z)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.11, 0.45, 0.395, 0.045]]), atol=1e-6, rtol=0)


def test_projection_5_atoms_wide_spacing_with_clipping():
    z = torch.tensor([-10.0, -5.0, 0.0, 5.0, 10.0])  # dz = 5
    # Tz = 1 + z = [-9, -4, 1, 6, 11 -> 10]; b = [0.2, 1.2, 2.2, 3.2, 4 (integer)]; p = 0.2 each
    # a0 .16 | a1 .04 + .16 | a2 .04 + .16 | a3 .04 + .16 | a4 .04 + .2
    out = _project([[0.2] * 5], [1.0], [1.0], z)
    torch.testing.assert_close(out, torch.tensor([[0.16, 0.2, 0.2, 0.2, 0.24]]), atol=1e-6, rtol=0)


def test_projection_conserves_mass_randomly():
    g = torch.Generator().manual_seed(0)
    z = torch.linspace(-10, 10, 51, dtype=torch.float64)
    p = torch.softmax(torch.randn(256, 51, generator=g, dtype=torch.float64), dim=-1)
    r = torch.randn(256, generator=g, dtype=torch.float64) * 8
    r[:10] = torch.arange(10, dtype=torch.float64) - 5  # b lands exactly on atoms
    d = (torch.rand(256, generator=g, dtype=torch.float64) > 0.2).double() * 0.99 ** 3
    d[10:20] = 1.0
    out = categorical_projection(p, r, d, z)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(256, dtype=torch.float64))
    # mean is preserved when nothing is clipped: E[Tz] = r + d E[z]
    ok = ((r.abs() + d * 10) <= 10)
    torch.testing.assert_close((out * z).sum(-1)[ok], (r + d * (p * z).sum(-1))[ok])


class TableDist(torch.nn.Module):
    """Categorical Q with log p(s, a) = log_softmax(table[s, a]); obs (B, 1) holds s."""

    def __init__(self, probs):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(probs).log())
        self.register_buffer("support", Z3.clone())

    def forward(self, obs):
        log_probs = torch.log_softmax(self.table[obs[:, 0].long()], dim=-1)
        return QOut((log_probs.exp() * self.support).sum(-1), log_probs)


# online: s0 a0 [.25,.25,.5]; s1 a0 [.6,.2,.2] (q -0.4), s1 a1 [.1,.2,.7] (q 0.6) -> online argmax at s1 = 1
ONLINE = [[[0.25, 0.25, 0.5], [0.3, 0.4, 0.3]], [[0.6, 0.2, 0.2], [0.1, 0.2, 0.7]]]
# target: s1 a0 [.2,.3,.5] (q 0.3), s1 a1 [.5,.3,.2] (q -0.3) -> target argmax at s1 = 0
TARGET = [[[1 / 3] * 3, [1 / 3] * 3], [[0.2, 0.3, 0.5], [0.5, 0.3, 0.2]]]


def _batch():
    # i0: s0 a0 r .5 d .5 -> s1;  i1: s1 a1 r -.5 terminal -> s0
    return TransitionBatch.from_numpy(dict(
        obs=np.array([[0], [1]]), action=np.array([0, 1]), reward=np.array([0.5, -0.5]),
        discount=np.array([0.5, 0.0]), next_obs=np.array([[1], [0]]), weight=np.array([2.0, 1.0])))


def test_cross_entropy_by_hand_double_and_not():
    online, target = TableDist(ONLINE), TableDist(TARGET)
    loss, prio, metrics = c51_loss(online, target, _batch(), double_q=True)
    # i0 double: a* = 1 -> p = [.5,.3,.2]; Tz = [0, .5, 1] -> m = [0, .5 + .15, .15 + .2] = [0, .65, .35]
    #    CE = -(.65 ln .25 + .35 ln .5) = 1.1436930
    # i1 terminal: Tz = -.5 -> b = .5 -> m = [.5, .5, 0]; p(s1, a1) = [.1,.2,.7]
    #    CE = -(.5 ln .1 + .5 ln .2) = 1.9560115
    ce0 = -(0.65 * math.log(0.25) + 0.35 * math.log(0.5))
    ce1 = -(0.5 * math.log(0.1) + 0.5 * math.log(0.2))
    torch.testing.assert_close(prio, torch.tensor([ce0, ce1]))
    assert loss.item() == pytest.approx((2.0 * ce0 + 1.0 * ce1) / 2, rel=1e-5)  # IS-weighted mean
    assert metrics["ce_mean"] == pytest.approx((ce0 + ce1) / 2, rel=1e-5)
    _, prio_nd, _ = c51_loss(online, target, _batch(), double_q=False)
    # i0 non-double: a* = argmax target q = 0 -> p = [.2,.3,.5] -> m = [0, .35, .65]
    ce0_nd = -(0.35 * math.log(0.25) + 0.65 * math.log(0.5))
    torch.testing.assert_close(prio_nd, torch.tensor([ce0_nd, ce1]))
    loss.backward()
    assert target.table.grad is None and online.table.grad is not None


def test_rainbow_network_end_to_end_and_nan_safety():
    torch.manual_seed(0)
    cfg = NetworkConfig(hidden_sizes=(16,), head_hidden=8, dueling=True, noisy=True, categorical=True,
                        num_atoms=11, v_min=-5, v_max=5)
    online, target = (make_network(cfg, (1, 4), np.float32, 3) for _ in range(2))
    batch = TransitionBatch(obs=torch.randn(6, 1, 4), action=torch.randint(0, 3, (6,)), reward=torch.randn(6),
                            discount=torch.full((6,), 0.97), next_obs=torch.randn(6, 1, 4), weight=torch.ones(6))
    loss, prio, _ = c51_loss(online, target, batch)
    loss.backward()
    assert is_finite(loss) and prio.shape == (6,) and (prio > 0).all()
    bad = TransitionBatch(**{**batch.__dict__, "reward": torch.tensor([float("nan")] + [0.0] * 5)})
    loss, prio, _ = c51_loss(online, target, bad)  # must not raise (no out-of-range scatter index)
    assert not is_finite(loss)
    with pytest.raises(TypeError, match="categorical"):
        c51_loss(make_network(NetworkConfig(hidden_sizes=(8,)), (1, 4), np.float32, 3), target, batch)
