"""``make_*`` builders shared by the single-process trainer and the services (STYLE.md #2)."""
from __future__ import annotations

import numpy as np

from apex_local.agents.learner import Learner, resolve_device
from apex_local.config import Config
from apex_local.replay import NStepAccumulator, SequenceAccumulator, make_replay


def set_torch_threads(cfg: Config, spec) -> int:
    """``run.torch_threads`` (0 = auto: 1 for MLP torsos, else cores/4 in [1, 4]). Small nets on
    few cores are many times slower with more threads (OpenMP spin-waits under load)."""
    import os

    import torch

    n = cfg.run.torch_threads
    if not n:
        image = cfg.network.torso == "nature_cnn" or (cfg.network.torso == "auto" and len(spec.frame_shape) >= 2)
        # a topology runs several processes per core: measured on 2 shared cores, 2 threads made
        # the Pong learner 10-15x slower than 1 (docs/benchmarks_topology.md)
        n = max(1, min(4, (os.cpu_count() or 1) // 4)) if image else 1
    torch.set_num_threads(n)
    return n


def make_learner(cfg: Config, spec, device: str | None = None) -> Learner:
    dev = resolve_device(device or cfg.run.device)
    return Learner(cfg, spec.obs_shape, spec.obs_dtype, spec.num_actions, dev)


def make_local_replay(cfg: Config, spec, seed: int = 0, allocator=None):
    """In-process replay. No rate limiter: the single-process loop sets the ratio itself
    (``learner.train_every`` / ``updates_per_train``), so ``replay.samples_per_insert`` only
    applies to the replay server."""
    if cfg.replay.samples_per_insert > 0:
        from apex_local.config import replace

        cfg = replace(cfg, **{"replay.samples_per_insert": 0})
    return make_replay(cfg, spec.frame_shape, spec.obs_dtype, spec.frame_stack,
                       allocator=allocator, rng=np.random.default_rng(seed))


def make_accumulator(cfg: Config, spec, num_envs: int):
    rc = cfg.replay
    if cfg.recurrent:
        return SequenceAccumulator(num_envs=num_envs, burn_in=rc.burn_in, sequence_length=rc.sequence_length,
                                   period=rc.sequence_period, frame_shape=spec.frame_shape,
                                   frame_dtype=spec.obs_dtype, state_size=cfg.network.lstm_size,
                                   gamma=rc.gamma)
    return NStepAccumulator(num_envs=num_envs, n=rc.n_step, gamma=rc.gamma, frame_stack=spec.frame_stack,
                            frame_shape=spec.frame_shape, frame_dtype=spec.obs_dtype)


def push_chunk(replay, acc, actor_id: int = 0) -> int:
    """Flush the accumulator into an in-process replay; returns items inserted."""
    chunk = acc.flush()
    if chunk is None:
        return 0
    chunk.pop("q", None)
    return replay.insert(actor_id, chunk)
