"""Transport: the wire protocol, shared memory, weights board, batch slots and sockets.

The only package that imports zmq. Modules:

* `codec` / `protocol` / `insert_spec`: typed messages, msgpack header + raw array parts in one ZMQ frame,
  validated on decode (`ProtocolError.reason` is a metrics label).
* `insert_ring`: an actor's inserts through its shared-memory ring, only a reference over ZMQ.
* `shm`: /dev/shm segments (`Segment`, `allocator` for replay storage, free-space checks).
* `rundir`: the run's 0700 ipc directory, pid files, and the janitor `clean`.
* `board`: the seqlock weights board (+ a PUB/SUB variant for remote actors).
* `slots`: the ring of shared-memory batch slots between replay and learner.
* `sockets` / `client`: endpoints, socket options, bind checks, the learner's `RequestClient`.
* `curve`: CURVE keys for remote actors (`apex-local keys`), key loading, the ZAP allow-list.
"""
from apex_local.transport.board import WeightsBoard, WeightsPublisher, WeightsSubscriber
from apex_local.transport.client import RequestClient
from apex_local.transport.curve import (
    CurveKeyError, KeySet, RunContext, auth_stats, check_key_files, curve_enabled, generate_keys, weights_over_pub)
from apex_local.transport.codec import PROTOCOL_VERSION, REASONS, DecodeLimits, ProtocolError
from apex_local.transport.insert_spec import InsertSpec
from apex_local.transport.protocol import (
    KINDS, BatchReady, Error, Gradients, Heartbeat, Info, InfoRequest, Insert, InsertRef, Message, PriorityUpdate, SampleRequest,
    decode, decode_frame)
from apex_local.transport.rundir import CleanReport, PidFile, RunPaths, clean, register_process, run_paths
from apex_local.transport.shm import (
    Segment, ShmAllocator, ShmError, allocator, check_free_space, ndarray_view, segment_name)
from apex_local.transport.slots import BatchSlots, Slot, StaleSlotError
from apex_local.transport.sockets import (
    PortInUseError, TransportError, bind_or_fail, endpoints, make_socket, new_context, recv_message, send_message,
    wait_readable)

__all__ = [
    "PROTOCOL_VERSION", "REASONS", "DecodeLimits", "ProtocolError", "InsertSpec", "KINDS", "Message", "Insert", "InsertRef",
    "SampleRequest", "BatchReady", "PriorityUpdate", "Gradients", "InfoRequest", "Info", "Heartbeat", "Error", "decode",
    "decode_frame",
    "Segment", "ShmAllocator", "ShmError", "allocator", "check_free_space", "ndarray_view", "segment_name",
    "RunPaths", "run_paths", "PidFile", "register_process", "CleanReport", "clean",
    "WeightsBoard", "WeightsPublisher", "WeightsSubscriber", "BatchSlots", "Slot", "StaleSlotError",
    "TransportError", "PortInUseError", "new_context", "endpoints", "make_socket", "bind_or_fail",
    "send_message", "recv_message", "wait_readable", "RequestClient",
    "CurveKeyError", "KeySet", "RunContext", "auth_stats", "check_key_files", "curve_enabled", "generate_keys",
    "weights_over_pub",
]
