"""Learner, policy, epsilon ladder and checkpoints (no processes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from apex_local.agents.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from apex_local.agents.learner import Learner
from apex_local.agents.policy import EpsilonSchedule, Policy, ladder_position
from apex_local.config import ActorConfig, replace, Config
from apex_local.errors import NonFiniteLossError
from apex_local.exploration import apex_epsilon


@pytest.mark.parametrize("slot,pos", [(0, 0.0), (1, 1.0), (2, 0.5), (3, 0.25), (4, 0.75), (5, 0.125),
                                      (6, 0.625), (7, 0.375), (8, 0.875)])
def test_ladder_positions(slot, pos):
    assert ladder_position(slot) == pos


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16])
def test_prefix_ladder_covers_paper_range(n):
    cfg = ActorConfig(exploration="apex", num_actors=0)
    eps = np.concatenate([EpsilonSchedule(cfg, i, 1)(0) for i in range(n)])
    assert eps.max() == pytest.approx(0.4)
    assert eps.min() == pytest.approx(0.4 ** 8)
    # evenly spread in log space: no gap bigger than twice the even spacing
    logs = np.sort(np.log(eps) / np.log(0.4) - 1) / 7  # back to positions in [0, 1]
    assert np.max(np.diff(logs)) <= 2.0 / (n - 1) + 1e-9


def test_exact_ladder_matches_paper():
    cfg = ActorConfig(exploration="apex", num_actors=4)
    eps = np.concatenate([EpsilonSchedule(cfg, i, 2)(0) for i in range(4)])
    expected = [apex_epsilon(s, 8, 0.4, 7.0) for s in range(8)]
    np.testing.assert_allclose(eps, expected)
    assert eps[0] == pytest.approx(0.4) and eps[-1] == pytest.approx(0.4 ** 8)
    with pytest.raises(ValueError, match="actor.num_actors"):
        EpsilonSchedule(cfg, 4, 2)


def test_linear_and_noisy_schedules():
    lin = EpsilonSchedule(ActorConfig(exploration="linear", eps_start=1.0, eps_end=0.1, eps_decay_steps=100))
    assert lin(0) == pytest.approx(1.0) and lin(50) == pytest.approx(0.55) and lin(1000) == pytest.approx(0.1)
    assert EpsilonSchedule(ActorConfig(exploration="none"))(0) == 0.0


def _cfg(**kw) -> Config:
    base = {"network.hidden_sizes": [16], "network.head_hidden": 0, "learner.lr": 1e-2,
            "learner.target_update_period": 3, "learner.max_nonfinite_in_row": 3}
    base.update(kw)
    return replace(Config(), **base)


def _batch(learner, b=8, seed=0, nan=False):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(b, 1, 4)).astype(np.float32)
    arrays = {"obs": obs, "action": rng.integers(0, 2, b), "reward": rng.normal(size=b).astype(np.float32),
              "discount": np.full(b, 0.99, np.float32), "next_obs": obs + 0.1,
              "weight": np.ones(b, np.float32)}
    if nan:
        arrays["reward"][0] = np.nan
    return learner.to_batch(arrays)


def test_learner_update_and_target_sync():
    learner = Learner(_cfg(), (1, 4), np.float32, 2)
    before = [p.clone() for p in learner.online.parameters()]
    res = learner.update(_batch(learner))
    assert not res.skipped and res.priorities.shape == (8,) and np.all(np.isfinite(res.priorities))
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.online.parameters()))
    assert learner.updates == 1
    # target syncs every 3 updates
    for i in range(2):
        learner.update(_batch(learner, seed=i + 1))
    for a, b in zip(learner.online.parameters(), learner.target.parameters()):
        assert torch.equal(a, b)


def test_adam_is_fused_where_torch_has_it_and_plain_otherwise(monkeypatch):
    from apex_local.agents.optim import FusedAdam

    learner = Learner(_cfg(), (1, 4), np.float32, 2)
    assert isinstance(learner.optimizer, FusedAdam) and learner.optimizer.defaults["fused"] is True
    real = torch.optim.Adam

    def old_torch_adam(params, fused=None, **kw):  # torch < 2.4: no fused kernel for the CPU
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kw)

    monkeypatch.delattr(torch, "_fused_adam_")
    monkeypatch.setattr(torch.optim, "Adam", old_torch_adam)
    learner = Learner(_cfg(), (1, 4), np.float32, 2)
    assert not learner.optimizer.defaults.get("fused") and learner.optimizer.param_groups[0]["params"]
    assert not learner.update(_batch(learner)).skipped


def test_nonfinite_loss_skipped_then_fatal():
    learner = Learner(_cfg(), (1, 4), np.float32, 2)
    before = [p.clone() for p in learner.online.parameters()]
    for _ in range(2):
        res = learner.update(_batch(learner, nan=True))
        assert res.skipped and res.priorities is None
    assert learner.nonfinite_total == 2 and learner.updates == 0
    for a, b in zip(before, learner.online.parameters()):
        assert torch.equal(a, b)  # no NaN reached the weights
    learner.update(_batch(learner))  # a good step resets the in-a-row count
    learner.update(_batch(learner, nan=True))
    learner.update(_batch(learner, nan=True))
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_in_row"):
        learner.update(_batch(learner, nan=True))


def test_deterministic_resume(tmp_path):
    """Train M, save, train M more  ==  restore, train M (same batches)."""
    a = Learner(_cfg(), (1, 4), np.float32, 2)
    for i in range(5):
        a.update(_batch(a, seed=i))
    save_checkpoint(tmp_path / "c.pt", a.state_dict())
    for i in range(5, 10):
        a.update(_batch(a, seed=i))
    b = Learner(_cfg(**{"run.seed": 99}), (1, 4), np.float32, 2)
    b.load_state_dict(load_checkpoint(tmp_path / "c.pt"))
    for i in range(5, 10):
        b.update(_batch(b, seed=i))
    assert a.updates == b.updates == 10
    for x, y in zip(a.online.state_dict().values(), b.online.state_dict().values()):
        assert torch.equal(x, y)


def test_truncated_checkpoint_is_refused(tmp_path):
    p = save_checkpoint(tmp_path / "checkpoint.pt", {"x": torch.ones(1000)})
    assert load_checkpoint(tmp_path)["x"].sum() == 1000
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind


def test_policy_epsilon_per_env_and_recurrent_state_reset():
    learner = Learner(_cfg(**{"network.lstm_size": 8}), (1, 4), np.float32, 2)
    pol = Policy(learner.online, num_envs=3, seed=0)
    obs = np.ones((3, 1, 4), np.float32)
    a, q, prev = pol.act(obs, np.array([0.0, 0.0, 1.0]))
    assert a.shape == (3,) and q.shape == (3, 2)
    assert all(torch.count_nonzero(s) == 0 for s in prev)  # state before the first step is zero
    assert all(torch.count_nonzero(s) > 0 for s in pol.state)
    pol.reset_state(np.array([True, False, False]))
    assert torch.count_nonzero(pol.state[0][0]) == 0 and torch.count_nonzero(pol.state[0][1]) > 0


@pytest.mark.parametrize("eps", [1.0, 0.7, 0.2, 0.0])
def test_policy_without_q_acts_exactly_as_with_q_and_skips_the_net_when_all_explore(eps):
    """need_q=False (single-process trainer): the same actions, step by step, as the q path;
    the network runs only on steps where some env acts greedily."""
    learner = Learner(_cfg(), (1, 4), np.float32, 3)
    with_q, without = (Policy(learner.online, num_envs=4, seed=7, noise=False) for _ in range(2))
    calls = []
    hook = learner.online.register_forward_hook(lambda *_: calls.append(1))
    obs_rng = np.random.default_rng(0)
    skipped = 0
    for _ in range(60):
        obs = obs_rng.normal(size=(4, 1, 4)).astype(np.float32)
        a, q, _ = with_q.act(obs, eps)
        n = len(calls)
        b, q2, _ = without.act(obs, eps, need_q=False)
        np.testing.assert_array_equal(a, b)
        assert q.shape == (4, 3) and (q2 is None or np.array_equal(q2, q))
        skipped += len(calls) == n
    hook.remove()
    if eps == 1.0:
        assert skipped == 60  # every env explores on every step: never a forward pass
    elif eps == 0.0:
        assert skipped == 0
    elif eps == 0.7:  # P(all 4 explore) = 0.24: ~14 of 60 steps skip the net
        assert 0 < skipped < 60
    else:  # 0.2 ** 4: almost never
        assert skipped < 5


def test_bootstrap_q_does_not_advance_recurrent_state():
    learner = Learner(_cfg(**{"network.lstm_size": 8}), (1, 4), np.float32, 2)
    pol = Policy(learner.online, num_envs=3, seed=0, noise=False)
    obs = np.ones((3, 1, 4), np.float32)
    pol.act(obs, 0.0)
    before = tuple(s.clone() for s in pol.state)
    q = pol.bootstrap_q(obs[[0, 2]] * 2, np.array([0, 2]))
    assert q.shape == (2, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, pol.state))
    # equals stepping rows 0 and 2 from their current state
    out, _ = learner.online.step(torch.as_tensor(obs[[0, 2]] * 2), tuple(s[[0, 2]] for s in before))
    np.testing.assert_allclose(q, out.q.detach().numpy(), rtol=1e-6)


def test_cli_eval_missing_checkpoint_exits_2_without_traceback():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "apex_local.cli", "eval", "--checkpoint", "/nonexistent/run"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no checkpoint at /nonexistent/run" in r.stderr
    assert "Traceback" not in r.stderr


def test_status_line_formats_its_extra_only_when_it_prints():
    import io

    from apex_local.agents.local import StatusLine

    out, calls = io.StringIO(), []

    def extra():
        calls.append(1)
        return "replay=7 eps=0.500"

    quiet = StatusLine(0, out)
    quiet.maybe(10, 1, extra)
    assert calls == [] and out.getvalue() == ""  # every <= 0: never printed, never formatted
    quiet.maybe(10, 1, extra, force=True)
    assert calls == [1] and "steps=10" in out.getvalue() and "replay=7 eps=0.500" in out.getvalue()
    hourly = StatusLine(3600, out)
    hourly.maybe(20, 2, extra)
    assert calls == [1]  # not yet due
    hourly.t_last -= 3601
    hourly.maybe(30, 3, "plain text")
    assert "steps=30" in out.getvalue() and "plain text" in out.getvalue()
