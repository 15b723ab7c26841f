"""Gorila per-learner local replay (Nair et al. 2015 §3: "each learner ... has its own replay
memory", filled by the actors of its bundle), used with ``learner.gorila_replay: local``.

    actor.i ──PUSH Insert──► PULL gorila_replay.<j>  (learner j's endpoint; j = L[i mod |L|])
                              learner j: LocalReplay (validate, insert) -> sample -> gradients
    L = the live learners of the run, sorted: ``learner.<j>.pid`` files in the run directory whose
        process is alive (pid + start time, rundir.process_alive)

Routing, and why this one. Actors send each frame exactly once and later items refer back to
earlier frames (docs/architecture.md "frames stored once"), so an actor's inserts must all reach
the SAME replay: letting ZMQ's PUSH round-robin one actor's chunks over several learners would
make the first items of every chunk refer to frames another learner received, and each replay
would lose those items (k - 1 + n per chunk boundary: ~12 % of Pong's items at flush_every 50).
Each actor therefore feeds exactly one learner, like the paper's bundles. Honcho does not tell a process how many learners run (``-c actor=4,learner=2``), so the
actor discovers them from the pid files every process writes anyway, and re-checks every
``ROUTE_CHECK_SECONDS``: when its learner died, restarted (new pid), or a learner came or went so
that ``i mod |L|`` names another one, the actor reconnects and restarts its accumulator (the new
replay never saw the old frames; the unflushed items are dropped, a few dozen transitions).
No YAML edit for any ``-c learner=N``; a learner with no actor (more learners than actors)
never reaches ``replay.min_size`` and sends nothing.

Ports (tcp): learner j's insert endpoint is ``transport.base_port + GORILA_REPLAY_PORT_OFFSET + j``;
ipc: ``gorila_replay.<j>.sock`` in the run directory.
"""
from __future__ import annotations

import os
import time

import numpy as np

from apex_local.config import Config
from apex_local.metrics import NullRecorder, Recorder
from apex_local.replay import make_replay
from apex_local.roles.replay_server import drain_inserts, insert_limits
from apex_local.transport.insert_ring import RING_REASONS, InsertRingReader
from apex_local.transport import TransportError, make_socket, wait_readable
from apex_local.transport.sockets import ipc_endpoint
from apex_local.transport.codec import REASONS
from apex_local.transport.rundir import process_alive, run_paths

GORILA_REPLAY_PORT_OFFSET = 10  # tcp: base_port + 10 + j (the shared roles use base_port + 0..3)
MAX_LEARNERS = 90  # j < 90 keeps the tcp ports below base_port + 100
ROUTE_CHECK_SECONDS = 1.0


def local_replay_enabled(cfg: Config) -> bool:
    return cfg.run.method == "gorila" and cfg.learner.gorila_replay == "local"


def learner_replay_endpoint(cfg: Config, run_id: str, j: int) -> str:
    """Where learner ``j`` binds its local replay's insert PULL socket."""
    if not 0 <= int(j) < MAX_LEARNERS:
        raise TransportError(f"Gorila learner index {j} out of range: local replay supports learners 0..{MAX_LEARNERS - 1}")
    t = cfg.transport
    if t.kind == "tcp":
        return f"tcp://{t.host}:{t.base_port + GORILA_REPLAY_PORT_OFFSET + int(j)}"
    return ipc_endpoint(run_paths(cfg, run_id).socket(f"gorila_replay.{int(j)}"))


def live_learners(cfg: Config, run_id: str) -> list[tuple[int, int, int | None]]:
    """[(j, pid, start time)] of the run's live learners, sorted by j (from their pid files)."""
    out = []
    for path in run_paths(cfg, run_id).ipc_dir.glob("learner.*.pid"):
        try:
            j = int(path.name.split(".")[1])
            parts = path.read_text().split()
            pid, start = int(parts[0]), (int(parts[1]) if len(parts) > 1 else None)
        except (OSError, ValueError, IndexError):
            continue  # being written or removed
        if process_alive(pid, start):
            out.append((j, pid, start))
    return sorted(out)


