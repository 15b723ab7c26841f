"""Benchmarks against peers: one command for the parts that exist.

    python -m bench list                      # the parts
    python -m bench all [--quick]             # every part; writes docs/benchmarks_peers.md + docs/img/peers_*.png
    python -m bench PART [PART ...] [--quick] # some parts (their sections of the doc are replaced, others kept)

Options: ``--quick`` (small sizes: about 2-4 minutes on 2 idle cores), ``--doc PATH`` (write the
results there instead of docs/benchmarks_peers.md), ``--no-doc`` (print only).

Peers (cpprb, torchrl) and matplotlib are the optional ``bench`` extra, never runtime
dependencies: ``pip install -e '.[bench]'``. A part whose peer is missing reports which
package and how to install it, and the rest still runs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks_peers.md"


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def machine() -> str:
    from bench._topo import cpu_model

    cpu, mem = cpu_model(), "?"
    try:
        kib = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal:"))
        mem = f"{kib / 2**20:.1f} GiB RAM"
    except (OSError, StopIteration):
        pass
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "torch not installed"
    return f"{cpu}, {os.cpu_count()} CPU cores, {mem}, {gpu}, {platform.system()} {platform.release()}"


def versions() -> str:
    import numpy
    parts = [f"Python {platform.python_version()}", f"numpy {numpy.__version__}"]
    parts += [f"{p} {_version(p)}" for p in ("torch", "cpprb", "torchrl", "tensordict", "matplotlib")]
    return ", ".join(parts)


# ------------------------------------------------------------------ parts
def part_replay_peers(quick: bool, stamp: str, img_dir: Path | None) -> str:
    from bench import bench_replay_peers as brp

    p = brp.QUICK if quick else brp.FULL
    rows = brp.run(quick=quick)
    img = brp.plot(rows, img_dir / "peers_replay.png") if img_dir else None
    print(brp.table(rows))
    plot_line = (f"![replay vs peers](img/{img.name})" if img else
                 "(no plot: matplotlib not installed (`pip install -e '.[bench]'`) or --no-doc)")
    return "\n".join([
        "## Prioritized replay vs cpprb and TorchRL (in-process)",
        "",
        stamp,
        f"Part command: `python -m bench.bench_replay_peers{' --quick' if quick else ''}` "
        "(each implementation in its own subprocess, one after the other)",
        "",
        f"Workload: capacity {p['capacity']:,} transitions of k=4 stacked 84x84 uint8 frames (n=3); insert "
        f"in chunks of 50 until full, then a fifth of the capacity more (ring full, overwriting); then "
        f"{p['cycles']} x (sample 512 with alpha 0.6, beta 0.4 + update 512 priorities). Only the library "
        "calls are timed. In parentheses: the ratio to `apex_local` of this same run (peer / ours; "
        "> 1 = the peer inserts or samples faster, or uses more memory). Peak RSS is the subprocess's "
        "maximum RSS, imports included (the RSS before the buffer was built is in parentheses after the ratio).",
        "",
        brp.table(rows),
        "",
        reading(rows),
        "",
        f"Full mode (capacity 1M): the per-transition layouts need {2 * brp.STACK_BYTES * 1e6 / 2**30:.1f} GiB; "
        "a RAM storage that does not fit in MemAvailable is skipped with that reason (TorchRL's memmap "
        "storage goes to a temp file on disk instead).",
        "",
        "Layouts: `apex_local` stores every frame once and rebuilds the stacks when sampling (into a "
        "preallocated batch, as the replay server does into a shared-memory slot). `cpprb` and `torchrl_*` "
        "store the obs and next-obs stacks per transition (56,448 B/transition): what a generic buffer "
        "needs for n-step transitions from interleaved env streams, and how TorchRL's DQN Atari example "
        "stores them. `cpprb_compressed` is cpprb's Atari memory mode (`next_of` + `stack_compress`): it "
        "assumes one env stream added in order and a 1-step next observation, so it cannot hold the Ape-X "
        "actors' n-step transitions from 5 interleaved streams; it is fed one stream's 1-step transitions "
        "and shown for its memory and speed, not as an equivalent store.",
        "",
        plot_line,
    ])


def reading(rows: list[dict]) -> str:
    """One line per peer: its ratios to ours in words (faster / slower, more / less memory)."""
    out = []
    for r in rows:
        if r["impl"] == "apex_local" or "skipped" in r or "cycles_per_s_ratio" not in r:
            continue
        def word(x, more="faster", less="slower"):
            return f"{x:.2f}x ours ({more})" if x >= 1 else f"{x:.2f}x ours ({less}: ours is {1 / x:.2f}x)"
        out.append(f"- `{r['impl']}`: inserts (filling) {word(r['fill_per_s_ratio'])}; sample + update "
                   f"{word(r['cycles_per_s_ratio'])}; peak RSS {word(r['peak_rss_gib_ratio'], 'more', 'less')}.")
    return "Reading (this run):\n\n" + "\n".join(out) if out else "No peer ran in this run."


def part_solve(quick: bool, stamp: str, img_dir: Path | None) -> str:
    from bench import bench_solve as bs

    methods, seeds = (["dqn"], 1) if quick else (["dqn", "rainbow"], 3)
    rows = []
    for m in methods:
        for seed in range(seeds):
            budget = bs.QUICK_BUDGET if quick else bs.BUDGETS[m]
            rows.append(bs.solve_one(m, seed, budget, 5000, 10, 475.0))
    print(bs.table(rows))
    cmd = ("python -m bench.bench_solve --quick --methods dqn --no-doc" if quick else
           "python -m bench.bench_solve --seeds 3 --methods dqn,rainbow --no-doc")
    return "\n".join([
        "## Time to solve CartPole-v1, single-process DQN (ours only so far)",
        "",
        stamp,
        f"Part command: `{cmd}`",
        "",
        "Solved = greedy (epsilon 0.001) mean return >= 475 over 10 episodes, checked every 5,000 env "
        "steps; wall seconds include the periodic evaluations. No peer DQN is measured yet: this row is "
        "the baseline the peer comparison (issue 'Benchmarks against peers') will be a ratio to.",
        "",
        bs.table(rows),
    ])


PARTS = {
    "replay_peers": ("prioritized replay (ours, in-process) vs cpprb and TorchRL: inserts/s, "
                     "sample+update cycles/s, peak RSS; needs cpprb / torchrl (bench extra)", part_replay_peers),
    "solve": ("time to solve CartPole-v1 with our single-process DQN (quick: 1 seed; full: "
              "DQN + Rainbow, 3 seeds); no peer yet", part_solve),
}


def marker(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def write_doc(path: Path, sections: dict[str, str], header: str) -> None:
    """Header regenerated; each part's section replaced, sections of parts not run kept."""
    old = path.read_text() if path.is_file() else ""
    kept = {}
    for name in PARTS:
        b, e = marker(name)
        m = re.search(re.escape(b) + r"\n(.*?)\n" + re.escape(e), old, re.S)
        if m:
            kept[name] = m.group(1)
    kept.update(sections)
    body = [header]
    for name in PARTS:
        if name in kept:
            b, e = marker(name)
            body += ["", b, kept[name], e]
    path.write_text("\n".join(body) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", help="'list', 'all', or part names: " + ", ".join(PARTS))
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes on 2 cores)")
    ap.add_argument("--doc", type=Path, default=DOC, help=f"results file (default {DOC.relative_to(ROOT)})")
    ap.add_argument("--no-doc", action="store_true", help="print only, write no file")
    args = ap.parse_args(argv)
    if args.parts == ["list"]:
        for name, (desc, _) in PARTS.items():
            print(f"{name:14s} {desc}")
        return 0
    names = list(PARTS) if args.parts == ["all"] else args.parts
    bad = [n for n in names if n not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {bad}; `python -m bench list` lists them")

    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    sections = {}
    for name in names:
        started = dt.datetime.now(dt.timezone.utc)
        load = os.getloadavg()
        t0 = time.monotonic()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        stamp_tmpl = (f"Date: {started:%Y-%m-%d %H:%M} UTC; mode: {'quick' if args.quick else 'full'}; "
                      f"command: `{command}`  \nLoad average (1/5/15 min) at start: "
                      + "/".join(f"{x:.1f}" for x in load) + " (shared 2-core machine: throughput scales with load)  ")
        sections[name] = PARTS[name][1](args.quick, stamp_tmpl, None if args.no_doc else args.doc.parent / "img")
        print(f"[bench] {name} done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)

    if not args.no_doc:
        header = "\n".join([
            "# Benchmarks against peers",
            "",
            "Written by `python -m bench all [--quick]` (`python -m bench list` lists the parts); each "
            "section gives its date, mode, command and load average. Peers are the optional `bench` extra: "
            "`pip install -e '.[bench]'`.",
            "",
            f"Machine (at the last write): {machine()}  ",
            f"Versions: {versions()}  ",
            f"Last written: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by `{command}`",
        ])
        write_doc(args.doc, sections, header)
        print(f"[bench] wrote {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
