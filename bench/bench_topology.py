"""Topology benchmark: what running Ape-X as separate processes costs, as ratios measured in one run.

    python -m bench.bench_topology [--quick] [--only NAME[,NAME...]] [--set SECTION.FIELD=VALUE ...]
                                   [--repeats N] [--json PATH] [--markdown PATH]

NAME: actor_cartpole, actor_pong, learner_cartpole, learner_pong, weights, pong_e2e
(or the groups cartpole, pong, actor, learner).

1. actor_<env>    env steps/s of actor.0 in a replay + learner + actor topology (tests/service_harness.py
                  Topology: real `python -m services.<role>` processes) / the same
                  ActorService.step loop with the transport replaced by no-ops (bench/_topo.py
                  noop-actor). replay.samples_per_insert=0 (the rate limiter would otherwise throttle
                  the actor to the learner on purpose). Three ratios:
                    full / noop alone         what the actor gets inside the topology on this machine
                    full / noop loaded        the no-op actor runs beside the same replay + learner
                                              (contention matched): the transport's own cost
                    replay-only / noop alone  replay + actor, the bench owns the weights board (no
                                              learner): transport + replay ingest, no learner
2. learner_<env>  apex_learner_updates_total/s of the topology learner with replay warm (actors
                  stopped) / Learner.update over batches already in memory (bench/_topo.py
                  inproc-learner, same config and torch thread rule).
3. weights        publish (flat_parameters + WeightsBoard.publish) -> adopted by BOTH of 2 reader
                  processes (board.read + load_flat_parameters), Nature-CNN Pong net; median, p99.
4. pong_e2e       env frames/s (agent steps x frame_skip) of the Pong topology with 1 and 2 actors of
                  env.num_envs=4 / pure ale_py AtariVectorEnv with random actions (1 and 2 processes
                  of 4 envs, same settings).

Measurements alternate A/B windows within one run: the processes of the other side are
SIGSTOPped (never killed), so numerator and denominator see the same background load; the
order rotates every round and each figure is the median of >= 3 rounds. Every window also
records the CPU (cores) each process used, from /proc, and what other users of the machine
used ('other'), and the CPU time per event (load-independent). transport.request_timeout_ms is
raised so that a paused learner does not resend (see docs/benchmarks_topology.md: with the
default 2 s a learner that does not poll for 2 s leaks batch slots). ``--set`` applies to the
topologies, the workers and the weights writer (e.g. ``--set run.torch_threads=1``).
Every process is stopped and every shm segment / ipc dir removed at exit, also on failure.
Results: docs/benchmarks_topology.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from bench._topo import ROOT, Registry, Window, cpu_model, machine_busy_seconds, rotate

ITEMS = ("actor_cartpole", "learner_cartpole", "actor_pong", "learner_pong", "pong_e2e", "weights")
GROUPS = {"cartpole": ("actor_cartpole", "learner_cartpole"), "pong": ("actor_pong", "learner_pong", "pong_e2e"),
          "actor": ("actor_cartpole", "actor_pong"), "learner": ("learner_cartpole", "learner_pong")}
COMMON = {"run.max_env_steps": 10**12, "replay.capacity": 20_000, "replay.min_size": 1_000,
          "replay.samples_per_insert": 0, "learner.checkpoint_every_seconds": 0,
          "transport.request_timeout_ms": 120_000}
ENVS = {"cartpole": ("configs/apex_cartpole.yaml", {}),
        "pong": ("configs/apex_pong.yaml", {"learner.batch_size": 32, "env.num_envs": 4})}
TARGET_RATIO = 0.9
TARGET_WEIGHTS_MS = 10.0


def log(msg: str) -> None:
    print(msg, flush=True)


def med(xs) -> float:
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else float("nan")


def rates(ws: list[Window], config: str, member: str) -> list[float]:
    return [w.rates[member] for w in sorted(ws, key=lambda w: w.repeat) if w.config == config and member in w.rates]


def _side(ws: list[Window], config: str, members: tuple[str, ...]) -> dict[int, tuple[float, float, float, float]]:
    """round -> (rate summed over members, count summed, span, CPU seconds of the members) of the
    window of ``config``."""
    out = {}
    for w in ws:
        if w.config == config and all(m in w.rates for m in members):
            span = statistics.mean(w.spans[m] for m in members)
            cpu = sum(w.cores.get(m, 0.0) for m in members) * w.seconds
            out[w.repeat] = (sum(w.rates[m] for m in members), sum(w.counts[m] for m in members), span, cpu)
    return out


def row(case: str, num_ws: list[Window], num: tuple, den_ws: list[Window], den: tuple, scale: float = 1.0) -> dict:
    """num/den = (config, member, ...): the medians of the per-window rates, the median of the
    per-round ratios (the reported ratio), and the pooled ratio (sum of counts / sum of time
    per side), with the fewest events counted in one window (quantisation), and the CPU time
    the measured processes spent per event (ms; independent of how much CPU they got)."""
    a, b = _side(num_ws, num[0], num[1:]), _side(den_ws, den[0], den[1:])
    per_round = [a[r][0] / b[r][0] for r in sorted(set(a) & set(b)) if b[r][0] > 0]
    pa = sum(x[1] for x in a.values()) / max(1e-9, sum(x[2] for x in a.values()))
    pb = sum(x[1] for x in b.values()) / max(1e-9, sum(x[2] for x in b.values()))
    return {"case": case, "num": scale * med(x[0] for x in a.values()), "den": scale * med(x[0] for x in b.values()),
            "ratio": med(per_round), "ratios": per_round, "ratio_pooled": pa / pb if pb > 0 else float("nan"),
            "min_events": min([x[1] for x in a.values()] + [x[1] for x in b.values()] or [0]),
            "num_cpu_ms_per_event": 1e3 * sum(x[3] for x in a.values()) / max(1e-9, sum(x[1] for x in a.values())),
            "den_cpu_ms_per_event": 1e3 * sum(x[3] for x in b.values()) / max(1e-9, sum(x[1] for x in b.values()))}


def cores_summary(ws: list[Window], config: str) -> dict[str, float]:
    sel = [w for w in ws if w.config == config]
    keys = sorted({k for w in sel for k in w.cores})
    return {k: round(med([w.cores.get(k, 0.0) for w in sel]), 2) for k in keys}


def verdict(ratio: float, target: float = TARGET_RATIO, higher: bool = True) -> str:
    if ratio != ratio:
        return "n/a"
    return "PASS" if (ratio >= target if higher else ratio <= target) else "FAIL"


# ---------------------------------------------------------------------------------- env sessions
def env_session(reg: Registry, env: str, wants: set[str], P: dict, user_sets: dict, cmd: str) -> dict:
    """One topology for ``env``: the phases the wanted items need, in one go (see module doc)."""
    from apex_local.envs import env_spec
    from apex_local.networks import flat_parameters, make_network, num_flat_parameters
    from apex_local.transport import WeightsBoard, segment_name

    base, env_over = ENVS[env]
    overrides = {**COMMON, **env_over, **user_sets}
    want_actor, want_learner, want_e2e = f"actor_{env}" in wants, f"learner_{env}" in wants, (
        env == "pong" and "pong_e2e" in wants)
    topo = reg.topology(env, overrides, base)
    cfg = topo.cfg
    spec = env_spec(cfg.env)
    window, settle, repeats = P["window"][env], P["settle"], P["repeats"]
    out: dict = {"config": base, "overrides": overrides, "run_id": topo.run_id, "windows": {}}
    log(f"\n== {env}: {base} + " + " ".join(f"{k}={v}" for k, v in overrides.items()))
    log(f"   services: APEX_CONFIG={topo.config_path} APEX_RUN_ID={topo.run_id} "
        f"python -m services.<replay|learner|actor> --index I")
    t_session = time.monotonic()

    def steps(role, i=0):
        return lambda: topo.metrics(role, i).get({"actor": "apex_actor_env_steps_total",
                                                  "learner": "apex_learner_updates_total",
                                                  "replay": "apex_replay_size"}[role], 0) or 0

    noop_args = ["--config", str(topo.config_path), "--index", "0", "--run-id", topo.run_id + "n"]
    if want_actor:
        # Phase A: replay + actor, the bench owns the weights board (a fresh net's weights, v1).
        net = make_network(cfg.network, spec.obs_shape, spec.obs_dtype, spec.num_actions)
        board = WeightsBoard.create(segment_name(topo.run_id, "weights"), num_flat_parameters(net))
        board.publish(flat_parameters(net).numpy(), 1)
        reg.closers.append(board.close)
        reg.start_service(topo, "replay")
        reg.start_service(topo, "actor", 0)
        reg.start_worker("noop", "noop-actor", noop_args, "apex_actor_env_steps_total", run_id=topo.run_id + "n")
        reg.wait_ready(reg.members["noop"])
        reg.pause(reg.members["noop"])
        reg.wait_for(lambda: steps("actor")() > 0 and topo.metrics("replay").get("apex_replay_inserted_total", 0) > 0,
                     120, "actor inserting into replay")
        log("   phase A: replay + actor (no learner; bench-owned board)  vs  no-op actor alone")
        out["windows"]["A"] = rotate(reg, {"replay_only": ["replay.0", "actor.0"], "noop_alone": ["noop"]},
                                     repeats=repeats, window=window, settle=settle, log=log)
        reg.only(["replay.0", "actor.0"], ["replay.0", "actor.0", "noop"])
        reg.start_service(topo, "learner")  # replaces the bench's board (create(replace=True))
    else:
        for role in ("replay", "learner"):
            reg.start_service(topo, role)
        reg.start_service(topo, "actor", 0)
    min_updates = 30 if env == "cartpole" else (1 if P["quick"] else 2)
    reg.wait_for(lambda: steps("replay")() >= cfg.replay.min_size and steps("learner")() >= min_updates,
                 240, f"replay >= {cfg.replay.min_size} items and >= {min_updates} learner updates")
    if not P["quick"]:  # the learner's v2 comes after learner.publish_every updates (slow for Pong on CPU)
        reg.wait_for(lambda: topo.metrics("actor", 0).get("apex_actor_weights_version", 0) >= 2, 120,
                     "actor.0 adopting the learner's weights")
    log(f"   warm after {time.monotonic() - t_session:.0f}s")

    def lag(when):
        if when == "start":
            return {}
        lv = topo.metrics("learner").get("apex_learner_weights_version", 0)
        av = [topo.metrics("actor", i).get("apex_actor_weights_version", 0) for i in (0, 1)
              if f"actor.{i}" in reg.members and not reg.members[f"actor.{i}"].stopped]
        return {"version_lag": lv - min(av)} if av and lv else {}

    def batch_wait(_when):  # seconds the learner spent waiting in poll() for a BatchReady (a rate: s/s)
        m = topo.metrics("learner")
        return {"batch_wait_s_per_s": m.get("apex_learner_batch_wait_seconds_sum", 0.0),
                "batches_per_s": m.get("apex_learner_batch_wait_seconds_count", 0.0)}

    full = ["replay.0", "learner.0", "actor.0"]
    configs_b = {"full": full}
    if want_actor:
        configs_b.update({"noop_loaded": ["replay.0", "learner.0", "noop"], "noop_alone": ["noop"]})
    if want_e2e:
        reg.start_worker("sim1", "ale-sim", ["--num-envs", str(cfg.env.num_envs), "--frame-skip",
                                              str(cfg.env.frame_skip), "--seed", "1"], "apex_actor_env_steps_total")
        reg.wait_ready(reg.members["sim1"])
        reg.pause(reg.members["sim1"])
        configs_b["sim1"] = ["sim1"]
    log("   phase B: " + "  vs  ".join(f"{k} ({'+'.join(v)})" for k, v in configs_b.items()))
    out["windows"]["B"] = rotate(reg, configs_b, repeats=repeats, window=window, settle=settle, log=log,
                                 extra={"full": lag} if want_e2e else None)
    pool_b = sorted({n for v in configs_b.values() for n in v})
    reg.only(full, pool_b)
    if "noop" in reg.members:
        reg.stop("noop")

    if want_e2e:
        reg.start_service(topo, "actor", 1)
        reg.start_worker("sim2", "ale-sim", ["--num-envs", str(cfg.env.num_envs), "--frame-skip",
                                              str(cfg.env.frame_skip), "--seed", "2"], "apex_actor_env_steps_total")
        reg.wait_ready(reg.members["sim2"])
        reg.pause(reg.members["sim2"])
        reg.wait_for(lambda: (topo.metrics("actor", 1).get("apex_actor_env_steps_total", 0) or 0) > 0, 120,
                     "actor.1 stepping")
        configs_e = {"full_2actors": full + ["actor.1"], "sim_2procs": ["sim1", "sim2"]}
        log("   phase E: " + "  vs  ".join(f"{k} ({'+'.join(v)})" for k, v in configs_e.items()))
        out["windows"]["E"] = rotate(reg, configs_e, repeats=repeats, window=window, settle=settle, log=log,
                                     extra={"full_2actors": lag})
        reg.only(full, ["replay.0", "learner.0", "actor.0", "actor.1", "sim1", "sim2"])
        for n in ("actor.1", "sim1", "sim2"):
            reg.stop(n)
    elif "sim1" in reg.members:
        reg.stop("sim1")

    if want_learner:
        reg.stop("actor.0")  # replay stays warm (samples_per_insert=0: the learner keeps sampling)
        items = 2 * cfg.replay.min_size
        reg.start_worker("inproc", "inproc-learner", ["--config", str(topo.config_path), "--items", str(items),
                                                      "--batches", "32"], "apex_learner_updates_total")
        reg.pause(reg.members["learner.0"])  # filling the worker's replay must not steal the learner's windows
        reg.wait_ready(reg.members["inproc"], timeout=300)
        reg.pause(reg.members["inproc"])
        configs_l = {"topo_learner": ["replay.0", "learner.0"], "inproc": ["inproc"]}
        log("   phase L: " + "  vs  ".join(f"{k} ({'+'.join(v)})" for k, v in configs_l.items()))
        out["windows"]["L"] = rotate(reg, configs_l, repeats=repeats, window=P["learner_window"][env],
                                     settle=settle, log=log, extra={"topo_learner": batch_wait})
        reg.stop("inproc")
    reg.only(["replay.0", "learner.0"], [n for n in ("replay.0", "learner.0") if n in reg.members])
    for n in [n for n in list(reg.members) if n.split(".")[0] in ("actor", "learner", "replay")]:
        reg.stop(n)
    out["seconds"] = time.monotonic() - t_session
    out["summary"] = summarize_env(env, out, cfg, wants, cmd)
    return out


def summarize_env(env: str, out: dict, cfg, wants: set[str], cmd: str) -> dict:
    W = out["windows"]
    res: dict = {}
    B = W.get("B", [])
    if f"actor_{env}" in wants:
        A = W["A"]
        res[f"actor_{env}"] = {
            "unit": "env steps/s (agent steps, all envs of the actor)",
            "rows": [
                row("full topology / no-op actor alone", B, ("full", "actor.0"), B, ("noop_alone", "noop")),
                row("full topology / no-op actor beside replay+learner", B, ("full", "actor.0"),
                    B, ("noop_loaded", "noop")),
                row("replay + actor, no learner / no-op actor alone", A, ("replay_only", "actor.0"),
                    A, ("noop_alone", "noop")),
            ],
            "cores": {c: cores_summary(B if c != "replay_only" else A, c)
                      for c in ("full", "noop_loaded", "noop_alone", "replay_only")},
            "learner_updates_per_s": {c: med(rates(B, c, "learner.0")) for c in ("full", "noop_loaded")},
            "command": f"{cmd} --only actor_{env}",
        }
    if f"learner_{env}" in wants:
        L = W["L"]
        res[f"learner_{env}"] = {
            "unit": f"updates/s (batch {cfg.learner.batch_size})",
            "rows": [row("topology learner (replay warm, actors stopped) / in-process Learner.update",
                         L, ("topo_learner", "learner.0"), L, ("inproc", "inproc"))],
            "learner_with_actor_running": med(rates(B, "full", "learner.0")),
            "learner_batch_wait_fraction": med([w.extra.get("batch_wait_s_per_s") for w in L
                                                if w.config == "topo_learner"]),
            "cores": {c: cores_summary(L, c) for c in ("topo_learner", "inproc")},
            "command": f"{cmd} --only learner_{env}",
        }
    if env == "pong" and "pong_e2e" in wants:
        fs = cfg.env.frame_skip
        E = W["E"]
        res["pong_e2e"] = {
            "unit": f"env frames/s (agent steps x frame_skip {fs})",
            "rows": [
                row("1 actor x 4 envs / 1 AtariVectorEnv(4) process", B, ("full", "actor.0"), B, ("sim1", "sim1"), fs),
                row("2 actors x 4 envs / 2 AtariVectorEnv(4) processes", E, ("full_2actors", "actor.0", "actor.1"),
                    E, ("sim_2procs", "sim1", "sim2"), fs),
            ],
            "learner_updates_per_s": {"1 actor": med(rates(B, "full", "learner.0")),
                                      "2 actors": med(rates(E, "full_2actors", "learner.0"))},
            "version_lag": {"1 actor": med([w.extra.get("version_lag") for w in B if w.config == "full"]),
                            "2 actors": med([w.extra.get("version_lag") for w in E if w.config == "full_2actors"])},
            "cores": {"full": cores_summary(B, "full"), "sim1": cores_summary(B, "sim1"),
                      "full_2actors": cores_summary(E, "full_2actors"), "sim_2procs": cores_summary(E, "sim_2procs")},
            "command": f"{cmd} --only pong_e2e",
        }
    return res


# ---------------------------------------------------------------------------------- weights
def weights_item(reg: Registry, P: dict, cmd: str, sets: list[str]) -> dict:
    from apex_local.agents.builders import set_torch_threads
    from apex_local.config import load_config
    from apex_local.envs import env_spec
    from apex_local.networks import flat_parameters, make_network, num_flat_parameters
    from apex_local.transport import WeightsBoard, segment_name

    config = "configs/apex_pong.yaml"
    cfg = load_config(str(ROOT / config), sets)  # --set applies here too (e.g. run.torch_threads=1)
    spec = env_spec(cfg.env)
    threads = set_torch_threads(cfg, spec)  # the learner's rule (the learner does this publish)
    net = make_network(cfg.network, spec.obs_shape, spec.obs_dtype, spec.num_actions)
    numel = num_flat_parameters(net)
    n, interval, poll_ms = P["publishes"], P["interval_ms"] / 1e3, P["poll_ms"]
    log(f"\n== weights: {numel} float32 ({numel * 4 / 1e6:.1f} MB, make_network for Pong), 2 reader processes "
        f"polling every {poll_ms:g} ms, {n} publishes every {interval * 1e3:g} ms, {P['weight_repeats']} rounds; "
        f"writer torch threads {threads}")
    R = P["weight_repeats"]
    rid = "bw" + uuid.uuid4().hex[:8]
    reg.run_ids.add(rid)
    board = WeightsBoard.create(segment_name(rid, "weights"), numel)
    reg.closers.append(board.close)
    outs = [reg.tmp / f"weights_{i}.jsonl" for i in range(2)]
    readers = [reg.start_worker(f"reader{i}", "weights-reader",
                                ["--config", str(ROOT / config), "--board", segment_name(rid, "weights"),
                                 "--count", str(R * n), "--poll-ms", str(poll_ms),
                                 "--timeout", str(R * (n * interval + 2) + 60), "--out", str(outs[i])], None)
               for i in range(2)]
    for m in readers:
        reg.wait_ready(m)
    starts, flat_s, pub_s, busy = {}, {}, {}, []
    for rep in range(R):  # rounds separated by a 1 s pause, same readers
        time.sleep(1.0)
        b0, w0 = machine_busy_seconds(), time.monotonic()
        for v in range(rep * n + 1, (rep + 1) * n + 1):
            t0 = time.perf_counter()
            flat = flat_parameters(net).numpy()  # what Learner.flat_weights does before every publish
            flat[0] = flat[-1] = v  # marker: a reader checks it got exactly version v
            t1 = time.perf_counter()
            board.publish(flat, v)
            t2 = time.perf_counter()
            starts[v], flat_s[v], pub_s[v] = t0, t1 - t0, t2 - t1
            time.sleep(interval)
        busy.append((machine_busy_seconds() - b0) / (time.monotonic() - w0))
    for m in readers:
        m.proc.wait(timeout=120)
        reg.members.pop(m.name)
    board.close()
    rows = [[json.loads(line) for line in o.read_text().splitlines() if line.strip()] for o in outs]
    got = [{r[0]: r for r in rs} for rs in rows]
    rounds = []
    for rep in range(R):
        vs = range(rep * n + 1, (rep + 1) * n + 1)
        both = [v for v in vs if v in got[0] and v in got[1]]
        e2e = [max(got[0][v][3], got[1][v][3]) - starts[v] for v in both]
        board_only = [max(got[0][v][3], got[1][v][3]) - (starts[v] + flat_s[v]) for v in both]
        mine = [g[v] for g in got for v in vs if v in g]
        rd = {"median_ms": 1e3 * float(np.median(e2e)), "p99_ms": 1e3 * float(np.percentile(e2e, 99)),
              "max_ms": 1e3 * float(np.max(e2e)),
              "board_median_ms": 1e3 * float(np.median(board_only)),
              "board_p99_ms": 1e3 * float(np.percentile(board_only, 99)),
              "flat_median_ms": 1e3 * float(np.median([flat_s[v] for v in vs])),
              "publish_median_ms": 1e3 * float(np.median([pub_s[v] for v in vs])),
              "read_median_ms": 1e3 * float(np.median([r[2] - r[1] for r in mine])),
              "load_median_ms": 1e3 * float(np.median([r[3] - r[2] for r in mine])),
              "machine_busy_cores": busy[rep], "adopted_by_both": len(both), "published": n, "inconsistent": sum(1 for r in mine if not r[4])}
        log(f"    [round {rep}] adopted by both readers: median {rd['median_ms']:.2f} ms, p99 {rd['p99_ms']:.2f} ms, "
            f"max {rd['max_ms']:.2f} ms (from board.publish: median {rd['board_median_ms']:.2f}, p99 "
            f"{rd['board_p99_ms']:.2f}); flat_parameters {rd['flat_median_ms']:.2f} ms, publish "
            f"{rd['publish_median_ms']:.2f} ms, read {rd['read_median_ms']:.2f} ms, load {rd['load_median_ms']:.2f} ms; "
            f"{len(both)}/{n} versions adopted by both, {rd['inconsistent']} inconsistent; machine busy "
            f"{busy[rep]:.2f} cores (all processes)")
        rounds.append(rd)
    summ = {k: med([r[k] for r in rounds]) for k in rounds[0]}
    return {"numel": numel, "rounds": rounds, "summary": summ, "poll_ms": poll_ms, "interval_ms": interval * 1e3,
            "command": f"{cmd} --only weights"}


# ---------------------------------------------------------------------------------- main
def versions() -> dict:
    import ale_py
    import torch
    import zmq

    return {"python": platform.python_version(), "torch": torch.__version__, "ale-py": ale_py.__version__,
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "numpy": np.__version__}


def print_summary(results: dict) -> None:
    log("\n================ summary (medians of rounds; ratio = median of per-round ratios)")
    for item in ITEMS:
        for env_res in results.get("sessions", {}).values():
            r = env_res["summary"].get(item)
            if r:
                log(f"{item}  [{r['unit']}]   {r['command']}")
                target = TARGET_RATIO if item.startswith(("actor", "learner")) else None
                for rw in r["rows"]:
                    v = verdict(rw["ratio"]) if target else ""
                    log(f"   {rw['case']:<70} {rw['num']:9.1f} / {rw['den']:9.1f} = {rw['ratio']:.3f}  "
                        f"{('target >= 0.9 ' + v) if target else ''}  (rounds: "
                        f"{', '.join(f'{x:.3f}' for x in rw['ratios'])}; pooled {rw['ratio_pooled']:.3f}; "
                        f"fewest events/window {rw['min_events']:.0f}; CPU ms/event {rw['num_cpu_ms_per_event']:.3f} "
                        f"vs {rw['den_cpu_ms_per_event']:.3f})")
                for k in ("cores", "learner_updates_per_s", "learner_with_actor_running",
                          "learner_batch_wait_fraction", "version_lag"):
                    if k in r:
                        log(f"   {k}: {r[k]}")
    w = results.get("weights")
    if w:
        s = w["summary"]
        log(f"weights  [{w['numel']} float32, 2 readers]   {w['command']}")
        log(f"   flat_parameters+publish -> adopted by both readers: median {s['median_ms']:.2f} ms "
            f"({verdict(s['median_ms'], TARGET_WEIGHTS_MS, False)}), p99 {s['p99_ms']:.2f} ms ({verdict(s['p99_ms'], TARGET_WEIGHTS_MS, False)}) "
            f"target <= 10 ms")
        log(f"   board.publish -> adopted by both readers: median {s['board_median_ms']:.2f} ms "
            f"({verdict(s['board_median_ms'], TARGET_WEIGHTS_MS, False)}), p99 {s['board_p99_ms']:.2f} ms "
            f"({verdict(s['board_p99_ms'], TARGET_WEIGHTS_MS, False)})")
        log(f"   parts: flat_parameters {s['flat_median_ms']:.2f} ms, board.publish {s['publish_median_ms']:.2f} ms, "
            f"reader board.read {s['read_median_ms']:.2f} ms, load_flat_parameters {s['load_median_ms']:.2f} ms")


def _f(x: float, nd: int = 1) -> str:
    return "n/a" if x != x else f"{x:,.{nd}f}"


def markdown(results: dict) -> str:
    """The run's tables (one per item) in Markdown, for docs/benchmarks_topology.md."""
    info = results["info"]
    lines = [f"Run {info['date']}, {info['seconds']:.0f} s, load average {', '.join(f'{x:.1f}' for x in info['loadavg_start'])}"
             f" at start, {', '.join(f'{x:.1f}' for x in info.get('loadavg_end', ()))} at end; rounds per figure: "
             f"{info['params']['repeats']}.", ""]
    for item in ITEMS:
        for sess in results.get("sessions", {}).values():
            r = sess["summary"].get(item)
            if not r:
                continue
            target = item.startswith(("actor", "learner"))
            lines += [f"**{item}** ({r['unit']}) - `{r['command']}`", "",
                      "| case | numerator | denominator | ratio (median of rounds) | per-round ratios | pooled ratio "
                      "| CPU ms/event num vs den | target | result |",
                      "|---|---:|---:|---:|---|---:|---:|---|---|"]
            for rw in r["rows"]:
                lines.append(f"| {rw['case']} | {_f(rw['num'])} | {_f(rw['den'])} | **{_f(rw['ratio'], 3)}** | "
                             f"{', '.join(_f(x, 2) for x in rw['ratios'])} | {_f(rw['ratio_pooled'], 3)} | "
                             f"{_f(rw['num_cpu_ms_per_event'], 3)} vs {_f(rw['den_cpu_ms_per_event'], 3)} | "
                             f"{'>= 0.9' if target else '-'} | {verdict(rw['ratio']) if target else '-'} |")
            cores = r.get("cores", {})
            if cores:
                lines += ["", "CPU cores used per process during the windows (median; 'other' = the rest of the "
                          "machine):", "", "| window | " + " | ".join(sorted({k for c in cores.values() for k in c
                                                                          if k != 'bench'})) + " |"]
                keys = sorted({k for c in cores.values() for k in c if k != "bench"})
                lines.append("|---|" + "---:|" * len(keys))
                for cname, c in cores.items():
                    if c:
                        lines.append(f"| {cname} | " + " | ".join(_f(c.get(k, 0.0), 2) for k in keys) + " |")
            for k in ("learner_updates_per_s", "learner_with_actor_running", "learner_batch_wait_fraction",
                      "version_lag"):
                if k in r:
                    v = r[k]
                    v = {a: round(b, 2) for a, b in v.items()} if isinstance(v, dict) else round(v, 2)
                    lines.append(f"\n{k}: {v}")
            lines.append("")
    w = results.get("weights")
    if w:
        s = w["summary"]
        lines += [f"**weights** ({w['numel']:,} float32 = {w['numel'] * 4 / 1e6:.1f} MB, 2 reader processes polling "
                  f"every {w['poll_ms']:g} ms, a publish every {w['interval_ms']:g} ms) - `{w['command']}`", "",
                  "| latency | median | p99 | target | result |", "|---|---:|---:|---|---|",
                  f"| flat_parameters + publish -> adopted by both readers | {_f(s['median_ms'], 2)} ms | "
                  f"{_f(s['p99_ms'], 2)} ms | <= 10 ms | {verdict(s['median_ms'], TARGET_WEIGHTS_MS, False)} (median), "
                  f"{verdict(s['p99_ms'], TARGET_WEIGHTS_MS, False)} (p99) |",
                  f"| board.publish -> adopted by both readers | {_f(s['board_median_ms'], 2)} ms | "
                  f"{_f(s['board_p99_ms'], 2)} ms | <= 10 ms | {verdict(s['board_median_ms'], TARGET_WEIGHTS_MS, False)} (median), "
                  f"{verdict(s['board_p99_ms'], TARGET_WEIGHTS_MS, False)} (p99) |", "",
                  f"Parts (medians): flat_parameters {_f(s['flat_median_ms'], 2)} ms, board.publish "
                  f"{_f(s['publish_median_ms'], 2)} ms, reader board.read {_f(s['read_median_ms'], 2)} ms, "
                  f"load_flat_parameters {_f(s['load_median_ms'], 2)} ms; machine busy "
                  f"{_f(s.get('machine_busy_cores', float('nan')), 2)} cores; per round: " +
                  "; ".join(f"{_f(x['median_ms'], 1)}/{_f(x['p99_ms'], 1)} ms, {x['inconsistent']} torn"
                            for x in w["rounds"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_topology", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short windows (~5 minutes in all)")
    p.add_argument("--only", default="", help="comma-separated: " + ", ".join(ITEMS + tuple(GROUPS)))
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="extra config override for the topologies and workers (e.g. run.torch_threads=1)")
    p.add_argument("--repeats", type=int, default=0, help="rounds per measurement (default 3 quick, 5 full)")
    p.add_argument("--json", default="", help="write every window and the summary here")
    p.add_argument("--markdown", default="", help="write the result tables (Markdown) here")
    args = p.parse_args(argv)
    wants: set[str] = set()
    for name in filter(None, (s.strip() for s in args.only.split(","))):
        if name in GROUPS:
            wants |= set(GROUPS[name])
        elif name in ITEMS:
            wants.add(name)
        else:
            p.error(f"--only: unknown name {name!r}; choose from {', '.join(ITEMS + tuple(GROUPS))}")
    wants = wants or set(ITEMS)
    user_sets = {}
    for s in args.sets:
        k, _, v = s.partition("=")
        import yaml

        user_sets[k] = yaml.safe_load(v)
    q = args.quick
    P = {"quick": q, "repeats": args.repeats or (3 if q else 5), "settle": 0.4 if q else 0.6,
         "window": {"cartpole": 2.0 if q else 5.0, "pong": 2.5 if q else 8.0},
         "learner_window": {"cartpole": 2.0 if q else 5.0, "pong": 4.0 if q else 10.0},
         "publishes": 150 if q else 600, "interval_ms": 25.0, "poll_ms": 1.0, "weight_repeats": 3}
    cmd = "python -m bench.bench_topology" + (" --quick" if q else "") + "".join(
        f" --set {shlex.quote(s)}" for s in args.sets)
    log("command: python -m bench.bench_topology " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cores": os.cpu_count(), "loadavg_start": os.getloadavg(), "versions": versions(), "params": P,
            "items": sorted(wants)}
    log(f"machine: {info['cores']} cores, {info['cpu']}; load average {info['loadavg_start']}; {info['versions']}")

    tmp = Path(tempfile.mkdtemp(prefix="apex-bench-topo-"))
    reg = Registry(tmp)

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # also when started with SIGINT ignored (`cmd &`)
        signal.signal(sig, on_term)
    results: dict = {"info": info, "sessions": {}}
    ok = False
    t0 = time.monotonic()
    try:
        for env in ("cartpole", "pong"):
            if wants & ({f"actor_{env}", f"learner_{env}"} | ({"pong_e2e"} if env == "pong" else set())):
                results["sessions"][env] = env_session(reg, env, wants, P, user_sets, cmd)
        if "weights" in wants:
            results["weights"] = weights_item(reg, P, cmd, args.sets)
        ok = True
    except KeyboardInterrupt:
        log(f"interrupted: cleaning up (logs kept in {tmp})")
    except Exception:
        log(f"FAILED; logs kept in {tmp}")
        raise
    finally:
        left = reg.close()
        log(f"cleanup: {'nothing left behind' if not left else 'LEFT BEHIND: ' + ', '.join(left)}")
        if ok and not left:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    results["info"]["seconds"] = time.monotonic() - t0
    results["info"]["loadavg_end"] = os.getloadavg()
    print_summary(results)
    log(f"total {results['info']['seconds']:.0f}s")
    if args.json:
        def enc(o):
            if isinstance(o, Window):
                return o.__dict__
            return str(o)

        Path(args.json).write_text(json.dumps(results, default=enc, indent=1))
    if args.markdown and ok:
        Path(args.markdown).write_text(markdown(results))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
