"""Helpers for bench/bench_topology.py: a registry of the processes a benchmark started
(topology services and baseline workers), A/B rotation of measurement windows with
SIGSTOP/SIGCONT, per-process CPU accounting from /proc, and the worker processes themselves.

Workers (``python -m bench._topo KIND ...``), each prints ``READY`` once warmed up and then
runs until SIGINT/SIGTERM, exporting its progress on a Prometheus port like a service does:

    noop-actor       apex_local.roles.actor_loop.ActorService.step with the transport replaced
                     by no-ops (``send_message`` returns True at once, ``sync_weights`` does
                     nothing); same config, env, network, recorder and thread limit (1) as
                     ``services/actor.py``.            -> apex_actor_env_steps_total
    inproc-learner   Learner.update(Learner.to_batch(b)) over a fixed list of batches sampled
                     once from a local Replay filled by an eps-ladder actor loop (same config,
                     same torch thread rule as ``services/learner.py``). -> apex_learner_updates_total
    ale-sim          ale_py AtariVectorEnv with random actions, the settings AleVectorEnv uses
                     (frameskip 4, max-pool, 84x84 grayscale, stack_num 1, sticky actions,
                     same-step autoreset).           -> apex_actor_env_steps_total (agent steps)
    weights-reader   polls a WeightsBoard like an actor (``board.read(out, min_version)``) and
                     adopts each new version (``load_flat_parameters`` into a torch net); writes
                     one JSON line per adopted version to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from service_harness import Topology, free_port_block  # noqa: E402  (tests/service_harness.py)

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------- /proc
def proc_cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a process (all its threads), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = text.rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK  # fields 14 utime, 15 stime


def machine_busy_seconds() -> float:
    """CPU seconds spent busy by all cores (from /proc/stat, idle and iowait excluded)."""
    parts = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    guest = sum(vals[8:10]) if len(vals) > 9 else 0  # guest time is already counted in user
    return (sum(vals) - idle - guest) / CLK_TCK


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# ---------------------------------------------------------------------------------- registry
@dataclass
class Member:
    """A process we started: its name, Popen, and how to read its progress counter."""
    name: str
    proc: subprocess.Popen
    counter: Callable[[], float | None] | None = None
    log: Path | None = None
    stopped: bool = False


class Registry:
    """Every process a benchmark starts, so that all of them are cleaned up, even on failure."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.members: dict[str, Member] = {}
        self.run_ids: set[str] = set()
        self.topologies: list[Topology] = []
        self.closers: list[Callable[[], None]] = []
        self._started = 0

    # -------------------------------------------------------------- start
    def topology(self, name: str, overrides: dict, base: str) -> Topology:
        t = Topology(self.tmp / name, overrides, base=base)
        self.topologies.append(t)
        self.run_ids.add(t.run_id)
        return t

    def start_service(self, topo: Topology, role: str, index: int = 0) -> Member:
        p = topo.start(role, index)
        counter_name = {"actor": "apex_actor_env_steps_total", "learner": "apex_learner_updates_total"}.get(role)
        counter = (lambda: topo.metrics(role, index).get(counter_name)) if counter_name else None
        m = Member(f"{role}.{index}", p, counter, topo.logs[f"{role}.{index}"])
        self.members[m.name] = m
        return m

    def start_worker(self, name: str, kind: str, args: list[str], counter_metric: str | None,
                     run_id: str | None = None) -> Member:
        port = free_port_block(8)
        self._started += 1
        log = self.tmp / f"{name}.{self._started}.log"
        cmd = [sys.executable, "-m", "bench._topo", kind, "--metrics-port", str(port), *args]
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                             start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        if run_id:
            self.run_ids.add(run_id)
        counter = None
        if counter_metric:
            counter = lambda: scrape(port).get(counter_metric)  # noqa: E731
        m = Member(name, p, counter, log)
        self.members[name] = m
        return m

    def wait_ready(self, m: Member, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if m.log is not None and "READY" in m.log.read_text(errors="replace"):
                return
            if m.proc.poll() is not None:
                raise RuntimeError(f"{m.name} exited {m.proc.returncode} before READY:\n{tail(m.log)}")
            time.sleep(0.1)
        raise RuntimeError(f"{m.name} not READY within {timeout:.0f}s:\n{tail(m.log)}")

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            for m in self.members.values():
                if m.proc.poll() is not None and m.proc.returncode != 0:
                    raise RuntimeError(f"{m.name} exited {m.proc.returncode} while waiting for {what}:\n"
                                       f"{tail(m.log)}")
            time.sleep(0.25)
        self.diagnose()
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n" +
                           "\n".join(f"--- {m.name}\n{tail(m.log, 800)}" for m in self.members.values()))

    def diagnose(self) -> None:
        """Python stacks of every member (py-spy, when installed) into <tmp>/stacks.txt."""
        import shutil

        if shutil.which("py-spy") is None:
            return
        with open(self.tmp / "stacks.txt", "a") as f:
            for m in self.members.values():
                if m.proc.poll() is None:
                    f.write(f"===== {m.name} (pid {m.proc.pid}, stopped={m.stopped})\n")
                    f.flush()
                    subprocess.run(["py-spy", "dump", "--pid", str(m.proc.pid)], stdout=f, stderr=subprocess.STDOUT,
                                   timeout=30)
        print(f"[bench] stacks written to {self.tmp / 'stacks.txt'}", flush=True)

    # -------------------------------------------------------------- pause / resume
    def _signal(self, m: Member, sig: int) -> None:
        if m.proc.poll() is None:
            try:
                os.killpg(m.proc.pid, sig)
            except ProcessLookupError:
                pass

    def pause(self, m: Member) -> None:
        if not m.stopped:
            self._signal(m, signal.SIGSTOP)
            m.stopped = True

    def resume(self, m: Member) -> None:
        if m.stopped:
            self._signal(m, signal.SIGCONT)
            m.stopped = False

    def only(self, running: list[str], pool: list[str]) -> None:
        """Within ``pool``, pause every member not in ``running`` and resume those in it."""
        for name in pool:
            if name not in running:
                self.pause(self.members[name])
        for name in running:
            self.resume(self.members[name])

    def stop(self, name: str, timeout: float = 10.0) -> None:
        """Graceful stop of one member (SIGCONT + SIGINT, then SIGKILL)."""
        m = self.members.pop(name)
        _terminate([m], timeout)

    # -------------------------------------------------------------- cleanup
    def close(self) -> list[str]:
        """Stop everything (SIGCONT, SIGINT, then SIGKILL), remove the runs' shm segments and ipc
        dirs; returns what was left behind (should be empty)."""
        for fn in reversed(self.closers):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                print(f"[bench] closer failed: {exc}", file=sys.stderr)
        _terminate(list(self.members.values()), 8.0)
        self.members.clear()
        from apex_local.transport import clean
        from apex_local.transport.rundir import ipc_base

        left = []
        for rid in sorted(self.run_ids):
            try:
                clean(rid)
            except Exception as exc:  # noqa: BLE001
                print(f"[bench] clean({rid}) failed: {exc}", file=sys.stderr)
            left += [f"/dev/shm/{f}" for f in os.listdir("/dev/shm") if f.startswith(f"apex_{rid}_")]
            d = ipc_base() / rid
            if d.exists():
                left.append(str(d))
        return left


