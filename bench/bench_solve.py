"""Time to solve CartPole-v1 with the single-process trainer (local DQN and Rainbow).

    python -m bench.bench_solve [--quick] [--seeds 3] [--methods dqn,rainbow] [--budget N] [--no-doc]
    python -m bench.bench_solve --methods dqn --seeds 12 --budget 40000 --set learner.target_update_period=125

For each method and seed: ``train_local`` on ``configs/<method>_cartpole.yaml`` (seed set, run
dir in a temp folder), a greedy evaluation of ``--episodes`` (10) games every ``--eval-every``
(5000) env steps, stopping at the first whose mean return is >= ``--threshold`` (475, the
CartPole-v1 "solved" level). Reports the env steps and wall seconds (training + the periodic
evaluations) at that point, or 'not solved within budget'.

Prints a markdown table and, in full mode (unless ``--no-doc``), replaces the
"Time to solve CartPole-v1" section of docs/benchmarks_learning.md with it, the exact command, the date
and the machine. ``--quick`` (1 seed, 25k-step budget) is a smoke run and writes no doc unless
``--doc`` is given.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks_learning.md"
DOC_HEADER = ("# Learning benchmarks (single process)\n\nEach figure measured on this machine, command given.\n")
BEGIN, END = "<!-- bench_solve:begin -->", "<!-- bench_solve:end -->"
CONFIGS = {"dqn": "configs/dqn_cartpole.yaml", "rainbow": "configs/rainbow_cartpole.yaml"}
# Env-step budgets per method (full mode): several times the steps the tuned configs need.
BUDGETS = {"dqn": 50_000, "rainbow": 60_000}
QUICK_BUDGET = 25_000


def solve_one(method: str, seed: int, budget: int, eval_every: int, episodes: int, threshold: float,
              verbose: bool = True, overrides: tuple[str, ...] = ()) -> dict:
    """One seeded run until solved or ``budget`` env steps; returns a result row.
    ``overrides``: extra ``key=value`` config overrides (``--set``, for tuning sweeps)."""
    from apex_local.agents.local import train_local
    from apex_local.api import resolve_config

    with tempfile.TemporaryDirectory(prefix="apex-bench-solve-") as tmp:
        cfg = resolve_config(ROOT / CONFIGS[method],
                             [f"run.seed={seed}", f"run.max_env_steps={budget}", f"run.dir={tmp}",
                              "run.log_every_seconds=0", "learner.checkpoint_every_seconds=0", *overrides])

        loads = [os.getloadavg()[0]]

        def on_eval(steps: int, seconds: float, returns: list) -> None:
            loads.append(os.getloadavg()[0])
            if verbose:
                print(f"  {method} seed={seed} steps={steps} t={seconds:.0f}s greedy mean={np.mean(returns):.1f}",
                      file=sys.stderr, flush=True)

        summary = train_local(cfg, eval_every_steps=eval_every, eval_episodes=episodes, on_eval=on_eval,
                              stop_on_return=threshold, out=open(os.devnull, "w"))
    solved = summary["solved"]
    best = max((e["mean_return"] for e in summary["evaluations"]), default=float("nan"))
    return {"method": method, "seed": seed, "budget": budget, "solved": solved is not None,
            "env_steps": solved["env_steps"] if solved else None,
            "seconds": round(solved["seconds"], 1) if solved else None,
            "best_eval": best, "total_steps": summary["env_steps"], "total_seconds": summary["wall_seconds"],
            "steps_per_s": summary["env_steps"] / max(summary["wall_seconds"], 1e-9), "peak_load": max(loads)}


def table(rows: list[dict]) -> str:
    lines = ["| method | seed | env steps to solve | wall seconds | best greedy mean (10 ep.) "
             "| env steps/s (incl. evals) | peak load (1 min) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["solved"]:
            steps, secs = f"{r['env_steps']:,}", f"{r['seconds']:.0f}"
        else:
            steps, secs = f"not solved within budget ({r['budget']:,})", f"({r['total_seconds']:.0f})"
        lines.append(f"| {r['method']} | {r['seed']} | {steps} | {secs} | {r['best_eval']:.1f} "
                     f"| {r['steps_per_s']:.0f} | {r['peak_load']:.1f} |")
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ok = [r for r in mine if r["solved"]]
        if ok:
            lines.append(f"| {method} | median of solved ({len(ok)}/{len(mine)}) | "
                         f"{int(np.median([r['env_steps'] for r in ok])):,} | "
                         f"{np.median([r['seconds'] for r in ok]):.0f} | | | |")
    return "\n".join(lines)


def machine() -> str:
    from bench._topo import cpu_model

    cpu = cpu_model()
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def section(rows: list[dict], command: str, args, started: dt.datetime, load: tuple, load_end: tuple) -> str:
    return "\n".join([
        BEGIN,
        "## Time to solve CartPole-v1 (single process)",
        "",
        f"Command: `{command}`  ",
        f"Date: {started:%Y-%m-%d %H:%M} UTC  ",
        f"Machine: {machine()}  ",
        f"Load average (1 min) at start / end: {load[0]:.1f} / {load_end[0]:.1f}; per run, the peak "
        "sampled at its evaluations (shared machine: wall seconds and env steps/s scale with load, "
        "env steps to solve do not, the runs are deterministic per seed)",
        "",
        f"Solved = greedy (epsilon {0.001}) mean return >= {args.threshold:g} over {args.episodes} episodes, "
        f"checked every {args.eval_every:,} env steps; wall seconds include the periodic evaluations. "
        f"Configs: {', '.join(f'`{CONFIGS[m]}`' for m in args.methods)}.",
        "",
        table(rows),
        END,
    ])


def write_doc(text: str, path: Path = DOC) -> None:
    """Replace the bench_solve section of ``path`` (or append it; create the file with its header)."""
    old = path.read_text() if path.is_file() else DOC_HEADER
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"1 seed, {QUICK_BUDGET:,}-step budget, no doc")
    p.add_argument("--seeds", type=int, default=None, help="N seeds from --first-seed (default 3, quick 1)")
    p.add_argument("--methods", default="dqn,rainbow", help="comma list of: " + ", ".join(CONFIGS))
    p.add_argument("--budget", type=int, default=None, help="env steps per run (default per method)")
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--threshold", type=float, default=475.0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run (repeatable; e.g. learner.target_update_period=60): "
                        "tuning sweeps; implies --no-doc")
    p.add_argument("--first-seed", type=int, default=0, help="seeds first..first+N-1")
    p.add_argument("--doc", action="store_true", help="write docs/benchmarks_learning.md even with --quick")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks_learning.md")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in CONFIGS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(CONFIGS)}")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    command = "python -m bench.bench_solve " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    started = dt.datetime.now(dt.timezone.utc)
    load = os.getloadavg()

    rows = []
    for method in args.methods:
        budget = args.budget or (QUICK_BUDGET if args.quick else BUDGETS[method])
        for seed in range(args.first_seed, args.first_seed + seeds):
            t0 = time.monotonic()
            rows.append(solve_one(method, seed, budget, args.eval_every, args.episodes, args.threshold,
                                  overrides=tuple(args.overrides)))
            print(f"[bench_solve] {method} seed {seed}: "
                  + (f"solved at {rows[-1]['env_steps']} steps, {rows[-1]['seconds']:.0f}s" if rows[-1]["solved"]
                     else f"not solved in {budget} steps (best {rows[-1]['best_eval']:.1f})")
                  + f" [{time.monotonic() - t0:.0f}s]", file=sys.stderr, flush=True)
    text = section(rows, command.strip(), args, started, load, os.getloadavg())
    print(table(rows))
    if (not args.quick or args.doc) and not args.no_doc and not args.overrides:
        write_doc(text)
        print(f"[bench_solve] wrote {DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
