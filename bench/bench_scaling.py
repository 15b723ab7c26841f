"""Scaling benchmarks: actors vs the simulator (Pong) and Ape-X scaling with the actor count (CartPole).

    python -m bench.bench_scaling [actors_vs_sim|apex_scaling ...] [--quick] [--counts 1,2] [--seeds N]
                                  [--plot-dir DIR] [--json PATH] [--markdown PATH]

Parts (both by default):

actors_vs_sim   Env frames/s (agent steps x frame_skip) and agent steps/s on the same cores, for the
                same number of processes P (1 and 2) of env.num_envs=4 envs each:
                  (a) topology  the Ape-X Pong topology's actors (configs/apex_pong.yaml as
                                bench/bench_topology.py's pong_e2e runs it: replay + learner + P
                                actors as real ``python -m services.<role>`` processes,
                                replay.samples_per_insert=0, learner.batch_size=32, capacity 20k);
                  (b) ale_sim   P processes of ale_py ``AtariVectorEnv`` with random actions and the
                                settings our AleVectorEnv uses (frameskip 4, max-pool, 84x84
                                grayscale, sticky 0.25, noop_max 30, fire reset, same-step autoreset,
                                num_threads=min(4, cores)), stack_num = env.frame_stack (4);
                  (c) gym_loop  P processes of a plain gymnasium loop: a Python for-loop over 4 single
                                envs ``gymnasium.make("ALE/Pong-v5", frameskip=1,
                                repeat_action_probability=0.25)`` + ``AtariPreprocessing(noop_max=30,
                                frame_skip=4, screen_size=84, grayscale_obs=True)`` +
                                ``FrameStackObservation(4)``, random actions, reset on done.
                Windows alternate between (a), (b), (c) with the other sides SIGSTOPped
                (bench/_topo.py ``rotate``), so all three see the same background load; each figure
                is the median of the rounds and each ratio the median of per-round ratios to (b).
apex_scaling    Ape-X on CartPole (configs/apex_cartpole.yaml as shipped, run.max_env_steps raised):
                replay + learner + N actors + the evaluator as real processes, N = 1, 2, 4, ... up to
                os.cpu_count(); the evaluator plays actor.eval_episodes (10) greedy episodes every
                actor.eval_every_seconds (5) s. Per run: env steps/s summed over the actors and
                learner updates/s from the learner's first update to the end of the run, and the wall
                seconds from launching the processes until the evaluator's mean return first reaches
                the threshold (475; quick: 195 with a 75 s cap per run).

Every process is stopped and every shm segment / ipc dir removed at exit, also on failure
(bench/_topo.py ``Registry.close``; a leftover is an error).

Python API (bench/__main__.py):

    res = actors_vs_sim(quick)                 # dict: rows, params, info
    markdown_actors_vs_sim(res) -> str
    plot_actors_vs_sim(res, path) -> Path | None
    res = apex_scaling(quick, counts=None)     # dict: runs, summary, params, info
    markdown_apex_scaling(res) -> str
    plot_apex_scaling(res, path) -> Path | None
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench._plot import pyplot, save
from bench._topo import (ROOT, Member, Registry, cpu_model, free_port_block, machine_busy_seconds,
                         proc_cpu_seconds, rotate, scrape)

AVS_CONFIG = "configs/apex_pong.yaml"
# what bench/bench_topology.py's pong_e2e runs (its COMMON + ENVS["pong"])
AVS_OVERRIDES = {"run.max_env_steps": 10**12, "replay.capacity": 20_000, "replay.min_size": 1_000,
                 "replay.samples_per_insert": 0, "learner.checkpoint_every_seconds": 0,
                 "transport.request_timeout_ms": 120_000, "learner.batch_size": 32, "env.num_envs": 4}
AVS_QUICK = {"procs": (1, 2), "repeats": 3, "window": 3.0, "settle": 0.4}
AVS_FULL = {"procs": (1, 2), "repeats": 5, "window": 6.0, "settle": 0.6}
SIDES = {"topology": "(a) Ape-X topology actors", "ale_sim": "(b) AtariVectorEnv, random actions",
         "gym_loop": "(c) gymnasium loop, random actions"}

SCALING_CONFIG = "configs/apex_cartpole.yaml"
SCALING_QUICK = {"seeds": 1, "threshold": 195.0, "cap_s": 75.0}
SCALING_FULL = {"seeds": 3, "threshold": 475.0, "cap_s": 300.0}


def _log(msg: str) -> None:
    print(msg, flush=True)


def _med(xs) -> float:
    xs = [x for x in xs if x is not None and x == x]
    return float(statistics.median(xs)) if xs else float("nan")


def _f(x, nd: int = 1, none: str = "n/a") -> str:
    return none if x is None or x != x else f"{x:,.{nd}f}"


def _info() -> dict:
    import ale_py
    import gymnasium
    import torch

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cores": os.cpu_count(), "loadavg_start": os.getloadavg(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "ale-py": ale_py.__version__, "gymnasium": gymnasium.__version__,
                         "numpy": np.__version__}}


_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _set_signals(handler) -> dict:
    """Install ``handler`` for SIGTERM / SIGHUP / SIGINT (main thread only); returns the old ones."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in _SIGNALS}


