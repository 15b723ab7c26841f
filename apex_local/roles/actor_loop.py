"""An Ape-X / R2D2 actor process: a vector env, its own CPU policy copy, local n-step (or
sequence) accumulation with initial priorities from its own network, inserts to replay,
weights from the board (a remote actor, ``transport.weights_transport: pub``: from the
learner's PUB socket, a `WeightsSubscriber` with the same ``read``).

    every step:            act (eps-greedy per env slot) -> env.step -> accumulator
    every flush_every:     Insert(chunk, env_steps, episode returns) ──PUSH──► replay
    every sync_every:      poll the weights board; adopt newer, finite versions only

An env error (reset or step raising) is survived: the env is rebuilt after a growing back-off
and the partial episode is dropped; the actor never crash-loops.
"""
from __future__ import annotations

import time
from collections import deque

import numpy as np

from apex_local.agents.builders import make_accumulator
from apex_local.agents.policy import EpsilonSchedule, Policy
from apex_local.config import Config
from apex_local.envs import make_vector_env
from apex_local.losses import initial_sequence_priorities
from apex_local.metrics import NullRecorder, Recorder
from apex_local.networks import load_flat_parameters, make_network, num_flat_parameters
from apex_local.roles.gorila_replay import insert_route
from apex_local.transport import Insert, WeightsBoard, endpoints, make_socket, new_context, segment_name, send_message
from apex_local.transport.insert_ring import InsertRingSender, ring_enabled
from apex_local.transport.shm import ShmError


# A full insert ring: wait this long for the replay to consume before sending inline (what
# a socket at its high-water mark would do; inline messages would queue behind the ring's).
RING_WAIT_S = 1.0


