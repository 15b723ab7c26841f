"""DRQN claim on velocity-masked CartPole: recurrent single frame vs feed-forward 1 and 4 frames.

    python -m bench.bench_drqn [--quick] [--seeds 3] [--steps N] [--eval-every 5000] [--eval-episodes 10]

Hausknecht & Stone 2015 (DRQN) and Kapturowski et al. 2019 (R2D2) claim that a recurrent
Q-network given single frames of a partially observable task does about as well as a
feed-forward one given a stack of frames, and much better than a feed-forward one given a
single frame. Measured here on CartPole-v1 with the velocities dropped (``env.mask_velocity:
true``: observation = [x, theta]), at the same env-step budget, for three agents:

  (a) ``lstm_1frame``  recurrent (LSTM), single frame, R2D2-style loss (burn-in, stored state,
                       prioritized sequence replay): the settings of configs/r2d2_cartpole_masked.yaml
  (b) ``ff_1frame``    feed-forward n-step double DQN, frame_stack 1: configs/dqn_cartpole.yaml
  (c) ``ff_4frames``   the same feed-forward DQN with frame_stack 4

The config settings are copied into this file (``AGENTS``) as of the commit that added it, so
later tuning of configs/*.yaml does not silently change what this benchmark measures. Every
agent is trained with ``train_local`` (single process, ``run.torch_threads 1``) and evaluated
greedily (``actor.eval_epsilon``) every ``--eval-every`` env steps on ``--eval-episodes``
separate episodes. Results (per eval point: env steps, wall seconds, mean return) go to
runs/bench_drqn/results.json after every run; the table and plot (docs/img/drqn_masked_cartpole.png,
needs matplotlib, a bench-only dependency: ``pip install matplotlib``) are written into
docs/benchmarks_drqn.md after every run, so a partial run leaves partial results.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks_drqn.md"
PLOT = ROOT / "docs" / "img" / "drqn_masked_cartpole.png"
RESULTS = ROOT / "runs" / "bench_drqn" / "results.json"
BEGIN, END = "<!-- bench_drqn:begin -->", "<!-- bench_drqn:end -->"

# configs/r2d2_cartpole_masked.yaml (as of this file's commit), copied so config tuning does not move the bench
R2D2_MASKED = {
    "run": {"method": "r2d2"},
    "env": {"id": "CartPole-v1", "frame_stack": 1, "mask_velocity": True, "num_envs": 4},
    "network": {"torso": "mlp", "hidden_sizes": [64], "lstm_size": 64, "head_hidden": 64, "dueling": True},
    "replay": {"capacity": 5000, "prioritized": True, "alpha": 0.9, "beta": 0.6, "min_size": 200, "n_step": 5,
               "gamma": 0.99, "burn_in": 4, "sequence_length": 16, "sequence_period": 8},
    "learner": {"batch_size": 32, "lr": 0.001, "adam_eps": 0.001, "max_grad_norm": 40, "target_update_period": 200,
                "train_every": 4, "value_rescale": False, "priority_eta": 0.9, "stored_state": True},
    "actor": {"exploration": "linear", "eps_start": 1.0, "eps_end": 0.02, "eps_decay_steps": 15000},
}
# configs/dqn_cartpole.yaml (as of this file's commit) on the masked env
DQN = {
    "run": {"method": "dqn"},
    "env": {"id": "CartPole-v1", "num_envs": 1, "frame_stack": 1, "mask_velocity": True},
    "network": {"torso": "mlp", "hidden_sizes": [128, 128], "head_hidden": 0},
    "replay": {"capacity": 50000, "prioritized": False, "min_size": 1000, "n_step": 3, "gamma": 0.99},
    "learner": {"batch_size": 64, "optimizer": "adam", "lr": 0.001, "adam_eps": 0.0001, "max_grad_norm": 10,
                "double_q": True, "target_update_period": 250, "train_every": 1},
    "actor": {"exploration": "linear", "eps_start": 1.0, "eps_end": 0.02, "eps_decay_steps": 10000},
}


def _with(base: dict, **changes: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, fields in changes.items():
        out.setdefault(section, {}).update(fields)
    return out


AGENTS = {  # name -> (label, config dict)
    "lstm_1frame": ("(a) recurrent LSTM, 1 frame (R2D2-style)", R2D2_MASKED),
    "ff_1frame": ("(b) feed-forward DQN, 1 frame", DQN),
    "ff_4frames": ("(c) feed-forward DQN, 4-frame stack", _with(DQN, env={"frame_stack": 4})),
    # supplementary (not part of the default run): (a) replaying as many steps per env step as the DQN
    # agents (batch 32 x 16 learning steps every 8 env steps = 64, DQN: batch 64 every env step)
    "lstm_1frame_rr64": ("(a') recurrent LSTM, 1 frame, DQN's replay ratio",
                         _with(R2D2_MASKED, learner={"train_every": 2})),
}
DEFAULT_AGENTS = ("lstm_1frame", "ff_1frame", "ff_4frames")
SETTINGS = {
    "lstm_1frame": "configs/r2d2_cartpole_masked.yaml: MLP 64 → LSTM 64 → dueling head 64; 4 envs; prioritized "
                   "sequence replay (α 0.9, β 0.6, 5,000 sequences), burn-in 4 + 16 learning steps, period 8, stored "
                   "state, n = 5, batch 32 sequences, one update per 16 env steps (`train_every: 4` vector steps of "
                   "4 envs) = 32 replayed learning steps per env step, target period 200; ε 1 → 0.02 over 15k steps",
    "ff_1frame": "configs/dqn_cartpole.yaml as of before e7e0915 on the masked env: MLP 128-128, 3-step double DQN, uniform replay 50k, "
                 "batch 64, one update per env step (64 replayed transitions per env step), target period 250; "
                 "ε 1 → 0.02 over 10k steps",
    "ff_4frames": "(b) with `env.frame_stack: 4`",
    "lstm_1frame_rr64": "(a) with `learner.train_every: 2`: one update per 8 env steps = 64 replayed learning steps "
                        "per env step, the DQN agents' ratio",
}
COMMON = {"run.torch_threads": 1, "learner.checkpoint_every_seconds": 0, "metrics.enabled": False,
          "run.log_every_seconds": 60}


def set_tag(tag: str) -> None:
    """Results file, plot and doc markers of a tagged run (untagged: the main comparison)."""
    global PLOT, RESULTS, BEGIN, END
    if tag and not re.fullmatch(r"[A-Za-z0-9_-]+", tag):
        raise SystemExit(f"--tag must be [A-Za-z0-9_-]+, got {tag!r}")
    sfx = f"_{tag}" if tag else ""
    PLOT = ROOT / "docs" / "img" / f"drqn_masked_cartpole{sfx}.png"
    RESULTS = ROOT / "runs" / "bench_drqn" / f"results{sfx}.json"
    BEGIN, END = f"<!-- bench_drqn{sfx}:begin -->", f"<!-- bench_drqn{sfx}:end -->"


def _recorded_args(argv: list[str] | None) -> list[str]:
    """The command-line arguments minus the reporting-only ones (--verdict TEXT, --resume)."""
    args, out = list(sys.argv[1:] if argv is None else argv), []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a == "--verdict":
            skip = True
        elif not a.startswith("--verdict=") and a not in ("--resume", "--report-only"):
            out.append(a)
    return out


def make_config(agent: str, seed: int, steps: int, run_dir: str):
    from apex_local.api import resolve_config
    from apex_local.config import config_from_dict

    over = dict(COMMON, **{"run.seed": seed, "run.max_env_steps": steps, "run.dir": run_dir,
                           "run.run_id": f"benchdrqn-{agent}-{seed}".replace("_", "-")})
    return resolve_config(config_from_dict(AGENTS[agent][1]), over)


def run_one(agent: str, seed: int, steps: int, eval_every: int, eval_episodes: int, log) -> dict:
    """Train one agent/seed; returns {evals: [{env_steps, seconds, mean_return, returns}], ...}."""
    import apex_local.agents.local as local

    evals: list[dict] = []
    eval_time = [0.0]
    inner = local.evaluate_policy

    def timed_eval(*a, **kw):  # time spent in greedy evaluation, to report training wall time apart
        t0 = time.monotonic()
        try:
            return inner(*a, **kw)
        finally:
            eval_time[0] += time.monotonic() - t0

    def on_eval(env_steps: int, seconds: float, returns: list) -> None:
        evals.append({"env_steps": int(env_steps), "seconds": round(seconds, 2),
                      "train_seconds": round(seconds - eval_time[0], 2),
                      "mean_return": float(np.mean(returns)), "returns": [float(r) for r in returns]})
        print(f"  [{agent} seed {seed}] {env_steps:>7} steps {seconds:6.0f}s greedy {np.mean(returns):6.1f}",
              file=log, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_drqn_") as tmp:
        cfg = make_config(agent, seed, steps, tmp)
        local.evaluate_policy = timed_eval
        try:
            summary = local.train_local(cfg, eval_every_steps=eval_every, eval_episodes=eval_episodes,
                                        on_eval=on_eval, out=log)
        finally:
            local.evaluate_policy = inner
    return {"agent": agent, "seed": seed, "evals": evals, "wall_seconds": summary["wall_seconds"],
            "eval_seconds": round(eval_time[0], 2), "updates": summary["updates"],
            "env_steps": summary["env_steps"], "episodes": summary["episodes"],
            "nonfinite_losses": summary["nonfinite_losses"], "exit_code": summary["exit_code"]}


# ---------------------------------------------------------------------- reporting
def auc(evals: list[dict]) -> float:
    """Normalised area under the greedy-return curve: trapezoid over env steps from the first
    to the last evaluation, divided by that span (= time-averaged greedy return)."""
    if len(evals) < 2:
        return float(evals[0]["mean_return"]) if evals else float("nan")
    x = np.array([e["env_steps"] for e in evals], float)
    y = np.array([e["mean_return"] for e in evals], float)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def settings_rows(agents: list[str]) -> str:
    return "\n".join(f"| {AGENTS[a][0].split(' ')[0]} `{a}` | {SETTINGS[a]} |" for a in agents)


def table(results: list[dict], seeds: list[int]) -> str:
    lines = ["| agent | " + " | ".join(f"seed {s} final" for s in seeds)
             + " | final mean ± std | AUC mean ± std | updates | wall s (train + eval) per run |",
             "|---|" + "---|" * len(seeds) + "---|---|---|---|"]
    for agent, (label, _) in AGENTS.items():
        runs = {r["seed"]: r for r in results if r["agent"] == agent}
        if not runs:
            continue
        finals = [runs[s]["evals"][-1]["mean_return"] if s in runs and runs[s]["evals"] else None for s in seeds]
        got = [f for f in finals if f is not None]
        aucs = [auc(runs[s]["evals"]) for s in seeds if s in runs]
        walls = [runs[s]["wall_seconds"] for s in seeds if s in runs]
        evs = [runs[s]["eval_seconds"] for s in seeds if s in runs]
        upd = [runs[s]["updates"] for s in seeds if s in runs]
        cells = ["—" if f is None else f"{f:.1f}" for f in finals]
        lines.append(
            f"| {label} | " + " | ".join(cells)
            + f" | **{np.mean(got):.1f} ± {np.std(got):.1f}** | {np.mean(aucs):.1f} ± {np.std(aucs):.1f} "
            f"| {int(np.mean(upd)):,} | {np.mean(walls):.0f} ({np.mean(walls) - np.mean(evs):.0f} + {np.mean(evs):.0f}) |")
    return "\n".join(lines)


def curve_table(results: list[dict]) -> str:
    """Mean greedy return over seeds at every evaluation point (and the mean wall seconds)."""
    steps = sorted({e["env_steps"] for r in results for e in r["evals"]})
    head = "| env steps | " + " | ".join(a for a in AGENTS if any(r["agent"] == a for r in results)) + " |"
    rows = [head, "|---|" + "---|" * (head.count("|") - 2)]
    for st in steps:
        cells = []
        for agent in AGENTS:
            runs = [r for r in results if r["agent"] == agent]
            if not runs:
                continue
            pts = [e for r in runs for e in r["evals"] if e["env_steps"] == st]
            cells.append("—" if not pts else
                         f"{np.mean([p['mean_return'] for p in pts]):.1f} "
                         f"[{min(p['mean_return'] for p in pts):.0f}, {max(p['mean_return'] for p in pts):.0f}] "
                         f"@{np.mean([p['seconds'] for p in pts]):.0f}s")
        rows.append(f"| {st:,} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: list[dict], path: Path, title: str, context: list[dict] | None = None) -> bool:
    """Mean (line) and min..max (band) over seeds vs env steps and vs wall-clock; ``context``
    (other runs, e.g. the main comparison behind a supplementary one) is drawn dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install matplotlib): no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    own = {r["agent"] for r in results}
    series = [(a, lbl, [r for r in results if r["agent"] == a and r["evals"]], "-") for a, (lbl, _) in AGENTS.items()]
    series += [(a, lbl + " [main run]", [r for r in (context or []) if r["agent"] == a and r["evals"]], "--")
               for a, (lbl, _) in AGENTS.items() if a not in own]
    for agent, label, runs, style in series:
        if not runs:
            continue
        n = min(len(r["evals"]) for r in runs)
        x = np.array([e["env_steps"] for e in runs[0]["evals"][:n]])
        y = np.array([[e["mean_return"] for e in r["evals"][:n]] for r in runs])
        t = np.array([[e["seconds"] for e in r["evals"][:n]] for r in runs]).mean(axis=0)
        for ax, xs in ((axes[0], x), (axes[1], t)):
            (line,) = ax.plot(xs, y.mean(axis=0), style, marker="o", ms=3, label=f"{label} (n={len(runs)})")
            ax.fill_between(xs, y.min(axis=0), y.max(axis=0), color=line.get_color(),
                            alpha=0.2 if style == "-" else 0.08)
    axes[0].set_xlabel("env steps")
    axes[1].set_xlabel("wall-clock seconds (mean over seeds, incl. evaluation)")
    for ax in axes:
        ax.set_ylabel("greedy return (mean of eval episodes)")
        ax.set_ylim(0, 520)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title + "\nline: mean over seeds; band: min..max over seeds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def machine() -> str:
    from bench._topo import cpu_model

    cpu = cpu_model()
    try:
        import torch

        tv = torch.__version__
    except ImportError:  # pragma: no cover
        tv = "?"
    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU, shared with other jobs; Python {platform.python_version()}, torch {tv}"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def write_section(doc: Path, begin: str, end: str, body: str, title: str) -> None:
    """Replace the text between ``begin`` and ``end`` in ``doc`` (append the block if absent)."""
    import fcntl

    block = f"{begin}\n{body.rstrip()}\n{end}"
    doc.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / f"{doc.name}.lock", "w") as lock:  # both benches write this doc
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = doc.read_text() if doc.exists() else f"# {title}\n"
        if begin in text and end in text:
            text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        tmp = doc.with_name(doc.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, doc)