@contextlib.contextmanager
def _registry(prefix: str, log=_log):
    """A Registry in a fresh temp dir, closed on the way out whatever happened. While the part runs,
    SIGTERM / SIGHUP / SIGINT raise KeyboardInterrupt (also when started with SIGINT ignored, `cmd &`);
    while it cleans up they are ignored, so a second signal cannot cut the cleanup short; the old
    handlers come back after. Leftovers (shm segments / ipc dirs not removed) raise; the logs are kept
    when something failed."""

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    reg = Registry(tmp)
    old = _set_signals(on_term)
    ok = False
    try:
        yield reg
        ok = True
    except BaseException:
        log(f"[bench] FAILED or interrupted; logs kept in {tmp}")
        raise
    finally:
        _set_signals(signal.SIG_IGN)
        try:
            left = reg.close()
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
        log(f"[bench] cleanup: {'nothing left behind' if not left else 'LEFT BEHIND: ' + ', '.join(left)}")
        if left and ok:
            raise RuntimeError(f"cleanup left behind: {left} (logs in {tmp})")
        if ok:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def _start_worker(reg: Registry, name: str, kind: str, args: list[str],
                  metric: str = "apex_actor_env_steps_total") -> Member:
    """Like ``Registry.start_worker`` but for this module's workers (``python -m bench.bench_scaling
    _worker KIND``): own session, log file, progress counter scraped from its Prometheus port."""
    port = free_port_block(8)
    log = reg.tmp / f"{name}.log"
    cmd = [sys.executable, "-m", "bench.bench_scaling", "_worker", kind, "--metrics-port", str(port), *args]
    with open(log, "ab") as out:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
    m = Member(name, p, lambda: scrape(port).get(metric), log)
    reg.members[name] = m
    return m


# ============================================================================ part 3: actors vs sim
def actors_vs_sim(quick: bool, procs=None, *, repeats: int | None = None, window: float | None = None,
                  settle: float | None = None, log=_log) -> dict:
    """Pong env frames/s of the Ape-X topology's actors vs pure AtariVectorEnv vs a gymnasium loop,
    for each process count in ``procs`` (default 1 and 2), alternating windows (see module doc).
    Returns {"rows": [...], "params", "info", "cores", "learner_updates_per_s", "seconds"}."""
    from bench.bench_topology import cores_summary, row

    P = dict(AVS_QUICK if quick else AVS_FULL)
    if procs is not None:
        P["procs"] = tuple(int(p) for p in procs)
    for k, v in (("repeats", repeats), ("window", window), ("settle", settle)):
        if v is not None:
            P[k] = v
    procs = sorted(set(P["procs"]))
    if not procs or procs[0] < 1:
        raise ValueError(f"procs must be >= 1, got {procs}")
    info = _info()
    t_start = time.monotonic()
    res: dict = {"part": "actors_vs_sim", "quick": quick, "params": {**P, "procs": procs}, "info": info,
                 "config": AVS_CONFIG, "overrides": AVS_OVERRIDES, "rows": [], "cores": {},
                 "learner_updates_per_s": {}}
    log(f"== actors_vs_sim: {AVS_CONFIG} + " + " ".join(f"{k}={v}" for k, v in AVS_OVERRIDES.items()) +
        f"; process counts {procs}; {P['repeats']} rounds of {P['window']:g} s windows")
    with _registry("bench_scaling_avs_", log) as reg:
        topo = reg.topology("pong", AVS_OVERRIDES, AVS_CONFIG)
        cfg = topo.cfg
        n, fs, stack = cfg.env.num_envs, cfg.env.frame_skip, cfg.env.frame_stack
        res.update(num_envs=n, frame_skip=fs, frame_stack=stack)
        for role in ("replay", "learner"):
            reg.start_service(topo, role)
        reg.start_service(topo, "actor", 0)

        def metric(role, name, i=0):
            return topo.metrics(role, i).get(name, 0) or 0

        reg.wait_for(lambda: metric("replay", "apex_replay_size") >= cfg.replay.min_size
                     and metric("learner", "apex_learner_updates_total") >= 1, 300,
                     f"replay >= {cfg.replay.min_size} items and a first learner update")
        log(f"   topology warm after {time.monotonic() - t_start:.0f}s")
        sim_args = ["--game", "pong", "--num-envs", str(n), "--frame-skip", str(fs), "--stack", str(stack),
                    "--sticky", str(cfg.env.sticky_action_prob), "--noop-max", str(cfg.env.noop_max)]
        topo_members = ["replay.0", "learner.0"]
        started = 0
        for p in procs:
            # the whole topology runs (the previous round may have ended with it paused), workers paused
            reg.only(topo_members + [m for m in reg.members if m.startswith("actor.")], list(reg.members))
            for i in range(started, p):
                if i > 0:
                    reg.start_service(topo, "actor", i)
                for kind, pre in (("ale-sim", "sim"), ("gym-loop", "gym")):
                    m = _start_worker(reg, f"{pre}{i}", kind, sim_args + ["--seed", str(i + 1)])
                    reg.wait_ready(m)
                    reg.pause(m)
            for i in range(started, p):
                reg.wait_for(lambda i=i: metric("actor", "apex_actor_env_steps_total", i) > 0, 120,
                             f"actor.{i} stepping")
            started = p
            actors = [f"actor.{i}" for i in range(p)]
            configs = {f"topology_{p}": topo_members + actors, f"ale_sim_{p}": [f"sim{i}" for i in range(p)],
                       f"gym_loop_{p}": [f"gym{i}" for i in range(p)]}
            log(f"   {p} process(es): " + "  vs  ".join(f"{k} ({'+'.join(v)})" for k, v in configs.items()))
            ws = rotate(reg, configs, repeats=P["repeats"], window=P["window"], settle=P["settle"], log=log)
            den = (f"ale_sim_{p}", *configs[f"ale_sim_{p}"])
            for side in SIDES:
                cname = f"{side}_{p}"
                measured = tuple(actors) if side == "topology" else tuple(configs[cname])
                r = row(SIDES[side], ws, (cname, *measured), ws, den)
                cores = cores_summary(ws, cname)
                r.update(side=side, procs=p, steps_per_s=r["num"], frames_per_s=r["num"] * fs,
                         den_steps_per_s=r["den"],
                         cores_measured=sum(cores.get(m, 0.0) for m in measured),
                         cores_all=sum(cores.get(m, 0.0) for m in configs[cname]),
                         cores_other=cores.get("other", 0.0), cores_bench=cores.get("bench", 0.0))
                res["rows"].append(r)
                res["cores"][cname] = cores
            res["learner_updates_per_s"][p] = _med(w.rates.get("learner.0") for w in ws
                                                   if w.config == f"topology_{p}")
    res["seconds"] = time.monotonic() - t_start
    res["info"]["loadavg_end"] = os.getloadavg()
    return res


