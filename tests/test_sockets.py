"""Sockets: endpoints, options, bind errors, zero-copy messages, and the Lazy Pirate client
surviving a replay restart (the server runs as a real subprocess: this file's __main__)."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zmq

from apex_local.config import TransportConfig
from apex_local.transport.codec import ENVELOPE_OVERHEAD
from apex_local.transport import (
    BatchReady, DecodeLimits, Info, InfoRequest, Insert, InsertSpec, PortInUseError, ProtocolError, RequestClient,
    SampleRequest, decode_frame, endpoints, make_socket, new_context, recv_message, send_message)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ipc_dir():
    with tempfile.TemporaryDirectory(prefix="apx") as d:  # short: unix socket paths are <= 107 chars
        yield d


@pytest.fixture
def ctx():
    c = new_context()
    yield c
    c.destroy(linger=0)


def rid() -> str:
    return "t" + uuid.uuid4().hex[:8]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoints_ipc_and_tcp(ipc_dir):
    run = rid()
    eps = endpoints(TransportConfig(ipc_dir=ipc_dir), run)
    run_dir = Path(ipc_dir) / "apex-local" / run
    assert eps["replay"] == f"ipc://{run_dir}/replay.sock" and set(eps) >= {"replay", "replay_sample", "weights"}
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    eps = endpoints(TransportConfig(kind="tcp", base_port=20000), run)
    assert eps["replay"] == "tcp://127.0.0.1:20000" and eps["replay_sample"] == "tcp://127.0.0.1:20001"


def test_socket_options(ctx):
    t = TransportConfig(send_hwm=7, send_timeout_ms=123, max_message_bytes=4096)
    push, pull = make_socket(ctx, "push", t), make_socket(ctx, "pull", t)
    assert push.getsockopt(zmq.LINGER) == 0 and push.getsockopt(zmq.SNDHWM) == 7
    assert push.getsockopt(zmq.SNDTIMEO) == 123 and push.getsockopt(zmq.IMMEDIATE) == 1
    assert pull.getsockopt(zmq.MAXMSGSIZE) == 4096 + ENVELOPE_OVERHEAD and pull.getsockopt(zmq.RCVHWM) == 7
    push.close()
    pull.close()
    with pytest.raises(ValueError, match="req"):
        make_socket(ctx, "req", t)


def test_curve_options_only_when_configured(tmp_path):
    """Without curve_* fields sockets are plain (existing configs unchanged); with them a bound
    tcp socket is a CURVE server, a connected one a CURVE client, and term() returns although
    the context runs a ZAP authenticator."""
    from apex_local.transport import RunContext, generate_keys

    c = new_context()
    assert isinstance(c, RunContext)
    port = free_port()
    plain = make_socket(c, "pull", TransportConfig(kind="tcp"), bind=f"tcp://127.0.0.1:{port}")
    assert plain.getsockopt(zmq.MECHANISM) == zmq.NULL
    ks = generate_keys(tmp_path / "k", clients=1)
    t = TransportConfig(kind="tcp", curve_server_cert=str(ks.server_secret), curve_client_cert=str(ks.client_secrets[0]),
                        curve_authorized_dir=str(ks.authorized_dir))
    server = make_socket(c, "pull", t, bind=f"tcp://127.0.0.1:{free_port()}")
    client = make_socket(c, "push", t, connect=f"tcp://127.0.0.1:{port}")
    sub = make_socket(c, "sub", t, connect=f"tcp://127.0.0.1:{port}", max_message_bytes=5000)
    assert server.getsockopt(zmq.MECHANISM) == zmq.CURVE and server.getsockopt(zmq.CURVE_SERVER) == 1
    assert client.getsockopt(zmq.MECHANISM) == zmq.CURVE and client.getsockopt(zmq.CURVE_SERVER) == 0
    assert sub.getsockopt(zmq.MAXMSGSIZE) == 5000 and sub.getsockopt(zmq.RCVHWM) == 4
    for s in (plain, server, client, sub):
        s.close()
    t0 = time.monotonic()
    c.term()
    assert time.monotonic() - t0 < 2.0


def test_port_in_use_tcp(ctx):
    port = free_port()
    ep = f"tcp://127.0.0.1:{port}"
    first = make_socket(ctx, "pull", TransportConfig(), bind=ep)
    with pytest.raises(PortInUseError, match=str(port)) as info:
        make_socket(ctx, "pull", TransportConfig(), bind=ep)
    assert info.value.endpoint == ep
    first.close()


def test_port_in_use_ipc_live_vs_stale(ctx, ipc_dir):
    ep = f"ipc://{ipc_dir}/replay.sock"
    live = make_socket(ctx, "router", TransportConfig(), bind=ep)
    with pytest.raises(PortInUseError, match="live process"):
        make_socket(ctx, "router", TransportConfig(), bind=ep)
    live.close()
    stale_path = f"{ipc_dir}/stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale_path)  # a dead process's socket file: nobody listens
    s.close()
    assert os.path.exists(stale_path)
    sock = make_socket(ctx, "pull", TransportConfig(), bind=f"ipc://{stale_path}")
    sock.close()


def test_messages_over_ipc_are_zero_copy(ctx, ipc_dir):
    t = TransportConfig()
    ep = f"ipc://{ipc_dir}/replay.sock"
    pull = make_socket(ctx, "pull", t, bind=ep)
    push = make_socket(ctx, "push", t, connect=ep)
    spec = InsertSpec((84, 84), np.uint8, 4, 6)
    chunk = {"frames": np.full((50, 84, 84), 3, np.uint8), "frame_stream": np.zeros(50, np.int32),
             "frame_seq": np.arange(50), "stream": np.zeros(2, np.int32), "obs_seq": np.zeros((2, 4), np.int64),
             "next_seq": np.ones((2, 4), np.int64), "action": np.ones(2, np.int64),
             "reward": np.ones(2, np.float32), "discount": np.ones(2, np.float32)}
    assert send_message(push, Insert(sender="actor.0", actor_id=0, chunk=chunk))
    assert pull.poll(5000)
    frames = pull.recv_multipart(copy=False)
    assert len(frames) == 1  # one frame per message, never multipart (codec.py)
    msg = decode_frame(frames[0], DecodeLimits(insert=spec))
    assert np.shares_memory(msg.chunk["frames"], np.frombuffer(frames[0].buffer, np.uint8))
    assert (msg.chunk["frames"] == 3).all()
    push.close()
    pull.close()


def test_router_identity_bad_message_and_vanished_peer(ctx, ipc_dir):
    t = TransportConfig()
    ep = f"ipc://{ipc_dir}/sample.sock"
    router = make_socket(ctx, "router", t, bind=ep)
    dealer = make_socket(ctx, "dealer", t, connect=ep)
    send_message(dealer, InfoRequest(request_id=4))
    identity, msg = recv_message(router, timeout_ms=5000, router=True)
    assert isinstance(msg, InfoRequest) and msg.request_id == 4
    assert send_message(router, Info(request_id=4, data={"size": 3}), identity=identity)
    _, reply = recv_message(dealer, timeout_ms=5000)
    assert reply.data == {"size": 3}
    dealer.send_multipart([b"\xc1junk"])
    with pytest.raises(ProtocolError) as info:
        recv_message(router, timeout_ms=5000, router=True)
    assert info.value.reason == "bad_header" and info.value.identity == identity
    dealer.send_multipart([*InfoRequest(request_id=5).encode(), b"x"])  # multipart, as protocol 1 sent it
    with pytest.raises(ProtocolError) as info:
        recv_message(router, timeout_ms=5000, router=True)
    assert info.value.reason == "frame_count" and info.value.identity == identity
    assert recv_message(router, timeout_ms=10, router=True) is None
    assert not send_message(router, Info(request_id=1), identity=b"\x00gone")  # ROUTER_MANDATORY
    dealer.close()
    router.close()


def test_blocked_send_times_out(ctx, ipc_dir):
    push = make_socket(ctx, "push", TransportConfig(send_timeout_ms=50), connect=f"ipc://{ipc_dir}/nobody.sock")
    t0 = time.monotonic()
    assert not send_message(push, InfoRequest())  # IMMEDIATE: nothing queued for an absent peer
    assert 0.04 <= time.monotonic() - t0 < 2
    push.close()


def start_server(endpoint: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, "serve", endpoint], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def collect(client: RequestClient, n: int, timeout: float) -> list:
    out, end = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < end:
        out += client.poll(100)
    return out


@pytest.mark.parametrize("kind", ["ipc", "tcp"])
def test_request_client_survives_replay_restart(ctx, ipc_dir, kind):
    t = TransportConfig(kind=kind, ipc_dir=ipc_dir, base_port=free_port() - 1, request_timeout_ms=300)
    ep = endpoints(t, rid())["replay_sample"]
    a = start_server(ep)
    b = None
    client = RequestClient(ctx, ep, t, max_in_flight=3)
    try:
        ids = [client.request(SampleRequest(batch_size=8, beta=0.4)) for _ in range(3)]
        with pytest.raises(RuntimeError, match="in flight"):
            client.request(SampleRequest(batch_size=8))
        replies = collect(client, 3, timeout=5)
        assert sorted(r.request_id for r in replies) == ids and {r.slot_seq for r in replies} == {a.pid}
        a.kill()
        a.wait()
        ids = [client.request(SampleRequest(batch_size=8)), client.request(InfoRequest())]
        assert collect(client, 1, timeout=0.8) == []  # nobody answers; the client keeps retrying
        b = start_server(ep)  # (ipc: the dead server's socket file is stale and gets replaced)
        replies = collect(client, 2, timeout=10)
        assert sorted(r.request_id for r in replies) == ids
        assert {type(r) for r in replies} == {BatchReady, Info}
        assert all(r.slot_seq == b.pid for r in replies if isinstance(r, BatchReady))
        assert client.stats["reconnects"] >= 1 and client.in_flight == 0
    finally:
        client.close()
        for p in (a, b):
            if p is not None:
                p.kill()
                p.wait()


def serve(endpoint: str) -> None:
    """A stand-in replay server: answers SampleRequest with BatchReady(slot_seq=pid), InfoRequest with Info."""
    ctx = new_context()
    router = make_socket(ctx, "router", TransportConfig(), bind=endpoint)
    print("ready", flush=True)
    while True:
        got = recv_message(router, timeout_ms=100, router=True)
        if got is None:
            continue
        identity, msg = got
        if isinstance(msg, SampleRequest):
            reply = BatchReady(request_id=msg.request_id, slot_id=0, slot_seq=os.getpid(), epoch=1,
                               batch_size=msg.batch_size)
        else:
            reply = Info(request_id=msg.request_id, data={"pid": os.getpid()})
        send_message(router, reply, identity=identity)


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(sys.argv[2])
