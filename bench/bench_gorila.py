"""Gorila vs Ape-X on CartPole: greedy return vs wall time, gradient staleness, updates/s.

    python -m bench.bench_gorila [--seconds 120] [--actors 2] [--learners 2]
                                 [--only apex,gorila,gorila_local] [--set SECTION.FIELD=VALUE ...]
                                 [--json PATH] [--markdown PATH] [--plot PATH]

Each topology runs as real processes (tests/service_harness.py Topology, the same
``python -m services.<role>`` mains honcho starts), one after the other, for the same wall-clock
budget counted from launch (process start-up included), with the same actors (``--actors``
processes of the config's ``env.num_envs`` envs) and an evaluator (5 greedy episodes every 5 s):

    apex          configs/apex_cartpole.yaml          replay + 1 learner + actors + evaluator
    gorila        configs/gorila_cartpole.yaml        replay + paramserver + N learners (shared replay)
    gorila_local  configs/gorila_cartpole_local.yaml  paramserver + N learners with their own replay
                                                      (the replay process idles)

Each config runs as shipped (``run.max_env_steps`` raised so the budget, not the step count, ends
the run): Ape-X is dueling + PER + the Ape-X epsilon ladder at batch 128; Gorila is DQN (uniform
replay, linearly annealed epsilon) at batch 64 per learner; both use samples_per_insert 8.
"updates" are the updates applied to the network the actors act with: the Ape-X learner's
``apex_learner_updates_total``, Gorila's ``apex_paramserver_gradients_applied_total``.
Staleness (Gorila only; 0 by construction for Ape-X, whose learner applies its own gradient at
once) is the paramserver's histogram ``apex_paramserver_staleness``: master version minus the
version the gradient was computed on. Every figure is also given as a ratio to the Ape-X run of
the same invocation. The 1-minute load average is recorded before and after each run (the
machine is shared). Every process is stopped and every shm segment / ipc dir removed at exit,
also on failure. Results: docs/benchmarks_gorila.md, docs/img/gorila_vs_apex_cartpole.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench._topo import ROOT, Registry, cpu_model

CONFIGS = {"apex": "configs/apex_cartpole.yaml", "gorila": "configs/gorila_cartpole.yaml",
           "gorila_local": "configs/gorila_cartpole_local.yaml"}
THRESHOLD = 195.0  # CartPole-v1 "solved"-style greedy return for the time-to-threshold column
_LE = re.compile(r'le="([^"]+)"')


def _histogram(metrics: dict[str, float], name: str) -> list[tuple[float, float]]:
    """[(upper bound, cumulative count)] of a histogram in a Topology.metrics() dict."""
    out = []
    for key, value in metrics.items():
        if key.startswith(name + "_bucket{"):
            m = _LE.search(key)
            if m:
                out.append((float(m.group(1)), value))
    return sorted(out)


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Upper bound of the bucket holding quantile q (Prometheus-style, no interpolation)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    want = q * buckets[-1][1]
    return next(le for le, n in buckets if n >= want)


def run_one(reg: Registry, name: str, args, log) -> dict:
    base = CONFIGS[name]
    overrides = {"run.max_env_steps": 10**9, "actor.eval_every_seconds": 5, "actor.eval_episodes": 5,
                 "run.log_every_seconds": 5, **dict(kv.split("=", 1) for kv in args.set)}
    t = reg.topology(name, overrides, base)
    gorila = t.cfg.run.method == "gorila"
    learners = args.learners if gorila else 1
    roles = [("replay", 0)] + ([("paramserver", 0)] if gorila else []) + [("learner", j) for j in range(learners)]
    roles += [("actor", i) for i in range(args.actors)] + [("evaluator", 0)]
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    for role, idx in roles:
        reg.start_service(t, role, idx)
    samples, evals, last_eval = [], [], 0.0

    def sample() -> dict:
        now = time.monotonic() - t0
        acts = [t.metrics("actor", i) for i in range(args.actors)]
        ev = t.metrics("evaluator")
        row = {"t": now, "env_steps": sum(a.get("apex_actor_env_steps_total", 0.0) for a in acts)}
        if gorila:
            ps = t.metrics("paramserver")
            row.update(updates=ps.get("apex_paramserver_gradients_applied_total", 0.0),
                       received=sum(v for k, v in ps.items()
                                    if k.startswith("apex_paramserver_gradients_received_total{")),
                       dropped_stale=next((v for k, v in ps.items() if k.startswith(
                           "apex_paramserver_gradients_dropped_total{") and 'reason="stale"' in k), 0.0),
                       staleness_sum=ps.get("apex_paramserver_staleness_sum", 0.0),
                       staleness_count=ps.get("apex_paramserver_staleness_count", 0.0),
                       staleness_buckets=_histogram(ps, "apex_paramserver_staleness"))
        else:
            row.update(updates=t.metrics("learner").get("apex_learner_updates_total", 0.0))
        row["eval_episodes"] = ev.get("apex_evaluator_episodes_total", 0.0)
        row["eval_return"] = ev.get("apex_evaluator_return")
        return row

    try:
        while time.monotonic() - t0 < args.seconds:
            time.sleep(args.sample_every)
            for role, idx in roles:
                m = reg.members[f"{role}.{idx}"]
                if m.proc.poll() is not None:
                    raise RuntimeError(f"{name}: {m.name} exited {m.proc.returncode}:\n{t.log(m.name)[-2000:]}")
            row = sample()
            samples.append(row)
            if row["eval_return"] is not None and row["eval_episodes"] > last_eval:
                evals.append((row["t"], row["eval_return"]))
                last_eval = row["eval_episodes"]
            log(f"  [{name}] t={row['t']:5.0f}s env_steps={row['env_steps']:8.0f} updates={row['updates']:7.0f} "
                f"eval={row['eval_return']}")
    finally:
        codes = t.stop(signal.SIGINT, timeout=5.0)
        for role, idx in roles:
            reg.members.pop(f"{role}.{idx}", None)
    load1 = os.getloadavg()[0]
    bad = {n: c for n, (c, _) in codes.items() if c != 0}
    if bad:
        raise RuntimeError(f"{name}: processes exited non-zero at stop: {bad}\n{t.dump()[-3000:]}")
    return summarize(name, base, learners, args, samples, evals, load0, load1, t.leftovers())


def summarize(name, base, learners, args, samples, evals, load0, load1, leftovers) -> dict:
    last = samples[-1]
    first_update = next((s["t"] for s in samples if s["updates"] > 0), None)
    span = last["t"] - first_update if first_update is not None else 0.0
    rets = [r for _, r in evals]
    # mean greedy return over the budget: the return of the latest evaluation held until the next
    # one (0 before the first), averaged over the budget: area under return-vs-time / budget
    area, prev_t, prev_r = 0.0, 0.0, 0.0
    for tt, r in evals:
        area += prev_r * (tt - prev_t)
        prev_t, prev_r = tt, r
    area += prev_r * (last["t"] - prev_t)
    out = {"config": name, "file": base, "learners": learners, "actors": args.actors, "seconds": last["t"],
           "load_before": load0, "load_after": load1, "env_steps": last["env_steps"],
           "env_steps_per_s": last["env_steps"] / last["t"], "updates": last["updates"],
           "updates_per_s": last["updates"] / span if span > 0 else 0.0, "first_update_s": first_update,
           "evals": evals, "final_return": sum(rets[-3:]) / len(rets[-3:]) if rets else None,
           "best_return": max(rets) if rets else None, "mean_return_over_time": area / last["t"],
           "time_to_threshold": next((tt for tt, r in evals if r >= THRESHOLD), None),
           "samples": samples, "leftovers": leftovers}
    if "received" in last:
        n = last["staleness_count"]
        out.update(received=last["received"], dropped_stale=last["dropped_stale"],
                   stale_drop_fraction=last["dropped_stale"] / last["received"] if last["received"] else 0.0,
                   staleness_mean=last["staleness_sum"] / n if n else None,
                   staleness_p50=_quantile(last["staleness_buckets"], 0.5),
                   staleness_p90=_quantile(last["staleness_buckets"], 0.9),
                   staleness_p99=_quantile(last["staleness_buckets"], 0.99))
    return out


def _fmt(v, spec=".1f", none="–"):
    return none if v is None else format(v, spec)


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def markdown(results: list[dict], meta: dict) -> str:
    base = next((r for r in results if r["config"] == "apex"), None)
    lines = [f"Measured {meta['when']} on {meta['cpu']} ({meta['cores']} cores), Python {meta['python']}; "
             f"budget {meta['seconds']:.0f} s per config, {meta['actors']} actors x {meta['num_envs']} envs.", "",
             f"Command: `{meta['command']}`", "",
             "| config | learners | load avg before/after | env steps/s | updates/s | first update s | "
             "mean return over budget | final return (last 3 evals) | best | time to >= 195 s | "
             "staleness mean / p50 / p90 / p99 | stale drops |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        stale = ("0 (synchronous)" if "received" not in r else
                 f"{_fmt(r['staleness_mean'])} / {_fmt(r['staleness_p50'], 'g')} / {_fmt(r['staleness_p90'], 'g')}"
                 f" / {_fmt(r['staleness_p99'], 'g')}")
        drops = "–" if "received" not in r else f"{100 * r['stale_drop_fraction']:.2f} % of {r['received']:.0f}"
        lines.append(f"| {r['config']} | {r['learners']} | {r['load_before']:.1f} / {r['load_after']:.1f} | "
                     f"{r['env_steps_per_s']:.0f} | {r['updates_per_s']:.0f} | {_fmt(r['first_update_s'])} | "
                     f"{r['mean_return_over_time']:.1f} | {_fmt(r['final_return'])} | {_fmt(r['best_return'])} | "
                     f"{_fmt(r['time_to_threshold'])} | {stale} | {drops} |")
    if base is not None:
        lines += ["", "Ratios to the Ape-X run of the same invocation (Gorila / Ape-X):", "",
                  "| config | env steps/s | updates/s | mean return over budget | final return | "
                  "time to >= 195 (lower is better) |", "|---|---|---|---|---|---|"]
        for r in results:
            if r is base:
                continue
            cells = [_ratio(r["env_steps_per_s"], base["env_steps_per_s"]),
                     _ratio(r["updates_per_s"], base["updates_per_s"]),
                     _ratio(r["mean_return_over_time"], base["mean_return_over_time"]),
                     _ratio(r["final_return"], base["final_return"]),
                     _ratio(r["time_to_threshold"], base["time_to_threshold"])]
            lines.append(f"| {r['config']} | " + " | ".join(_fmt(c, ".2f", "n/a") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in results:
        ts, rs = zip(*r["evals"]) if r["evals"] else ((), ())
        axes[0].step(ts, rs, where="post", marker=".", label=f"{r['config']} ({r['learners']} learner(s))")
        axes[1].plot([s["t"] for s in r["samples"]], [s["updates"] for s in r["samples"]], label=r["config"])
        if "received" in r and r["samples"][-1]["staleness_buckets"] and r["samples"][-1]["staleness_buckets"][-1][1]:
            b = r["samples"][-1]["staleness_buckets"]
            les, cum = [le for le, _ in b], [n / b[-1][1] for _, n in b]
            axes[2].step(range(len(les)), cum, where="post", label=r["config"])
            axes[2].set_xticks(range(len(les)), ["inf" if le == float("inf") else f"{le:g}" for le in les])
    axes[0].axhline(THRESHOLD, color="grey", lw=0.5, ls="--")
    axes[0].set(xlabel="wall seconds since launch", ylabel="greedy return (5 episodes)", title="return vs time")
    axes[1].set(xlabel="wall seconds since launch", ylabel="updates applied to the acting network",
                title="updates vs time")
    axes[2].set(xlabel="staleness <= (versions)", ylabel="fraction of gradients", title="Gorila gradient staleness (CDF)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_gorila", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=120.0, help="wall-clock budget per config, from launch")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--learners", type=int, default=2, help="Gorila learners")
    p.add_argument("--only", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override for every config (e.g. run.seed=1)")
    p.add_argument("--sample-every", type=float, default=2.0)
    p.add_argument("--json", default="", help="write every sample and summary here")
    p.add_argument("--markdown", default="", help="write the tables here")
    p.add_argument("--plot", default="", help="PNG: return vs time, updates vs time, staleness CDF (matplotlib)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        p.error(f"--only: unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    for kv in args.set:
        if "=" not in kv or "." not in kv.split("=", 1)[0]:
            p.error(f"--set {kv!r} must look like section.field=value")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib (a bench-only dependency: pip install matplotlib)")
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    tmp = Path(tempfile.mkdtemp(prefix="bench_gorila_"))
    reg = Registry(tmp)
    results = []
    try:
        for name in names:
            log(f"[bench] {name}: {CONFIGS[name]} for {args.seconds:.0f} s (load {os.getloadavg()[0]:.1f})")
            results.append(run_one(reg, name, args, log))
            left = results[-1]["leftovers"]
            if left:
                raise RuntimeError(f"{name} left {left} behind")
    finally:
        left = reg.close()
        if left:
            print(f"[bench] left behind: {left}", file=sys.stderr)
    from apex_local.config import load_config

    meta = {"when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "seconds": args.seconds, "actors": args.actors, "num_envs": load_config(ROOT / CONFIGS["apex"]).env.num_envs,
            "command": "python -m bench.bench_gorila " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))}
    table = markdown(results, meta)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    if args.plot:
        plot(results, Path(args.plot))
        log(f"[bench] plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
