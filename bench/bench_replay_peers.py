"""Prioritized replay vs peers (cpprb, TorchRL): the Ape-X workload, each library in-process.

    python -m bench.bench_replay_peers [--quick] [--impls apex_local,cpprb,...] [--capacity N] [--cycles N]

Workload (bench/bench_replay.py's, the Ape-X paper's replay settings): insert chunks of 50
n-step transitions (k = 4 stacked 84x84 uint8 frames, n = 3) until the buffer is full, keep
inserting (overwriting) for a fifth of the capacity more, then run ``--cycles`` of sample 512
(alpha 0.6, beta 0.4) + update 512 priorities. Each implementation runs in its own
subprocess (so peak RSS is its own), one after the other, with the same interpreter.

Implementations (``--impls``):

- ``apex_local``: our ``make_replay`` (``configs/apex_pong.yaml``'s replay section, capacity
  overridden): frames stored once, stacks rebuilt at sample time into a preallocated batch, as
  the replay server does into a shared-memory slot. Chunks as an actor sends them (5 env
  streams x 10 steps, each frame once) from bench/bench_replay.py's ``ChunkSource``.
- ``apex_local_server``: the same replay as a real replay server process (``python -m
  services.replay``, what every topology runs), driven from this process over ZeroMQ and shared
  memory the way actors and the learner drive it: Insert messages of 50 transitions pushed as an
  actor flush sends them (inserts/s = transitions until the server reports them stored), then
  learner-style cycles with ``learner.prefetch`` requests in flight: SampleRequest(512, beta 0.4)
  -> BatchReady -> copy the shared-memory slot out, release it -> PriorityUpdate(512). Peak RSS =
  the server's VmHWM + this client's (the shared slots are counted in both).
- ``cpprb``: ``cpprb.PrioritizedReplayBuffer`` with obs and next_obs stacks stored per
  transition (2 x 4 x 84 x 84 B), the layout any generic buffer needs for an n-step transition
  from interleaved env streams.
- ``cpprb_compressed``: cpprb's Atari memory mode (``next_of="obs"`` + ``stack_compress="obs"``):
  frames shared between consecutive transitions. It assumes ONE env stream added in order and a
  1-step next observation (next_obs of item i = obs of item i+1), so it cannot store the Ape-X
  actor's n-step transitions from 5 interleaved streams as they are; fed here with one stream's
  sequential 1-step transitions. Shown for its memory and speed, not as an equivalent store.
- ``torchrl_tensor`` / ``torchrl_memmap``: ``torchrl.data.TensorDictPrioritizedReplayBuffer``
  over ``LazyTensorStorage`` (RAM) / ``LazyMemmapStorage`` (a file in a temp dir), obs and
  next_obs stacks per transition as in TorchRL's DQN Atari example.

Timed: only the library calls (insert / sample / update); building the peers' input arrays is
outside the clocks. Peak RSS: ``getrusage`` max RSS of the subprocess (imports included); the
RSS before the buffer is built is reported next to it. A peer layout that would not fit in
MemAvailable (RAM storages) or in free disk space (memmap) is skipped with that reason rather
than swapping the machine. Every figure is also given as a ratio to ``apex_local`` of the same
invocation (peer / ours: > 1 = the peer is faster / uses more memory).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._plot import pyplot, save
from bench._topo import stop_child

ROOT = Path(__file__).resolve().parents[1]
FRAME = (84, 84)
K, N_STEP, CHUNK, BATCH, ALPHA, BETA = 4, 3, 50, 512, 0.6, 0.4
STACK_BYTES = K * FRAME[0] * FRAME[1]
IMPLS = ("apex_local", "apex_local_server", "cpprb", "cpprb_compressed", "torchrl_tensor", "torchrl_memmap")
PEER_PACKAGES = {"cpprb": "cpprb", "cpprb_compressed": "cpprb", "torchrl_tensor": "torchrl",
                 "torchrl_memmap": "torchrl"}
QUICK = {"capacity": 100_000, "cycles": 200}
FULL = {"capacity": 1_000_000, "cycles": 300}
INSTALL_HINT = "pip install -e '.[bench]'"


class Skip(Exception):
    """The implementation cannot run here (package missing, layout too large, ...)."""


def rss_now_gib() -> float:
    from apex_local.monitoring.procstats import resident_bytes

    rss = resident_bytes("self")  # anon + file + shmem = VmRSS
    return sum(rss.values()) / 2 ** 30 if rss else float("nan")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def mem_available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def need_package(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise Skip(f"package `{name}` not installed ({e.__class__.__name__}: {e}); install the peers with "
                   f"`{INSTALL_HINT}`") from None


class PeerChunks:
    """Peer input: chunk c = 50 transitions whose obs / next obs stacks (k=4) come from a pool of
    997 random frames. ``generic``: (50, 4, 84, 84) obs and next obs n=3 frames later;
    ``compressed``: one stream's consecutive 1-step transitions, stack on the last axis."""

    def __init__(self, rng: np.random.Generator, compressed: bool = False) -> None:
        self.pool = rng.integers(0, 256, (997, *FRAME), dtype=np.uint8)
        self.compressed = compressed
        self.c = 0
        self.rng = rng

    def next(self) -> dict:
        c = self.c
        self.c += 1
        if self.compressed:
            t = (c * CHUNK + np.arange(CHUNK + 1))[:, None] + np.arange(K)
            stacks = np.ascontiguousarray(self.pool[t % self.pool.shape[0]].transpose(0, 2, 3, 1))
            obs, nxt = stacks[:-1], stacks[1:]
        else:
            start = (c * 53) % (self.pool.shape[0] - CHUNK - K - N_STEP)
            idx = (start + np.arange(CHUNK))[:, None] + np.arange(K)
            obs, nxt = self.pool[idx], self.pool[idx + N_STEP]
        return {"obs": obs, "next_obs": nxt, "action": self.rng.integers(0, 6, CHUNK),
                "reward": np.ones(CHUNK, np.float32), "discount": np.full(CHUNK, 0.99 ** N_STEP, np.float32),
                "priority": self.rng.random(CHUNK).astype(np.float32) + 1e-3}


