"""The message kinds of the wire protocol (DESIGN.md §3; STYLE.md #6): one dataclass each.

=================  ==========================  =============================================
kind               direction                   carries
=================  ==========================  =============================================
insert             actor -> replay (PUSH)      the insert chunk (docs/architecture.md) as
                                               arrays; actor_id, env_steps since the last
                                               report, finished episodes (return, length)
insert_ref         actor -> replay (PUSH)      an insert whose frame lies in the actor's
                                               shared-memory insert ring (insert_ring.py):
                                               ring, nonce, start, nbytes, end
sample_request     learner -> replay (DEALER)  request_id, batch_size, beta
batch_ready        replay -> learner (ROUTER)  request_id, slot_id, slot_seq, epoch,
                                               batch_size; optional arrays index,
                                               generation, weight (B,)
priority_update    learner -> replay           index, generation (int64), priority (float32)
gradients          learner -> paramserver      (Gorila) grad (N,) float32, batch_size,
                                               env_steps (local replay: inserted since the last)
info_request       any -> replay               request_id
info               replay -> requester         request_id, data: small {str: scalar} map
heartbeat          any -> any                  incarnation (random per process start)
error              replay -> requester         request_id, reason, detail, retry_after_ms
=================  ==========================  =============================================

Every message also carries ``sender`` (e.g. 'actor.3') and ``weights_version`` ("wv").
``msg.encode()`` gives the parts and ``msg.to_frame()`` the one ZMQ frame that carries them
(codec.py); `decode_frame` (frame, limits) / `decode` (parts, limits) validate everything and
raise `ProtocolError`. Unknown extra header keys are ignored (additive changes need no version bump).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from apex_local.transport.codec import (
    MAX_I64, PROTOCOL_VERSION, ArraySpec, DecodeLimits, ProtocolError, check_range, check_shape,
    decode_arrays, get_float, get_int, get_list, get_str, join_parts, pack_header, split_frame, unpack_header,
    wire_array)
from apex_local.transport.insert_spec import InsertSpec

__all__ = ["Message", "Insert", "InsertRef", "SampleRequest", "BatchReady", "PriorityUpdate", "Gradients", "InfoRequest", "Info",
           "Heartbeat", "Error", "KINDS", "decode", "decode_frame", "decode_received", "DEFAULT_LIMITS", "InsertSpec"]

DEFAULT_LIMITS = DecodeLimits()
_I64 = ("<i8",)
_F32 = ("<f4",)
_MAX_EPISODES = 4096
_MAX_SLOTS = 1 << 16


@dataclass(kw_only=True, eq=False)
class Message:
    KIND: ClassVar[str] = ""
    sender: str = ""
    weights_version: int = 0

    def fields(self) -> dict[str, Any]:
        """Kind-specific scalar header fields."""
        return {}

    def arrays(self) -> dict[str, np.ndarray | None]:
        """Kind-specific arrays (None entries are left out)."""
        return {}

    def encode(self) -> list[bytes | np.ndarray]:
        """The parts: header bytes, then the arrays (not copied)."""
        arrs = [(n, wire_array(a)) for n, a in self.arrays().items() if a is not None]
        return [pack_header(self.KIND, self.sender, self.weights_version, arrs, self.fields()),
                *(a for _, a in arrs)]

    def to_frame(self) -> np.ndarray:
        """The one ZMQ frame that carries this message (``codec.join_parts``)."""
        return join_parts(self.encode())

    @classmethod
    def array_specs(cls, limits: DecodeLimits) -> Mapping[str, ArraySpec]:
        return {}

    @classmethod
    def from_wire(cls, h: Mapping, arrays: dict[str, np.ndarray], limits: DecodeLimits,
                  **base: Any) -> "Message":
        raise NotImplementedError  # pragma: no cover


@dataclass(kw_only=True, eq=False)
class Insert(Message):
    KIND: ClassVar[str] = "insert"
    actor_id: int = 0
    env_steps: int = 0  # env steps since this actor's previous insert
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    chunk: dict[str, np.ndarray] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        return {"actor_id": int(self.actor_id), "env_steps": int(self.env_steps),
                "ep_returns": [float(r) for r in self.episode_returns],
                "ep_lengths": [int(n) for n in self.episode_lengths]}

    def arrays(self) -> dict[str, np.ndarray | None]:
        return dict(self.chunk)

    @classmethod
    def array_specs(cls, limits: DecodeLimits) -> Mapping[str, ArraySpec]:
        if limits.insert is None:
            raise ProtocolError("unknown_kind", "insert messages are not accepted on this socket")
        return limits.insert.array_specs()

    @classmethod
    def from_wire(cls, h, arrays, limits, **base):
        rets = get_list(h, "ep_returns", float, _MAX_EPISODES)
        lens = get_list(h, "ep_lengths", int, _MAX_EPISODES)
        if len(rets) != len(lens) or any(n < 0 for n in lens):
            raise ProtocolError("bad_field", "ep_returns / ep_lengths must pair up, lengths >= 0")
        limits.insert.check(arrays)
        return cls(actor_id=get_int(h, "actor_id", 0, 1 << 20), env_steps=get_int(h, "env_steps", 0, 1 << 40),
                   episode_returns=rets, episode_lengths=lens, chunk=arrays, **base)


@dataclass(kw_only=True, eq=False)
class InsertRef(Message):
    """An `Insert` whose one-frame envelope the sender wrote into its insert ring
    ``apex_<run>_ins_<ring>`` at absolute position ``start`` (``nbytes`` long; ``end``: where the
    ring is free up to once it is stored). The consumer decodes it from there (insert_ring.py)."""
    KIND: ClassVar[str] = "insert_ref"
    ring: str = ""
    nonce: int = 0
    start: int = 0
    nbytes: int = 0
    end: int = 0

    def fields(self):
        return {"ring": self.ring, "nonce": int(self.nonce), "start": int(self.start), "nbytes": int(self.nbytes),
                "end": int(self.end)}

    @classmethod
    def from_wire(cls, h, arrays, limits, **base):
        return cls(ring=get_str(h, "ring"), nonce=get_int(h, "nonce"), start=get_int(h, "start"),
                   nbytes=get_int(h, "nbytes", 1, limits.max_message_bytes), end=get_int(h, "end"), **base)


@dataclass(kw_only=True, eq=False)
class SampleRequest(Message):
    KIND: ClassVar[str] = "sample_request"
    request_id: int = 0
    batch_size: int = 1
    beta: float = 0.4

    def fields(self):
        return {"request_id": int(self.request_id), "batch_size": int(self.batch_size), "beta": float(self.beta)}

    @classmethod
    def from_wire(cls, h, arrays, limits, **base):
        return cls(request_id=get_int(h, "request_id"), batch_size=get_int(h, "batch_size", 1, limits.max_items),
                   beta=get_float(h, "beta", 0.0, 1.0), **base)


@dataclass(kw_only=True, eq=False)
class BatchReady(Message):
    """The batch is in shared-memory slot ``slot_id`` (see slots.py), valid while the slot's
    header still shows ``slot_seq`` and the segment's epoch is ``epoch``. index / generation /
    weight may travel here instead of in the slot; when present each is (batch_size,)."""
    KIND: ClassVar[str] = "batch_ready"
    request_id: int = 0
    slot_id: int = 0
    slot_seq: int = 0
    epoch: int = 0
    batch_size: int = 0
    index: np.ndarray | None = None
    generation: np.ndarray | None = None
    weight: np.ndarray | None = None

    def fields(self):
        return {"request_id": int(self.request_id), "slot_id": int(self.slot_id), "slot_seq": int(self.slot_seq),
                "epoch": int(self.epoch), "batch_size": int(self.batch_size)}

    def arrays(self):
        return {"index": self.index, "generation": self.generation, "weight": self.weight}

    @classmethod
    def array_specs(cls, limits):
        return {"index": ArraySpec(_I64, False), "generation": ArraySpec(_I64, False),
                "weight": ArraySpec(_F32, False)}

    @classmethod
    def from_wire(cls, h, arrays, limits, **base):
        b = get_int(h, "batch_size", 0, limits.max_items)
        for name, a in arrays.items():
            check_shape(name, a, (b,))
        if "index" in arrays:
            check_range("index", arrays["index"], 0)
        if "weight" in arrays:
            check_range("weight", arrays["weight"], 0.0)
        return cls(request_id=get_int(h, "request_id"), slot_id=get_int(h, "slot_id", 0, _MAX_SLOTS),
                   slot_seq=get_int(h, "slot_seq"), epoch=get_int(h, "epoch"), batch_size=b, **arrays, **base)


@dataclass(kw_only=True, eq=False)
class PriorityUpdate(Message):
    KIND: ClassVar[str] = "priority_update"
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    generation: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    priority: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def arrays(self):
        return {"index": self.index, "generation": self.generation, "priority": self.priority}

    @classmethod
    def array_specs(cls, limits):
        return {"index": ArraySpec(_I64), "generation": ArraySpec(_I64), "priority": ArraySpec(_F32)}

    @classmethod
    def from_wire(cls, h, arrays, limits, **base):
        n = arrays["index"].shape[0] if arrays["index"].ndim == 1 else 0
        if n > limits.max_items:
            raise ProtocolError("too_large", f"{n} priority updates > {limits.max_items}")
        for name, a in arrays.items():
            check_shape(name, a, (n,))
        check_range("index", arrays["index"], 0)
        check_range("priority", arrays["priority"], 0.0)
        return cls(**arrays, **base)


@dataclass(kw_only=True, eq=False)
class Gradients(Message):
    """Gorila: a learner's flat float32 gradient, computed at ``weights_version``."""
    KIND: ClassVar[str] = "gradients"
    batch_size: int = 0
    # env steps the sender's local replay received since its previous gradient (Gorila with
    # learner.gorila_replay: local; the parameter server sums them to end the run); else 0
    env_steps: int = 0
    grad: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def fields(self):
        return {"batch_size": int(self.batch_size), "env_steps": int(self.env_steps)}

    def arrays(self):
        return {"grad": self.grad}

    @classmethod
    def array_specs(cls, limits):
        return {"grad": ArraySpec(_F32)}

    @classmethod
    def from_wire(cls, h, arrays, limits, **base):
        g = arrays["grad"]
        if g.ndim != 1 or (limits.num_params and g.shape[0] != limits.num_params):
            raise ProtocolError("bad_shape", f"grad shape {g.shape}, expected ({limits.num_params or 'N'},)")
        steps = get_int(h, "env_steps", 0, 1 << 40) if "env_steps" in h else 0
        return cls(batch_size=get_int(h, "batch_size", 0, limits.max_items), env_steps=steps, grad=g, **base)


