"""R2D2 sequence replay throughput: sample 64 sequences + update 64 priorities, at 84x84 frames.

    python -m bench.bench_sequence_replay [--capacity 100000] [--cycles 200] [--mem-fraction 0.6]

The paper's replay (Kapturowski et al. 2019, Table 2): 100k sequences of T = 40 burn-in + 80
learning steps (T + 1 = 121 obs refs each), a new sequence every 40 steps, single 84x84 uint8
frames (frame_stack 1), LSTM state 512 (h and c stored per sequence), prioritized replay
alpha 0.9 / IS exponent beta 0.6, batch 64. Built by ``apex_local.replay.make_replay`` on a
Config, as the local trainer builds it (the replay server passes a shared-memory allocator for
the same arrays), filled with synthetic chunks in the chunk
format of docs/architecture.md (the keys and dtypes ``SequenceAccumulator.flush`` produces):
chunk c of each of 4 env streams carries that stream's 40 new frames (121 in the first chunk)
and the one sequence whose bootstrap obs they complete (obs seqs 40c .. 40c + 120), i.e. 4
sequences per insert message (``actor.flush_every: 4`` in configs/r2d2_pong.yaml).

Frames are stored once, so a sequence costs ``sequence_period`` = 40 new frames (7,056 B each)
plus the ring margin, about 300 KB: 100k sequences need ~30 GB. If the layout does not fit
in ``--mem-fraction`` of MemAvailable, the largest capacity (a multiple of 1,000) that does is
used and the output says so. Phases: fill to capacity (first touch of every page), insert
10 % more (the item ring overwrites, and the frame ring, 1/16 larger, wraps: steady state),
then ``--cycles`` x [sample(64, beta 0.6) into a preallocated batch (as the server does into a
shared-memory slot) + update_priorities(64)]. Prints a markdown table and appends/replaces it
in docs/benchmarks_drqn.md (``--no-doc`` to skip).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import resource
import sys
import time
from pathlib import Path

import numpy as np

from apex_local.config import config_from_dict
from apex_local.replay import make_replay, replay_layout
from apex_local.replay.frames import layout_nbytes

FRAME = (84, 84)
FRAME_BYTES = 84 * 84
STREAMS = 4  # sequences per chunk: one per stream
BURN_IN, LEARN, PERIOD, LSTM, BATCH, NUM_ACTIONS = 40, 80, 40, 512, 64, 6
T = BURN_IN + LEARN
BEGIN, END = "<!-- bench_sequence_replay:begin -->", "<!-- bench_sequence_replay:end -->"


def make_cfg(capacity: int):
    return config_from_dict({
        "run": {"method": "r2d2"},
        "env": {"id": "ALE/Pong-v5", "frame_stack": 1},
        "network": {"torso": "nature_cnn", "lstm_size": LSTM, "dueling": True},
        "replay": {"capacity": capacity, "prioritized": True, "alpha": 0.9, "beta": 0.6, "beta_final": 0.6,
                   "min_size": BATCH, "burn_in": BURN_IN, "sequence_length": LEARN, "sequence_period": PERIOD},
        "learner": {"batch_size": BATCH},
    })


def layout_bytes(capacity: int) -> tuple[int, int]:
    """(total bytes of every array make_replay allocates, bytes of the frame ring)."""
    layout = replay_layout(make_cfg(capacity), FRAME, np.uint8)
    return layout_nbytes(layout), layout_nbytes([x for x in layout if x[0] == "frames"])


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def largest_fitting(requested: int, budget: int) -> int:
    if layout_bytes(requested)[0] <= budget:
        return requested
    lo, hi = 0, requested  # layout bytes grow monotonically with capacity
    while hi - lo > 1000:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if layout_bytes(mid)[0] <= budget else (lo, mid)
    return lo // 1000 * 1000


class ChunkSource:
    """Synthetic R2D2 actor with ``STREAMS`` envs in one endless episode each: chunk c holds, per
    stream, the frames up to seq 40c + 120 not sent before and the sequence starting at 40c."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.pool = rng.integers(0, 256, (4099, *FRAME), dtype=np.uint8)  # 29 MB of distinct frames
        self.rng = rng
        self.c = 0
        self.stream = np.arange(STREAMS, dtype=np.int32)

    def next(self) -> dict:
        c = self.c
        self.c += 1
        lo = 0 if c == 0 else PERIOD * c + T - PERIOD + 1
        seqs = np.arange(lo, PERIOD * c + T + 1, dtype=np.int64)
        f = seqs.size * STREAMS
        start = (c * 97) % (self.pool.shape[0] - f)
        obs = np.tile(PERIOD * c + np.arange(T + 1, dtype=np.int64), (STREAMS, 1))
        rng = self.rng
        return {"frames": self.pool[start:start + f],
                "frame_stream": np.repeat(self.stream, seqs.size), "frame_seq": np.tile(seqs, STREAMS),
                "stream": self.stream, "obs_seq": obs,
                "action": rng.integers(0, NUM_ACTIONS, (STREAMS, T)),
                "reward": rng.standard_normal((STREAMS, T)).astype(np.float32),
                "discount": np.full((STREAMS, T), 0.997, np.float32), "mask": np.ones((STREAMS, T), np.float32),
                "state_h": rng.standard_normal((STREAMS, LSTM)).astype(np.float32),
                "state_c": rng.standard_normal((STREAMS, LSTM)).astype(np.float32),
                "priority": rng.random(STREAMS).astype(np.float32) * 10}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", type=int, default=100_000, help="sequences")
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--mem-fraction", type=float, default=0.6,
                    help="use at most this fraction of MemAvailable (the machine is shared)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks_drqn.md")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    requested = args.capacity
    req_total, req_frames = layout_bytes(requested)
    avail = mem_available()
    budget = int(args.mem_fraction * avail)
    capacity = largest_fitting(requested, budget)
    if capacity < BATCH * 2:
        sys.exit(f"not even {BATCH * 2} sequences fit in {gib(budget)}")
    total, frame_bytes = layout_bytes(capacity)
    cfg = make_cfg(capacity)
    lines = [f"requested {requested:,} sequences (T = {BURN_IN} + {LEARN} = {T}, 84x84 uint8, LSTM {LSTM}): "
             f"layout {gib(req_total)} ({req_frames / requested:,.0f} B/sequence of frames); "
             f"MemAvailable {gib(avail)}, budget {args.mem_fraction:.0%} = {gib(budget)}"]
    if capacity != requested:
        lines.append(f"-> does not fit; using the largest capacity that does: {capacity:,} sequences")
    print("\n".join(lines), flush=True)
    rss0 = peak_rss()
    t0 = time.perf_counter()
    replay = make_replay(cfg, FRAME, np.uint8, num_actions=NUM_ACTIONS, rng=rng)
    frame_cap = replay.table.frame_store.capacity
    src = ChunkSource(rng)
    phases = {}
    for phase, count in (("fill", capacity), ("overwrite", max(capacity // 10, STREAMS))):
        t1 = time.perf_counter()
        n = 0
        while n < count:
            n += replay.insert(0, src.next())
        dt = time.perf_counter() - t1
        phases[phase] = (n, dt)
        print(f"insert ({phase}): {n:,} sequences in {dt:.1f} s = {n / dt:,.0f} sequences/s "
              f"({n * PERIOD * FRAME_BYTES / dt / 2 ** 20:,.0f} MiB/s of new frames); peak RSS {gib(peak_rss())}",
              flush=True)
    out = {key: np.zeros(shape, dt) for key, shape, dt in replay.batch_layout(BATCH)}
    batch_bytes = sum(a.nbytes for a in out.values())
    for _ in range(5):  # warm-up: page in the batch buffers
        res = replay.sample(BATCH, beta=0.6, out=out)
        replay.update_priorities(res.indices, res.generations, rng.random(BATCH) * 10)
    t_sample = t_update = 0.0
    for _ in range(args.cycles):
        t1 = time.perf_counter()
        res = replay.sample(BATCH, beta=0.6, out=out)
        t2 = time.perf_counter()
        replay.update_priorities(res.indices, res.generations, rng.random(BATCH) * 10)
        t3 = time.perf_counter()
        t_sample += t2 - t1
        t_update += t3 - t2
    total_s = t_sample + t_update
    cps = args.cycles / total_s
    rss = peak_rss()
    assert out["obs"].shape == (BATCH, T + 1, 1, *FRAME)
    print(f"sample {BATCH} + update {BATCH}: {cps:,.1f} cycles/s (sample+gather {1e3 * t_sample / args.cycles:.2f} ms, "
          f"update {1e3 * t_update / args.cycles:.2f} ms; {cps * BATCH:,.0f} sequences/s, "
          f"{cps * batch_bytes / 2 ** 30:.2f} GiB/s of batch); peak RSS {gib(rss)}; "
          f"invalidated {replay.invalidated}, stale updates {replay.stale_updates}; total {time.perf_counter() - t0:.0f}s",
          flush=True)

    per_seq_frames = frame_bytes / capacity
    item_bytes = total - frame_bytes
    fill_n, fill_s = phases["fill"]
    ow_n, ow_s = phases["overwrite"]
    note = ("" if capacity == requested else
            f"**{requested:,} sequences do not fit**: their layout is {gib(req_total)} "
            f"({req_total / 1e9:.1f} GB) against {gib(mem_total())} of RAM ({gib(avail)} available when run, "
            f"shared with other jobs; budget {args.mem_fraction:.0%} of available = {gib(budget)}). Measured at "
            f"the largest capacity that fits, **{capacity:,} sequences**. ")
    body = f"""## Sequence replay at R2D2 scale (84x84 frames, T = 120, LSTM 512)

Command: `python -m bench.bench_sequence_replay {' '.join(argv if argv is not None else sys.argv[1:])}`
({_dt.datetime.now().strftime('%Y-%m-%d %H:%M %Z').strip()}). Machine: {machine_line()}.
Replay built by `make_replay` on a Config with `network.lstm_size: 512`, `env.frame_stack: 1`,
burn-in 40 + sequence 80 (T = 120, 121 obs refs), period 40, prioritized α 0.9 / β 0.6, batch 64;
filled with synthetic chunks in the `SequenceAccumulator` format (4 streams, 4 sequences per
chunk, each new frame sent once). Sampling gathers into a preallocated batch, as the replay
server does into a shared-memory slot; the priority update is `Replay.update_priorities(64)`.

{note}Frames are stored once: a sequence references 121 frames but adds only 40 new ones
(`sequence_period`), so the frame ring needs capacity × 40 + T + 1 frames plus a 1/16 + 4,096 margin.

| quantity | value |
|---|---|
| capacity measured | {capacity:,} sequences ({frame_cap:,} frames in the ring) |
| layout bytes (all arrays `make_replay` allocates: frame ring + item columns + PER trees) | {total:,} B = {gib(total)} |
| frame-store bytes per sequence | {per_seq_frames:,.0f} B (40 × 7,056 B = 282,240 B + ring margin) |
| item columns + trees per sequence (refs 968, action 960, reward/discount/mask 1,440, h/c 4,096, generation 8, trees) | {item_bytes / capacity:,.0f} B |
| {requested:,} sequences would need | {req_total:,} B = {gib(req_total)} (frames {gib(req_frames)}) |
| insert, filling (first touch) | {fill_n / fill_s:,.0f} sequences/s ({fill_n * PERIOD * FRAME_BYTES / fill_s / 2 ** 20:,.0f} MiB/s of new frames) |
| insert, full ring (overwriting) | {ow_n / ow_s:,.0f} sequences/s |
| **sample 64 + update 64** | **{cps:,.1f} cycles/s** = {cps * BATCH:,.0f} sequences/s |
| sample + gather 64 (batch {batch_bytes / 2 ** 20:.1f} MiB: obs 64 × 121 × 84 × 84 uint8) | {1e3 * t_sample / args.cycles:.2f} ms |
| update_priorities 64 | {1e3 * t_update / args.cycles:.3f} ms |
| peak RSS (whole process, `ru_maxrss`) | {gib(rss)} (before building the replay: {gib(rss0)}) |
"""
    if not args.no_doc:
        from bench.bench_drqn import DOC, DOC_TITLE, write_section

        write_section(DOC, BEGIN, END, body, DOC_TITLE)
        print(f"written to {DOC}")


def machine_line() -> str:
    from bench.bench_drqn import machine

    return machine()


if __name__ == "__main__":
    main()