class ActorService:
    def __init__(self, cfg: Config, run_id: str, spec, index: int, recorder: Recorder | None = None,
                 log=print) -> None:
        self.cfg, self.run_id, self.spec, self.index, self.log = cfg, run_id, spec, index, log
        self.rec = recorder or NullRecorder()
        self.num_envs = cfg.env.num_envs
        self.seed = cfg.run.seed + 1000 * (index + 1)
        self.net = make_network(cfg.network, spec.obs_shape, spec.obs_dtype, spec.num_actions)
        self._weights = np.empty(num_flat_parameters(self.net), np.float32)
        self.weights_version = 0
        self.board: WeightsBoard | None = None
        self.eps = EpsilonSchedule(cfg.actor, index, self.num_envs)
        self.ctx = new_context()
        self.route = insert_route(cfg, run_id, index)  # Gorila local replay: the learner this actor feeds
        self.push = make_socket(self.ctx, "push", cfg.transport,
                                connect=self.route.endpoint if self.route else endpoints(cfg, run_id)["replay"])
        self.ring: InsertRingSender | None = None
        self._open_ring()
        if cfg.transport.weights_transport == "pub":  # remote actor: weights from the learner's PUB, not shm
            from apex_local.transport import WeightsSubscriber

            self.board = WeightsSubscriber(self.ctx, endpoints(cfg, run_id)["weights"], cfg.transport,
                                           self._weights.size)
        self.env_steps = self.unreported_steps = self.env_errors = 0
        self.returns: deque = deque(maxlen=100)
        self.pending_returns: list[float] = []
        self.pending_lengths: list[int] = []
        self.blocked_seconds = 0.0
        self.venv = None
        self._build_env()

    def _open_ring(self) -> None:
        """This actor's shared-memory insert ring (made at the first message, sized to them; a
        new instance after each call, the old one retired until its replay has consumed it), or
        None: inserts go inline."""
        if self.ring is not None:
            self.ring.reset()
            return
        if ring_enabled(self.cfg.transport):
            t = self.cfg.transport
            self.ring = InsertRingSender(self.run_id, f"actor{self.index}", t.insert_ring_mb << 20,
                                         queue=t.send_hwm, log=self.log, min_message_bytes=t.insert_ring_min_kb << 10)
            self.rec.inc("apex_actor_ring_full_total", 0)

    # ------------------------------------------------------------------ env
    def _build_env(self) -> None:
        if self.venv is not None:
            try:
                self.venv.close()
            except Exception:  # noqa: BLE001 - a broken env may fail to close too
                pass
        self.venv = make_vector_env(self.cfg.env, self.num_envs, seed=self.seed + 97 * self.env_errors)
        self.policy = Policy(self.net, self.num_envs, seed=self.seed + self.env_errors, noise=True)
        self.acc = make_accumulator(self.cfg, self.spec, self.num_envs)
        self.obs = self.venv.reset()
        self.acc.reset(self.obs)

    def _recover(self, exc: Exception, shutdown) -> None:
        self.env_errors += 1
        self.rec.inc("apex_actor_env_errors_total")
        backoff = min(5.0, 0.1 * 2 ** min(self.env_errors, 6))
        self.log(f"env error #{self.env_errors} ({type(exc).__name__}: {exc}); rebuilding in {backoff:.1f}s")
        shutdown.sleep(backoff)
        while not shutdown:
            try:
                self._build_env()
                return
            except Exception as again:  # noqa: BLE001
                self.env_errors += 1
                self.log(f"env rebuild failed ({type(again).__name__}: {again}); retrying")
                shutdown.sleep(5.0)

    # ------------------------------------------------------------------ weights
    def sync_weights(self, wait: bool = False, shutdown=None) -> bool:
        """Adopt a newer version from the board (attaching when the learner has created it)."""
        while True:
            if self.board is None:
                try:
                    self.board = WeightsBoard.attach(segment_name(self.run_id, "weights"))
                except (ShmError, FileNotFoundError):
                    self.board = None
            if self.board is not None:
                version = self.board.read(self._weights, min_version=self.weights_version)
                if version is not None and version > self.weights_version:
                    load_flat_parameters(self.net, self._weights)
                    self.weights_version = version
                    self.rec.set("apex_actor_weights_version", version)
                    return True
                if self.weights_version > 0 or not wait:
                    return False
            if not wait or (shutdown is not None and shutdown):
                return False
            time.sleep(0.1)

    # ------------------------------------------------------------------ loop
    def step(self, shutdown) -> None:
        eps = self.eps(self.env_steps)
        actions, q, state = self.policy.act(self.obs, eps)
        try:
            obs, reward, term, trunc, info = self.venv.step(actions)
        except Exception as exc:  # noqa: BLE001 - any env failure is survived
            self._recover(exc, shutdown)
            return
        q_final = None
        if trunc.any():
            rows = np.flatnonzero(trunc)
            q_final = np.zeros_like(q)
            q_final[rows] = self.policy.bootstrap_q(info["final_obs"][rows], rows)
        extra = {"state_h": state[0].numpy(), "state_c": state[1].numpy()} if state is not None else {}
        self.acc.step(actions, reward, term, trunc, obs, info["final_obs"], q=q, q_final=q_final, **extra)
        self.policy.reset_state(term | trunc)
        self.obs = obs
        self.env_steps += self.num_envs
        self.unreported_steps += self.num_envs
        self.rec.inc("apex_actor_env_steps_total", self.num_envs)
        for i in np.flatnonzero(info["game_over"]):
            ret = float(info["episode_return"][i])
            self.returns.append(ret)
            self.pending_returns.append(ret)
            self.pending_lengths.append(int(info["episode_length"][i]))
            self.rec.inc("apex_actor_episodes_total")
            self.rec.set("apex_actor_episode_return", ret)
        self.rec.set("apex_actor_epsilon", float(np.mean(eps)))
        if self.acc.pending >= self.cfg.actor.flush_every:
            self.flush(shutdown)
        if (self.env_steps // self.num_envs) % max(1, self.cfg.actor.sync_every // self.num_envs) == 0:
            self.sync_weights()

    def _follow_route(self) -> None:
        """Gorila local replay: this actor's learner changed (died, restarted, or the learner set
        changed). The new replay never saw our earlier frames, so drop the unsent items and
        restart the accumulator at the current observations (roles/gorila_replay.py)."""
        self.push.close(linger=0)
        self.push = make_socket(self.ctx, "push", self.cfg.transport, connect=self.route.endpoint)
        self.acc.flush()
        self.acc.reset(self.obs)
        self._open_ring()
        self.log(f"feeding learner {self.route.learner}'s replay ({self.route.endpoint})")

    def flush(self, shutdown) -> None:
        if self.route is not None and self.route.moved():
            self._follow_route()
        chunk = self.acc.flush()
        if chunk is None:
            return
        q = chunk.pop("q", None)
        if q is not None:  # R2D2 §2.3: initial sequence priorities from the actor's own net
            lc, rc = self.cfg.learner, self.cfg.replay
            chunk["priority"] = np.asarray(initial_sequence_priorities(
                q, chunk["action"], chunk["reward"], chunk["discount"], chunk["mask"], burn_in=rc.burn_in,
                n_step=rc.n_step, eta=lc.priority_eta, value_rescale=lc.value_rescale,
                rescale_eps=lc.rescale_eps), np.float32)
        msg = Insert(sender=f"actor.{self.index}", weights_version=self.weights_version, actor_id=self.index,
                     env_steps=self.unreported_steps, episode_returns=self.pending_returns[:256],
                     episode_lengths=self.pending_lengths[:256], chunk=chunk)
        t0 = time.monotonic()
        # encoded once (a send that times out is retried with it): a reference into this actor's
        # insert ring, or the message itself
        if self.ring is not None:
            full = self.ring.full
            frame = self.ring.frame(msg, wait_s=RING_WAIT_S, stop=lambda: bool(shutdown))
            if self.ring.full != full:  # no room in the ring, even after waiting: this one went inline
                self.rec.inc("apex_actor_ring_full_total")
        else:
            frame = msg.to_frame()
        while not send_message(self.push, frame):  # SNDTIMEO expired: replay slow or gone
            now = time.monotonic()  # count blocked time as it accrues, so a stall shows while it lasts
            self.blocked_seconds += now - t0
            self.rec.inc("apex_actor_send_blocked_seconds_total", now - t0)
            t0 = now
            if shutdown:
                return
            if self.ring is not None:
                self.ring.sweep()  # retired rings go on time while the replay is away
            if self.route is not None and self.route.moved():  # its learner is gone: feed another
                self._follow_route()
                return
        self.blocked_seconds += time.monotonic() - t0
        self.rec.inc("apex_actor_send_blocked_seconds_total", time.monotonic() - t0)
        self.rec.inc("apex_actor_inserted_total", len(chunk["action"]))
        self.unreported_steps = 0
        self.pending_returns, self.pending_lengths = [], []

    def close(self) -> None:
        if self.board is not None:
            self.board.close()  # before term: a weights SUB socket would keep it waiting
        self.push.close(linger=0)
        self.ctx.term()
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.venv is not None:
            self.venv.close()
