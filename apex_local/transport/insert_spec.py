"""`InsertSpec`: what an INSERT chunk must look like for one env and agent (docs/architecture.md,
"Insert chunk"). The replay server builds it from the env spec and hands it to `decode` via
`DecodeLimits(insert=...)`; an actor may call ``spec.check(chunk)`` before sending.

Transitions (Ape-X, ``unroll_length == 0``)::

    frames (F, *frame_shape) frame dtype | frame_stream (F,) int32 | frame_seq (F,) int64
    stream (B,) int32 | obs_seq (B, k) int64 | next_seq (B, k) int64 | action (B,) int64
    reward (B,) float32 | discount (B,) float32 | priority (B,) float32 (optional)

Sequences (R2D2, ``unroll_length == T == burn_in + sequence_length``)::

    frames, frame_stream, frame_seq as above | stream (B,) int32 | obs_seq (B, T+1) int64
    action, reward, discount, mask (B, T) | state_h, state_c (B, H) float32 | priority (B,)
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from apex_local.transport.codec import WIRE_DTYPES, ArraySpec, ProtocolError, check_range, check_shape

_I32, _I64, _F32 = ("<i4",), ("<i8",), ("<f4",)
_MASK = ("<f4", "|u1", "|b1")


@dataclass(frozen=True)
class InsertSpec:
    frame_shape: tuple[int, ...]
    frame_dtype: Any  # anything np.dtype accepts; normalised to its wire string ('|u1', '<f4')
    frame_stack: int  # k: obs_seq / next_seq are (B, k) for transitions
    num_actions: int  # actions must lie in [0, num_actions)
    unroll_length: int = 0  # T = burn_in + sequence_length for sequences; 0 = transitions
    lstm_size: int = 0  # H of state_h / state_c (sequences only)
    max_items: int = 65_536  # transitions or sequences per message
    max_frames: int = 1 << 20  # new frames per message
    max_streams: int = 1 << 16  # env streams per actor (stream ids lie in [0, max_streams))

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.frame_shape)
        object.__setattr__(self, "frame_shape", shape)
        dt = np.dtype(self.frame_dtype).str
        object.__setattr__(self, "frame_dtype", dt)
        if dt not in WIRE_DTYPES:
            raise ValueError(f"InsertSpec.frame_dtype {dt!r} cannot travel on the wire; allowed {sorted(WIRE_DTYPES)}")
        if any(d <= 0 for d in shape) or len(shape) > 6:
            raise ValueError(f"InsertSpec.frame_shape {shape} must be 1-6 positive sizes")
        for name in ("frame_stack", "num_actions", "max_items", "max_frames", "max_streams"):
            if getattr(self, name) < 1:
                raise ValueError(f"InsertSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.unroll_length < 0 or (self.unroll_length > 0) != (self.lstm_size > 0):
            raise ValueError(f"InsertSpec: unroll_length ({self.unroll_length}) and lstm_size ({self.lstm_size}) "
                             "must both be > 0 (sequences) or both 0 (transitions)")

    @classmethod
    def from_env(cls, env_spec: Any, *, unroll_length: int = 0, lstm_size: int = 0, **limits: int) -> "InsertSpec":
        """From an `apex_local.envs.EnvSpec` (frame_shape, obs_dtype, frame_stack, num_actions)."""
        return cls(env_spec.frame_shape, env_spec.obs_dtype, env_spec.frame_stack, env_spec.num_actions,
                   unroll_length=unroll_length, lstm_size=lstm_size, **limits)

    @property
    def recurrent(self) -> bool:
        return self.unroll_length > 0

    def array_specs(self) -> Mapping[str, ArraySpec]:
        """name -> ArraySpec of every array an insert may carry (built once per spec: the
        replay server asks twice per message)."""
        cached = self.__dict__.get("_array_specs")
        if cached is None:
            cached = self._build_array_specs()
            object.__setattr__(self, "_array_specs", cached)
        return MappingProxyType(cached)

    def _build_array_specs(self) -> dict[str, ArraySpec]:
        specs = {"frames": ArraySpec((self.frame_dtype,)), "frame_stream": ArraySpec(_I32),
                 "frame_seq": ArraySpec(_I64), "stream": ArraySpec(_I32), "obs_seq": ArraySpec(_I64),
                 "action": ArraySpec(_I64), "reward": ArraySpec(_F32), "discount": ArraySpec(_F32),
                 "priority": ArraySpec(_F32, required=False)}
        if self.recurrent:
            specs.update(mask=ArraySpec(_MASK), state_h=ArraySpec(_F32), state_c=ArraySpec(_F32))
        else:
            specs["next_seq"] = ArraySpec(_I64)
        return specs

    def expected_shapes(self, num_frames: int, num_items: int) -> dict[str, tuple[int, ...]]:
        f, b, t = num_frames, num_items, self.unroll_length
        shapes = {"frames": (f, *self.frame_shape), "frame_stream": (f,), "frame_seq": (f,), "stream": (b,),
                  "priority": (b,)}
        if self.recurrent:
            shapes.update(obs_seq=(b, t + 1), action=(b, t), reward=(b, t), discount=(b, t), mask=(b, t),
                          state_h=(b, self.lstm_size), state_c=(b, self.lstm_size))
        else:
            k = self.frame_stack
            shapes.update(obs_seq=(b, k), next_seq=(b, k), action=(b,), reward=(b,), discount=(b,))
        return shapes

    def check(self, chunk: Mapping[str, np.ndarray]) -> None:
        """Shapes (consistent F and B) and value domains; raises `ProtocolError`.

        Dtypes and finiteness are checked by the decoder; call `array_specs` for those.
        """
        for name, spec in self.array_specs().items():
            if spec.required and name not in chunk:
                raise ProtocolError("missing_array", f"array {name!r} is required")
        frames, stream = np.asarray(chunk["frames"]), np.asarray(chunk["stream"])
        if frames.ndim < 1 or stream.ndim != 1:
            raise ProtocolError("bad_shape", f"frames {frames.shape} / stream {stream.shape} have no leading axis")
        f, b = frames.shape[0], stream.shape[0]
        if f > self.max_frames or b > self.max_items:
            raise ProtocolError("too_large", f"{f} frames / {b} items > {self.max_frames} / {self.max_items}")
        for name, shape in self.expected_shapes(f, b).items():
            if name in chunk:
                check_shape(name, np.asarray(chunk[name]), shape)
        a = {name: np.asarray(v) for name, v in chunk.items()}
        check_range("frame_stream", a["frame_stream"], 0, self.max_streams - 1)
        check_range("stream", a["stream"], 0, self.max_streams - 1)
        check_range("frame_seq", a["frame_seq"], 0)
        check_range("obs_seq", a["obs_seq"], -1)
        check_range("action", a["action"], 0, self.num_actions - 1)
        check_range("discount", a["discount"], 0.0, 1.0)
        if "priority" in a:
            check_range("priority", a["priority"], 0.0)
        if self.recurrent:
            check_range("mask", a["mask"], 0, 1)
        else:
            check_range("next_seq", a["next_seq"], -1)
