"""Batches the losses receive: dataclasses of tensors, built from the replay's numpy arrays.

TransitionBatch (Ape-X / DQN / Rainbow), one n-step transition per row:
    obs (B, k, *frame), action (B,) int64, reward (B,) float32 (n-step discounted sum),
    discount (B,) float32 = gamma^m if the window did not terminate (time-limit truncation
    bootstraps) else 0, next_obs (B, k, *frame), weight (B,) float32 IS weight.

SequenceBatch (R2D2 / DRQN), batch-major, T = burn_in + sequence_length:
    obs (B, T+1, k, *frame) (k = 1 for R2D2/DRQN; the +1 is the bootstrap observation),
    action, reward (B, T), discount (B, T) = the PER-STEP discount gamma * (1 - terminal_t)
    (gamma included; a truncated last step keeps gamma), mask (B, T) 1 = real step / 0 = zero
    padding after the episode end, state_h, state_c (B, H) the actor's LSTM state before obs[:, 0],
    weight (B,).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

_INT = ("action",)
_FLOAT = ("reward", "discount", "weight", "mask", "state_h", "state_c")


def _tensor(name: str, value: Any, copy: bool) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.clone() if copy else value
    else:
        t = torch.tensor(np.asarray(value)) if copy else torch.as_tensor(np.asarray(value))
    if name in _INT:
        return t.long()
    if name in _FLOAT:
        return t.float()
    return t  # observations keep their dtype (uint8 frames are scaled inside the network)


def _from_mapping(cls: type, data: Mapping[str, Any], copy: bool) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in data and n != "weight"]
    if missing:
        raise KeyError(f"{cls.__name__}.from_numpy: missing arrays {missing}; got {sorted(data)}")
    kwargs = {n: _tensor(n, data[n], copy) for n in names if n in data}
    if "weight" not in kwargs:  # uniform replay: IS weights are all 1
        kwargs["weight"] = torch.ones(kwargs["action"].shape[0])
    return cls(**kwargs)


class _Batch:
    def to(self, device: Any, non_blocking: bool = False) -> Any:
        """A copy with every tensor moved to `device`."""
        return dataclasses.replace(self, **{  # type: ignore[arg-type]
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)})  # type: ignore[arg-type]

    @property
    def batch_size(self) -> int:
        return int(self.action.shape[0])  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TransitionBatch(_Batch):
    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    discount: torch.Tensor
    next_obs: torch.Tensor
    weight: torch.Tensor

    @classmethod
    def from_numpy(cls, data: Mapping[str, Any], copy: bool = False) -> "TransitionBatch":
        """From a dict of arrays (extra keys such as index/generation are ignored; a missing
        weight means 1). copy=False shares memory with arrays already of the
        right dtype (float32 / int64 / frames): keep a shared-memory slot
        alive until the loss is computed, or pass copy=True."""
        return _from_mapping(cls, data, copy)


@dataclass(frozen=True)
class SequenceBatch(_Batch):
    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    discount: torch.Tensor
    mask: torch.Tensor
    state_h: torch.Tensor
    state_c: torch.Tensor
    weight: torch.Tensor

    @classmethod
    def from_numpy(cls, data: Mapping[str, Any], copy: bool = False) -> "SequenceBatch":
        """As `TransitionBatch.from_numpy`; mask is converted to float32 (1 = real step)."""
        return _from_mapping(cls, data, copy)

    @property
    def sequence_steps(self) -> int:
        """T = burn_in + sequence_length."""
        return int(self.action.shape[1])
