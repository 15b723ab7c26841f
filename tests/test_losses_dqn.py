"""n-step (double) DQN loss on a hand-built batch; batch types; non-finite handling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from apex_local.config import NetworkConfig
from apex_local.losses import TransitionBatch, dqn_loss, dqn_targets, huber, is_finite
from apex_local.networks import QOut, make_network


class TableQ(torch.nn.Module):
    """Q(s, .) = table[s]; obs (B, 1) holds the state index."""

    def __init__(self, rows):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(rows, dtype=torch.float32))
        self.support = None

    def forward(self, obs):
        return QOut(self.table[obs[:, 0].long()], None)


# states 0..3, two actions
ONLINE = [[1, 2], [3, 1], [0, 5], [2, 2]]
TARGET = [[0.5, 1], [2, 4], [1, 3], [6, 1]]
# gamma = 0.9, n = 2: discount = 0.81 unless the window terminated
#  i  s  a  r     discount             s'
#  0  0  1  1.0   0.81                 1
#  1  1  0  0.5   0.0  (terminated)    2
#  2  2  1  -1.0  0.81 (truncated: time limit, still bootstraps)  3
BATCH = dict(obs=[[0], [1], [2]], action=[1, 0, 1], reward=[1.0, 0.5, -1.0], discount=[0.81, 0.0, 0.81],
             next_obs=[[1], [2], [3]], weight=[1.0, 0.5, 2.0], index=[7, 8, 9])


def _batch(**changes):
    data = {k: np.asarray(v) for k, v in {**BATCH, **changes}.items()}
    return TransitionBatch.from_numpy(data)


def test_double_dqn_targets_priorities_and_loss_by_hand():
    online, target = TableQ(ONLINE), TableQ(TARGET)
    loss, prio, metrics = dqn_loss(online, target, _batch(), double_q=True, huber_delta=1.0)
    # i0: a* = argmax online(s1) = 0 -> y = 1 + 0.81 * target(s1, 0) = 1 + 0.81*2 = 2.62; Q(s0,1) = 2 -> td 0.62
    # i1: terminated -> y = 0.5; Q(s1,0) = 3 -> td -2.5
    # i2: a* = argmax online(s3) = 0 (tie: first) -> y = -1 + 0.81*6 = 3.86; Q(s2,1) = 5 -> td -1.14
    torch.testing.assert_close(prio, torch.tensor([0.62, 2.5, 1.14]))
    # Huber(1): 0.5*0.62^2 = 0.1922; 2.5 - 0.5 = 2.0; 1.14 - 0.5 = 0.64; weights 1, 0.5, 2
    # loss = (0.1922 + 1.0 + 1.28) / 3 = 0.824066...
    assert loss.item() == pytest.approx(2.4722 / 3, rel=1e-5)
    assert metrics["loss"] == pytest.approx(2.4722 / 3, rel=1e-5)
    assert metrics["q_mean"] == pytest.approx((2 + 3 + 5) / 3)
    assert metrics["td_abs_mean"] == pytest.approx((0.62 + 2.5 + 1.14) / 3, rel=1e-5)
    loss.backward()
    assert target.table.grad is None  # no gradient into the target network
    # d loss / d Q(s0, 1) = -(w * huber'(td)) / B = -(1 * 0.62) / 3
    assert online.table.grad[0, 1].item() == pytest.approx(-0.62 / 3, rel=1e-5)
    assert online.table.grad[3].abs().sum() == 0  # s3 only appears as a next state


def test_non_double_uses_target_max_and_differs():
    online, target = TableQ(ONLINE), TableQ(TARGET)
    _, prio, _ = dqn_loss(online, target, _batch(), double_q=False)
    # i0: max_a target(s1) = 4 -> y = 1 + 3.24 = 4.24 -> td 2.24 (double gave 0.62)
    torch.testing.assert_close(prio, torch.tensor([2.24, 2.5, 1.14]))


def test_dqn_targets_termination_vs_truncation():
    q_t = torch.tensor([[1.0, 3.0], [1.0, 3.0]])
    r_t = torch.tensor([1.0, 1.0])
    d_t = torch.tensor([0.0, 0.9])  # terminated: no bootstrap; truncated: gamma^m
    torch.testing.assert_close(dqn_targets(q_t, q_t, r_t, d_t), torch.tensor([1.0, 1.0 + 0.9 * 3.0]))


def test_huber_and_squared():
    x = torch.tensor([-3.0, -0.5, 0.0, 2.0])
    torch.testing.assert_close(huber(x, 1.0), torch.tensor([2.5, 0.125, 0.0, 1.5]))
    torch.testing.assert_close(huber(x, 0.0), 0.5 * x * x)


@pytest.mark.parametrize("delta", [0.0, 1.0, 2.0])
def test_huber_with_target_is_huber_of_the_difference_with_its_gradient(delta):
    """huber(q, d, target=y) == huber(q - y, d) (symmetric); d/dq: q - y inside delta, +-delta beyond
    (hand values for delta 1: td = q - y = [-3, -0.5, 0, 2])."""
    q = torch.tensor([-2.0, 0.5, 1.0, 3.0], requires_grad=True)
    y = torch.tensor([1.0, 1.0, 1.0, 1.0])
    loss = huber(q, delta, target=y)
    torch.testing.assert_close(loss, huber((q - y).detach(), delta))
    loss.sum().backward()
    td = (q - y).detach()
    want = td if delta <= 0 else td.clamp(-delta, delta)
    torch.testing.assert_close(q.grad, want)
    if delta == 1.0:
        torch.testing.assert_close(q.grad, torch.tensor([-1.0, -0.5, 0.0, 1.0]))


def test_nan_input_does_not_crash_and_is_reported():
    online, target = TableQ(ONLINE), TableQ(TARGET)
    loss, prio, metrics = dqn_loss(online, target, _batch(reward=[np.nan, 0.5, -1.0]))
    assert not is_finite(loss) and prio.shape == (3,)
    assert is_finite(torch.tensor(1.0)) and not is_finite(torch.tensor(float("inf")))


def test_transition_batch_from_numpy_dtypes_defaults_and_to():
    data = {k: np.asarray(v) for k, v in BATCH.items() if k != "weight"}
    batch = TransitionBatch.from_numpy(data)
    assert batch.action.dtype == torch.int64 and batch.reward.dtype == torch.float32
    assert batch.obs.dtype == torch.int64  # observations keep their dtype
    torch.testing.assert_close(batch.weight, torch.ones(3))
    moved = batch.to("cpu")
    assert isinstance(moved, TransitionBatch) and moved.batch_size == 3
    data["reward"] = data["reward"].astype(np.float32)  # memory is shared where the dtype already matches
    batch = TransitionBatch.from_numpy(data)
    copied = TransitionBatch.from_numpy(data, copy=True)
    data["reward"][0] = 99.0
    assert batch.reward[0].item() == 99.0 and copied.reward[0].item() == 1.0  # shared vs copied
    with pytest.raises(KeyError, match="next_obs"):
        TransitionBatch.from_numpy({k: v for k, v in data.items() if k != "next_obs"})


@pytest.mark.parametrize("kw", [dict(), dict(dueling=True, noisy=True)])
def test_real_network_update_step(kw):
    torch.manual_seed(0)
    cfg = NetworkConfig(hidden_sizes=(16,), head_hidden=8, **kw)
    online, target = (make_network(cfg, (1, 4), np.float32, 2) for _ in range(2))
    batch = TransitionBatch(obs=torch.randn(5, 1, 4), action=torch.randint(0, 2, (5,)), reward=torch.randn(5),
                            discount=torch.full((5,), 0.99), next_obs=torch.randn(5, 1, 4), weight=torch.ones(5))
    loss, prio, metrics = dqn_loss(online, target, batch, huber_delta=0.0)
    loss.backward()
    assert is_finite(loss) and prio.shape == (5,) and (prio >= 0).all() and not prio.requires_grad
    assert all(p.grad is not None for p in online.parameters())
    assert set(metrics) == {"loss", "q_mean", "td_abs_mean"}
