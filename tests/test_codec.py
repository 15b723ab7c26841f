"""Wire protocol: round trips for every kind, zero-copy decode, and every rejection reason."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest

from apex_local.transport import (
    KINDS, PROTOCOL_VERSION, REASONS, BatchReady, DecodeLimits, Error, Gradients, Heartbeat, Info, InfoRequest, Insert,
    InsertRef, InsertSpec, PriorityUpdate, ProtocolError, SampleRequest, decode, decode_frame)
from apex_local.transport.codec import join_parts, split_frame

K, A, FRAME = 4, 6, (5, 7)
SPEC = InsertSpec(FRAME, np.uint8, K, A)
SEQ_SPEC = InsertSpec((4,), np.float32, 1, 2, unroll_length=6, lstm_size=8)
LIMITS = DecodeLimits(insert=SPEC)


def transition_chunk(f: int = 3, b: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "frames": rng.integers(0, 255, (f, *FRAME), dtype=np.uint8),
        "frame_stream": np.zeros(f, np.int32), "frame_seq": np.arange(f, dtype=np.int64),
        "stream": np.zeros(b, np.int32),
        "obs_seq": np.full((b, K), -1, np.int64), "next_seq": np.ones((b, K), np.int64),
        "action": np.arange(b, dtype=np.int64) % A, "reward": rng.normal(size=b).astype(np.float32),
        "discount": np.full(b, 0.97, np.float32), "priority": np.ones(b, np.float32),
    }


def sequence_chunk(b: int = 2) -> dict[str, np.ndarray]:
    t, h = SEQ_SPEC.unroll_length, SEQ_SPEC.lstm_size
    return {
        "frames": np.ones((t + 1, 4), np.float32), "frame_stream": np.zeros(t + 1, np.int32),
        "frame_seq": np.arange(t + 1, dtype=np.int64), "stream": np.zeros(b, np.int32),
        "obs_seq": np.tile(np.arange(t + 1), (b, 1)), "action": np.ones((b, t), np.int64),
        "reward": np.ones((b, t), np.float32), "discount": np.full((b, t), 0.997, np.float32),
        "mask": np.ones((b, t), np.float32), "state_h": np.zeros((b, h), np.float32),
        "state_c": np.zeros((b, h), np.float32), "priority": np.ones(b, np.float32),
    }


def wire(frames) -> list[bytes]:
    """What arrives after a trip through a socket: plain bytes per frame."""
    return [bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in frames]


def insert_frames(**chunk_changes) -> list[bytes]:
    chunk = transition_chunk()
    chunk.update(chunk_changes)
    chunk = {k: v for k, v in chunk.items() if v is not None}
    return wire(Insert(sender="actor.0", chunk=chunk).encode())


def rehead(frames: list, **changes) -> list:
    h = msgpack.unpackb(frames[0])
    h.update(changes)
    return [msgpack.packb(h), *frames[1:]]


EXAMPLES = [
    Insert(sender="actor.3", weights_version=7, actor_id=3, env_steps=120, episode_returns=[21.0, -3.5],
           episode_lengths=[800, 90], chunk=transition_chunk()),
    SampleRequest(sender="learner.0", weights_version=9, request_id=5, batch_size=64, beta=0.5),
    BatchReady(sender="replay.0", request_id=5, slot_id=2, slot_seq=11, epoch=123456789, batch_size=3,
               index=np.array([4, 5, 6]), generation=np.array([1, 1, 2]), weight=np.array([1, .5, .25], np.float32)),
    BatchReady(sender="replay.0", request_id=6, slot_id=0, slot_seq=1, epoch=1, batch_size=64),
    PriorityUpdate(sender="learner.0", index=np.array([1, 2]), generation=np.array([0, 3]),
                   priority=np.array([0.5, 2.0], np.float32)),
    Gradients(sender="learner.2", weights_version=12, batch_size=32, grad=np.linspace(-1, 1, 9, dtype=np.float32)),
    InfoRequest(sender="cli", request_id=1),
    Info(sender="replay.0", request_id=1, data={"size": 1000, "inserted_total": 5000, "fill": 0.5, "ok": True,
                                                "note": "warming up", "mean_return": None}),
    Heartbeat(sender="actor.1", weights_version=4, incarnation=2**62),
    Error(sender="replay.0", request_id=8, reason="not_ready", detail="replay below min_size", retry_after_ms=200),
    InsertRef(sender="actor.3", weights_version=7, ring="actor3", nonce=2**62 + 5, start=4096, nbytes=391_000,
              end=4096 + 391_040),
]


def test_every_kind_has_an_example():
    assert {type(m).KIND for m in EXAMPLES} == set(KINDS)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).KIND)
def test_round_trip(msg):
    out = decode(wire(msg.encode()), LIMITS)
    assert type(out) is type(msg)
    assert out.fields() == msg.fields()
    assert (out.sender, out.weights_version) == (msg.sender, msg.weights_version)
    mine = {k: v for k, v in msg.arrays().items() if v is not None}
    theirs = {k: v for k, v in out.arrays().items() if v is not None}
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert theirs[k].dtype == np.asarray(mine[k]).dtype and np.array_equal(theirs[k], mine[k])


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).KIND)
def test_one_frame_round_trip_is_aligned_and_zero_copy(msg):
    frame = bytes(msg.to_frame())
    parts = split_frame(frame, LIMITS)
    assert [bytes(p) for p in parts] == wire(msg.encode())
    base = np.frombuffer(frame, np.uint8).ctypes.data
    assert all((np.frombuffer(p, np.uint8).ctypes.data - base) % 64 == 0 for p in parts if p.nbytes)
    out = decode_frame(frame, LIMITS)
    assert type(out) is type(msg) and out.fields() == msg.fields()
    for k, a in out.arrays().items():
        if a is not None:
            assert np.array_equal(a, msg.arrays()[k]) and np.shares_memory(a, np.frombuffer(frame, np.uint8)), k


def test_empty_arrays_travel():  # a chunk right after an actor re-routed may hold no frames
    chunk = dict(transition_chunk(), frames=np.zeros((0, *FRAME), np.uint8), frame_stream=np.zeros(0, np.int32),
                 frame_seq=np.zeros(0, np.int64))
    out = decode_frame(bytes(Insert(sender="actor.0", chunk=chunk).to_frame()), LIMITS)
    assert out.chunk["frames"].shape == (0, *FRAME) and out.chunk["frame_seq"].shape == (0,)
    out = decode_frame(Gradients(grad=np.zeros((0,), np.float32)).to_frame(), LIMITS)
    assert out.grad.shape == (0,)


def test_envelope_by_hand():
    # 2 parts, 3 and 5 bytes: "APXM", u32 2, u64 3, u64 5 (24 bytes) -> part 0 at 64, part 1 at 128
    frame = bytes(join_parts([b"abc", b"defgh"]))
    assert frame[:24] == b"APXM" + (2).to_bytes(4, "little") + (3).to_bytes(8, "little") + (5).to_bytes(8, "little")
    assert frame[64:67] == b"abc" and frame[128:] == b"defgh" and len(frame) == 133
    assert [bytes(p) for p in split_frame(frame, LIMITS)] == [b"abc", b"defgh"]


ENVELOPE_BAD = [
    ("empty", b"", "bad_header"),
    ("short", b"APX", "bad_header"),
    ("wrong_magic", b"APXN" + bytes(100), "bad_header"),
    ("zero_parts", b"APXM" + bytes(4), "frame_count"),
    ("too_many_parts", b"APXM" + (34).to_bytes(4, "little") + bytes(400), "frame_count"),
    ("lengths_cut", b"APXM" + (3).to_bytes(4, "little") + bytes(10), "bad_header"),
    ("part_past_end", bytes(join_parts([b"abc", b"defgh"]))[:-1], "length_mismatch"),
    ("trailing_bytes", bytes(join_parts([b"abc", b"defgh"])) + b"x", "length_mismatch"),
    ("huge_length", b"APXM" + (1).to_bytes(4, "little") + (2**63).to_bytes(8, "little") + bytes(60),
     "length_mismatch"),
]


@pytest.mark.parametrize("frame,reason", [c[1:] for c in ENVELOPE_BAD], ids=[c[0] for c in ENVELOPE_BAD])
def test_envelope_rejects(frame, reason):
    with pytest.raises(ProtocolError) as info:
        decode_frame(frame, LIMITS)
    assert info.value.reason == reason, info.value.detail


def test_sequence_insert_round_trip():
    msg = Insert(sender="actor.0", chunk=sequence_chunk())
    out = decode(wire(msg.encode()), DecodeLimits(insert=SEQ_SPEC))
    assert out.chunk["obs_seq"].shape == (2, 7) and out.chunk["state_h"].shape == (2, 8)


def test_decode_is_zero_copy():
    frames = [bytearray(f) for f in wire(EXAMPLES[0].encode())]
    out = decode(frames, LIMITS)
    for name, buf in zip(out.chunk, frames[1:]):
        assert np.shares_memory(out.chunk[name], np.frombuffer(buf, np.uint8)), name


def test_spec_from_env_and_fail_fast():
    class Env:
        frame_shape, obs_dtype, frame_stack, num_actions = (84, 84), np.dtype(np.uint8), 4, 6
    spec = InsertSpec.from_env(Env())
    assert spec.frame_dtype == "|u1" and spec.frame_shape == (84, 84) and not spec.recurrent
    with pytest.raises(ValueError, match="unroll_length"):
        InsertSpec((4,), np.float32, 1, 2, unroll_length=5)
    with pytest.raises(ValueError, match="frame_dtype"):
        InsertSpec((4,), object, 1, 2)
    with pytest.raises(ValueError, match="num_actions"):
        InsertSpec((4,), np.float32, 1, 0)


def _bad_arrays_decl(frames):
    h = msgpack.unpackb(frames[0])
    h["arrays"][0] = ["frames"]
    return [msgpack.packb(h), *frames[1:]]


def _dup_name(frames):
    h = msgpack.unpackb(frames[0])
    h["arrays"][1][0] = h["arrays"][0][0]
    return [msgpack.packb(h), *frames[1:]]


def _set_decl(index, **kw):
    def fn(frames):
        h = msgpack.unpackb(frames[0])
        entry = h["arrays"][index]
        if "dtype" in kw:
            entry[1] = kw["dtype"]
        if "shape" in kw:
            entry[2] = kw["shape"]
        return [msgpack.packb(h), *frames[1:]]
    return fn


GOOD = insert_frames()
SR = wire(EXAMPLES[1].encode())
# (case id, frames or a function of nothing returning frames, limits, expected reason)
BAD = [
    ("garbage", [b"\xc1\x00garbage"], LIMITS, "bad_header"),
    ("empty_header", [b""], LIMITS, "bad_header"),
    ("header_not_map", [msgpack.packb([1, 2, 3])], LIMITS, "bad_header"),
    ("map_bomb_2**31", [b"\xdf\x80\x00\x00\x00"], LIMITS, "bad_header"),
    ("array_bomb_2**31", [b"\xdd\x80\x00\x00\x00"], LIMITS, "bad_header"),
    ("str_bomb", [b"\xdb\x7f\xff\xff\xff" + b"x" * 10], LIMITS, "bad_header"),
    ("deep_nesting", [b"\x91" * 5000 + b"\x00"], LIMITS, "bad_header"),
    ("ext_type", [msgpack.packb(msgpack.ExtType(1, b"x"))], LIMITS, "bad_header"),
    ("truncated_header", [GOOD[0][:-5], *GOOD[1:]], LIMITS, "bad_header"),
    ("arrays_decl_malformed", _bad_arrays_decl(GOOD), LIMITS, "bad_header"),
    ("arrays_not_list", rehead(SR, arrays="x"), LIMITS, "bad_header"),
    ("duplicate_array", _dup_name(GOOD), LIMITS, "bad_header"),
    ("no_frames", [], LIMITS, "frame_count"),
    ("missing_frame", GOOD[:-1], LIMITS, "frame_count"),
    ("extra_frame", [*GOOD, b"x"], LIMITS, "frame_count"),
    ("too_many_frames", [GOOD[0]] + [b""] * 40, LIMITS, "frame_count"),
    ("bad_version", rehead(SR, v=PROTOCOL_VERSION + 1), LIMITS, "bad_version"),
    ("version_missing", [msgpack.packb({"kind": "heartbeat"})], LIMITS, "bad_version"),
    ("unknown_kind", rehead(SR, kind="pickle"), LIMITS, "unknown_kind"),
    ("insert_without_spec", GOOD, DecodeLimits(), "unknown_kind"),
    ("kind_not_on_socket", SR, DecodeLimits(kinds=frozenset({"insert"})), "unknown_kind"),
    ("batch_size_zero", rehead(SR, batch_size=0), LIMITS, "bad_field"),
    ("batch_size_str", rehead(SR, batch_size="64"), LIMITS, "bad_field"),
    ("batch_size_bool", rehead(SR, batch_size=True), LIMITS, "bad_field"),
    ("beta_above_one", rehead(SR, beta=1.5), LIMITS, "bad_field"),
    ("sender_not_str", rehead(SR, sender=5), LIMITS, "bad_field"),
    ("request_id_negative", rehead(SR, request_id=-1), LIMITS, "bad_field"),
    ("episodes_unpaired", rehead(GOOD, ep_returns=[1.0], ep_lengths=[]), LIMITS, "bad_field"),
    ("info_data_nested", wire(Info(data={"x": [1, 2]}).encode()), LIMITS, "bad_field"),
    ("missing_array", insert_frames(discount=None), LIMITS, "missing_array"),
    ("unexpected_array", insert_frames(evil=np.zeros(2, np.int64)), LIMITS, "unexpected_array"),
    ("action_float", insert_frames(action=np.zeros(2, np.float64)), LIMITS, "bad_dtype"),
    ("frames_float_for_uint8_env", insert_frames(frames=np.zeros((3, *FRAME), np.float32)), LIMITS, "bad_dtype"),
    ("dtype_object", _set_decl(0, dtype="|O")(GOOD), LIMITS, "bad_dtype"),
    ("dtype_big_endian", _set_decl(2, dtype=">i8")(GOOD), LIMITS, "bad_dtype"),
    ("obs_seq_wrong_k", insert_frames(obs_seq=np.zeros((2, K + 1), np.int64)), LIMITS, "bad_shape"),
    ("frames_wrong_shape", insert_frames(frames=np.zeros((3, 7, 5), np.uint8)), LIMITS, "bad_shape"),
    ("reward_length_inconsistent", insert_frames(reward=np.zeros(3, np.float32)), LIMITS, "bad_shape"),
    ("grad_wrong_length", wire(EXAMPLES[5].encode()), DecodeLimits(num_params=10), "bad_shape"),
    ("grad_nan", wire(Gradients(grad=np.array([0, np.nan], np.float32)).encode()), LIMITS, "non_finite"),
    ("shape_negative", _set_decl(1, shape=[-3])(GOOD), LIMITS, "bad_shape"),
    ("shape_not_ints", _set_decl(1, shape=["3"])(GOOD), LIMITS, "bad_shape"),
    ("priority_lengths", wire(PriorityUpdate(index=np.arange(3), generation=np.arange(2),
                                             priority=np.ones(3, np.float32)).encode()), LIMITS, "bad_shape"),
    ("truncated_frame", [*GOOD[:-1], GOOD[-1][:-1]], LIMITS, "length_mismatch"),
    ("frame_too_long", [*GOOD[:-1], GOOD[-1] + b"\x00" * 4], LIMITS, "length_mismatch"),
    ("header_over_64k", [msgpack.packb({"v": PROTOCOL_VERSION, "kind": "heartbeat", **{f"k{i}": "y" * 3000 for i in range(30)}})],
     LIMITS, "too_large"),
    ("message_over_limit", GOOD, DecodeLimits(insert=SPEC, max_message_bytes=64), "too_large"),
    ("declared_size_bomb", _set_decl(0, shape=[2**40, 5, 7])(GOOD), LIMITS, "too_large"),
    ("too_many_items", insert_frames(), DecodeLimits(insert=InsertSpec(FRAME, np.uint8, K, A, max_items=1)),
     "too_large"),
    ("batch_size_over_max", rehead(SR, batch_size=10**7), LIMITS, "bad_field"),
    ("nan_reward", insert_frames(reward=np.array([0.0, np.nan], np.float32)), LIMITS, "non_finite"),
    ("inf_priority", wire(PriorityUpdate(index=np.arange(2), generation=np.arange(2),
                                         priority=np.array([1, np.inf], np.float32)).encode()), LIMITS, "non_finite"),
    ("nan_beta", rehead(SR, beta=float("nan")), LIMITS, "non_finite"),
    ("nan_episode_return", rehead(GOOD, ep_returns=[float("nan")], ep_lengths=[3]), LIMITS, "non_finite"),
    ("action_out_of_range", insert_frames(action=np.array([0, A], np.int64)), LIMITS, "bad_value"),
    ("discount_above_one", insert_frames(discount=np.array([1.0, 1.5], np.float32)), LIMITS, "bad_value"),
    ("negative_priority", insert_frames(priority=np.array([1.0, -1.0], np.float32)), LIMITS, "bad_value"),
    ("obs_seq_below_minus_one", insert_frames(obs_seq=np.full((2, K), -2, np.int64)), LIMITS, "bad_value"),
    ("stream_negative", insert_frames(stream=np.array([0, -1], np.int32)), LIMITS, "bad_value"),
    ("negative_is_weight", wire(BatchReady(batch_size=1, index=np.zeros(1, np.int64), generation=np.zeros(1, np.int64),
                                           weight=np.array([-1.0], np.float32)).encode()), LIMITS, "bad_value"),
]


@pytest.mark.parametrize("frames,limits,reason", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_rejects(frames, limits, reason):
    with pytest.raises(ProtocolError) as info:
        decode(frames, limits)
    assert info.value.reason == reason, info.value.detail


def test_every_reason_is_exercised():
    assert {c[3] for c in BAD} == set(REASONS)


def test_sequence_spec_rejects_bad_mask_and_state():
    lim = DecodeLimits(insert=SEQ_SPEC)
    bad_mask = sequence_chunk()
    bad_mask["mask"] = np.full((2, 6), 2.0, np.float32)
    with pytest.raises(ProtocolError, match="mask") as info:
        decode(wire(Insert(chunk=bad_mask).encode()), lim)
    assert info.value.reason == "bad_value"
    bad_state = sequence_chunk()
    bad_state["state_c"] = np.zeros((2, 9), np.float32)
    with pytest.raises(ProtocolError) as info:
        decode(wire(Insert(chunk=bad_state).encode()), lim)
    assert info.value.reason == "bad_shape"
    with pytest.raises(ProtocolError) as info:  # a transition chunk is not a sequence chunk
        decode(GOOD, lim)
    assert info.value.reason in ("unexpected_array", "bad_dtype")


@pytest.mark.parametrize("reward,ok", [
    (np.array([3e38, 3e38], np.float32), True),  # finite, whatever their sum is
    (np.array([3e38, np.inf], np.float32), False),
    (np.array([-np.inf, np.inf], np.float32), False),  # the sum is NaN
    (np.array([np.nan, 0.0], np.float32), False),
    (np.array([0.5, -2.0], np.float32), True),
])
def test_finiteness_is_checked_element_by_element(reward, ok):
    frames = insert_frames(reward=reward)
    if ok:
        assert np.array_equal(decode(frames, LIMITS).chunk["reward"], reward)
    else:
        with pytest.raises(ProtocolError) as info:
            decode(frames, LIMITS)
        assert info.value.reason == "non_finite"
