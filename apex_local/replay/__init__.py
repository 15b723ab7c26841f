"""Replay in four swappable parts (DESIGN.md §4, STYLE.md #5).

storage (``frames``, ``tables``), sampler (``sum_tree``, ``samplers``), accumulator
(``accumulators``, runs in the actor) and rate limiter (``rate_limiter``), composed by
``replay.Replay`` and built by ``make_replay`` for both the local trainer and the server.
"""
from apex_local.replay.accumulators import NStepAccumulator, SequenceAccumulator
from apex_local.replay.frames import ChunkError, FrameStore, default_allocator, layout_nbytes
from apex_local.replay.rate_limiter import RateLimiter
from apex_local.replay.replay import (RateLimitedError, Replay, SampleResult, make_replay, make_table,
                                      replay_layout, replay_nbytes)
from apex_local.replay.samplers import PrioritizedSampler, UniformSampler, beta_schedule, make_sampler
from apex_local.replay.tables import SequenceTable, TransitionTable

__all__ = [
    "ChunkError", "FrameStore", "NStepAccumulator", "PrioritizedSampler", "RateLimitedError", "RateLimiter",
    "Replay", "SampleResult", "SequenceAccumulator", "SequenceTable", "TransitionTable", "UniformSampler",
    "beta_schedule", "default_allocator", "layout_nbytes", "make_replay", "make_sampler", "make_table",
    "replay_layout", "replay_nbytes",
]
