"""Replay throughput: insert Ape-X chunks of 84x84 frames, then sample + update priorities.

    python -m bench.bench_replay [--capacity 1000000] [--cycles 300] [--batch 512]

Phase 1 fills (then keeps overwriting) a prioritized Replay (alpha 0.6) with chunks of 50 n-step transitions (k=4,
n=3) from 5 env streams of one actor, as an actor's flush would send them (each frame once,
initial priorities included). Phase 2 runs sample(512, beta=0.4) into a preallocated batch
(as the server does into a shared-memory slot) + update_priorities(512) cycles. Prints
inserts/s (transitions), cycles/s and the peak RSS (resource.getrusage).
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from apex_local.replay.frames import layout_nbytes
from apex_local.replay.replay import Replay
from apex_local.replay.samplers import PrioritizedSampler
from apex_local.replay.tables import TransitionTable

FRAME = (84, 84)
K, N_STEP, STREAMS, PER_STREAM = 4, 3, 5, 10  # 5 streams x 10 = 50 transitions per chunk


class ChunkSource:
    """Synthetic actor: chunk j carries frames 10j+1..10j+10 of every stream (plus seq 0 in the
    first chunk) and the transitions t = 10j-2 .. 10j+7 whose next obs (t+3) is already sent."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.pool = rng.integers(0, 256, (997, *FRAME), dtype=np.uint8)
        self.j = 0
        self.stream = np.repeat(np.arange(STREAMS, dtype=np.int32), PER_STREAM)
        self.rng = rng

    def next(self) -> dict:
        j = self.j
        self.j += 1
        lo = 0 if j == 0 else 10 * j + 1
        seqs = np.arange(lo, 10 * j + 11, dtype=np.int64)
        t = np.tile(np.arange(10 * j - 2, 10 * j + 8, dtype=np.int64), STREAMS)
        obs = t[:, None] + np.arange(-K + 1, 1)
        nxt = obs + N_STEP
        obs[obs < 0] = -1
        nxt[nxt < 0] = -1
        keep = t >= 0
        b = int(keep.sum())
        start = (j * 53) % (self.pool.shape[0] - seqs.size * STREAMS)
        return {"frames": self.pool[start:start + seqs.size * STREAMS],
                "frame_stream": np.repeat(np.arange(STREAMS, dtype=np.int32), seqs.size),
                "frame_seq": np.tile(seqs, STREAMS), "stream": self.stream[keep], "obs_seq": obs[keep],
                "next_seq": nxt[keep], "action": self.rng.integers(0, 6, b), "reward": np.ones(b, np.float32),
                "discount": np.full(b, 0.99 ** N_STEP, np.float32),
                "priority": self.rng.random(b).astype(np.float32)}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", type=int, default=1_000_000)
    ap.add_argument("--cycles", type=int, default=300)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    layout_bytes = layout_nbytes(TransitionTable.layout(args.capacity, FRAME, np.uint8, K))
    print(f"capacity {args.capacity:,} transitions of {K}x84x84 uint8: table layout {layout_bytes / 2**30:.2f} GiB "
          f"({layout_bytes / args.capacity:.0f} B/transition, frames alone {84 * 84} B)")
    table = TransitionTable(args.capacity, FRAME, np.uint8, K, num_actions=6)
    replay = Replay(table, PrioritizedSampler(args.capacity, 0.6, 1e-6, rng), min_size=args.batch)
    src = ChunkSource(rng)

    for phase, count in (("insert (filling, first touch of every page)", args.capacity),
                         ("insert (full ring, overwriting)", max(args.capacity // 5, 50))):
        t0 = time.perf_counter()
        n = 0
        while n < count:
            n += replay.insert(0, src.next())
        dt = time.perf_counter() - t0
        print(f"{phase}: {n:,} transitions in {dt:.1f} s = {n / dt:,.0f} transitions/s "
              f"({n / 50 / dt:,.0f} chunks/s); peak RSS {peak_rss_gib():.2f} GiB")

    out = {key: np.zeros(shape, dt) for key, shape, dt in replay.batch_layout(args.batch)}
    t_sample = t_update = 0.0
    for _ in range(args.cycles):
        t1 = time.perf_counter()
        res = replay.sample(args.batch, beta=0.4, out=out)
        t2 = time.perf_counter()
        replay.update_priorities(res.indices, res.generations, rng.random(args.batch))
        t3 = time.perf_counter()
        t_sample += t2 - t1
        t_update += t3 - t2
    total = t_sample + t_update
    print(f"sample {args.batch} + update {args.batch}: {args.cycles / total:,.1f} cycles/s "
          f"(sample+gather {1e3 * t_sample / args.cycles:.2f} ms, update {1e3 * t_update / args.cycles:.2f} ms; "
          f"{args.batch * args.cycles / total:,.0f} sampled transitions/s)")
    print(f"peak RSS {peak_rss_gib():.2f} GiB; invalidated {replay.invalidated}, stale updates {replay.stale_updates}")


if __name__ == "__main__":
    main()
