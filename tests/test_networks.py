"""Networks: torsos, heads (plain / dueling / noisy / C51), LSTM core, flat parameters, presets."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apex_local.config import NetworkConfig, apply_overrides, config_from_dict
from apex_local.networks import (METHODS, MLPTorso, NatureCNNTorso, NoisyLinear, QOut, flat_parameters,
                                 load_flat_parameters, make_network, num_flat_parameters, preset_overrides)

CARTPOLE = ((1, 4), np.float32)
SMALL = dict(hidden_sizes=(16,), head_hidden=8)


def _net(obs=CARTPOLE, num_actions=3, **kw):
    torch.manual_seed(0)
    return make_network(NetworkConfig(**{**SMALL, **kw}), obs[0], obs[1], num_actions)


def test_auto_torso_picks_mlp_for_vectors_and_cnn_for_uint8_images():
    assert isinstance(_net().torso, MLPTorso)
    net = _net(obs=((4, 84, 84), np.uint8))
    assert isinstance(net.torso, NatureCNNTorso)
    assert net.torso.out_dim == 64 * 7 * 7  # 84 -> 20 -> 9 -> 7
    # float images are not "images" for auto; an explicit nature_cnn still works
    assert isinstance(_net(obs=((4, 84, 84), np.float32)).torso, MLPTorso)
    assert isinstance(_net(obs=((4, 84, 84), torch.float32), torso="nature_cnn").torso, NatureCNNTorso)


def test_cnn_other_square_sizes_and_too_small():
    net = _net(obs=((2, 64, 64), "uint8"))
    assert net.torso.out_dim == 64 * 4 * 4  # 64 -> 15 -> 6 -> 4
    out = net(torch.zeros(5, 2, 64, 64, dtype=torch.uint8))
    assert out.q.shape == (5, 3)
    with pytest.raises(ValueError, match="36x36"):
        _net(obs=((1, 20, 20), np.uint8), torso="nature_cnn")
    with pytest.raises(ValueError, match="image observations"):
        _net(torso="nature_cnn")


def test_uint8_is_scaled_by_255():
    net = _net(obs=((1, 36, 36), np.uint8))
    obs = torch.randint(0, 256, (2, 1, 36, 36), dtype=torch.uint8)
    expected = net.head(net.torso(obs.float() / 255.0), net.support).q
    torch.testing.assert_close(net(obs).q, expected)


@pytest.mark.parametrize("kw", [
    dict(), dict(head_hidden=0), dict(dueling=True), dict(noisy=True), dict(categorical=True, num_atoms=5),
    dict(dueling=True, noisy=True, categorical=True, num_atoms=7, head_hidden=0),
])
def test_head_shapes(kw):
    net = _net(**kw)
    out = net(torch.randn(4, 1, 4))
    assert isinstance(out, QOut) and out.q.shape == (4, 3)
    assert net.noisy == kw.get("noisy", False) and net.categorical == kw.get("categorical", False)
    assert not net.recurrent and net.num_actions == 3
    if net.categorical:
        atoms = kw["num_atoms"]
        assert out.log_probs.shape == (4, 3, atoms)
        torch.testing.assert_close(out.log_probs.exp().sum(-1), torch.ones(4, 3))
        torch.testing.assert_close(out.q, (out.log_probs.exp() * net.support).sum(-1))  # Q = sum_i z_i p_i
        torch.testing.assert_close(net.support, torch.linspace(-10, 10, atoms))
    else:
        assert out.log_probs is None and net.support is None


def test_dueling_advantages_have_zero_mean():
    net = _net(dueling=True)
    feats = net.torso(torch.randn(6, 1, 4))
    q = net.head(feats, None).q
    value = net.head.value(feats)  # (6, 1)
    # Q = V + A - mean_a A  =>  mean_a (Q - V) = 0
    torch.testing.assert_close((q - value).mean(dim=1), torch.zeros(6), atol=1e-6, rtol=0)


def test_noisy_layer_init_resampling_and_eval_mean():
    torch.manual_seed(1)
    layer = NoisyLinear(16, 4, sigma0=0.5)
    # sigma init = sigma0 / sqrt(fan_in) = 0.5 / 4 = 0.125
    assert torch.allclose(layer.weight_sigma, torch.full((4, 16), 0.125))
    assert torch.allclose(layer.bias_sigma, torch.full((4,), 0.125))
    assert layer.weight_mu.abs().max() <= 1 / math.sqrt(16)
    assert "eps_in" not in layer.state_dict()  # noise is not part of the weights
    x = torch.randn(3, 16)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))  # fresh noise each forward
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    torch.testing.assert_close(layer(x), x @ layer.weight_mu.T + layer.bias_mu)


def test_noisy_network_train_vs_eval_and_reset_noise():
    net = _net(noisy=True, dueling=True)
    x = torch.randn(2, 1, 4)
    assert not torch.allclose(net(x).q, net(x).q)
    before = net.head.advantage[0].eps_in.clone()
    net.reset_noise()
    assert not torch.equal(before, net.head.advantage[0].eps_in)
    net.eval()
    torch.testing.assert_close(net(x).q, net(x).q)


def _rnn(**kw):
    return _net(lstm_size=8, **kw)


def test_recurrent_api_and_unroll_equals_stepping():
    net = _rnn(dueling=True, categorical=True, num_atoms=5)
    assert net.recurrent
    with pytest.raises(TypeError):
        net(torch.zeros(2, 1, 4))
    h, c = net.initial_state(3, "cpu")
    assert h.shape == c.shape == (3, 8) and not h.any()
    obs = torch.randn(6, 3, 1, 4)
    state = (torch.randn(3, 8), torch.randn(3, 8))
    out, final = net.unroll(obs, state)
    assert out.q.shape == (6, 3, 3) and out.log_probs.shape == (6, 3, 3, 5)
    s = state
    for t in range(6):
        step_out, s = net.step(obs[t], s)
        torch.testing.assert_close(step_out.q, out.q[t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step_out.log_probs, out.log_probs[t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s[0], final[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s[1], final[1], atol=1e-5, rtol=1e-5)


def test_done_mask_resets_state_before_the_step():
    net = _rnn()
    obs = torch.randn(5, 2, 1, 4)
    state = (torch.randn(2, 8), torch.randn(2, 8))
    done = torch.zeros(5, 2, dtype=torch.bool)
    done[0, 1] = True  # stream 1 starts fresh
    done[3, 0] = True  # stream 0 resets before step 3
    out, final = net.unroll(obs, state, done)
    s = state
    for t in range(5):
        keep = (~done[t]).float().unsqueeze(1)
        s = (s[0] * keep, s[1] * keep)
        step_out, s = net.step(obs[t], s)
        torch.testing.assert_close(step_out.q, out.q[t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s[0], final[0], atol=1e-5, rtol=1e-5)
    # step(done=...) is the same reset
    o1, _ = net.step(obs[0], state, done=done[0])
    torch.testing.assert_close(o1.q, out.q[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(noisy=True, dueling=True, categorical=True, num_atoms=5),
                                dict(lstm_size=8)])
def test_flat_parameter_round_trip(kw):
    a = _net(**kw)
    torch.manual_seed(123)
    b = make_network(NetworkConfig(**{**SMALL, **kw}), (1, 4), np.float32, 3)
    flat = flat_parameters(a)
    assert flat.dtype == torch.float32 and flat.dim() == 1
    n_params = sum(p.numel() for p in a.parameters())
    extra = kw.get("num_atoms", 0)  # the C51 support buffer travels too; noise buffers do not
    assert flat.numel() == num_flat_parameters(a) == n_params + extra
    assert not torch.equal(flat, flat_parameters(b))
    load_flat_parameters(b, flat.numpy().copy())
    torch.testing.assert_close(flat_parameters(b), flat)
    a.eval(), b.eval()
    x = torch.randn(2, 1, 4)
    if a.recurrent:
        st = a.initial_state(2)
        torch.testing.assert_close(a.step(x, st)[0].q, b.step(x, st)[0].q)
    else:
        torch.testing.assert_close(a(x).q, b(x).q)
    board = torch.zeros(flat.numel())
    assert flat_parameters(a, out=board) is board and torch.equal(board, flat)
    with pytest.raises(ValueError, match="expected"):
        load_flat_parameters(b, flat[:-1])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("atari", [False, True])
def test_presets_name_real_fields_and_validate(method, atari):
    over = preset_overrides(method, atari=atari)
    cfg = config_from_dict(apply_overrides({}, over))  # unknown keys or bad combos raise ConfigError
    for key, value in over.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value
    if method in ("r2d2", "drqn"):
        assert cfg.network.lstm_size == (512 if atari else 64)


def test_preset_values_from_the_papers():
    r2d2 = preset_overrides("r2d2", lstm_size=32)
    assert r2d2["network.lstm_size"] == 32
    assert (r2d2["replay.n_step"], r2d2["replay.gamma"], r2d2["learner.priority_eta"]) == (5, 0.997, 0.9)
    assert (r2d2["replay.burn_in"], r2d2["replay.sequence_length"], r2d2["replay.sequence_period"]) == (40, 80, 40)
    assert (r2d2["learner.lr"], r2d2["learner.adam_eps"], r2d2["learner.value_rescale"]) == (1e-4, 1e-3, True)
    rainbow = preset_overrides("rainbow")
    assert rainbow["network.dueling"] and rainbow["network.noisy"] and rainbow["network.categorical"]
    assert rainbow["actor.exploration"] == "none" and rainbow["replay.prioritized"] and rainbow["replay.n_step"] == 3
    assert preset_overrides("apex")["network.dueling"] and preset_overrides("apex")["learner.double_q"]
    with pytest.raises(ValueError, match="no preset"):
        preset_overrides("a3c")


def test_run_layers_is_the_sequential_call_with_the_same_values_and_gradients():
    import torch
    from torch import nn

    from apex_local.networks.heads import NoisyLinear, run_layers

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), NoisyLinear(8, 8, 0.5), nn.ReLU(inplace=True), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    torch.manual_seed(1)
    a = seq(x)
    a.sum().backward()
    ga = [p.grad.clone() for p in seq.parameters()]
    seq.zero_grad()
    torch.manual_seed(1)  # NoisyLinear draws its noise again: same draws
    b = run_layers(seq, x)
    b.sum().backward()
    assert torch.equal(a, b)
    assert all(torch.equal(g, p.grad) for g, p in zip(ga, seq.parameters()))
