"""`QNetwork` = preprocessing -> torso -> [LSTM core] -> Q head, and `make_network`.

Feed-forward:  out = net(obs)                       obs (B, k, *frame) -> QOut (B, A)
Recurrent:     state = net.initial_state(B, device)  (h, c) each (B, H)
               out, state = net.unroll(obs_TB, state, done_mask)   (T, B, ...) time-major
               out, state = net.step(obs_B, state)                  == unroll with T = 1

uint8 observations are converted to float and scaled by 1/255 (any torso); other dtypes are
only converted to float32.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from apex_local.config import NetworkConfig
from apex_local.networks.heads import NoisyLinear, QHead, QOut
from apex_local.networks.torsos import make_torso

State = tuple[torch.Tensor, torch.Tensor]


def is_uint8_dtype(dtype: Any) -> bool:
    """True for torch.uint8, np.uint8, np.dtype('uint8') or 'uint8'."""
    if isinstance(dtype, torch.dtype):
        return dtype == torch.uint8
    try:
        return np.dtype(dtype) == np.uint8
    except TypeError:
        return False


class QNetwork(nn.Module):
    """Q network; see the module docstring for the call conventions.

    Attributes: recurrent, categorical, noisy, num_actions, lstm_size (0 if feed-forward),
    support ((atoms,) buffer for C51, else None), obs_shape.
    """

    def __init__(self, net_cfg: NetworkConfig, obs_shape: Sequence[int], obs_dtype: Any, num_actions: int):
        super().__init__()
        if num_actions < 1:
            raise ValueError(f"num_actions must be >= 1, got {num_actions}")
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.num_actions = int(num_actions)
        self.scale_uint8 = is_uint8_dtype(obs_dtype)
        self.categorical = bool(net_cfg.categorical)
        self.noisy = bool(net_cfg.noisy)
        self.lstm_size = int(net_cfg.lstm_size)
        self.recurrent = self.lstm_size > 0
        self.torso = make_torso(net_cfg.torso, self.obs_shape, self.scale_uint8, net_cfg.hidden_sizes)
        feat = self.torso.out_dim
        self.core: Optional[nn.LSTM] = None
        if self.recurrent:
            self.core = nn.LSTM(feat, self.lstm_size)  # time-major, one layer
            feat = self.lstm_size
        support = None
        if self.categorical:
            if not net_cfg.v_min < net_cfg.v_max:
                raise ValueError(f"network.v_min ({net_cfg.v_min}) must be < network.v_max ({net_cfg.v_max})")
            support = torch.linspace(net_cfg.v_min, net_cfg.v_max, net_cfg.num_atoms)
        self.register_buffer("support", support)  # None when not categorical
        self.head = QHead(feat, self.num_actions, hidden=int(net_cfg.head_hidden), dueling=bool(net_cfg.dueling),
                          noisy=self.noisy, sigma0=float(net_cfg.noisy_sigma0), support=support)

    # ----------------------------------------------------------------- helpers

    def _features(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float()
        if self.scale_uint8:
            x = x / 255.0
        return self.torso(x)

    def reset_noise(self) -> None:
        """Resample the noise of every noisy layer (train-mode forwards also do this)."""
        for m in self.modules():
            if isinstance(m, NoisyLinear):
                m.reset_noise()

    # ----------------------------------------------------------------- feed-forward

    def forward(self, obs: torch.Tensor) -> QOut:
        if self.recurrent:
            raise TypeError("recurrent QNetwork: use net.step(obs, state) or net.unroll(obs_TB, state)")
        return self.head(self._features(obs), self.support)

    # ----------------------------------------------------------------- recurrent

    def initial_state(self, batch_size: int, device: Any = None) -> State:
        if not self.recurrent:
            raise TypeError("initial_state() is only defined for recurrent networks (network.lstm_size > 0)")
        if device is None:
            device = next(self.parameters()).device
        zeros = torch.zeros(batch_size, self.lstm_size, device=device)
        return zeros, zeros.clone()

    def unroll(self, obs: torch.Tensor, state: State,
               done_mask: Optional[torch.Tensor] = None) -> tuple[QOut, State]:
        """obs (T, B, k, *frame); state (h, c) each (B, H); done_mask (T, B) bool: where True
        the state is reset to zero BEFORE step t is processed. Returns QOut with (T, B, ...)
        tensors and the final state."""
        if not self.recurrent:
            raise TypeError("unroll() is only defined for recurrent networks (network.lstm_size > 0)")
        steps, batch = obs.shape[0], obs.shape[1]
        feats = self._features(obs.reshape(steps * batch, *obs.shape[2:])).view(steps, batch, -1)
        h, c = state[0].unsqueeze(0), state[1].unsqueeze(0)
        # Split time at steps where some stream resets; each segment is one cuDNN-friendly call.
        starts = [0]
        if done_mask is not None:
            starts += [t for t in torch.nonzero(done_mask.any(dim=1)).flatten().tolist() if t > 0]
        outs = []
        for i, t0 in enumerate(starts):
            t1 = starts[i + 1] if i + 1 < len(starts) else steps
            if done_mask is not None:
                keep = (~done_mask[t0].bool()).to(h.dtype).view(1, batch, 1)
                h, c = h * keep, c * keep
            out, (h, c) = self.core(feats[t0:t1], (h, c))
            outs.append(out)
        core_out = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
        q_out = self.head(core_out.reshape(steps * batch, -1), self.support)
        q = q_out.q.view(steps, batch, self.num_actions)
        log_probs = None if q_out.log_probs is None else q_out.log_probs.view(steps, batch, self.num_actions, -1)
        return QOut(q, log_probs), (h.squeeze(0), c.squeeze(0))

    def step(self, obs: torch.Tensor, state: State,
             done: Optional[torch.Tensor] = None) -> tuple[QOut, State]:
        """One step: obs (B, k, *frame) -> QOut (B, ...), new state. done (B,) resets first."""
        mask = None if done is None else done.view(1, -1)
        out, new_state = self.unroll(obs.unsqueeze(0), state, mask)
        log_probs = None if out.log_probs is None else out.log_probs[0]
        return QOut(out.q[0], log_probs), new_state


def make_network(net_cfg: NetworkConfig, obs_shape: tuple, obs_dtype: Any, num_actions: int) -> QNetwork:
    """Build the Q network for an observation spec. `torso: auto` -> nature_cnn for (k, H, W)
    uint8 observations, else mlp. Heads compose (dueling / noisy / C51); lstm_size > 0 adds the
    recurrent core."""
    return QNetwork(net_cfg, obs_shape, obs_dtype, num_actions)