# ------------------------------------------------------------------ implementations
# Each builder returns (insert(chunk) -> n, make_chunk() -> chunk, cycle_fns, info);
# cycle_fns = (sample() -> handle, update(handle, priorities)).

def build_apex_local(capacity: int, rng: np.random.Generator):
    from apex_local.api import resolve_config
    from apex_local.replay.replay import make_replay
    from bench.bench_replay import ChunkSource

    cfg = resolve_config(ROOT / "configs" / "apex_pong.yaml",
                         [f"replay.capacity={capacity}", f"replay.min_size={BATCH}", "replay.samples_per_insert=0",
                          f"replay.alpha={ALPHA}", f"replay.beta={BETA}", f"learner.batch_size={BATCH}"])
    replay = make_replay(cfg, FRAME, np.uint8, K, num_actions=6, rng=rng)
    src = ChunkSource(rng)
    out = {key: np.zeros(shape, dt) for key, shape, dt in replay.batch_layout(BATCH)}

    def sample():
        return replay.sample(BATCH, beta=BETA, out=out)

    def update(res, prio):
        replay.update_priorities(res.indices, res.generations, prio)

    return (lambda chunk: replay.insert(0, chunk)), src.next, (sample, update), \
        {"layout": "frames once (k=4, n=3, 5 streams)", "size": lambda: replay.size}


def build_cpprb(capacity: int, rng: np.random.Generator, compressed: bool = False):
    cpprb = need_package("cpprb")
    if compressed:
        need = capacity * (FRAME[0] * FRAME[1]) * 1.05
        env = {"obs": {"shape": (*FRAME, K), "dtype": np.ubyte}, "act": {"dtype": np.int64},
               "rew": {"dtype": np.float32}, "discount": {"dtype": np.float32}}
        kw = {"next_of": ("obs",), "stack_compress": "obs"}
        layout = "frames shared (next_of + stack_compress; 1 stream, 1-step next)"
    else:
        need = capacity * 2 * STACK_BYTES
        env = {"obs": {"shape": (K, *FRAME), "dtype": np.ubyte}, "next_obs": {"shape": (K, *FRAME), "dtype": np.ubyte},
               "act": {"dtype": np.int64}, "rew": {"dtype": np.float32}, "discount": {"dtype": np.float32}}
        kw = {}
        layout = "obs + next_obs stacks per transition"
    check_ram(need)
    rb = cpprb.PrioritizedReplayBuffer(capacity, env, alpha=ALPHA, **kw)
    src = PeerChunks(rng, compressed)

    def insert(ch):
        rb.add(obs=ch["obs"], next_obs=ch["next_obs"], act=ch["action"], rew=ch["reward"],
               discount=ch["discount"], priorities=ch["priority"])
        return CHUNK

    def sample():
        return rb.sample(BATCH, beta=BETA)

    def update(s, prio):
        rb.update_priorities(s["indexes"], prio)

    return insert, src.next, (sample, update), {"layout": layout, "size": rb.get_stored_size}