@dataclass(kw_only=True, eq=False)
class InfoRequest(Message):
    KIND: ClassVar[str] = "info_request"
    request_id: int = 0

    def fields(self):
        return {"request_id": int(self.request_id)}

    @classmethod
    def from_wire(cls, h, arrays, limits, **base):
        return cls(request_id=get_int(h, "request_id"), **base)


@dataclass(kw_only=True, eq=False)
class Info(Message):
    """A small {str: int | float | str | bool | None} map (replay size, totals, env steps)."""
    KIND: ClassVar[str] = "info"
    request_id: int = 0
    data: dict[str, Any] = field(default_factory=dict)

    def fields(self):
        return {"request_id": int(self.request_id), "data": dict(self.data)}

    @classmethod
    def from_wire(cls, h, arrays, limits, **base):
        data = h.get("data", {})
        if not isinstance(data, dict) or len(data) > 64:
            raise ProtocolError("bad_field", "'data' must be a map of <= 64 entries")
        for k, v in data.items():
            if not isinstance(k, str) or len(k) > 64 or not (
                    v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= 256)):
                raise ProtocolError("bad_field", f"'data' entry {str(k)[:64]!r} is not a short str -> scalar")
        return cls(request_id=get_int(h, "request_id"), data=data, **base)


@dataclass(kw_only=True, eq=False)
class Heartbeat(Message):
    KIND: ClassVar[str] = "heartbeat"
    incarnation: int = 0  # random per process start: a new value means the peer restarted

    def fields(self):
        return {"incarnation": int(self.incarnation)}

    @classmethod
    def from_wire(cls, h, arrays, limits, **base):
        return cls(incarnation=get_int(h, "incarnation"), **base)


