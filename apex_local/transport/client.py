"""`RequestClient`: the learner's side of DEALER -> replay ROUTER, Lazy Pirate style.

Up to ``max_in_flight`` requests (`SampleRequest`, `InfoRequest`) are outstanding at once; the
client stamps each with a fresh ``request_id`` and matches replies (`BatchReady`, `Info`,
`Error`) by it. When any outstanding request gets no reply within ``timeout_ms``
(transport.request_timeout_ms), the client closes its socket, opens a new one (a new ROUTER
identity) and resends every outstanding request. That survives a replay restart: requests
lost with the old server are asked again of the new one, and replies addressed to the old
socket are dropped by the server (ROUTER_MANDATORY tells it so, and it frees their slots).

The server should answer every request within ``timeout_ms``: with the batch, or with an
`Error` (``retry_after_ms > 0`` while it is not ready), never by holding the request.

A reply whose id is not outstanding (a duplicate after a resend) goes to ``on_orphan`` (the
learner releases its batch slot there) and is counted.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Callable

import zmq

from apex_local.transport.codec import DecodeLimits, ProtocolError
from apex_local.transport.protocol import DEFAULT_LIMITS, Message, decode_received
from apex_local.transport.sockets import make_socket, send_message

__all__ = ["RequestClient"]


@dataclasses.dataclass
class _Pending:
    msg: Message
    deadline: float


class RequestClient:
    def __init__(self, ctx: zmq.Context, endpoint: str, transport: Any, *, max_in_flight: int = 2,
                 timeout_ms: int | None = None, limits: DecodeLimits = DEFAULT_LIMITS,
                 on_orphan: Callable[[Message], None] | None = None) -> None:
        if max_in_flight < 1:
            raise ValueError(f"RequestClient: max_in_flight must be >= 1, got {max_in_flight}")
        self.ctx, self.endpoint = ctx, endpoint
        self.transport = getattr(transport, "transport", transport)
        self.max_in_flight = max_in_flight
        self.timeout_s = (timeout_ms if timeout_ms is not None else self.transport.request_timeout_ms) / 1000.0
        self.limits, self.on_orphan = limits, on_orphan
        self.stats = {"requests": 0, "replies": 0, "resent": 0, "reconnects": 0, "orphans": 0, "rejected": 0}
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self.sock = self._new_socket()

    def _new_socket(self) -> zmq.Socket:
        return make_socket(self.ctx, "dealer", self.transport, connect=self.endpoint)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def can_request(self) -> bool:
        return len(self._pending) < self.max_in_flight

    def request(self, msg: Message) -> int:
        """Send a request (a message with a ``request_id`` field); returns the id it got.
        Raises RuntimeError when ``max_in_flight`` requests are already outstanding."""
        if not self.can_request:
            raise RuntimeError(f"RequestClient: {self.max_in_flight} requests already in flight; poll() first")
        rid = next(self._ids)
        msg = dataclasses.replace(msg, request_id=rid)
        self._pending[rid] = _Pending(msg, time.monotonic() + self.timeout_s)
        self.stats["requests"] += 1
        send_message(self.sock, msg)  # a failed send is retried at the deadline
        return rid

    def send(self, msg: Message) -> bool:
        """One-way message on the same socket (e.g. `PriorityUpdate`); False on send timeout."""
        return send_message(self.sock, msg)

    def poll(self, timeout_ms: int = 0) -> list[Message]:
        """Replies that arrived, waiting up to ``timeout_ms`` for the first one; resends on timeout."""
        end = time.monotonic() + timeout_ms / 1000.0
        replies: list[Message] = []
        while True:
            now = time.monotonic()
            # Read what already arrived before expiring: _expire closes the socket, and a batch
            # reply dropped with it would leave its slot held in the replay server for good.
            self._drain(replies)
            self._expire(time.monotonic())
            if replies:
                return replies
            wait = end - now
            if self._pending:
                wait = min(wait, min(p.deadline for p in self._pending.values()) - now)
            if self.sock.poll(max(0, int(wait * 1000)), zmq.POLLIN):
                self._drain(replies)
            if replies or time.monotonic() >= end:
                return replies

    def _drain(self, replies: list[Message]) -> None:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = decode_received(frames, self.limits)
            except ProtocolError:
                self.stats["rejected"] += 1
                continue
            rid = getattr(msg, "request_id", None)
            if rid is not None and self._pending.pop(rid, None) is not None:
                self.stats["replies"] += 1
                replies.append(msg)
            else:
                self.stats["orphans"] += 1
                if self.on_orphan is not None:
                    self.on_orphan(msg)

    def _expire(self, now: float) -> None:
        if not any(p.deadline <= now for p in self._pending.values()):
            return
        self.sock.close(linger=0)  # Lazy Pirate: a fresh socket, then ask again
        self.sock = self._new_socket()
        self.stats["reconnects"] += 1
        for p in self._pending.values():
            p.deadline = now + self.timeout_s
            self.stats["resent"] += 1
            send_message(self.sock, p.msg)

    def cancel_all(self) -> None:
        """Forget every outstanding request (their late replies become orphans)."""
        self._pending.clear()

    def close(self) -> None:
        self.sock.close(linger=0)
        self._pending.clear()