def build_torchrl(capacity: int, rng: np.random.Generator, memmap: bool = False):
    need_package("torchrl")
    import torch
    from tensordict import TensorDict
    try:
        importlib.import_module("torchrl._torchrl")
    except ImportError as e:
        raise Skip(f"torchrl {version('torchrl')} is installed but its C++ extension (the segment trees "
                   f"its PrioritizedSampler needs) does not load against torch {torch.__version__}: "
                   f"{str(e).rsplit(': ', 1)[-1][:48]}...; install a torchrl built for this torch") from None
    from torchrl.data import LazyMemmapStorage, LazyTensorStorage, TensorDictPrioritizedReplayBuffer

    need = capacity * 2 * STACK_BYTES
    if memmap:
        scratch = tempfile.mkdtemp(prefix="apex-bench-torchrl-")
        free = shutil.disk_usage(scratch).free
        if need > 0.9 * free:
            raise Skip(f"memmap layout needs {need / 2**30:.1f} GiB on disk, {free / 2**30:.1f} GiB free")
        storage = LazyMemmapStorage(capacity, scratch_dir=scratch)
    else:
        check_ram(need)
        storage = LazyTensorStorage(capacity)
    rb = TensorDictPrioritizedReplayBuffer(alpha=ALPHA, beta=BETA, storage=storage, batch_size=BATCH,
                                           priority_key="td_error")
    src = PeerChunks(rng)

    def make():
        ch = src.next()
        return TensorDict({"obs": torch.from_numpy(ch["obs"]), "next_obs": torch.from_numpy(ch["next_obs"]),
                           "action": torch.from_numpy(ch["action"]), "reward": torch.from_numpy(ch["reward"]),
                           "discount": torch.from_numpy(ch["discount"]),
                           "td_error": torch.from_numpy(ch["priority"])}, batch_size=[CHUNK])

    def insert(td):
        rb.extend(td)
        return CHUNK

    def update(s, prio):
        rb.update_priority(s["index"], torch.from_numpy(prio))

    return insert, make, (rb.sample, update), \
        {"layout": "obs + next_obs stacks per transition" + (" (memmap file)" if memmap else ""),
         "size": lambda: len(rb), "torch_threads": torch.get_num_threads()}


def check_ram(need: float) -> None:
    avail = mem_available_bytes()
    if need > 0.8 * avail:
        raise Skip(f"layout needs {need / 2**30:.1f} GiB of RAM, MemAvailable {avail / 2**30:.1f} GiB "
                   f"(skipped rather than swapping; run with a smaller --capacity)")


BUILDERS = {"apex_local": build_apex_local, "cpprb": build_cpprb,
            "cpprb_compressed": lambda c, r: build_cpprb(c, r, compressed=True),
            "torchrl_tensor": build_torchrl, "torchrl_memmap": lambda c, r: build_torchrl(c, r, memmap=True)}


def version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version as v
    try:
        return v(pkg)
    except PackageNotFoundError:
        return "not installed"