@dataclass(kw_only=True, eq=False)
class Error(Message):
    """A reply saying why a request was not served; retry_after_ms > 0 means 'ask again'."""
    KIND: ClassVar[str] = "error"
    request_id: int = 0
    reason: str = ""
    detail: str = ""
    retry_after_ms: int = 0

    def fields(self):
        return {"request_id": int(self.request_id), "reason": self.reason[:64], "detail": self.detail[:1024],
                "retry_after_ms": int(self.retry_after_ms)}

    @classmethod
    def from_wire(cls, h, arrays, limits, **base):
        return cls(request_id=get_int(h, "request_id"), reason=get_str(h, "reason"),
                   detail=get_str(h, "detail", 1024), retry_after_ms=get_int(h, "retry_after_ms", 0, 3_600_000),
                   **base)


KINDS: dict[str, type[Message]] = {c.KIND: c for c in (
    Insert, InsertRef, SampleRequest, BatchReady, PriorityUpdate, Gradients, InfoRequest, Info, Heartbeat, Error)}


def decode_frame(frame: Any, limits: DecodeLimits = DEFAULT_LIMITS) -> Message:
    """Validate and decode the one ZMQ frame of a message (`Message.to_frame`)."""
    return decode(split_frame(frame, limits), limits)


def decode_received(frames: Sequence[Any], limits: DecodeLimits = DEFAULT_LIMITS) -> Message:
    """`decode_frame` of what ``recv_multipart`` returned (identity already removed): a message
    is exactly one frame; more is a protocol-1 (multipart) peer, 'frame_count'."""
    if len(frames) != 1:
        raise ProtocolError("frame_count", f"a message is one ZMQ frame, got {len(frames)} "
                                           "(a peer speaking an older protocol version?)")
    return decode_frame(frames[0], limits)


