"""R2D2 / DRQN: value rescaling, n-step targets, burn-in, masks, stored state, priorities, Delta Q."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from apex_local.config import NetworkConfig
from apex_local.losses import (SequenceBatch, drqn_loss, initial_sequence_priorities, inverse_value_rescale,
                               is_finite, n_step_targets, q_value_discrepancy, r2d2_loss, sequence_priorities,
                               value_rescale)
from apex_local.networks import QOut, make_network


# ----------------------------------------------------------------------------- value rescaling

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-3, 1e-2])
def test_value_rescale_round_trip_both_directions(dtype, eps):
    grid = torch.linspace(-1e4, 1e4, 20001, dtype=dtype)
    small = torch.logspace(-6, 4, 500, dtype=dtype)
    x = torch.cat([grid, small, -small, torch.zeros(1, dtype=dtype)])
    for y in (value_rescale(inverse_value_rescale(x, eps), eps), inverse_value_rescale(value_rescale(x, eps), eps)):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=0)


def test_value_rescale_known_values():
    x = torch.tensor([0.0, 3.0, -3.0, 8.0], dtype=torch.float64)
    # h(0) = 0; h(3) = (sqrt(4) - 1) + 3e-3 = 1.003; h(-3) = -1.003; h(8) = (3 - 1) + 8e-3 = 2.008
    torch.testing.assert_close(value_rescale(x), torch.tensor([0.0, 1.003, -1.003, 2.008], dtype=torch.float64))
    torch.testing.assert_close(inverse_value_rescale(torch.tensor([1.003, 2.008], dtype=torch.float64)),
                               torch.tensor([3.0, 8.0], dtype=torch.float64))
    # eps = 0: h^-1(x) = (|x| + 1)^2 - 1
    torch.testing.assert_close(inverse_value_rescale(torch.tensor([1.0, -2.0]), 0.0), torch.tensor([3.0, -8.0]))


# ----------------------------------------------------------------------------- n-step targets

Q_BOOT = torch.tensor([[10.0, 20.0, 30.0, 40.0, 50.0]])  # Q_tgt(o_j, a*) for j = 0..4
R = torch.tensor([[1.0, 2.0, 3.0, 4.0]])


def test_n_step_targets_termination_cuts():
    # n = 2; step 2 terminates (d = 0), step 3 is padding
    y = n_step_targets(Q_BOOT, R, torch.tensor([[0.9, 0.9, 0.0, 0.0]]), torch.tensor([[1.0, 1, 1, 0]]), 2)
    # t0: 1 + .9*2 + .81*Q(o2)=30 -> 27.1 | t1: 2 + .9*3 + .9*0*Q(o3) -> 4.7 | t2: 3 + 0 -> 3
    torch.testing.assert_close(y[:, :3], torch.tensor([[27.1, 4.7, 3.0]]))


def test_n_step_targets_truncation_bootstraps_from_final_obs():
    # n = 3; time-limit truncation after step 1 (d = .9 kept), o_2 is the final obs, steps 2-3 padding
    y = n_step_targets(Q_BOOT, R, torch.tensor([[0.9, 0.9, 0.0, 0.0]]), torch.tensor([[1.0, 1, 0, 0]]), 3)
    # t0: 1 + .9*2 + .81*Q(o2)=30 -> 27.1 | t1: 2 + .9*30 -> 29
    torch.testing.assert_close(y[:, :2], torch.tensor([[27.1, 29.0]]))


def test_n_step_targets_shorten_at_the_sequence_end():
    y = n_step_targets(Q_BOOT, R, torch.full((1, 4), 0.9), torch.ones(1, 4), 3)
    # t0: 1 + 1.8 + 2.43 + .729*40 = 34.39 | t1: 2 + 2.7 + 3.24 + .729*50 = 44.39
    # t2: 3 + 3.6 + .81*50 = 47.1 | t3: 4 + .9*50 = 49
    torch.testing.assert_close(y, torch.tensor([[34.39, 44.39, 47.1, 49.0]]))


def test_n_step_targets_with_value_rescaling():
    q_boot = value_rescale(torch.tensor([[0.0, 10.0]]))
    y = n_step_targets(q_boot, torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.ones(1, 1), 1, value_rescale=True)
    # y = h(1 + 0.5 * h^-1(h(10))) = h(6) = sqrt(7) - 1 + 0.006
    torch.testing.assert_close(y, torch.tensor([[7 ** 0.5 - 1 + 0.006]]))


# ----------------------------------------------------------------------------- priorities

def test_sequence_priorities_eta_mix_numpy_and_torch():
    td = np.array([[1.0, -3.0, 2.0, 100.0], [5.0, 5.0, 5.0, 5.0]])
    mask = np.array([[1, 1, 1, 0], [0, 0, 0, 0]])
    # row 0: max 3, mean (1+3+2)/3 = 2 -> .9*3 + .1*2 = 2.9 (100 is padding); row 1: no valid step -> 0
    np.testing.assert_allclose(sequence_priorities(td, mask, 0.9), [2.9, 0.0], rtol=1e-6)
    torch.testing.assert_close(sequence_priorities(torch.tensor(td), torch.tensor(mask), 0.9),
                               torch.tensor([2.9, 0.0], dtype=torch.float64))


def test_initial_sequence_priorities_from_actor_q():
    q = np.array([[[1.0, 2.0], [3.0, 0.0], [0.0, 4.0]]])  # (B=1, T+1=3, A=2)
    # n = 1: t0: y = 1 + .5*max q(o1) = 2.5, q(o0, 1) = 2 -> td .5 | t1: y = 1 + .5*4 = 3, q(o1, 0) = 3 -> 0
    # p = .9*.5 + .1*.25 = .475
    prio = initial_sequence_priorities(q, np.array([[1, 0]]), np.array([[1.0, 1.0]]), np.array([[0.5, 0.5]]),
                                       np.array([[1, 1]]), burn_in=0, n_step=1, eta=0.9, value_rescale=False)
    assert isinstance(prio, np.ndarray) and prio.shape == (1,)
    np.testing.assert_allclose(prio, [0.475], rtol=1e-6)
    # with burn_in = 1 only t1 counts -> 0
    prio = initial_sequence_priorities(torch.tensor(q), torch.tensor([[1, 0]]), torch.tensor([[1.0, 1.0]]),
                                       torch.tensor([[0.5, 0.5]]), torch.tensor([[1, 1]]), burn_in=1, n_step=1,
                                       value_rescale=False)
    torch.testing.assert_close(prio, torch.tensor([0.0]))


# ----------------------------------------------------------------------------- full loss, by hand

class TableRQ(torch.nn.Module):
    """'Recurrent' table net: q = table[o] (ignores the state); obs (T, B, 1, 1) holds o."""

    recurrent, categorical, noisy, support = True, False, False, None

    def __init__(self, rows):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(rows))

    def initial_state(self, batch_size, device=None):
        return torch.zeros(batch_size, 1), torch.zeros(batch_size, 1)

    def unroll(self, obs, state, done_mask=None):
        return QOut(self.table[obs[..., 0, 0].long()], None), state


def _hand_batch():
    # T = 4 (burn-in 1 + 3 learning steps), obs o_0..o_4 = states 0..4, gamma .5 everywhere
    return SequenceBatch.from_numpy(dict(
        obs=np.arange(5, dtype=np.float32).reshape(1, 5, 1, 1), action=np.array([[0, 1, 0, 1]]),
        reward=np.array([[9.0, 1.0, 2.0, 3.0]]), discount=np.full((1, 4), 0.5), mask=np.ones((1, 4)),
        state_h=np.zeros((1, 1)), state_c=np.zeros((1, 1))))


def test_r2d2_loss_by_hand():
    online = TableRQ([[0.0, 0.0], [1.0, 2.0], [3.0, 1.0], [0.0, 4.0], [2.0, 1.0]])
    target = TableRQ([[0.0, 0.0], [1.0, 1.0], [2.0, 6.0], [8.0, 3.0], [4.0, 10.0]])
    loss, prio, metrics = r2d2_loss(online, target, _hand_batch(), burn_in=1, n_step=2, value_rescale=False)
    # a* = argmax online: o2 -> 0, o3 -> 1, o4 -> 0; target values 2, 3, 4
    # t1: 1 + .5*2 + .25*3 = 2.75, Q(o1, 1) = 2 -> .75 | t2: 2 + 1.5 + .25*4 = 4.5, Q(o2, 0) = 3 -> 1.5
    # t3: 3 + .5*4 = 5 (sequence end), Q(o3, 1) = 4 -> 1
    assert loss.item() == pytest.approx((0.5 * 0.75 ** 2 + 0.5 * 1.5 ** 2 + 0.5 * 1.0) / 3)
    # priority: .9 * 1.5 + .1 * (.75 + 1.5 + 1) / 3
    assert prio.item() == pytest.approx(0.9 * 1.5 + 0.1 * 3.25 / 3)
    assert metrics["td_abs_mean"] == pytest.approx(3.25 / 3)
    loss.backward()
    assert online.table.grad[0].abs().sum() == 0  # o_0 is burn-in only
    _, prio_nd, _ = r2d2_loss(online, target, _hand_batch(), burn_in=1, n_step=2, value_rescale=False,
                              double_q=False)
    # non-double: target max o3 = 8, o4 = 10 -> t1: 2 + .25*8 = 4 -> td 2 ; priorities differ
    assert prio_nd.item() != pytest.approx(prio.item())


# ----------------------------------------------------------------------------- real LSTM nets

H, T, BURN = 8, 6, 2


def _nets(seed=0):
    torch.manual_seed(seed)
    cfg = NetworkConfig(hidden_sizes=(16,), head_hidden=8, lstm_size=H, dueling=True)
    return make_network(cfg, (1, 3), np.float32, 2), make_network(cfg, (1, 3), np.float32, 2)


def _seq_batch(b=3, seed=1, **changes):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, T)
    mask[0, 4:] = 0  # sequence 0 ends after step 3 (terminal) and is zero padded
    discount = torch.full((b, T), 0.99) * mask
    discount[0, 3] = 0.0
    data = dict(obs=torch.randn(b, T + 1, 1, 3, generator=g), action=torch.randint(0, 2, (b, T), generator=g),
                reward=torch.randn(b, T, generator=g), discount=discount, mask=mask,
                state_h=torch.randn(b, H, generator=g), state_c=torch.randn(b, H, generator=g),
                weight=torch.tensor([1.0, 0.5, 2.0])[:b])
    data["obs"][0, 5:] = 0.0
    return SequenceBatch(**{**data, **changes})


def test_burn_in_carries_no_gradient():
    online, target = _nets()
    batch = _seq_batch()
    obs = batch.obs.clone().requires_grad_(True)
    state_h = batch.state_h.clone().requires_grad_(True)
    loss, _, _ = r2d2_loss(online, target, SequenceBatch(**{**batch.__dict__, "obs": obs, "state_h": state_h}),
                           burn_in=BURN, n_step=2)
    loss.backward()
    assert state_h.grad is None or not state_h.grad.any()  # stored state reaches the loss only via burn-in
    assert not obs.grad[:, :BURN].any() and obs.grad[:, BURN:T].abs().sum() > 0
    # without burn-in the stored state does get a gradient (the check above is not vacuous)
    state_h2 = batch.state_h.clone().requires_grad_(True)
    loss, _, _ = r2d2_loss(online, target, SequenceBatch(**{**batch.__dict__, "state_h": state_h2}),
                           burn_in=0, n_step=2)
    loss.backward()
    assert state_h2.grad.abs().sum() > 0


def test_padded_steps_contribute_nothing():
    online, target = _nets()
    base = _seq_batch()
    loss, prio, _ = r2d2_loss(online, target, base, burn_in=BURN, n_step=3)
    reward, action, obs = base.reward.clone(), base.action.clone(), base.obs.clone()
    reward[0, 4:] = 1e6  # padded steps of sequence 0
    action[0, 4:] = 1 - action[0, 4:]
    obs[0, 6:] = 123.0  # beyond the bootstrap observation o_4 (after the terminal step 3)
    loss2, prio2, _ = r2d2_loss(online, target, SequenceBatch(**{**base.__dict__, "reward": reward,
                                                                "action": action, "obs": obs}),
                                burn_in=BURN, n_step=3)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(prio2, prio)


def test_stored_state_vs_zero_state():
    online, target = _nets()
    batch = _seq_batch()
    stored, _, _ = r2d2_loss(online, target, batch, burn_in=BURN, n_step=2, stored_state=True)
    zero, _, _ = r2d2_loss(online, target, batch, burn_in=BURN, n_step=2, stored_state=False)
    assert stored.item() != pytest.approx(zero.item())
    zeros = torch.zeros(3, H)
    batch0 = SequenceBatch(**{**batch.__dict__, "state_h": zeros, "state_c": zeros})
    a, _, _ = r2d2_loss(online, target, batch0, burn_in=BURN, n_step=2, stored_state=True)
    b, _, _ = r2d2_loss(online, target, batch0, burn_in=BURN, n_step=2, stored_state=False)
    torch.testing.assert_close(a, b)


def test_drqn_modes_and_q_value_discrepancy():
    online, target = _nets()
    batch = _seq_batch()
    rnd, _, _ = drqn_loss(online, target, batch, mode="random")
    ref, _, _ = r2d2_loss(online, target, batch, burn_in=0, n_step=1, value_rescale=False, stored_state=False,
                          double_q=False, huber_delta=1.0)
    torch.testing.assert_close(rnd, ref)
    seq, _, _ = drqn_loss(online, target, batch, mode="sequential")
    assert seq.item() != pytest.approx(rnd.item())
    with pytest.raises(ValueError, match="drqn_update"):
        drqn_loss(online, target, batch, mode="episodic")
    dq = q_value_discrepancy(online, batch, burn_in=BURN)
    assert isinstance(dq, float) and dq > 0
    zeros = torch.zeros(3, H)
    assert q_value_discrepancy(online, SequenceBatch(**{**batch.__dict__, "state_h": zeros, "state_c": zeros}),
                               burn_in=BURN) == 0.0


def test_r2d2_nan_input_and_from_numpy():
    online, target = _nets()
    batch = _seq_batch()
    loss, prio, metrics = r2d2_loss(online, target, batch, burn_in=BURN, n_step=5)
    assert is_finite(loss) and prio.shape == (3,) and set(metrics) >= {"loss", "q_mean", "priority_mean"}
    reward = batch.reward.clone()
    reward[1, 3] = float("nan")
    loss, _, _ = r2d2_loss(online, target, SequenceBatch(**{**batch.__dict__, "reward": reward}), burn_in=BURN,
                           n_step=5)
    assert not is_finite(loss)
    with pytest.raises(ValueError, match="burn_in"):
        r2d2_loss(online, target, batch, burn_in=T, n_step=5)
    arrays = {k: v.numpy() for k, v in batch.__dict__.items() if k != "weight"}
    arrays["mask"] = arrays["mask"].astype(np.uint8)
    seq = SequenceBatch.from_numpy(arrays)
    assert seq.mask.dtype == torch.float32 and seq.sequence_steps == T
    torch.testing.assert_close(seq.weight, torch.ones(3))


@pytest.mark.parametrize("delta, rescale", [(1.0, False), (0.0, False), (2.0, True)])
def test_learner_passes_its_loss_settings_to_drqn(delta, rescale):
    """learner.huber_delta / value_rescale reach drqn_loss (they were left at drqn_loss's defaults)."""
    from apex_local.agents.learner import Learner
    from apex_local.config import Config, replace

    cfg = replace(Config(), **{"network.hidden_sizes": [16], "network.head_hidden": 8, "network.lstm_size": H,
                               "network.dueling": True, "learner.drqn_update": "random", "replay.burn_in": 0,
                               "replay.n_step": 1, "learner.double_q": False, "learner.huber_delta": delta,
                               "learner.value_rescale": rescale})
    learner = Learner(cfg, (1, 3), np.float32, 2)
    batch = _seq_batch()
    got, _, _ = learner.loss(batch)
    want, _, _ = drqn_loss(learner.online, learner.target, batch, mode="random", huber_delta=delta,
                           value_rescale=rescale)
    torch.testing.assert_close(got, want)
    other, _, _ = drqn_loss(learner.online, learner.target, batch, mode="random",
                            huber_delta=1.0 if delta != 1.0 else 0.0, value_rescale=not rescale)
    assert other.item() != pytest.approx(got.item())
