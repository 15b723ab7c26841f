"""Sampler throughput at replay-server scale: ``python -m bench.bench_sampler``.

The replay server's hot loop per learner update is one ``sample(batch)`` plus one
``set_priorities`` for the previous batch (Ape-X, Horgan et al. 2018: 1M-item replay,
batch 512), and per actor message one ``add`` of a chunk (plus, now and then, an
``invalidate`` of items whose frames were overwritten). This times each of those on a full buffer and prints a table.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np

from apex_local.replay.samplers import PrioritizedSampler, UniformSampler
from apex_local.replay.sum_tree import SumTree


def _rate(fn: Callable[[], None], seconds: float) -> tuple[float, int]:
    """Calls per second of ``fn`` over at least ``seconds`` (after a short warm-up)."""
    for _ in range(5):
        fn()
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(20):
            fn()
        n += 20
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed, n


def run(capacity: int, batch: int, chunk: int, seconds: float, seed: int = 0) -> list[tuple[str, float, int]]:
    rng = np.random.default_rng(seed)
    all_idx = np.arange(capacity, dtype=np.int64)
    rows: list[tuple[str, float, int]] = []

    tree = SumTree(capacity)
    t0 = time.perf_counter()
    tree.update(all_idx, rng.random(capacity))
    rows.append((f"SumTree.update all {capacity} leaves (one call)", 1.0 / (time.perf_counter() - t0), 1))
    idx = rng.integers(0, capacity, batch)
    vals = rng.random(batch)
    rows.append((f"SumTree.update {batch}", *_rate(lambda: tree.update(idx, vals), seconds)))
    rows.append((f"SumTree.sample {batch} (stratified)", *_rate(lambda: tree.sample(batch, rng), seconds)))

    per = PrioritizedSampler(capacity, alpha=0.6, priority_eps=1e-6, rng=rng)
    per.add(all_idx, rng.random(capacity))
    td = rng.random(batch) * 2
    rows.append((f"PER sample {batch}", *_rate(lambda: per.sample(batch, 0.4), seconds)))

    def per_cycle() -> None:
        sampled, _ = per.sample(batch, 0.4)
        per.set_priorities(sampled, td)

    rows.append((f"PER sample {batch} + set_priorities {batch}", *_rate(per_cycle, seconds)))
    head = [0]

    def ring_slots() -> np.ndarray:  # the next chunk of slots of a ring buffer
        pos = (head[0] + np.arange(chunk)) % capacity
        head[0] = (head[0] + chunk) % capacity
        return pos

    init = td[:chunk]
    rows.append((f"PER add chunk {chunk} (ring overwrite)", *_rate(lambda: per.add(ring_slots(), init), seconds)))
    rows.append((f"PER invalidate chunk {chunk}", *_rate(lambda: per.invalidate(ring_slots()), seconds)))

    uni = UniformSampler(capacity, rng=rng)
    uni.add(all_idx)

    def uni_cycle() -> None:
        sampled, _ = uni.sample(batch)
        uni.set_priorities(sampled, td)

    rows.append((f"Uniform sample {batch} + set_priorities {batch}", *_rate(uni_cycle, seconds)))
    uni.invalidate(all_idx[: capacity // 2])  # half the slots invalid: rejection sampling
    rows.append((f"Uniform sample {batch}, half invalid", *_rate(lambda: uni.sample(batch), seconds)))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=50, help="items per actor insert message")
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum timing per row")
    args = ap.parse_args(argv)
    rows = run(args.capacity, args.batch, args.chunk, args.seconds)
    print(f"capacity {args.capacity:,}  batch {args.batch}  numpy {np.__version__}")
    width = max(len(name) for name, _, _ in rows)
    print(f"{'operation':<{width}}  {'calls/s':>10}  {'us/call':>9}  {'calls':>7}")
    for name, rate, n in rows:
        print(f"{name:<{width}}  {rate:>10,.0f}  {1e6 / rate:>9,.1f}  {n:>7}")


if __name__ == "__main__":
    main()