def decode(parts: Sequence[Any], limits: DecodeLimits = DEFAULT_LIMITS) -> Message:
    """Validate and decode a message's parts (zmq.Frame / bytes / buffers; `Message.encode`);
    arrays are zero-copy read-only views. Raises `ProtocolError` with a `REASONS` label."""
    if not isinstance(parts, (list, tuple)) or not parts:
        raise ProtocolError("frame_count", "a message needs at least the header part")
    if len(parts) > 1 + limits.max_arrays:
        raise ProtocolError("frame_count", f"{len(parts)} parts > 1 + {limits.max_arrays}")
    h = unpack_header(parts[0], limits)
    v = h.get("v")
    if not isinstance(v, int) or isinstance(v, bool) or v != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"protocol version {str(v)[:16]!r}, this build speaks {PROTOCOL_VERSION}")
    kind = h.get("kind")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError("unknown_kind", f"kind {str(kind)[:32]!r}")
    if limits.kinds is not None and kind not in limits.kinds:
        raise ProtocolError("unknown_kind", f"kind {kind!r} is not accepted on this socket")
    base = {"sender": get_str(h, "sender"), "weights_version": get_int(h, "wv", 0, MAX_I64)}
    arrays = decode_arrays(h, parts, cls.array_specs(limits), limits)
    return cls.from_wire(h, arrays, limits, **base)