class LearnerRoute:
    """Actor side: which learner's replay actor ``index`` feeds (``endpoint``). ``moved()`` is
    True (at most every ``check_every`` s) when that changed; the actor then reconnects and
    restarts its accumulator. Before any learner is up, learner 0's endpoint (PUSH sockets
    connect lazily, and with ZMQ_IMMEDIATE a send waits until it is bound)."""

    def __init__(self, cfg: Config, run_id: str, index: int, check_every: float = ROUTE_CHECK_SECONDS) -> None:
        self.cfg, self.run_id, self.index, self.check_every = cfg, run_id, int(index), float(check_every)
        self.key: tuple = ()
        self.learner = 0
        self.endpoint = ""
        self._checked = -1e9
        self.moved()

    def _target(self) -> tuple:
        live = live_learners(self.cfg, self.run_id)
        return live[self.index % len(live)] if live else (0, None, None)

    def moved(self) -> bool:
        now = time.monotonic()
        if now - self._checked < self.check_every:
            return False
        self._checked = now
        key = self._target()
        if key == self.key:
            return False
        self.key, self.learner = key, int(key[0])
        self.endpoint = learner_replay_endpoint(self.cfg, self.run_id, self.learner)
        return True


def insert_route(cfg: Config, run_id: str, index: int) -> LearnerRoute | None:
    """The actor's route to a learner's local replay, or None (inserts go to the replay server)."""
    return LearnerRoute(cfg, run_id, index) if local_replay_enabled(cfg) else None


class LocalReplay:
    """Learner side: an in-process `Replay` (``make_replay``, process memory, same table /
    sampler / rate limiter as the replay server) behind its own PULL socket. Inserts are
    decoded and validated like the replay server does (``DecodeLimits`` with the run's
    ``InsertSpec``, then the table's own chunk checks); a bad message is dropped and counted in
    ``apex_learner_replay_rejected_messages_total{reason}`` and nothing else changes.

    What blocks: while the rate limiter refuses inserts the PULL socket is not read, so the
    actors routed here block on their send high-water mark (as with the replay server)."""

    def __init__(self, cfg: Config, run_id: str, spec, index: int, ctx, recorder: Recorder | None = None,
                 log=print) -> None:
        self.cfg, self.log = cfg, log
        self.rec = recorder or NullRecorder()
        self.replay = make_replay(cfg, spec.frame_shape, spec.obs_dtype, spec.frame_stack, spec.num_actions,
                                  rng=np.random.default_rng(cfg.run.seed + 7 + 1009 * (index + 1)))
        self.limits = insert_limits(cfg, spec)
        self.rings = InsertRingReader(run_id)
        self.endpoint = learner_replay_endpoint(cfg, run_id, index)
        self.pull = make_socket(ctx, "pull", cfg.transport, bind=self.endpoint)
        self.env_steps = self.episodes = 0
        self.rejected: dict[str, int] = {}
        self.rec.set("apex_learner_replay_capacity", self.replay.capacity)
        for reason in REASONS + RING_REASONS + ("bad_chunk",):
            self.rec.inc("apex_learner_replay_rejected_messages_total", 0, reason=reason)

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.rec.inc("apex_learner_replay_rejected_messages_total", reason=reason)
        if self.rejected[reason] <= 3 or self.rejected[reason] % 1000 == 0:
            self.log(f"dropped a message ({reason}, {self.rejected[reason]} so far): {detail[:200]}")

    def drain(self) -> int:
        """Insert what arrived (at most MAX_MESSAGES_PER_TICK messages); returns items inserted."""
        items = 0
        for msg, n in drain_inserts(self.pull, self.limits, self.replay, self._reject, rings=self.rings):
            items += n
            self.env_steps += msg.env_steps
            self.episodes += len(msg.episode_returns)
            self.rec.inc("apex_learner_replay_inserted_total", n)
            self.rec.inc("apex_learner_replay_env_steps_total", msg.env_steps)
        self.rec.set("apex_learner_replay_size", self.replay.size)
        return items

    def wait(self, timeout_ms: int) -> None:
        """Wait for inserts (or just sleep while the rate limiter refuses them)."""
        if self.replay.can_insert():
            wait_readable([self.pull], timeout_ms)
        else:
            time.sleep(timeout_ms / 1000.0)

    def sample(self, batch_size: int, beta: float) -> dict | None:
        """A batch with the keys of a replay-server batch slot, or None if sampling must wait."""
        if not self.replay.can_sample(batch_size):
            return None
        return self.replay.sample(batch_size, beta).batch

    def update_priorities(self, index, generation, priority) -> None:
        self.replay.update_priorities(index, generation, priority)

    def info(self) -> dict:
        r = self.replay
        return {"size": int(r.size), "capacity": int(r.capacity), "inserted": int(r.inserted),
                "sampled": int(r.sampled), "env_steps": int(self.env_steps), "episodes": int(self.episodes),
                "rejected": int(sum(self.rejected.values()))}

    def close(self) -> None:
        self.rings.close()
        self.pull.close(linger=0)
        if self.endpoint.startswith("ipc://"):  # ZMQ leaves ipc socket files behind
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except FileNotFoundError:
                pass
