"""ZeroMQ sockets of a run: endpoints, socket options, binding, sending and receiving messages.

The only place (with client.py and board.py) that imports zmq; services get sockets from
`make_socket` and never touch zmq constants.

Endpoints (`endpoints`)::

    role            ipc (default)                          tcp (transport.kind == 'tcp')
    replay          ipc://<run dir>/replay.sock            tcp://<host>:<base_port + 0>   actors PUSH inserts
    replay_sample   ipc://<run dir>/replay_sample.sock     tcp://<host>:<base_port + 1>   learner DEALER <-> ROUTER
    paramserver     ipc://<run dir>/paramserver.sock       tcp://<host>:<base_port + 2>   Gorila gradients
    weights         ipc://<run dir>/weights.sock           tcp://<host>:<base_port + 3>   weights PUB (remote actors)

Every socket has LINGER 0 (close never hangs), SNDHWM/RCVHWM = transport.send_hwm, and
reconnects every 100 ms .. 2 s. Sending sockets get SNDTIMEO = transport.send_timeout_ms, so
a blocked send returns (False) and the caller can check for a shutdown signal; receiving
sockets get MAXMSGSIZE = transport.max_message_bytes + the envelope (header, part
lengths, padding: ``codec.ENVELOPE_OVERHEAD``) (a bigger frame drops the peer's
connection). PUSH sockets set IMMEDIATE (never queue into a connection that is not up);
ROUTER sockets set ROUTER_MANDATORY, so a reply to a vanished requester fails (False) and
the server can free what it reserved for it; SUB sockets CONFLATE (keep only the newest);
PUB/SUB (weights) queue at most ``_PUBSUB_HWM`` messages (a weights message can be large).

CURVE (remote actors, `curve`): with ``transport.curve_server_cert`` set, every tcp socket
is encrypted and authenticated: bound sockets are CURVE servers that admit only the client
keys in ``transport.curve_authorized_dir`` (ZAP, refused at the handshake), connected
sockets are CURVE clients with ``transport.curve_client_cert``. Use `new_context` (its
`term` also stops the ZAP handler).
"""
from __future__ import annotations

import errno
import os
import socket as pysocket
from typing import Any, Sequence

import numpy as np
import zmq

from apex_local.transport.codec import ENVELOPE_OVERHEAD, DecodeLimits, ProtocolError
from apex_local.transport.curve import RunContext, curve_enabled, secure_socket
from apex_local.transport.protocol import DEFAULT_LIMITS, Message, decode_received
from apex_local.transport.rundir import run_paths

__all__ = ["ROLE_PORT_OFFSETS", "TransportError", "PortInUseError", "new_context", "endpoints", "make_socket",
           "bind_or_fail", "ipc_endpoint", "send_message", "try_send", "recv_message", "wait_readable"]

ROLE_PORT_OFFSETS = {"replay": 0, "replay_sample": 1, "paramserver": 2, "weights": 3}
_MAX_IPC_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_TYPES = {"push": zmq.PUSH, "pull": zmq.PULL, "dealer": zmq.DEALER, "router": zmq.ROUTER,
          "pub": zmq.PUB, "sub": zmq.SUB}
_SENDING = {"push", "dealer", "router", "pub"}
_RECEIVING = {"pull", "dealer", "router", "sub"}
_PUBSUB_HWM = 4


class TransportError(RuntimeError):
    """A socket could not be set up; the message names the endpoint."""