def _terminate(members: list[Member], timeout: float) -> None:
    for m in members:
        if m.proc.poll() is None:
            for sig in (signal.SIGCONT, signal.SIGINT):
                try:
                    os.killpg(m.proc.pid, sig)
                except ProcessLookupError:
                    pass
            m.stopped = False
    end = time.monotonic() + timeout
    for m in members:
        try:
            m.proc.wait(timeout=max(0.05, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(m.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            m.proc.wait(timeout=5)


def stop_child(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGINT a child that is still running (it stops its own processes and frees its shm), wait up
    to ``grace`` s, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def tail(path: Path | None, n: int = 2500) -> str:
    if path is None or not path.exists():
        return ""
    return path.read_text(errors="replace")[-n:]


def scrape(port: int) -> dict[str, float]:
    """A process's /metrics, by series name summed over labels (tests/service_harness.py)."""
    from service_harness import scrape as scrape_metrics

    return scrape_metrics(port)


# ---------------------------------------------------------------------------------- rotation
@dataclass
class Window:
    config: str
    repeat: int
    seconds: float
    rates: dict[str, float] = field(default_factory=dict)  # member -> counter units / s
    counts: dict[str, float] = field(default_factory=dict)  # member -> counter increase in the window
    spans: dict[str, float] = field(default_factory=dict)  # member -> seconds between its two readings
    cores: dict[str, float] = field(default_factory=dict)  # member (+ 'bench', 'other') -> CPU cores used
    extra: dict[str, float] = field(default_factory=dict)


def rotate(reg: Registry, configs: dict[str, list[str]], *, repeats: int, window: float, settle: float,
           extra: dict[str, Callable[[str], dict[str, float]]] | None = None, log=print) -> list[Window]:
    """Alternate measurement windows between ``configs`` (name -> members that run; every other
    member of the pool is SIGSTOPped), ``repeats`` rounds, the order shifted each round. Each
    window: resume, wait ``settle``, read counters and CPU times, wait ``window``, read again.
    ``extra[config](when)`` may add readings (a key in both 'start' and 'end' readings becomes a
    rate, a key only in the 'end' reading is kept as is)."""
    pool = sorted({n for names in configs.values() for n in names})
    names = list(configs)
    out: list[Window] = []
    me = os.getpid()
    idle: dict[str, int] = {}  # member -> consecutive windows without progress
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for cname in order:
            running = configs[cname]
            reg.only(running, pool)
            time.sleep(settle)
            pids = {n: reg.members[n].proc.pid for n in pool}
            c0 = {n: reg.members[n].counter() for n in running if reg.members[n].counter}
            t0 = {n: time.monotonic() for n in c0}
            cpu0 = {n: proc_cpu_seconds(pid) for n, pid in pids.items()}
            bench0, busy0, w0 = proc_cpu_seconds(me), machine_busy_seconds(), time.monotonic()
            fx = (extra or {}).get(cname)
            x0 = fx("start") if fx else {}
            time.sleep(window)
            x1 = fx("end") if fx else {}
            c1 = {n: reg.members[n].counter() for n in c0}
            t1 = {n: time.monotonic() for n in c0}
            cpu1 = {n: proc_cpu_seconds(pid) for n, pid in pids.items()}
            bench1, busy1, w1 = proc_cpu_seconds(me), machine_busy_seconds(), time.monotonic()
            wall = w1 - w0
            w = Window(cname, r, wall)
            for n in c0:
                if c0[n] is None or c1[n] is None:
                    raise RuntimeError(f"could not read the progress counter of {n} (see {reg.members[n].log})")
                w.counts[n], w.spans[n] = c1[n] - c0[n], t1[n] - t0[n]
                w.rates[n] = w.counts[n] / w.spans[n]
                idle[n] = idle.get(n, 0) + 1 if c1[n] == c0[n] else 0
                if idle[n] >= 3:  # no progress in 3 of its windows in a row: stalled, not just slow
                    reg.diagnose()
                    raise RuntimeError(f"{n} made no progress in 3 windows of {window:g}s in a row ({cname}, round "
                                       f"{r}); see {reg.members[n].log} and {reg.tmp / 'stacks.txt'}")
            ours = 0.0
            for n in pool:
                if cpu0[n] is not None and cpu1[n] is not None:
                    w.cores[n] = (cpu1[n] - cpu0[n]) / wall
                    ours += cpu1[n] - cpu0[n]
            w.cores["bench"] = (bench1 - bench0) / wall
            w.cores["other"] = max(0.0, (busy1 - busy0 - ours - (bench1 - bench0)) / wall)
            for k in set(x0) | set(x1):
                if k in x0 and k in x1:
                    w.extra[k] = (x1[k] - x0[k]) / wall
                elif k in x1:
                    w.extra[k] = x1[k]
            log(f"    [{cname:<14} r{r}] " + " ".join(f"{n}={v:.1f}/s" for n, v in w.rates.items()) +
                "  cpu " + " ".join(f"{n}={v:.2f}" for n, v in w.cores.items() if v >= 0.005))
            out.append(w)
    return out


# ---------------------------------------------------------------------------------- workers
def _recorder(port: int, role: str, index: int):
    from apex_local.metrics import PrometheusRecorder

    return PrometheusRecorder("127.0.0.1", port, {"role": role, "index": str(index)})


def worker_noop_actor(args) -> None:
    from apex_local.config import load_config
    from apex_local.envs import env_spec
    from apex_local.roles import actor_loop
    from apex_local.runtime import Shutdown, limit_threads

    shutdown = Shutdown()
    limit_threads(1)  # as services/actor.py
    cfg = load_config(args.config)
    spec = env_spec(cfg.env)
    actor_loop.send_message = lambda *a, **k: True  # the PUSH send: a no-op that "succeeds" at once

    class NoTransportActor(actor_loop.ActorService):
        def sync_weights(self, wait: bool = False, shutdown=None) -> bool:  # weights sync: a no-op
            return False

    rec = _recorder(args.metrics_port, "actor", args.index)
    actor = NoTransportActor(cfg, args.run_id, spec, args.index, rec, log=lambda m: print(m, flush=True))
    try:
        for _ in range(20):
            actor.step(shutdown)
        print("READY", flush=True)
        while not shutdown:
            actor.step(shutdown)
    finally:
        actor.close()
        rec.close()


def worker_inproc_learner(args) -> None:
    import torch

    from apex_local.agents.builders import make_accumulator, make_learner, make_local_replay, push_chunk, \
        set_torch_threads
    from apex_local.agents.policy import EpsilonSchedule, Policy
    from apex_local.config import load_config
    from apex_local.envs import env_spec, make_vector_env
    from apex_local.replay import beta_schedule
    from apex_local.runtime import Shutdown

    shutdown = Shutdown()
    cfg = load_config(args.config)
    spec = env_spec(cfg.env)
    torch.set_num_threads(1)  # filling: acting like an actor (1 thread)
    learner = make_learner(cfg, spec)
    replay = make_local_replay(cfg, spec, seed=cfg.run.seed + 7)
    n = cfg.env.num_envs
    venv = make_vector_env(cfg.env, n, seed=cfg.run.seed + 1000)
    acc = make_accumulator(cfg, spec, n)
    policy = Policy(learner.online, n, seed=cfg.run.seed + 1000)
    eps = EpsilonSchedule(cfg.actor, 0, n)
    obs = venv.reset()
    acc.reset(obs)
    want = min(cfg.replay.capacity, max(cfg.replay.min_size, args.items))
    t0 = time.monotonic()
    while replay.size < want:
        actions, q, _ = policy.act(obs, eps(0))
        obs, reward, term, trunc, info = venv.step(actions)
        acc.step(actions, reward, term, trunc, obs, info["final_obs"], q=q)
        push_chunk(replay, acc)
    venv.close()
    batches = []
    for _ in range(args.batches):  # the same arrays the server would put into a batch slot
        s = replay.sample(cfg.learner.batch_size, beta_schedule(cfg.replay, 0))
        batches.append({k: np.array(v) for k, v in s.batch.items()})
    threads = set_torch_threads(cfg, spec)  # as services/learner.py
    print(f"filled {replay.size} items in {time.monotonic() - t0:.1f}s; {len(batches)} batches of "
          f"{cfg.learner.batch_size}; torch threads {threads}", flush=True)
    rec = _recorder(args.metrics_port, "learner", 0)
    try:
        for i in range(3):
            learner.update(learner.to_batch(batches[i % len(batches)]))
        print("READY", flush=True)
        i = 0
        while not shutdown:
            result = learner.update(learner.to_batch(batches[i % len(batches)]))
            if not result.skipped:
                rec.inc("apex_learner_updates_total")
            i += 1
    finally:
        rec.close()


def worker_ale_sim(args) -> None:
    """Random actions in ale_py's AtariVectorEnv with our AleVectorEnv's settings (``--stack``,
    ``--sticky``, ``--noop-max`` as the config has them); bench_scaling's ale-sim worker too."""
    from ale_py.vector_env import AtariVectorEnv

    from apex_local.runtime import Shutdown

    shutdown = Shutdown()
    n = args.num_envs
    venv = AtariVectorEnv(args.game, n, num_threads=min(n, os.cpu_count() or 1), autoreset_mode="SameStep",
                          max_num_frames_per_episode=108_000, repeat_action_probability=args.sticky,
                          img_height=84, img_width=84, grayscale=True, stack_num=args.stack,
                          frameskip=args.frame_skip, maxpool=True, noop_max=max(args.noop_max, 1),
                          episodic_life=False, reward_clipping=False, use_fire_reset=True)
    rng = np.random.default_rng(args.seed)
    n_act = venv.single_action_space.n
    venv.reset(seed=args.seed)
    rec = _recorder(args.metrics_port, "actor", 0)
    try:
        for _ in range(20):
            venv.step(rng.integers(0, n_act, n))
        print(f"READY ale-sim {n} envs, obs {venv.single_observation_space.shape}", flush=True)
        while not shutdown:
            venv.step(rng.integers(0, n_act, n))
            rec.inc("apex_actor_env_steps_total", n)
    finally:
        venv.close()
        rec.close()


def worker_weights_reader(args) -> None:
    import torch

    from apex_local.config import load_config
    from apex_local.envs import env_spec
    from apex_local.networks import load_flat_parameters, make_network
    from apex_local.transport import WeightsBoard

    torch.set_num_threads(1)  # actors run one torch thread
    cfg = load_config(args.config)
    spec = env_spec(cfg.env)
    net = make_network(cfg.network, spec.obs_shape, spec.obs_dtype, spec.num_actions)
    board = WeightsBoard.attach(args.board)
    out = np.empty(board.numel, np.float32)
    rows = []
    print("READY", flush=True)
    last, end = 0, time.perf_counter() + args.timeout
    poll = args.poll_ms / 1e3
    while last < args.count and time.perf_counter() < end:
        t0 = time.perf_counter()
        v = board.read(out, min_version=last)  # what ActorService.sync_weights calls
        if v is None:
            time.sleep(poll)
            continue
        t1 = time.perf_counter()
        load_flat_parameters(net, out)
        t2 = time.perf_counter()
        rows.append([v, t0, t1, t2, bool(out[0] == v and out[-1] == v)])
        last = v
    board.close()
    Path(args.out).write_text("\n".join(json.dumps(r) for r in rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench._topo")
    p.add_argument("kind", choices=["noop-actor", "inproc-learner", "ale-sim", "weights-reader"])
    p.add_argument("--metrics-port", type=int, default=0)
    p.add_argument("--config", default="configs/apex_cartpole.yaml")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--run-id", default="")
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--batches", type=int, default=32)
    p.add_argument("--game", default="pong")
    p.add_argument("--num-envs", type=int, default=4)
    p.add_argument("--frame-skip", type=int, default=4)
    p.add_argument("--stack", type=int, default=1)
    p.add_argument("--sticky", type=float, default=0.25)
    p.add_argument("--noop-max", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--board", default="")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--poll-ms", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if not args.run_id:
        args.run_id = "bw" + uuid.uuid4().hex[:8]
    {"noop-actor": worker_noop_actor, "inproc-learner": worker_inproc_learner, "ale-sim": worker_ale_sim,
     "weights-reader": worker_weights_reader}[args.kind](args)


if __name__ == "__main__":
    main()
