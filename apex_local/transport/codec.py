"""Wire codec: one bounded msgpack header part + raw array parts, in one ZMQ frame, validated
on decode.

A message has parts::

    part 0      msgpack map {"v": PROTOCOL_VERSION, "kind": str, "sender": str, "wv": int,
                             "arrays": [[name, dtype_str, shape], ...], <kind-specific scalars>}
    part 1..n   the arrays, C-contiguous little-endian raw bytes, in the order of "arrays"

and travels as ONE single-part ZMQ message (`join_parts` / `split_frame`)::

    b"APXM" | u32 n | u64 length of each part (n of them) | pad to 64 | part 0 | pad to 64 | part 1 ...

(little-endian; every part starts 64-byte aligned within the frame). Why one frame: libzmq
4.3.x aborts the whole process (``session_base.cpp:233``, libzmq issue 3442) when a connection
drops while its I/O thread has sent some parts of a multipart message and the socket is
being closed, which is what happens when every process of a run stops at once. A single-part
message is never half-sent, so that path cannot be reached (docs/architecture.md).

Never pickle. Decoding is zero-copy: each array is ``np.frombuffer`` over the received frame
(read-only; it keeps the frame alive). Everything a peer sends is checked before use, and
every failure is a `ProtocolError` whose ``reason`` is one of `REASONS` (a low-cardinality
metrics label, ``apex_replay_rejected_messages_total{reason}``).

This module holds the kind-independent machinery; `protocol.py` holds the message kinds.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import msgpack
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from apex_local.transport.protocol import InsertSpec

PROTOCOL_VERSION = 2  # 2: one frame per message (the envelope above)
MAX_HEADER_BYTES = 64 * 1024
MAX_I64 = 2**63 - 1

REASONS = (
    "bad_header",        # a malformed envelope, not msgpack, not a map, malformed "arrays" entry, wrong field type
    "frame_count",       # not one ZMQ frame, or part count != 1 + len(arrays), or no parts at all
    "bad_version",       # "v" != PROTOCOL_VERSION
    "unknown_kind",      # kind not known, or not accepted on this socket
    "bad_field",         # a scalar header field missing / wrong type / out of range
    "missing_array",     # a required array is absent
    "unexpected_array",  # an array name this kind does not carry
    "bad_dtype",         # dtype not in the allow-list of that array name
    "bad_shape",         # shape differs from the expected spec, or inconsistent lengths
    "length_mismatch",   # frame bytes != prod(shape) * itemsize
    "too_large",         # header, message or item count above the limits
    "non_finite",        # NaN/inf in a float array or float field
    "bad_value",         # a value out of its domain (action >= num_actions, discount > 1, ...)
)

# rejection reasons of an insert_ref beyond those of the message it points at (insert_ring.py)
RING_REASONS = (
    "stale_ref",  # an insert_ref into an insert ring that is gone or was replaced
    "bad_ref",    # an insert_ref whose ring id or positions cannot be right
)

# Header limits for msgpack's C unpacker: no allocation larger than these, whatever the
# header claims (a map claiming 2**31 entries fails before anything is allocated).
_MAX_STR = 4096
_MAX_CONTAINER = 4096
_MAX_MAP = 64

# dtypes that may appear on the wire at all (native little-endian, as ``dtype.str`` spells them)
WIRE_DTYPES = frozenset({"|u1", "|i1", "|b1", "<u2", "<i2", "<u4", "<i4", "<i8", "<f2", "<f4", "<f8"})


_WIRE_NP = {s: np.dtype(s) for s in WIRE_DTYPES}
_MIN_REDUCE, _MAX_REDUCE = np.minimum.reduce, np.maximum.reduce


class ProtocolError(ValueError):
    """A message failed validation. ``reason`` is one of `REASONS`; ``detail`` is for logs;
    ``identity`` is the ROUTER peer it came from (set by `sockets.recv_message`), else None."""

    identity: bytes | None = None

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS and reason not in RING_REASONS:  # pragma: no cover - programming error
            raise ValueError(f"unknown ProtocolError reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodeLimits:
    """What a receiving socket accepts. ``insert`` must be set for INSERT messages to be
    accepted (the replay server builds it from the env spec); ``kinds`` (None = all) restricts
    the kinds accepted on one socket."""

    max_header_bytes: int = MAX_HEADER_BYTES
    max_message_bytes: int = 256 * 1024 * 1024  # sum of array bytes (TransportConfig.max_message_bytes)
    max_arrays: int = 32
    max_items: int = 1 << 20  # batch size, priority updates per message
    num_params: int = 0  # Gorila gradients must have this length (0 = any)
    insert: "InsertSpec | None" = None
    kinds: frozenset[str] | None = None


@dataclass(frozen=True)
class ArraySpec:
    """Allow-list entry for one array name: accepted dtypes and whether it must be present."""

    dtypes: tuple[str, ...]
    required: bool = True


def as_buffer(frame: Any) -> memoryview:
    """A flat byte memoryview over a zmq.Frame, bytes, bytearray, memoryview or ndarray."""
    buf = getattr(frame, "buffer", None)  # zmq.Frame exposes its data as .buffer
    try:
        mv = memoryview(buf if buf is not None else frame)
        if mv.nbytes == 0:  # e.g. a (0, 4) array: memoryview cannot cast a shape with zeros
            return memoryview(b"")
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
    except TypeError as exc:
        raise ProtocolError("bad_header", f"frame is not a byte buffer: {type(frame).__name__}") from exc
    return mv


_MAGIC = b"APXM"
_ALIGN = 64
# bytes a frame may carry beyond its arrays' ``max_message_bytes``: the header, the length
# table and the padding of up to 1 + 32 parts (the sockets' MAXMSGSIZE adds this)
ENVELOPE_OVERHEAD = MAX_HEADER_BYTES + 8 + 8 * 33 + _ALIGN * 34
_ENVELOPE = struct.Struct("<4sI")


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _layout(views: Sequence[memoryview]) -> tuple[int, list[int], int]:
    head = _ENVELOPE.size + 8 * len(views)
    offsets, end = [], _aligned(head)
    for v in views:
        offsets.append(end)
        end = _aligned(end + v.nbytes)
    return head, offsets, (offsets[-1] + views[-1].nbytes if views else head)


def envelope_size(parts: Sequence[Any]) -> int:
    """Bytes of the frame `join_parts` makes of ``parts``."""
    return _layout([as_buffer(p) for p in parts])[2]


def join_parts(parts: Sequence[Any], out: np.ndarray | None = None) -> np.ndarray:
    """The one ZMQ frame that carries ``parts`` (header bytes, then arrays): the envelope in the
    module docstring. One copy of the arrays (the price of never sending a multipart message).
    ``out``: write it there (a uint8 array of exactly `envelope_size` bytes, e.g. an insert
    ring's, `insert_ring.py`) instead of a new array."""
    views = [as_buffer(p) for p in parts]
    head, offsets, size = _layout(views)
    if out is None:
        arr = np.empty(size, np.uint8)  # not zero-filled: every byte is written once below
    elif out.dtype != np.uint8 or out.shape != (size,):
        raise ValueError(f"join_parts: out must be uint8 ({size},), got {out.dtype} {out.shape}")
    else:
        arr = out
    buf = memoryview(arr)
    _ENVELOPE.pack_into(buf, 0, _MAGIC, len(views))
    struct.pack_into(f"<{len(views)}Q", buf, _ENVELOPE.size, *(v.nbytes for v in views))
    pos = head
    for off, v in zip(offsets, views):
        arr[pos:off] = 0  # padding
        buf[off:off + v.nbytes] = v
        pos = off + v.nbytes
    return arr


def split_frame(frame: Any, limits: "DecodeLimits") -> list[memoryview]:
    """The parts of one received frame (zero-copy views), or `ProtocolError`: 'bad_header' for a
    malformed envelope, 'frame_count' for more parts than a message may have, 'length_mismatch'
    when the part lengths do not add up to the frame."""
    buf = as_buffer(frame)
    if buf.nbytes < _ENVELOPE.size:
        raise ProtocolError("bad_header", f"a {buf.nbytes}-byte frame is too short for the message envelope")
    magic, n = _ENVELOPE.unpack_from(buf, 0)
    if magic != _MAGIC:
        raise ProtocolError("bad_header", f"frame does not start with {_MAGIC!r} (got {bytes(magic)!r}): "
                                          "not an apex-local message, or an older protocol version")
    if not 1 <= n <= 1 + limits.max_arrays:
        raise ProtocolError("frame_count", f"envelope declares {n} parts, expected 1..{1 + limits.max_arrays}")
    head = _ENVELOPE.size + 8 * n
    if buf.nbytes < head:
        raise ProtocolError("bad_header", f"frame of {buf.nbytes} bytes is shorter than its {n}-part envelope")
    lengths = struct.unpack_from(f"<{n}Q", buf, _ENVELOPE.size)
    parts, end = [], _aligned(head)
    for i, length in enumerate(lengths):
        if end + length > buf.nbytes:
            raise ProtocolError("length_mismatch", f"part {i} ({length} bytes at {end}) runs past the "
                                                   f"{buf.nbytes}-byte frame")
        parts.append(buf[end:end + length])
        stop = end + length
        end = _aligned(stop)
    if stop != buf.nbytes:
        raise ProtocolError("length_mismatch", f"frame has {buf.nbytes} bytes, its parts end at {stop}")
    return parts


def pack_header(kind: str, sender: str, weights_version: int, arrays: Sequence[tuple[str, np.ndarray]],
                fields: Mapping[str, Any]) -> bytes:
    header = {"v": PROTOCOL_VERSION, "kind": kind, "sender": sender, "wv": int(weights_version),
              "arrays": [[name, a.dtype.str, list(a.shape)] for name, a in arrays]}
    header.update(fields)
    return msgpack.packb(header, use_bin_type=True)


def wire_array(a: Any) -> np.ndarray:
    """C-contiguous, little-endian, at least 1-D: the form arrays travel in."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def unpack_header(frame: Any, limits: DecodeLimits) -> dict:
    buf = as_buffer(frame)
    if buf.nbytes > limits.max_header_bytes:
        raise ProtocolError("too_large", f"header is {buf.nbytes} bytes > {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(
            buf, raw=False, strict_map_key=True, use_list=True,
            max_str_len=_MAX_STR, max_bin_len=_MAX_STR, max_array_len=_MAX_CONTAINER,
            max_map_len=_MAX_MAP, max_ext_len=0)
    except Exception as exc:  # noqa: BLE001 - any unpacker failure is a bad header
        raise ProtocolError("bad_header", f"not a valid msgpack header ({type(exc).__name__}: "
                                          f"{str(exc)[:120]})") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", f"header is a {type(header).__name__}, not a map")
    return header


# --------------------------------------------------------------------------- scalar fields


def get_int(h: Mapping, key: str, lo: int = 0, hi: int = MAX_I64) -> int:
    v = h.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError("bad_field", f"{key!r} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ProtocolError("bad_field", f"{key!r}={v} outside [{lo}, {hi}]")
    return v


def get_float(h: Mapping, key: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    v = h.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ProtocolError("bad_field", f"{key!r} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ProtocolError("non_finite", f"{key!r}={v}")
    if not lo <= v <= hi:
        raise ProtocolError("bad_field", f"{key!r}={v} outside [{lo}, {hi}]")
    return v


def get_str(h: Mapping, key: str, max_len: int = 64) -> str:
    v = h.get(key)
    if not isinstance(v, str) or len(v) > max_len:
        raise ProtocolError("bad_field", f"{key!r} must be a string of <= {max_len} characters")
    return v


def get_list(h: Mapping, key: str, item_type: type, max_len: int) -> list:
    v = h.get(key, [])
    if not isinstance(v, list) or len(v) > max_len:
        raise ProtocolError("bad_field", f"{key!r} must be a list of <= {max_len} items")
    for x in v:
        if not isinstance(x, item_type) or isinstance(x, bool):
            raise ProtocolError("bad_field", f"{key!r} items must be {item_type.__name__}")
        if isinstance(x, float) and not math.isfinite(x):
            raise ProtocolError("non_finite", f"{key!r} holds {x}")
    return v


# --------------------------------------------------------------------------- arrays


def decode_arrays(header: Mapping, parts: Sequence[Any], allowed: Mapping[str, ArraySpec],
                  limits: DecodeLimits) -> dict[str, np.ndarray]:
    """Zero-copy arrays from parts 1..n, checked against the header and the allow-list.

    Checks (in order): declaration well-formed, part count, name allowed, dtype allowed,
    shape well-formed, total size bound, exact byte length, required names present, float
    arrays finite. Shapes against a spec are the kind's job (they depend on each other).
    """
    decl = header.get("arrays", [])
    if not isinstance(decl, list):
        raise ProtocolError("bad_header", "'arrays' must be a list")
    if len(decl) != len(parts) - 1:
        raise ProtocolError("frame_count", f"header declares {len(decl)} arrays, got {len(parts) - 1} array parts")
    out: dict[str, np.ndarray] = {}
    total = 0
    floats = []
    for entry, part in zip(decl, parts[1:]):
        # (exact type checks: msgpack gives list / str / int, and bool is not an int here)
        if not (type(entry) is list and len(entry) == 3 and type(entry[0]) is str):
            raise ProtocolError("bad_header", "each 'arrays' entry must be [name, dtype, shape]")
        name, dt, shape = entry
        if name in out:
            raise ProtocolError("bad_header", f"array {name[:64]!r} declared twice")
        spec = allowed.get(name)
        if spec is None:
            raise ProtocolError("unexpected_array", f"array {name[:64]!r} is not part of this message kind")
        if type(dt) is not str or dt not in spec.dtypes or dt not in WIRE_DTYPES:
            raise ProtocolError("bad_dtype", f"array {name!r}: dtype {str(dt)[:16]!r} not in {spec.dtypes}")
        dtype = _WIRE_NP[dt]
        nbytes = dtype.itemsize
        if type(shape) is not list or len(shape) > 8:
            nbytes = -1
        else:
            for d in shape:
                if type(d) is not int or not 0 <= d <= MAX_I64:
                    nbytes = -1
                    break
                nbytes *= d
        if nbytes < 0:
            raise ProtocolError("bad_shape", f"array {name!r}: shape must be a list of <= 8 non-negative ints")
        total += nbytes
        if total > limits.max_message_bytes:
            raise ProtocolError("too_large", f"arrays exceed {limits.max_message_bytes} bytes (at {name!r})")
        buf = part if type(part) is memoryview and part.format == "B" and part.ndim == 1 else as_buffer(part)
        if buf.nbytes != nbytes:
            raise ProtocolError("length_mismatch", f"array {name!r}: part has {buf.nbytes} bytes, "
                                                   f"shape {shape} {dt} needs {nbytes}")
        out[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
        if dtype.kind == "f":
            floats.append(name)
    for name, spec in allowed.items():
        if spec.required and name not in out:
            raise ProtocolError("missing_array", f"array {name!r} is required")
    for name in floats:
        if not np.isfinite(out[name]).all():
            raise ProtocolError("non_finite", f"array {name!r} holds NaN or inf")
    return out


def check_shape(name: str, a: np.ndarray, expected: Sequence[int]) -> None:
    if a.shape != tuple(expected):
        raise ProtocolError("bad_shape", f"array {name!r}: shape {a.shape}, expected {tuple(expected)}")


def check_range(name: str, a: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
    """Every element in [lo, hi] (either bound may be None); raises 'bad_value'."""
    if a.size == 0:
        return
    if lo is not None and _MIN_REDUCE(a, axis=None) < lo:
        raise ProtocolError("bad_value", f"array {name!r}: value {a.min()} < {lo}")
    if hi is not None and _MAX_REDUCE(a, axis=None) > hi:
        raise ProtocolError("bad_value", f"array {name!r}: value {a.max()} > {hi}")