DOC_TITLE = "DRQN / R2D2 benchmarks"


def report(results: list[dict], meta: dict, done: bool) -> None:
    seeds = meta["seeds"]
    main_results = ROOT / "runs" / "bench_drqn" / "results.json"
    context = json.loads(main_results.read_text())["results"] if meta.get("tag") and main_results.exists() else None
    have_plot = plot(results, PLOT, f"velocity-masked CartPole-v1, {meta['steps']:,} env steps, "
                                    f"greedy eval every {meta['eval_every']:,} steps x {meta['eval_episodes']} episodes",
                     context)
    status = "complete" if done else f"PARTIAL ({len(results)} of {len(seeds) * len(meta['agents'])} runs done)"
    tagged = bool(meta.get("tag"))
    heading = "DRQN claim: recurrent single frame vs feed-forward on velocity-masked CartPole"
    intro = f"""Claim (Hausknecht & Stone 2015, DRQN; Kapturowski et al. 2019, R2D2): on a partially observable
task a recurrent Q-network fed single frames integrates information over time and does about as
well as a feed-forward one fed a stack of frames, and much better than a feed-forward one fed a
single frame. Task: CartPole-v1 with the velocities dropped (`env.mask_velocity: true`,
observation `[x, theta]`), {meta['steps']:,} env steps per run, seeds {', '.join(map(str, seeds))}."""
    metrics = f"""Final = greedy return (ε = 0.001, mean of {meta['eval_episodes']} episodes) at the last evaluation
({meta['steps']:,} steps). AUC = trapezoidal area under the greedy-return curve from the first to
the last evaluation divided by that span (the time-averaged greedy return; max 500). Wall s =
mean seconds per run, split into training and greedy evaluation (evaluation time grows with the
agent's return, up to 10 × 500 steps)."""
    outro = """**Flickering Pong** (DRQN §6, `configs/drqn_flicker_pong.yaml`: Pong with `env.flicker_prob: 0.5`,
Nature CNN + LSTM 512, 10M env steps per run) needs a GPU (a CNN + LSTM learner on 2 shared CPU cores
would take days); **not measured here**."""
    if tagged:
        heading = f"Supplementary ({meta['tag']}): {', '.join(meta['agents'])}, {meta['steps']:,} env steps"
        intro = (f"Same task, evaluation and metrics as the main comparison; {meta['steps']:,} env steps per run, "
                 f"greedy evaluation every {meta['eval_every']:,} steps, seeds {', '.join(map(str, seeds))}.")
        metrics = outro = ""
    body = f"""## {heading}

Status: **{status}**. Command: `{meta['command']}` (git {meta['rev']}, started {meta['date']}).
Machine: {meta['machine']}. Each run is one process, `run.torch_threads: 1`; runs are sequential.

{intro}

| agent | settings (copied into `bench/bench_drqn.py`, `AGENTS`) |
|---|---|
{settings_rows(meta['agents'])}

{metrics}

{table(results, seeds)}

{f'![greedy return vs env steps and wall-clock](img/{PLOT.name})' if have_plot else '(no plot: matplotlib missing)'}

Mean greedy return over seeds [min, max] @ mean wall seconds, at each evaluation:

{curve_table(results)}

{meta.get('verdict', '')}

{outro}
"""
    body = re.sub(r"\n{3,}", "\n\n", body)
    write_section(DOC, BEGIN, END, body, DOC_TITLE)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 seed, 6,000 steps, eval every 2,000 x 3; tag 'quick', no doc")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks_drqn.md or the plot")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20_000, help="env steps per run (same for every agent)")
    ap.add_argument("--eval-every", type=int, default=2_500)
    ap.add_argument("--eval-episodes", type=int, default=10)
    ap.add_argument("--agents", default=",".join(DEFAULT_AGENTS), help="comma-separated, from " + ",".join(AGENTS))
    ap.add_argument("--resume", action="store_true", help="keep finished runs from runs/bench_drqn/results.json")
    ap.add_argument("--verdict", default="", help="text appended below the tables (the human reading of the result)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the doc/plot from results.json, train nothing")
    ap.add_argument("--tag", default="", help="separate results file, plot and doc section (e.g. a longer budget)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.eval_episodes = 1, 6_000, 2_000, 3
        args.tag, args.no_doc = args.tag or "quick", True
    set_tag(args.tag)
    agents = [a for a in args.agents.split(",") if a]
    unknown = set(agents) - set(AGENTS)
    if unknown:
        ap.error(f"unknown agents {sorted(unknown)}; choose from {', '.join(AGENTS)}")
    seeds = list(range(args.seeds))
    meta = {"command": " ".join(["python -m bench.bench_drqn", *_recorded_args(argv)]), "tag": args.tag,
            "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M %Z").strip(), "machine": machine(),
            "rev": git_rev(), "seeds": seeds, "steps": args.steps, "eval_every": args.eval_every,
            "eval_episodes": args.eval_episodes, "verdict": args.verdict, "agents": agents}
    results: list[dict] = []
    if (args.resume or args.report_only) and RESULTS.exists():
        saved = json.loads(RESULTS.read_text())
        results = saved["results"]
        if args.report_only:
            meta = dict(saved["meta"], verdict=args.verdict or saved["meta"].get("verdict", ""))
            report(results, meta, done=len(results) == len(meta["seeds"]) * len(meta["agents"]))
            print(table(results, meta["seeds"]))
            return
        meta["date"] = saved["meta"]["date"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    for seed in seeds:  # seed-major: after each seed, every agent has the same number of runs
        for agent in agents:
            if any(r["agent"] == agent and r["seed"] == seed for r in results):
                continue
            print(f"== {agent} seed {seed} ({args.steps:,} steps) t={time.monotonic() - t0:.0f}s", flush=True)
            res = run_one(agent, seed, args.steps, args.eval_every, args.eval_episodes, sys.stdout)
            print(f"== {agent} seed {seed}: final {res['evals'][-1]['mean_return'] if res['evals'] else 'n/a'} "
                  f"in {res['wall_seconds']:.0f}s ({res['updates']} updates)", flush=True)
            results.append(res)
            RESULTS.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
            if not args.no_doc:
                report(results, meta, done=False)
    done = all(any(r["agent"] == a and r["seed"] == s for r in results) for a in agents for s in seeds)
    if not args.no_doc:
        report(results, meta, done=done)
    print(table(results, seeds))
    print(f"total {time.monotonic() - t0:.0f}s; results {RESULTS.relative_to(ROOT)}"
          + ("" if args.no_doc else f", doc {DOC.relative_to(ROOT)}, plot {PLOT.relative_to(ROOT)}"))


if __name__ == "__main__":
    main()
