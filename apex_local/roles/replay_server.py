"""The replay server: prioritized replay in shared memory behind two sockets.

    actors ──PUSH──► PULL  inserts (validated; bad ones dropped and counted by reason)
    learner ─DEALER─► ROUTER  SampleRequest -> BatchReady(slot) | Error(retry_after_ms)
                              PriorityUpdate (index, generation), InfoRequest -> Info, Heartbeat

What blocks (DESIGN.md §4): while the rate limiter refuses inserts the server stops reading
the PULL socket, so actors block on their send high-water mark; while it refuses samples (or
replay is below ``replay.min_size``, or all K batch slots are held by the learner) sample
requests wait in a queue and are answered with ``Error(retry_after_ms)`` before the learner's
request timeout, never held silently.
"""
from __future__ import annotations

import os
import time
from collections import deque

import numpy as np

from apex_local.config import Config, run_dir
from apex_local.metrics import NullRecorder, Recorder
from apex_local.replay import ChunkError, beta_schedule, make_replay, replay_nbytes
from apex_local.replay.frames import layout_nbytes
from apex_local.replay.snapshot import (SNAPSHOT_NAME, SnapshotError, load_snapshot, remove_partial_snapshots,
                                        save_snapshot)
from apex_local.transport import (BatchReady, BatchSlots, DecodeLimits, Error, Heartbeat, Info, InfoRequest,
                                  InsertSpec, PriorityUpdate, ProtocolError, SampleRequest, allocator,
                                  check_free_space, endpoints, make_socket, new_context, recv_message, segment_name,
                                  send_message, wait_readable)
from apex_local.transport.codec import REASONS
from apex_local.transport.insert_ring import RING_REASONS, InsertRingReader
from apex_local.transport.protocol import InsertRef

MAX_MESSAGES_PER_TICK = 64
INSERT_GROUP = 16  # insert messages stored together (Replay.insert_many) when that many are queued


def insert_spec(cfg: Config, spec) -> InsertSpec:
    r = cfg.replay
    if cfg.recurrent:
        return InsertSpec.from_env(spec, unroll_length=r.burn_in + r.sequence_length, lstm_size=cfg.network.lstm_size)
    return InsertSpec.from_env(spec)


def insert_limits(cfg: Config, spec) -> DecodeLimits:
    """What an insert socket (replay server, Gorila local replay) accepts: inserts, and insert
    references into actors' shared-memory insert rings (transport/insert_ring.py)."""
    return DecodeLimits(max_message_bytes=cfg.transport.max_message_bytes, insert=insert_spec(cfg, spec),
                        kinds=frozenset({"insert", "insert_ref"}))


def drain_inserts(pull, limits: DecodeLimits, replay, reject, group: int = INSERT_GROUP,
                  rings: InsertRingReader | None = None):
    """Actors' messages into ``replay``: up to MAX_MESSAGES_PER_TICK, while its rate limiter
    admits inserts. Yields (Insert, items stored) per stored message; a message that fails
    decoding (``limits``) or the table's chunk checks goes to ``reject(reason, detail)`` and
    stores nothing. Shared by the replay server and a Gorila learner's local replay.

    Messages already queued are stored ``group`` at a time (``Replay.insert_many``: the same
    outcome per message as one by one, at a fraction of the cost). Before each read the limiter
    is asked for the items read but not yet stored plus one: what asking for one before each
    message stored one by one amounts to when they all get stored, and stricter otherwise.

    An `InsertRef` is decoded from its actor's insert ring (``rings``; without one it is
    rejected as 'unknown_kind'); the ring space is handed back once its group is stored."""
    batch: list = []
    pending = 0
    try:
        for _ in range(MAX_MESSAGES_PER_TICK):
            if not replay.can_insert(pending + 1):
                break
            try:
                got = recv_message(pull, limits)
                if got is None:
                    break
                msg = got[1]
                if isinstance(msg, InsertRef):
                    if rings is None:
                        raise ProtocolError("unknown_kind", "insert_ref: this replay reads no insert rings")
                    msg = rings.resolve(msg, limits)
            except ProtocolError as exc:
                reject(exc.reason, exc.detail)
                continue
            batch.append(msg)
            pending += len(msg.chunk["stream"])
            if len(batch) >= group:
                yield from _store_batch(replay, batch, reject)
                batch, pending = [], 0
                if rings is not None:
                    rings.release()
        yield from _store_batch(replay, batch, reject)
    finally:
        if rings is not None:
            rings.release()