def markdown_actors_vs_sim(res: dict) -> str:
    info, P = res["info"], res["params"]
    lines = [
        f"Run {info['date']} on {info['cpu']} ({info['cores']} cores), {res['seconds']:.0f} s"
        f"{' (quick)' if res['quick'] else ''}; load average {', '.join(f'{x:.1f}' for x in info['loadavg_start'])} "
        f"at start, {', '.join(f'{x:.1f}' for x in info.get('loadavg_end', ()))} at end. "
        f"{P['repeats']} rounds of {P['window']:g} s windows per process count, (a), (b), (c) alternating "
        "(the others SIGSTOPped). Figures: median over rounds; ratio: median of the per-round ratios to (b) "
        "in the same round.", "",
        f"Each process runs {res['num_envs']} envs: Pong, frame skip {res['frame_skip']}, 84x84 grayscale, "
        f"{res['frame_stack']} frames stacked, sticky actions 0.25, noop_max 30. (a) `{res['config']}` with "
        "replay.samples_per_insert=0, learner.batch_size=32, replay capacity 20k (as `bench.bench_topology` "
        "pong_e2e): replay + learner + P actors (`python -m services.<role>`); the actors act with the Q-net "
        "and send transitions, the learner trains at the same time. (b) ale_py `AtariVectorEnv` (C++ threads, "
        "min(4, cores)), random actions. (c) a Python for-loop over 4 single `gymnasium.make(\"ALE/Pong-v5\", "
        "frameskip=1)` + `AtariPreprocessing(frame_skip=4, screen_size=84, grayscale_obs=True)` + "
        "`FrameStackObservation(4)` envs, random actions (not `SyncVectorEnv`).", "",
        "| procs x envs | side | agent steps/s | env frames/s | / (b) (median of rounds) | per-round ratios | "
        "CPU cores: measured procs / all running | CPU ms per agent step | other load (cores) |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in res["rows"]:
        all_running = "" if r["side"] != "topology" else f" / {_f(r['cores_all'], 2)}"
        lines.append(f"| {r['procs']} x {res['num_envs']} | {r['case']} | {_f(r['steps_per_s'], 0)} | "
                     f"{_f(r['frames_per_s'], 0)} | **{_f(r['ratio'], 2)}** | "
                     f"{', '.join(_f(x, 2) for x in r['ratios'])} | {_f(r['cores_measured'], 2)}{all_running} | "
                     f"{_f(r['num_cpu_ms_per_event'], 3)} | {_f(r['cores_other'], 2)} |")
    lu = res.get("learner_updates_per_s", {})
    lines += ["", "CPU cores of (a): the actors' own, then replay + learner + actors together. Learner updates/s "
              "(batch 32) during the (a) windows: " + ", ".join(f"{p} actor(s): {_f(v)}" for p, v in lu.items()) +
              ". On a machine with few cores (a) shares them with the replay and learner processes, so (a) / (b) "
              "mixes the actor's own cost (Q-net forward per step, transition packing and sending) with the "
              "training processes' CPU use; the CPU ms per agent step column is the load-independent part."]
    return "\n".join(lines) + "\n"


def plot_actors_vs_sim(res: dict, path) -> Path | None:
    plt = pyplot(note=True)
    if plt is None:
        return None
    procs = res["params"]["procs"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / len(SIDES)
    for j, side in enumerate(SIDES):
        vals = [next((r["frames_per_s"] for r in res["rows"] if r["side"] == side and r["procs"] == p), np.nan)
                for p in procs]
        bars = ax.bar(np.arange(len(procs)) + (j - (len(SIDES) - 1) / 2) * width, vals, width, label=SIDES[side])
        for b, p in zip(bars, procs):
            r = next((r for r in res["rows"] if r["side"] == side and r["procs"] == p), None)
            if r is not None:
                ax.annotate(f"{r['ratio']:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(procs)), [f"{p} proc(s) x {res['num_envs']} envs" for p in procs])
    ax.set(ylabel="env frames/s (agent steps x frame skip)",
           title=f"Pong: actors vs simulator ({res['info']['cores']} cores; labels: ratio to AtariVectorEnv)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path, dpi=110)


# ============================================================================ part 4: Ape-X scaling
def default_counts(cores: int | None = None) -> list[int]:
    """1, 2, 4, ... up to the cores available."""
    cores = max(1, cores or os.cpu_count() or 1)
    out, c = [], 1
    while c <= cores:
        out.append(c)
        c *= 2
    return out


def epsilon_ladder(cfg, count: int) -> list[list[float]] | None:
    """Per actor, the epsilon of each of its envs (what EpsilonSchedule gives the actor processes);
    None when the config does not use the Ape-X ladder."""
    from apex_local.agents.policy import EpsilonSchedule

    if cfg.actor.exploration != "apex":
        return None
    return [[float(e) for e in EpsilonSchedule(cfg.actor, i, cfg.env.num_envs).ladder] for i in range(count)]


def _scaling_run(reg: Registry, count: int, seed: int, P: dict, log) -> dict:
    overrides = {"run.max_env_steps": 10**9, "run.seed": seed, "actor.eval_every_seconds": P["eval_every"],
                 "actor.eval_episodes": P["eval_episodes"], "learner.checkpoint_every_seconds": 0,
                 "run.log_every_seconds": 5, **(P.get("overrides") or {})}
    if P.get("samples_per_insert") is not None:
        overrides["replay.samples_per_insert"] = P["samples_per_insert"]
    t = reg.topology(f"n{count}_s{seed}", overrides, P.get("config") or SCALING_CONFIG)
    roles = [("replay", 0), ("learner", 0)] + [("actor", i) for i in range(count)] + [("evaluator", 0)]
    names = [f"{r}.{i}" for r, i in roles]
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    for role, idx in roles:
        reg.start_service(t, role, idx)
    samples, evals, last_episodes, reached = [], [], 0.0, None
    try:
        while True:
            time.sleep(P["sample_every"])
            for nm in names:
                m = reg.members[nm]
                if m.proc.poll() is not None:
                    raise RuntimeError(f"{nm} (actors={count}, seed={seed}) exited {m.proc.returncode}:\n"
                                       f"{t.log(nm)[-2000:]}")
            now = time.monotonic() - t0
            ev = t.metrics("evaluator")
            s = {"t": now,
                 "env_steps": sum(t.metrics("actor", i).get("apex_actor_env_steps_total", 0.0) for i in range(count)),
                 "updates": t.metrics("learner").get("apex_learner_updates_total", 0.0),
                 "eval_return": ev.get("apex_evaluator_return"), "eval_episodes": ev.get("apex_evaluator_episodes_total", 0.0),
                 "cpu": {nm: proc_cpu_seconds(reg.members[nm].proc.pid) for nm in names},
                 "busy": machine_busy_seconds(), "bench_cpu": proc_cpu_seconds(os.getpid())}
            samples.append(s)
            if s["eval_return"] is not None and s["eval_episodes"] > last_episodes:
                evals.append((now, s["eval_return"]))
                last_episodes = s["eval_episodes"]
                if reached is None and s["eval_return"] >= P["threshold"]:
                    reached = now
            if len(samples) % 5 == 0 or reached is not None:
                log(f"    [actors={count} seed={seed}] t={now:5.1f}s env_steps={s['env_steps']:8.0f} "
                    f"updates={s['updates']:6.0f} eval={s['eval_return']}")
            if reached is not None or now >= P["cap_s"]:
                break
    finally:
        codes = t.stop(signal.SIGINT, timeout=10.0)
        for nm in names:
            m = reg.members.pop(nm, None)
            if m is not None and m.proc.poll() is None:  # did not stop in time: the registry's way (SIGKILL)
                reg.members[nm] = m
                reg.stop(nm, timeout=1.0)
    load1 = os.getloadavg()[0]
    # a process that exits non-zero on SIGINT after the measurement is reported with the run (the
    # numbers stand); one that left shm segments / ipc files behind is an error
    stop_errors = {}
    for n, (c, _) in codes.items():
        if c != 0:
            last = [ln for ln in t.log(n).splitlines() if ln.strip()][-1:] or [""]
            stop_errors[n] = {"code": c, "last_line": last[0][-200:]}
            log(f"    WARNING actors={count} seed={seed}: {n} exited {c} when stopped (SIGINT): {last[0][-200:]}")
    left = t.leftovers()
    if left:
        raise RuntimeError(f"actors={count} seed={seed}: left behind {left}")
    out = _summarize_run(count, seed, P, t.cfg, samples, evals, reached, load0, load1)
    out["stop_errors"] = stop_errors
    return out


def _summarize_run(count, seed, P, cfg, samples, evals, reached, load0, load1) -> dict:
    last = samples[-1]
    first = next((s for s in samples if s["updates"] > 0), None)
    out = {"actors": count, "seed": seed, "seconds": last["t"], "load_before": load0, "load_after": load1,
           "env_steps": last["env_steps"], "updates": last["updates"], "evals": evals,
           "time_to_threshold": reached, "best_return": max((r for _, r in evals), default=None),
           "first_update_s": first["t"] if first else None,
           "samples": [{k: v for k, v in s.items() if k not in ("cpu", "busy", "bench_cpu")} for s in samples]}
    if first is not None and last["t"] > first["t"]:
        span = last["t"] - first["t"]
        out["env_steps_per_s"] = (last["env_steps"] - first["env_steps"]) / span
        out["updates_per_s"] = (last["updates"] - first["updates"]) / span
        cores = {}
        for nm, c1 in last["cpu"].items():
            c0 = first["cpu"].get(nm)
            if c0 is not None and c1 is not None:
                cores[nm] = (c1 - c0) / span
        out["cores"] = {"learner": cores.get("learner.0", float("nan")),
                        "actors": sum(v for k, v in cores.items() if k.startswith("actor.")),
                        "replay": cores.get("replay.0", float("nan")),
                        "evaluator": cores.get("evaluator.0", float("nan"))}
        # the rest of the machine (other users; the bench's own polling excluded)
        out["cores_other"] = max(0.0, (last["busy"] - first["busy"] - (last["bench_cpu"] - first["bench_cpu"])) / span
                                 - sum(cores.values()))
        out["steady_span_s"] = span
    else:
        out["env_steps_per_s"] = out["updates_per_s"] = float("nan")
        out["cores"] = {}
        out["cores_other"] = float("nan")
        out["steady_span_s"] = 0.0
    spi = cfg.replay.samples_per_insert
    # with the rate limiter the actors can insert at most (sampled transitions / spi) per second
    out["limiter_cap_per_s"] = out["updates_per_s"] * cfg.learner.batch_size / spi if spi > 0 else None
    return out


def apex_scaling(quick: bool, counts=None, *, seeds: int | None = None, threshold: float | None = None,
                 cap_s: float | None = None, samples_per_insert: float | None = None, eval_every: float = 5.0,
                 eval_episodes: int = 10, sample_every: float = 1.0, config: str = SCALING_CONFIG,
                 overrides: dict | None = None, log=_log) -> dict:
    """Ape-X on CartPole with N = ``counts`` actors (default 1, 2, 4, ... <= cores), ``seeds`` runs
    each (quick 1, full 3): env steps/s, learner updates/s, time to the evaluator's mean return >=
    ``threshold`` (quick 195, full 475) within ``cap_s`` (quick 75 s, full 300 s) per run.
    ``samples_per_insert`` None keeps the config's (8); 0 lets the actors run free (the paper).
    ``config`` / ``overrides`` run another topology the same way (bench/__main__.py's GPU part: the
    Pong configs with ``run.device``).
    Returns {"runs": [...], "summary": [...], "params", "info", "ladder", "seconds"}."""
    from apex_local.config import load_config

    P = dict(SCALING_QUICK if quick else SCALING_FULL)
    for k, v in (("seeds", seeds), ("threshold", threshold), ("cap_s", cap_s)):
        if v is not None:
            P[k] = v
    counts = sorted(set(int(c) for c in (counts or default_counts())))
    if not counts or counts[0] < 1:
        raise ValueError(f"actor counts must be >= 1, got {counts}")
    P.update(counts=counts, samples_per_insert=samples_per_insert, eval_every=eval_every,
             eval_episodes=eval_episodes, sample_every=sample_every, config=config, overrides=dict(overrides or {}))
    over = dict(overrides or {})
    if samples_per_insert is not None:
        over["replay.samples_per_insert"] = samples_per_insert
    cfg = load_config(str(ROOT / config), [f"{k}={v}" for k, v in over.items()])
    info = _info()
    t_start = time.monotonic()
    res: dict = {"part": "apex_scaling", "quick": quick, "params": P, "info": info, "config": config,
                 "num_envs": cfg.env.num_envs, "batch_size": cfg.learner.batch_size,
                 "samples_per_insert": cfg.replay.samples_per_insert, "exploration": cfg.actor.exploration,
                 "num_actors_cfg": cfg.actor.num_actors, "apex_eps": cfg.actor.apex_eps,
                 "apex_alpha": cfg.actor.apex_alpha,
                 "ladder": {c: epsilon_ladder(cfg, c) for c in counts}, "runs": []}
    log(f"== apex_scaling: {config} {over or ''}, actors {counts}, {P['seeds']} seed(s), threshold {P['threshold']:g} "
        f"within {P['cap_s']:g} s, eval {eval_episodes} episodes every {eval_every:g} s, "
        f"samples_per_insert {cfg.replay.samples_per_insert:g}")
    with _registry("bench_scaling_apex_", log) as reg:
        for seed in range(P["seeds"]):  # seeds outer: a drift of the machine's load spreads over the counts
            for c in counts:
                log(f"  actors={c} seed={seed} (load {os.getloadavg()[0]:.1f})")
                r = _scaling_run(reg, c, seed, P, log)
                log(f"  -> env steps/s {_f(r['env_steps_per_s'], 0)}, updates/s {_f(r['updates_per_s'])}, "
                    f"time to >= {P['threshold']:g}: {_f(r['time_to_threshold'])} s")
                res["runs"].append(r)
    res["summary"] = _scaling_summary(res)
    res["seconds"] = time.monotonic() - t_start
    res["info"]["loadavg_end"] = os.getloadavg()
    return res


def _scaling_summary(res: dict) -> list[dict]:
    out = []
    for c in res["params"]["counts"]:
        runs = [r for r in res["runs"] if r["actors"] == c]
        times = [r["time_to_threshold"] for r in runs]
        reached = [x for x in times if x is not None]
        # median with the runs that missed counted as "> cap": defined when at least half reached
        srt = sorted(x if x is not None else float("inf") for x in times)
        m = statistics.median(srt) if srt else float("inf")
        out.append({"actors": c, "runs": len(runs), "reached": len(reached),
                    "env_steps_per_s": _med(r["env_steps_per_s"] for r in runs),
                    "updates_per_s": _med(r["updates_per_s"] for r in runs),
                    "limiter_cap_per_s": _med(r["limiter_cap_per_s"] for r in runs),
                    "time_to_threshold": m if m != float("inf") else None})
    base = out[0] if out and out[0]["actors"] == 1 else None
    for s in out:
        s["env_steps_ratio"] = s["env_steps_per_s"] / base["env_steps_per_s"] if base and base["env_steps_per_s"] else None
        s["updates_ratio"] = s["updates_per_s"] / base["updates_per_s"] if base and base["updates_per_s"] else None
        s["time_ratio"] = (s["time_to_threshold"] / base["time_to_threshold"]
                           if base and base["time_to_threshold"] and s["time_to_threshold"] else None)
    return out


def markdown_apex_scaling(res: dict) -> str:
    info, P = res["info"], res["params"]
    thr, cap = P["threshold"], P["cap_s"]
    spi = res["samples_per_insert"]
    lines = [
        f"Run {info['date']} on {info['cpu']} ({info['cores']} cores), {res['seconds']:.0f} s"
        f"{' (quick)' if res['quick'] else ''}; load average {', '.join(f'{x:.1f}' for x in info['loadavg_start'])} "
        f"at start, {', '.join(f'{x:.1f}' for x in info.get('loadavg_end', ()))} at end.", "",
        f"`{res['config']}` as shipped (dueling double DQN, PER, n=3, batch {res['batch_size']}, "
        f"replay.samples_per_insert={spi:g}"
        + (" (Reverb-style limiter: the actors wait for the learner)" if spi > 0 else " (no limiter: actors run free)")
        + f", run.max_env_steps raised), learner.checkpoint_every_seconds=0; replay + learner + N actors of "
        f"{res['num_envs']} envs + the evaluator as real `python -m services.<role>` processes. Threshold: the "
        f"evaluator's mean greedy return over {P['eval_episodes']} episodes (one evaluation every "
        f"{P['eval_every']:g} s, metrics polled every {P['sample_every']:g} s) >= **{thr:g}**"
        + (" (quick mode: the lower threshold)" if res["quick"] else "") +
        f", each run capped at {cap:g} s from launch; time counts from launching the processes (start-up "
        "included). Env steps/s (CartPole has no frame skip: env frames = agent steps) and updates/s are "
        "measured from the learner's first update to the end of the run (the threshold or the cap).", "",
        "| actors | seed | env steps/s (all actors) | learner updates/s | limiter cap (updates x batch / spi) | "
        f"first update s | time to >= {thr:g} s | best eval | CPU cores learner / actors / replay / evaluator | "
        "other load (cores) | load average before / after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in res["runs"]:
        c = r["cores"]
        cores = " / ".join(_f(c.get(k), 2) for k in ("learner", "actors", "replay", "evaluator")) if c else "n/a"
        ttt = _f(r["time_to_threshold"]) if r["time_to_threshold"] is not None else f"> {cap:g} (not reached)"
        lines.append(f"| {r['actors']} | {r['seed']} | {_f(r['env_steps_per_s'], 0)} | {_f(r['updates_per_s'])} | "
                     f"{_f(r['limiter_cap_per_s'], 0, '-')} | {_f(r['first_update_s'])} | {ttt} | "
                     f"{_f(r['best_return'])} | {cores} | {_f(r.get('cores_other'), 2)} | "
                     f"{r['load_before']:.1f} / {r['load_after']:.1f} |")
    lines += ["", f"Per actor count (medians over seeds; a run that missed the threshold counts as > {cap:g} s; "
              "ratios to 1 actor):", "",
              "| actors | runs reaching threshold | env steps/s | x 1 actor | updates/s | x 1 actor | "
              f"time to >= {thr:g} s | x 1 actor (lower = faster) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for s in res["summary"]:
        ttt = _f(s["time_to_threshold"]) if s["time_to_threshold"] is not None else f"> {cap:g}"
        lines.append(f"| {s['actors']} | {s['reached']}/{s['runs']} | {_f(s['env_steps_per_s'], 0)} | "
                     f"{_f(s['env_steps_ratio'], 2)} | {_f(s['updates_per_s'])} | {_f(s['updates_ratio'], 2)} | "
                     f"{ttt} | {_f(s['time_ratio'], 2)} |")
    lines += ["", f"Caveat: this machine has {info['cores']} cores, so with N actors the actor processes, the "
              "learner, the replay server and the evaluator all share them: adding actors takes CPU from the "
              "learner instead of adding hardware, and this machine cannot show the paper's many-actor scaling "
              "(Horgan et al. 2018 ran 360 actors on their own CPUs beside a GPU learner). The table shows what "
              "it does show: how throughput and time to threshold change as actors are added on a fixed, "
              "small CPU budget."
              + (" With the limiter on (samples_per_insert > 0) the actors' insert rate is bounded by the "
                 "learner's sampling rate (column 'limiter cap'), so more actors cannot raise env steps/s "
                 "beyond it; `apex_scaling(..., samples_per_insert=0)` runs them free as in the paper."
                 if spi > 0 else "")]
    if P["seeds"] == 1:
        lines += ["", "One seed per actor count: time to threshold varies a lot between runs, even of the same "
                  "seed (the actors, learner and evaluator interleave differently every run), so read it as "
                  "one sample, not a trend; full mode runs 3 seeds per count."]
    if spi > 0:
        bound = [f"{s['actors']} actor(s) {_f(s['env_steps_per_s'] / s['limiter_cap_per_s'], 2)}"
                 for s in res["summary"] if s.get("limiter_cap_per_s")]
        if bound:
            lines += ["", "Env steps/s / limiter cap (medians; about 1 = the actors run as fast as the limiter "
                      "lets them, i.e. at the learner's pace): " + ", ".join(bound) + "."]
    errs = [(r["actors"], r["seed"], n, e) for r in res["runs"] for n, e in r.get("stop_errors", {}).items()]
    if errs:
        lines += ["", "Warning: process(es) exited non-zero when stopped with SIGINT after the measurement (the "
                  "figures above are unaffected; shm segments and ipc files were checked and removed): " +
                  "; ".join(f"actors={c} seed={sd}: {n} exit {e['code']} (`{e['last_line']}`)"
                            for c, sd, n, e in errs) + "."]
    if res["exploration"] == "apex" and res.get("ladder"):
        exact = res["num_actors_cfg"] > 0
        lines += ["", f"Exploration: the config uses the Ape-X epsilon ladder (actor.exploration=apex, "
                  f"eps_i = {res['apex_eps']:g}^(1 + {res['apex_alpha']:g} i / (N - 1)) over the exploring "
                  "slots, one slot per env of each actor: actor k owns slots "
                  f"{res['num_envs']}k .. {res['num_envs']}k+{res['num_envs'] - 1}). "
                  + ("With actor.num_actors > 0 it is the paper's ladder over actor.num_actors x envs slots."
                     if exact else
                     "With actor.num_actors=0 (as shipped) it is the prefix-covering variant: slot positions "
                     "0, 1, 1/2, 1/4, 3/4, 1/8, ... in [0, 1], so any first S >= 2 slots span "
                     f"[{res['apex_eps']:g}^{1 + res['apex_alpha']:g}, {res['apex_eps']:g}] without "
                     "the processes knowing how many actors run; the positions equal the paper's evenly spaced "
                     "i/(S-1) only when S = 2^k + 1, never for S = 4N slots. Adding actors adds exploring envs "
                     "between the existing epsilons, and the existing actors keep theirs.")
                  + " Epsilons per actor (its envs) in these runs:", ""]
        for c, lad in res["ladder"].items():
            if lad:
                lines.append(f"- {c} actor(s): " + "; ".join(
                    f"actor {i}: " + ", ".join(f"{e:.4f}" for e in eps) for i, eps in enumerate(lad)))
    return "\n".join(lines) + "\n"


def plot_apex_scaling(res: dict, path) -> Path | None:
    plt = pyplot(note=True)
    if plt is None:
        return None
    counts = res["params"]["counts"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r in res["runs"]:
        col = colors[counts.index(r["actors"]) % len(colors)]
        if r["evals"]:
            ts, rs = zip(*r["evals"])
            axes[0].step(ts, rs, where="post", marker=".", color=col,
                         label=f"{r['actors']} actor(s)" if r["seed"] == 0 else None)
    axes[0].axhline(res["params"]["threshold"], color="grey", lw=0.7, ls="--")
    axes[0].set(xlabel="wall seconds since launch", ylabel=f"greedy return ({res['params']['eval_episodes']} episodes)",
                title="CartPole Ape-X: evaluator return vs time")
    summ = res["summary"]
    x = np.arange(len(summ))
    axes[1].bar(x - 0.2, [s["env_steps_per_s"] for s in summ], 0.4, label="env steps/s (all actors)")
    ax2 = axes[1].twinx()
    ax2.bar(x + 0.2, [s["updates_per_s"] for s in summ], 0.4, color=colors[1], label="learner updates/s")
    axes[1].set_xticks(x, [f"{s['actors']} actor(s)" for s in summ])
    axes[1].set(ylabel="env steps/s", title=f"throughput ({res['info']['cores']} cores, median over seeds)")
    ax2.set_ylabel("updates/s")
    h1, l1 = axes[1].get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    axes[1].legend(h1 + h2, l1 + l2, fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save(fig, path, dpi=110)


# ============================================================================ workers
def _worker_ale_sim(args) -> None:
    """bench/_topo.py's ale-sim, with the config's frame stacking, sticky actions and noop_max."""
    from bench._topo import worker_ale_sim

    worker_ale_sim(args)


def _worker_gym_loop(args) -> None:
    """A Python for-loop over ``num_envs`` single gymnasium ALE envs with the standard wrappers."""
    import ale_py
    import gymnasium as gym
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

    from apex_local.runtime import Shutdown
    from bench._topo import _recorder

    shutdown = Shutdown()
    gym.register_envs(ale_py)
    envs = []
    for i in range(args.num_envs):
        e = gym.make(f"ALE/{args.game.capitalize()}-v5", frameskip=1, repeat_action_probability=args.sticky,
                     max_num_frames_per_episode=108_000)
        e = AtariPreprocessing(e, noop_max=args.noop_max, frame_skip=args.frame_skip, screen_size=84,
                               grayscale_obs=True, terminal_on_life_loss=False)
        e = FrameStackObservation(e, args.stack)
        e.reset(seed=args.seed * 1000 + i)
        envs.append(e)
    n_act = envs[0].action_space.n
    rng = np.random.default_rng(args.seed)
    rec = _recorder(args.metrics_port, "actor", 0)

    def sweep() -> None:
        for e in envs:
            _obs, _r, term, trunc, _info = e.step(int(rng.integers(n_act)))
            if term or trunc:
                e.reset()

    try:
        for _ in range(20):
            sweep()
        print(f"READY gym-loop {len(envs)} envs, obs {envs[0].observation_space.shape}", flush=True)
        while not shutdown:
            sweep()
            rec.inc("apex_actor_env_steps_total", len(envs))
    finally:
        for e in envs:
            e.close()
        rec.close()


def _worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_scaling _worker")
    p.add_argument("kind", choices=["ale-sim", "gym-loop"])
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--game", default="pong")
    p.add_argument("--num-envs", type=int, default=4)
    p.add_argument("--frame-skip", type=int, default=4)
    p.add_argument("--stack", type=int, default=4)
    p.add_argument("--sticky", type=float, default=0.25)
    p.add_argument("--noop-max", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    {"ale-sim": _worker_ale_sim, "gym-loop": _worker_gym_loop}[args.kind](args)


# ============================================================================ CLI
PARTS = ("actors_vs_sim", "apex_scaling")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        _worker_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.bench_scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("parts", nargs="*", metavar="PART", help=f"{' | '.join(PARTS)} (default: both)")
    p.add_argument("--quick", action="store_true", help="quick sizes (about 1.5 + 3 minutes)")
    p.add_argument("--counts", default="", help="apex_scaling actor counts, e.g. 1,2 (default 1,2,4,... <= cores)")
    p.add_argument("--seeds", type=int, default=0, help="apex_scaling seeds per count (default 1 quick, 3 full)")
    p.add_argument("--samples-per-insert", type=float, default=None,
                   help="apex_scaling: override replay.samples_per_insert (0 = actors run free)")
    p.add_argument("--procs", default="", help="actors_vs_sim process counts, e.g. 1,2 (default 1,2)")
    p.add_argument("--plot-dir", default="", help="write scaling_actors_vs_sim.png / scaling_apex.png here")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--markdown", default="", help="write the tables here")
    args = p.parse_args(argv)
    unknown = [x for x in args.parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    parts = [x for x in PARTS if x in (args.parts or PARTS)]
    out, tables, rc = {}, [], 0
    for part in parts:
        t0 = time.monotonic()
        try:
            if part == "actors_vs_sim":
                procs = [int(x) for x in args.procs.split(",") if x.strip()] or None
                res = actors_vs_sim(args.quick, procs)
                md = markdown_actors_vs_sim(res)
                plot = plot_actors_vs_sim
                title = "Actors vs the simulator (Pong)"
            else:
                counts = [int(x) for x in args.counts.split(",") if x.strip()] or None
                res = apex_scaling(args.quick, counts, seeds=args.seeds or None,
                                   samples_per_insert=args.samples_per_insert)
                md = markdown_apex_scaling(res)
                plot = plot_apex_scaling
                title = "Ape-X scaling with the actor count (CartPole)"
        except Exception as exc:  # noqa: BLE001  (reported; the other part still runs)
            _log(f"[bench] {part} FAILED after {time.monotonic() - t0:.0f}s: {exc!r}")
            tables.append(f"## {part}\n\nFAILED: {exc!r}\n")
            rc = 1
            continue
        cmd = "python -m bench.bench_scaling " + " ".join(shlex.quote(a) for a in argv)
        out[part] = res
        tables.append(f"## {title}\n\nCommand: `{cmd}`\n\n{md}")
        if args.plot_dir:
            img = plot(res, Path(args.plot_dir) / f"scaling_{part}.png")
            if img:
                _log(f"[bench] plot: {img}")
        _log(f"[bench] {part}: {time.monotonic() - t0:.0f}s")
    text = "\n".join(tables)
    print("\n" + text, flush=True)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main())