class PortInUseError(TransportError):
    def __init__(self, endpoint: str, message: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint


def new_context() -> zmq.Context:
    """A fresh ZMQ context (one per process; close it with ``ctx.term()`` / ``ctx.destroy(0)``,
    which also stop its CURVE authenticator, if any)."""
    return RunContext()


def endpoints(cfg: Any, run_id: str) -> dict[str, str]:
    """role -> endpoint. ``cfg``: a `Config` or `TransportConfig`. For ipc this creates the
    run's 0700 directory (`rundir.run_paths`)."""
    t = getattr(cfg, "transport", cfg)
    if t.kind == "tcp":
        return {role: f"tcp://{t.host}:{t.base_port + off}" for role, off in ROLE_PORT_OFFSETS.items()}
    paths = run_paths(cfg, run_id)
    socks = {role: str(paths.socket(role)) for role in ROLE_PORT_OFFSETS}
    ipc_endpoint(max(socks.values(), key=len))  # name the longest path if any is too long
    return {role: ipc_endpoint(path) for role, path in socks.items()}


def ipc_endpoint(path: Any) -> str:
    """``ipc://path``; TransportError naming the path if it does not fit a Unix socket address."""
    path = str(path)
    if len(path) > _MAX_IPC_PATH:
        raise TransportError(f"ipc socket path {path!r} is longer than {_MAX_IPC_PATH} characters: "
                             "set transport.ipc_dir to a shorter directory or use a shorter run id")
    return f"ipc://{path}"


def make_socket(ctx: zmq.Context, kind: str, transport: Any, *, bind: str | None = None,
                connect: str | None = None, max_message_bytes: int | None = None) -> zmq.Socket:
    """A socket of ``kind`` (push | pull | dealer | router | pub | sub) with the options in the
    module docstring, bound (via `bind_or_fail`) or connected when an endpoint is given; a
    CURVE server / client for a tcp endpoint when CURVE is configured (`curve.secure_socket`;
    a bad key file raises `curve.CurveKeyError`, exit 2). ``max_message_bytes`` (a whole
    frame's size) overrides ``transport.max_message_bytes`` (arrays) + envelope for a receiving socket."""
    if kind not in _TYPES:
        raise ValueError(f"socket kind {kind!r}; choose one of {', '.join(_TYPES)}")
    t = getattr(transport, "transport", transport)
    sock = ctx.socket(_TYPES[kind])
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, t.send_hwm)
    sock.setsockopt(zmq.RCVHWM, t.send_hwm)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    if kind in _SENDING:
        sock.setsockopt(zmq.SNDTIMEO, t.send_timeout_ms)
    if kind in _RECEIVING:
        # an override is a whole frame's size (the weights SUB); the default bounds a message's arrays
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes or t.max_message_bytes + ENVELOPE_OVERHEAD)
    if kind in ("pub", "sub"):
        sock.setsockopt(zmq.SNDHWM, _PUBSUB_HWM)
        sock.setsockopt(zmq.RCVHWM, _PUBSUB_HWM)
    if kind == "push":
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if kind == "router":
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if kind == "sub":
        sock.setsockopt(zmq.CONFLATE, 1)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        endpoint = bind or connect or ""
        if endpoint.startswith("tcp://") and curve_enabled(t):
            secure_socket(ctx, sock, t, server=bool(bind))
        if bind:
            bind_or_fail(sock, bind)
        if connect:
            sock.connect(connect)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def _ipc_in_use(path: str) -> bool:
    """True if a process accepts connections on the unix socket at ``path``."""
    probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)
    finally:
        probe.close()


def bind_or_fail(sock: zmq.Socket, endpoint: str) -> None:
    """Bind, or raise `PortInUseError` naming the endpoint. For ipc, a socket file with a live
    listener is an error (ZMQ would silently steal it); a stale file is removed first."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if os.path.lexists(path):
            if _ipc_in_use(path):
                raise PortInUseError(endpoint, f"cannot bind {endpoint}: a live process is listening on {path} "
                                               "(another process of this run id is running? see `apex-local clean`)")
            os.unlink(path)  # stale file of a process that died
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        if exc.errno == errno.EADDRINUSE:
            port = endpoint.rsplit(":", 1)[-1]
            raise PortInUseError(endpoint, f"cannot bind {endpoint}: port {port} is already in use (another run or "
                                           "program); stop it or pick another transport.base_port") from None
        raise TransportError(f"cannot bind {endpoint}: {exc}") from None


def send_message(sock: zmq.Socket, msg: Message | np.ndarray, *, identity: bytes | None = None,
                 block: bool = True) -> bool:
    """Send ``msg``. False when the send timed out (SNDTIMEO), would block (``block=False``),
    or the ROUTER peer ``identity`` is gone.

    The message travels as one frame (`Message.to_frame`, one copy of its arrays): a multipart
    message can abort the process in libzmq when its peer goes away mid-send (codec.py). A
    caller that may resend (a send that timed out) passes ``msg.to_frame()`` once instead.
    """
    frame = msg.to_frame() if isinstance(msg, Message) else msg
    flags = 0 if block else zmq.NOBLOCK
    try:
        if identity is not None:  # ROUTER: the identity frame only picks the peer; one frame goes out
            sock.send_multipart([identity, frame], flags=flags, copy=False)
        else:
            sock.send(frame, flags=flags, copy=False)
        return True
    except zmq.Again:
        return False
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EHOSTUNREACH:
            return False
        raise


def try_send(sock: zmq.Socket, data: Any, *, block: bool = True) -> bool:
    """Send one frame; False on timeout."""
    try:
        sock.send(data, flags=0 if block else zmq.NOBLOCK, copy=True)
        return True
    except zmq.Again:
        return False


def recv_message(sock: zmq.Socket, limits: DecodeLimits = DEFAULT_LIMITS, *, timeout_ms: int = 0,
                 router: bool = False) -> tuple[bytes | None, Message] | None:
    """(identity or None, message), or None if nothing arrived within ``timeout_ms``.

    Raises `ProtocolError` for a bad message (it is consumed; ``exc.identity`` names the ROUTER
    peer so the server may answer with an `Error`)."""
    if timeout_ms > 0 and not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    try:
        frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return None
    identity = None
    if router:
        identity, frames = frames[0].bytes, frames[1:]
    try:
        return identity, decode_received(frames, limits)
    except ProtocolError as exc:
        exc.identity = identity
        raise


def wait_readable(socks: Sequence[zmq.Socket], timeout_ms: int) -> list[zmq.Socket]:
    """The sockets of ``socks`` with a message waiting, after at most ``timeout_ms``."""
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    return [s for s, _ in poller.poll(timeout_ms)]