def measure(impl: str, capacity: int, cycles: int, seed: int = 0) -> dict:
    """Run one implementation in this process; returns a result row (or {"skipped": why})."""
    if impl == "apex_local_server":
        return measure_server(capacity, cycles, seed)
    rng = np.random.default_rng(seed)
    row = {"impl": impl, "capacity": capacity, "cycles": cycles, "load_start": os.getloadavg()[0]}
    try:
        # imports first, so that "RSS before the buffer" includes them (cpprb touches its arrays at
        # construction; ours and TorchRL's fill lazily)
        if impl == "apex_local":
            importlib.import_module("apex_local.replay.replay")
        else:
            need_package(PEER_PACKAGES[impl])
            if impl.startswith("torchrl"):
                importlib.import_module("torchrl.data")
        row["rss_before_gib"] = rss_now_gib()
        insert, make, (sample, update), info = BUILDERS[impl](capacity, rng)
    except Skip as e:
        return {**row, "skipped": str(e)}
    size = info.pop("size")
    row.update(info)
    for phase, count in (("fill", capacity), ("overwrite", max(capacity // 5, CHUNK))):
        n, busy = 0, 0.0
        t_wall = time.perf_counter()
        while n < count:
            chunk = make()
            t0 = time.perf_counter()
            n += insert(chunk)
            busy += time.perf_counter() - t0
        row[f"{phase}_per_s"] = n / busy
        row[f"{phase}_wall_s"] = time.perf_counter() - t_wall
        print(f"[{impl}] {phase}: {n:,} transitions, {n / busy:,.0f}/s (size {size():,})", file=sys.stderr, flush=True)
    prio = [rng.random(BATCH).astype(np.float32) + 1e-3 for _ in range(8)]
    for i in range(3):  # warm-up (first-call allocations), untimed
        update(sample(), prio[i])
    t_s = t_u = 0.0
    for i in range(cycles):
        t0 = time.perf_counter()
        s = sample()
        t1 = time.perf_counter()
        update(s, prio[i % 8])
        t2 = time.perf_counter()
        t_s += t1 - t0
        t_u += t2 - t1
    row.update(cycles_per_s=cycles / (t_s + t_u), sample_ms=1e3 * t_s / cycles, update_ms=1e3 * t_u / cycles,
               peak_rss_gib=peak_rss_gib(), load_end=os.getloadavg()[0])
    print(f"[{impl}] sample {BATCH} + update {BATCH}: {row['cycles_per_s']:,.1f} cycles/s; "
          f"peak RSS {row['peak_rss_gib']:.2f} GiB", file=sys.stderr, flush=True)
    return row


def measure_server(capacity: int, cycles: int, seed: int = 0) -> dict:
    """``apex_local_server``: the replay server as its own process, driven over the transport."""
    import tempfile

    from apex_local.transport import (BatchReady, BatchSlots, Error, Info, InfoRequest, Insert,
                                      PriorityUpdate, RequestClient, SampleRequest, segment_name)
    from apex_local.transport.insert_ring import InsertRingWriter, insert_frame, ring_enabled
    from apex_local.transport.sockets import endpoints, make_socket, new_context, send_message
    from bench.bench_replay import ChunkSource
    from bench._topo import Registry

    rng = np.random.default_rng(seed)
    row = {"impl": "apex_local_server", "capacity": capacity, "cycles": cycles, "load_start": os.getloadavg()[0],
           "layout": "frames once, server process (ZMQ + shm slots)"}
    with tempfile.TemporaryDirectory(prefix="apex-bench-server-") as tmp:
        reg = Registry(Path(tmp))
        ctx = client = push = slots = ring = None
        try:
            topo = reg.topology("replay", {"replay.capacity": capacity, "replay.min_size": BATCH,
                                           "replay.samples_per_insert": 0, "replay.alpha": ALPHA,
                                           "replay.beta": BETA, "learner.batch_size": BATCH,
                                           "replay.snapshot_every_seconds": 0, "transport.request_timeout_ms": 60_000},
                                "configs/apex_pong.yaml")
            server = reg.start_service(topo, "replay", 0)
            ctx = new_context()
            eps = endpoints(topo.cfg, topo.run_id)
            push = make_socket(ctx, "push", topo.cfg.transport, connect=eps["replay"])
            client = RequestClient(ctx, eps["replay_sample"], topo.cfg.transport,
                                   max_in_flight=topo.cfg.learner.prefetch + 1)

            def info(timeout: float = 60.0) -> dict:
                end = time.monotonic() + timeout
                while time.monotonic() < end:
                    if server.proc.poll() is not None:
                        raise RuntimeError(f"replay server exited {server.proc.returncode}: {topo.log('replay.0')[-2000:]}")
                    if client.can_request:
                        client.request(InfoRequest())
                    for msg in client.poll(200):
                        if isinstance(msg, Info):
                            return msg.data
                raise RuntimeError(f"replay server did not answer in {timeout:.0f} s: {topo.log('replay.0')[-2000:]}")

            info(120.0)  # up and answering
            row["rss_before_gib"] = (sum(resident_bytes_of(server.proc.pid).values()) / 2 ** 30) + rss_now_gib()
            src = ChunkSource(rng)
            total = 0
            # what an actor on this host does: the message into its shared-memory insert ring,
            # a reference over ZMQ (transport.insert_ring_mb; inline when the ring is full)
            ring = InsertRingWriter(topo.run_id, "bench", topo.cfg.transport.insert_ring_mb << 20) \
                if ring_enabled(topo.cfg.transport) else None
            row["insert_ring_mb"] = topo.cfg.transport.insert_ring_mb if ring else 0
            for phase, count in (("fill", capacity), ("overwrite", max(capacity // 5, CHUNK))):
                n = 0
                t0 = time.perf_counter()
                while n < count:
                    chunk = src.next()
                    msg = Insert(sender="bench", actor_id=0, env_steps=len(chunk["action"]), chunk=chunk)
                    frame = insert_frame(msg, ring)
                    while not send_message(push, frame):
                        if server.proc.poll() is not None:
                            raise RuntimeError(f"replay server exited: {topo.log('replay.0')[-2000:]}")
                    n += len(chunk["action"])
                total += n
                while (got := info())["inserted"] < total:  # stored, not just sent
                    if got["rejected"]:
                        raise RuntimeError(f"the server rejected inserts: {topo.log('replay.0')[-2000:]}")
                dt = time.perf_counter() - t0
                row[f"{phase}_per_s"], row[f"{phase}_wall_s"] = n / dt, dt
                print(f"[apex_local_server] {phase}: {n:,} transitions, {n / dt:,.0f}/s (size {got['size']:,})",
                      file=sys.stderr, flush=True)
            slots = BatchSlots.attach(segment_name(topo.run_id, "slots"))
            prio = [rng.random(BATCH).astype(np.float32) + 1e-3 for _ in range(8)]
            k = topo.cfg.learner.prefetch

            def run_cycles(n: int) -> None:
                done = 0
                deadline = time.monotonic() + 600
                while done < n:
                    while client.in_flight < k:
                        client.request(SampleRequest(batch_size=BATCH, beta=BETA))
                    for msg in client.poll(50):
                        if isinstance(msg, BatchReady):
                            # what our CPU learner does: it reads the batch in place in its slot
                            # (roles/learner_loop.py _train_in_slot), copying index / generation only
                            view = slots.view(msg.slot_id, msg.slot_seq, msg.epoch)
                            index, generation = np.array(view["index"]), np.array(view["generation"])
                            slots.release(msg.slot_id, msg.slot_seq)
                            client.send(PriorityUpdate(index=index, generation=generation, priority=prio[done % 8]))
                            done += 1
                        elif isinstance(msg, Error):
                            raise RuntimeError(f"replay refused a sample: {msg.reason}: {msg.detail}")
                    if time.monotonic() > deadline or server.proc.poll() is not None:
                        raise RuntimeError(f"sampling stalled: {topo.log('replay.0')[-2000:]}")

            run_cycles(3)  # warm-up, untimed
            from bench._topo import proc_cpu_seconds

            cpu0, own0 = proc_cpu_seconds(server.proc.pid), time.process_time()
            t0 = time.perf_counter()
            run_cycles(cycles)
            dt = time.perf_counter() - t0
            row["server_cpu_ms_per_cycle"] = 1e3 * (proc_cpu_seconds(server.proc.pid) - cpu0) / cycles
            row["client_cpu_ms_per_cycle"] = 1e3 * (time.process_time() - own0) / cycles
            got = info()
            hwm = peak_rss_of(server.proc.pid)
            row.update(cycles_per_s=cycles / dt, sample_ms=1e3 * dt / cycles, update_ms=None,
                       peak_rss_gib=hwm + peak_rss_gib(), load_end=os.getloadavg()[0],
                       server_peak_rss_gib=hwm, rejected=got["rejected"])
            print(f"[apex_local_server] CPU per cycle: server {row['server_cpu_ms_per_cycle']:.2f} ms, "
                  f"client {row['client_cpu_ms_per_cycle']:.2f} ms", file=sys.stderr)
            print(f"[apex_local_server] sample {BATCH} + update {BATCH}: {row['cycles_per_s']:,.1f} cycles/s; "
                  f"peak RSS server {hwm:.2f} + client {peak_rss_gib():.2f} GiB", file=sys.stderr, flush=True)
        finally:
            for closer in (lambda: ring and ring.close(), lambda: slots and slots.close(),
                           lambda: push and push.close(linger=0),
                           lambda: client and client.close(), lambda: ctx and ctx.term()):
                closer()
            leftovers = reg.close()
            if leftovers:
                raise RuntimeError(f"apex_local_server: cleanup left behind {leftovers}")
    return row


def resident_bytes_of(pid: int) -> dict:
    from apex_local.monitoring.procstats import resident_bytes

    return resident_bytes(pid)


def peak_rss_of(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, GiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def ok(row: dict) -> bool:
    """The row has measurements (not skipped for a missing package, not failed)."""
    return "skipped" not in row and "failed" not in row


def failures(rows: list[dict]) -> list[str]:
    """'impl: why' for every row whose subprocess failed (a missing peer is 'skipped', not failed)."""
    return [f"{r['impl']}: {r['failed']}" for r in rows if "failed" in r]


# run `ROUNDS` times, interleaved (round 1: every impl, round 2: these again, ...), and reported
# as the median of the rounds: the rows the target compares. One run of the fill phase
# lasts ~0.5 s at quick size, and cpprb's own rate swung 155k-220k/s between single runs on
# the shared 2-core box. The slower peers (far from the target) run once.
REPEATED = ("apex_local", "apex_local_server", "cpprb")
ROUNDS = 3
_MEDIAN_KEYS = ("fill_per_s", "overwrite_per_s", "cycles_per_s", "sample_ms", "update_ms", "peak_rss_gib",
                "rss_before_gib", "server_cpu_ms_per_cycle", "client_cpu_ms_per_cycle", "fill_wall_s",
                "overwrite_wall_s")


def _run_one(impl: str, p: dict, env: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_replay_peers", "--one", impl,
           "--capacity", str(p["capacity"]), "--cycles", str(p["cycles"])]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        return json.loads(lines[-1]) if proc.returncode == 0 and lines else \
            {"impl": impl, "failed": f"subprocess failed (exit {proc.returncode}); see its stderr above"}
    except BaseException as exc:  # timeout or Ctrl-C: let the child stop its server and free its shm first
        stop_child(proc)
        if not isinstance(exc, subprocess.TimeoutExpired):
            raise
        return {"impl": impl, "failed": f"timed out after {timeout:.0f} s"}


def merge_rounds(runs: list[dict]) -> dict:
    """One row from an implementation's rounds: the first failure or skip as is, else the first
    run's row with each measured figure replaced by the median over the rounds (and the
    per-round values kept as ``<key>_rounds``; the load columns: first start, last end)."""
    bad = next((r for r in runs if not ok(r)), None)
    if bad is not None or len(runs) == 1:
        return dict(bad or runs[0], rounds=len(runs))
    row = dict(runs[0], rounds=len(runs), load_end=runs[-1].get("load_end"))
    for key in _MEDIAN_KEYS:
        vals = [r.get(key) for r in runs]
        if all(isinstance(v, (int, float)) for v in vals):
            row[key] = float(np.median(vals))
            row[f"{key}_rounds"] = vals
    return row


def run(quick: bool = False, impls=IMPLS, capacity: int | None = None, cycles: int | None = None,
        timeout: float = 1800, rounds: int = ROUNDS) -> list[dict]:
    """Each implementation in its own subprocess (same interpreter); rows in ``impls`` order.
    Those in `REPEATED` run ``rounds`` times, interleaved with each other (`merge_rounds`)."""
    p = dict(QUICK if quick else FULL)
    if capacity:
        p["capacity"] = capacity
    if cycles:
        p["cycles"] = cycles
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    runs: dict[str, list[dict]] = {impl: [] for impl in impls}
    for r in range(max(1, rounds)):
        for impl in impls:
            if r == 0 or (impl in REPEATED and ok(runs[impl][-1])):
                runs[impl].append(_run_one(impl, p, env, timeout))
    rows = [merge_rounds(runs[impl]) for impl in impls]
    base = next((r for r in rows if r["impl"] == "apex_local" and ok(r)), None)
    for r in rows:
        if base and ok(r):
            for key in ("fill_per_s", "overwrite_per_s", "cycles_per_s", "peak_rss_gib"):
                r[f"{key}_ratio"] = r[key] / base[key]
    return rows


def table(rows: list[dict]) -> str:
    has_base = any(r["impl"] == "apex_local" and ok(r) for r in rows)
    rat = (lambda r, k: f" ({r[k + '_ratio']:.2f}x)") if has_base else (lambda r, k: "")
    lines = ["| implementation | layout | insert, filling (transitions/s) | insert, ring full (transitions/s) "
             "| sample 512 + update 512 (cycles/s) | sample / update ms | peak RSS GiB (before buffer) "
             "| load 1 min start / end |",
             "|---|---|---|---|---|---|---|---|"]
    skipped = []

    def ms(r):
        if r.get("update_ms") is None:  # the server pipelines both: per cycle, wall
            return f"{r['sample_ms']:.2f} per cycle (pipelined)"
        return f"{r['sample_ms']:.2f} / {r['update_ms']:.2f}"

    for r in rows:
        if "skipped" in r or "failed" in r:
            skipped.append(f"- `{r['impl']}` skipped: {r['skipped']}" if "skipped" in r else
                           f"- `{r['impl']}` FAILED: {r['failed']}")
            continue
        lines.append(f"| {r['impl']} | {r['layout']} | {r['fill_per_s']:,.0f}{rat(r, 'fill_per_s')} "
                     f"| {r['overwrite_per_s']:,.0f}{rat(r, 'overwrite_per_s')} "
                     f"| {r['cycles_per_s']:,.1f}{rat(r, 'cycles_per_s')} | {ms(r)} "
                     f"| {r['peak_rss_gib']:.2f}{rat(r, 'peak_rss_gib')} ({r['rss_before_gib']:.2f}) "
                     f"| {r['load_start']:.1f} / {r['load_end']:.1f} |")
    return "\n".join(lines + ([""] + skipped if skipped else []))


def plot(rows: list[dict], path: Path) -> Path | None:
    """Bar charts (inserts/s, cycles/s, peak RSS) of the rows that ran; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    done = [r for r in rows if ok(r)]
    if not done:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = [r["impl"] for r in done]
    for ax, key, title in zip(axes, ("fill_per_s", "cycles_per_s", "peak_rss_gib"),
                              ("insert, filling (transitions/s)", "sample 512 + update 512 (cycles/s)",
                               "peak RSS (GiB)")):
        vals = [r[key] for r in done]
        bars = ax.bar(names, vals, color=["tab:blue" if n == "apex_local" else "tab:gray" for n in names])
        for b, r in zip(bars, done):
            label = f"{r[key + '_ratio']:.2f}x" if key + "_ratio" in r else ""
            ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"Prioritized replay, capacity {done[0]['capacity']:,}, 84x84 uint8, k=4 "
                 f"(ratios vs apex_local)", fontsize=10)
    return save(fig, path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"capacity {QUICK['capacity']:,}, {QUICK['cycles']} cycles")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list of: " + ", ".join(IMPLS))
    ap.add_argument("--capacity", type=int, default=None)
    ap.add_argument("--cycles", type=int, default=None)
    ap.add_argument("--one", choices=IMPLS, help=argparse.SUPPRESS)  # child mode: one impl, JSON on stdout
    args = ap.parse_args(argv)
    if args.one:
        def on_term(signum, frame):  # SIGTERM -> KeyboardInterrupt: `finally` stops the server, frees shm
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, on_term)
        p = QUICK if args.quick else FULL
        print(json.dumps(measure(args.one, args.capacity or p["capacity"], args.cycles or p["cycles"])))
        return 0
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        ap.error(f"unknown implementation(s) {bad}")
    rows = run(args.quick, impls, args.capacity, args.cycles)
    print(table(rows))
    return 1 if failures(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