def _store_batch(replay, batch: list, reject):
    if not batch:
        return
    results = replay.insert_many([(m.actor_id, m.chunk) for m in batch])
    for msg, n in zip(batch, results):
        if isinstance(n, ChunkError):
            reject("bad_chunk", str(n))
        else:
            yield msg, n


class ReplayServer:
    def __init__(self, cfg: Config, run_id: str, spec, recorder: Recorder | None = None, log=print,
                 restore: bool = True) -> None:
        self.cfg, self.run_id, self.spec, self.log = cfg, run_id, spec, log
        self.rec = recorder or NullRecorder()
        r, t = cfg.replay, cfg.transport
        self.batch_size = cfg.learner.batch_size
        needed = replay_nbytes(cfg, spec.frame_shape, spec.obs_dtype, spec.frame_stack)
        self._alloc = allocator(segment_name(run_id, "replay"), replace=True)
        self._slots = None
        self.ctx = new_context()
        self.pull = self.router = None
        self._bound: list[str] = []
        try:
            check_free_space(needed, name=segment_name(run_id, "replay"))
            self.replay = make_replay(cfg, spec.frame_shape, spec.obs_dtype, spec.frame_stack, spec.num_actions,
                                      allocator=self._alloc, rng=np.random.default_rng(cfg.run.seed + 7))
            layout = self.replay.batch_layout(self.batch_size)
            check_free_space(layout_nbytes(layout) * r.batch_slots, name=segment_name(run_id, "slots"))
            self._slots = BatchSlots.create(segment_name(run_id, "slots"), layout, r.batch_slots)
            eps = endpoints(cfg, run_id)
            self._bound = [eps["replay"], eps["replay_sample"]]
            self.pull = make_socket(self.ctx, "pull", t, bind=eps["replay"])
            self.router = make_socket(self.ctx, "router", t, bind=eps["replay_sample"])
        except BaseException:
            self.close()
            raise
        self.insert_limits = insert_limits(cfg, spec)
        self.rings = InsertRingReader(run_id)
        self.request_limits = DecodeLimits(max_message_bytes=t.max_message_bytes,
                                           kinds=frozenset({"sample_request", "priority_update", "info_request",
                                                            "heartbeat"}))
        self.pending: deque = deque()  # (identity, SampleRequest, arrival time)
        self.env_steps = self.episodes = 0
        self.updates_seen = 0
        self.incarnations: dict[str, int] = {}  # heartbeat sender -> incarnation
        self.rejected: dict[str, int] = {}
        self.rec.set("apex_replay_capacity", r.capacity)
        for reason in REASONS + RING_REASONS + ("bad_chunk",):
            self.rec.inc("apex_replay_rejected_messages_total", 0, reason=reason)
        self.rec.inc("apex_replay_gap_items_total", 0)
        self.rec.inc("apex_replay_ring_messages_total", 0)
        self._gap_logs = 0
        self._answer_within = max(0.005, t.request_timeout_ms / 2000.0)
        self.snapshot_path = run_dir(cfg) / SNAPSHOT_NAME
        self._gap_items = 0
        self._next_snapshot = None
        if r.snapshot_every_seconds > 0:
            self._next_snapshot = time.monotonic() + r.snapshot_every_seconds
            for name in ("apex_replay_snapshots_total", "apex_replay_snapshot_errors_total"):
                self.rec.inc(name, 0)
            if restore:
                try:
                    self.restore_snapshot()
                except BaseException:
                    self.close()
                    raise

    # ------------------------------------------------------------------ snapshots
    def _fingerprint(self) -> dict:
        c = self.cfg
        r = c.replay
        out = {"kind": "sequence" if c.recurrent else "transition", "capacity": int(self.replay.capacity),
               "env_id": self.spec.env_id, "num_actions": int(self.spec.num_actions),
               "frame_shape": list(self.spec.frame_shape), "frame_dtype": str(self.spec.obs_dtype),
               "frame_stack": int(self.spec.frame_stack), "prioritized": bool(r.prioritized),
               "n_step": int(r.n_step), "gamma": float(r.gamma)}  # stored returns depend on these two
        if c.recurrent:
            out.update(burn_in=int(r.burn_in), sequence_length=int(r.sequence_length),
                       sequence_period=int(r.sequence_period), lstm_size=int(c.network.lstm_size))
        return out

    def snapshot(self) -> bool:
        """Write the replay and the counters to ``run_dir/replay_snapshot.npz`` (atomically).
        A failure (disk full, ...) is logged and counted; serving goes on and the previous
        snapshot is kept."""
        t0 = time.monotonic()
        meta = {"env_steps": int(self.env_steps), "episodes": int(self.episodes),
                "fingerprint": self._fingerprint(), "run_id": self.run_id, "written_at": time.time()}
        try:
            save_snapshot(self.snapshot_path, self.replay.state_dict(), meta)
        except Exception as exc:  # noqa: BLE001 - disk full, MemoryError, ...: keep serving
            self.rec.inc("apex_replay_snapshot_errors_total")
            self.log(f"snapshot failed ({type(exc).__name__}): {exc}")
            return False
        took = time.monotonic() - t0
        self.rec.inc("apex_replay_snapshots_total")
        self.rec.set("apex_replay_snapshot_seconds", took)
        self.log(f"snapshot: {self.replay.size} items, {self.env_steps} env steps -> {self.snapshot_path} "
                 f"({took:.2f}s)")
        return True

    def restore_snapshot(self) -> bool:
        """Load ``run_dir/replay_snapshot.npz`` if there is one. A snapshot of a finished run
        (its env steps reached ``run.max_env_steps``) is kept as ``replay_snapshot.finished.npz``
        and the replay starts empty, like the learner's checkpoint. A snapshot made for another
        replay layout is a `SnapshotError` naming both (move it away or start with --fresh)."""
        path = self.snapshot_path
        for tmp in remove_partial_snapshots(path):
            self.log(f"removed {tmp.name}, a snapshot write that never finished")
        if not path.is_file():
            return False
        state, meta = load_snapshot(path)
        if int(meta.get("env_steps", 0)) >= self.cfg.run.max_env_steps:
            done = path.with_name("replay_snapshot.finished.npz")
            os.replace(path, done)
            self.log(f"{path} is from a finished run ({meta.get('env_steps')} env steps); kept as {done.name}, "
                     "starting empty")
            return False
        want = self._fingerprint()
        if meta.get("fingerprint") != want:
            raise SnapshotError(f"replay snapshot {path} was made for a different replay "
                                f"({meta.get('fingerprint')}), this config needs {want}: move the file away or "
                                "start the replay with --fresh (APEX_FRESH=1)")
        try:
            self.replay.load_state_dict(state)
        except (KeyError, ValueError, IndexError) as exc:
            raise SnapshotError(f"replay snapshot {path} does not fit this replay: {exc}") from None
        # priority updates still in flight from before the crash carry generations of the old
        # contents; a slot refilled after the snapshot may be back at the same number: move on
        self.replay.table.generation[...] += 1
        self.env_steps, self.episodes = int(meta.get("env_steps", 0)), int(meta.get("episodes", 0))
        self._gap_items = self.replay.table.gap_items
        self.rec.inc("apex_replay_env_steps_total", self.env_steps)
        self.log(f"restored {self.replay.size} items, {self.env_steps} env steps from {path}")
        return True

    # ------------------------------------------------------------------ loop
    def run(self, shutdown, status=None) -> None:
        while not shutdown:
            socks = [self.router] + ([self.pull] if self.replay.can_insert() else [])
            ready = wait_readable(socks, 20 if not self.pending else 5)
            if self.pull in ready:
                self._drain_inserts()
            if self.router in ready:
                self._drain_requests()
            self._serve_pending()
            self.rec.set("apex_replay_size", self.replay.size)
            if self._next_snapshot is not None and time.monotonic() >= self._next_snapshot:
                self.snapshot()
                self._next_snapshot = time.monotonic() + self.cfg.replay.snapshot_every_seconds
            if status is not None:
                status(self)
        if self._next_snapshot is not None:  # a clean stop: the newest contents survive
            self.snapshot()

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.rec.inc("apex_replay_rejected_messages_total", reason=reason)
        if self.rejected[reason] <= 3 or self.rejected[reason] % 1000 == 0:
            self.log(f"dropped a message ({reason}, {self.rejected[reason]} so far): {detail[:200]}")

    def _drain_inserts(self) -> None:
        before = self.rings.resolved
        for msg, n in drain_inserts(self.pull, self.insert_limits, self.replay, self._reject, rings=self.rings):
            self.env_steps += msg.env_steps
            self.episodes += len(msg.episode_returns)
            self.rec.inc("apex_replay_inserted_total", n)
            if self.replay.table.gap_items != self._gap_items:
                lost = self.replay.table.gap_items - self._gap_items
                self._gap_items = self.replay.table.gap_items
                self.rec.inc("apex_replay_gap_items_total", lost)
                self._gap_logs += 1
                if self._gap_logs <= 8 or self._gap_logs % 1000 == 0:
                    self.log(f"actor {msg.actor_id}: skipped {lost} items referencing frames this replay never "
                             "got (it restarted while the actor ran); the stream continues")
            self.rec.inc("apex_replay_env_steps_total", msg.env_steps)
        if self.rings.resolved != before:
            self.rec.inc("apex_replay_ring_messages_total", self.rings.resolved - before)

    def _drain_requests(self) -> None:
        for _ in range(MAX_MESSAGES_PER_TICK):
            try:
                got = recv_message(self.router, self.request_limits, router=True)
            except ProtocolError as exc:
                self._reject(exc.reason, exc.detail)
                continue
            if got is None:
                return
            identity, msg = got
            if isinstance(msg, SampleRequest):
                if msg.batch_size != self.batch_size:
                    send_message(self.router, Error(request_id=msg.request_id, reason="bad_batch_size",
                                                    detail=f"batch slots hold {self.batch_size} items "
                                                           f"(learner.batch_size), asked {msg.batch_size}"),
                                 identity=identity)
                    continue
                self.pending.append((identity, msg, time.monotonic()))
            elif isinstance(msg, PriorityUpdate):
                applied = self.replay.update_priorities(msg.index, msg.generation, msg.priority)
                self.updates_seen += 1
                self.rec.inc("apex_replay_priority_updates_total", applied)
                self.rec.inc("apex_replay_stale_priority_updates_total", int(msg.index.size) - applied)
            elif isinstance(msg, InfoRequest):
                send_message(self.router, Info(request_id=msg.request_id, data=self.info()), identity=identity)
            elif isinstance(msg, Heartbeat):
                known = self.incarnations.get(msg.sender)
                if known is not None and known != msg.incarnation:
                    # this learner restarted: the slots it held will never be released
                    self._slots.reclaim_all()
                    self.log(f"learner {msg.sender or '?'} restarted: reclaimed held batch slots")
                self.incarnations[msg.sender] = msg.incarnation

    def _serve_pending(self) -> None:
        while self.pending:
            identity, req, since = self.pending[0]
            if not self.replay.can_sample(self.batch_size):
                break
            slot = self._slots.acquire()
            if slot is None:
                break
            self.pending.popleft()
            self.replay.sample(self.batch_size, req.beta, out=slot.arrays)
            self._slots.publish(slot)
            ok = send_message(self.router, BatchReady(request_id=req.request_id, slot_id=slot.slot_id,
                                                      slot_seq=slot.seq, epoch=self._slots.epoch,
                                                      batch_size=self.batch_size), identity=identity)
            if not ok:  # the requester is gone (restarted): free the slot again
                self._slots.abort(slot)
                continue
            self.rec.inc("apex_replay_sampled_total", self.batch_size)
        now = time.monotonic()
        while self.pending and now - self.pending[0][2] > self._answer_within:
            identity, req, _ = self.pending.popleft()
            why = (f"replay holds {self.replay.size} items (min {self.replay.min_size})"
                   if self.replay.size < self.replay.min_size else "rate limited or all batch slots in use")
            send_message(self.router, Error(request_id=req.request_id, reason="not_ready", detail=why,
                                            retry_after_ms=50), identity=identity)

    def info(self) -> dict:
        return {"size": int(self.replay.size), "capacity": int(self.replay.capacity),
                "inserted": int(self.replay.inserted), "sampled": int(self.replay.sampled),
                "env_steps": int(self.env_steps), "episodes": int(self.episodes),
                "rejected": int(sum(self.rejected.values())), "ring_messages": int(self.rings.resolved)}

    def close(self) -> None:
        if getattr(self, "rings", None) is not None:
            self.rings.close()
        for s in (self.pull, self.router):
            if s is not None:
                s.close(linger=0)
        self.ctx.term()
        for ep in self._bound:  # ZMQ leaves ipc socket files behind
            if ep.startswith("ipc://"):
                try:
                    os.unlink(ep[len("ipc://"):])
                except FileNotFoundError:
                    pass
        if self._slots is not None:
            self._slots.close()
        self._alloc.close()


__all__ = ["ReplayServer", "beta_schedule", "drain_inserts", "insert_limits", "insert_spec"]
