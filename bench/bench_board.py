"""Weights-board benchmark: publish -> read latency across processes, and raw throughput.

    python -m bench.bench_board [--numel 1700000] [--publishes 200] [--interval-ms 20]

A writer (this process) publishes ``--publishes`` versions, one every ``--interval-ms``; a
reader in another process busy-polls ``board.version`` and reads each new version. Reported:

* publish: time of ``publish()`` (seq odd -> copy -> seq even) in the writer;
* read: time of ``read()`` in the reader (copy + finiteness check);
* read-after-publish: from ``publish()`` returning to the reader holding that version;
* end-to-end: from ``publish()`` being called to the reader holding that version;
* throughput: back-to-back publishes, and back-to-back reads, each alone (GB/s of params).

Timestamps are ``time.perf_counter()`` (CLOCK_MONOTONIC on Linux, shared by processes).
Default numel ~ a Nature-CNN Q-network for Atari (1.69M float32 = 6.8 MB).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid

import numpy as np

from apex_local.transport import WeightsBoard, segment_name


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) * 1e3


def _summary(label: str, xs: list[float]) -> str:
    return (f"{label:<20} median {_pct(xs, 50):8.3f} ms   p99 {_pct(xs, 99):8.3f} ms   "
            f"max {_pct(xs, 100):8.3f} ms   (n={len(xs)})")


def reader(name: str, count: int, timeout_s: float) -> None:
    """Busy-poll the board; print one JSON line per version read: [version, t_done, read_s]."""
    board = WeightsBoard.attach(name)
    out = np.empty(board.numel, np.float32)
    print("ready", flush=True)
    last, end = 0, time.perf_counter() + timeout_s
    while last < count and time.perf_counter() < end:
        if board.version <= last:  # cheap poll: one uint64 load
            continue
        t0 = time.perf_counter()
        v = board.read(out, min_version=last)
        t1 = time.perf_counter()
        if v is not None:
            if out[0] != v or out[-1] != v:
                print(json.dumps({"error": f"inconsistent read at version {v}"}), flush=True)
            print(json.dumps([v, t1, t1 - t0]), flush=True)
            last = v
    board.close()


def throughput(board: WeightsBoard, vec: np.ndarray, seconds: float = 1.0) -> tuple[float, float]:
    """(publishes/s, reads/s), each back to back in this process."""
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        n += 1
        board.publish(vec, 1_000_000 + n)
    pubs = n / seconds
    out = np.empty_like(vec)
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        n += 1
        board.read(out, min_version=0)
    return pubs, n / seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--numel", type=int, default=1_693_362)  # Nature CNN torso + 512-unit head, 18 actions
    p.add_argument("--publishes", type=int, default=200)
    p.add_argument("--interval-ms", type=float, default=20.0)
    p.add_argument("--reader", nargs=3, metavar=("NAME", "COUNT", "TIMEOUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reader:
        reader(args.reader[0], int(args.reader[1]), float(args.reader[2]))
        return

    name = segment_name("bench" + uuid.uuid4().hex[:8], "weights")
    board = WeightsBoard.create(name, args.numel)
    vec = np.zeros(args.numel, np.float32)
    timeout = args.publishes * args.interval_ms / 1e3 + 30
    proc = subprocess.Popen([sys.executable, "-m", "bench.bench_board", "--reader", name, str(args.publishes),
                             str(timeout)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", "reader failed to start"
        starts, ends = {}, {}
        for v in range(1, args.publishes + 1):
            vec[:] = v
            t0 = time.perf_counter()
            board.publish(vec, v)
            starts[v], ends[v] = t0, time.perf_counter()
            time.sleep(args.interval_ms / 1e3)
        reads = [json.loads(line) for line in proc.stdout]
        proc.wait(timeout)
    finally:
        proc.kill()
    errors = [r for r in reads if isinstance(r, dict)]
    reads = [r for r in reads if isinstance(r, list)]
    pubs_s, reads_s = throughput(board, vec)
    board.close()

    mb = args.numel * 4 / 1e6
    print(f"weights board: {args.numel} float32 ({mb:.1f} MB), {args.publishes} publishes every "
          f"{args.interval_ms:g} ms, reader in another process")
    print(_summary("publish", [ends[v] - starts[v] for v in ends]))
    print(_summary("read (copy+check)", [r[2] for r in reads]))
    print(_summary("read-after-publish", [r[1] - ends[r[0]] for r in reads]))
    print(_summary("end-to-end", [r[1] - starts[r[0]] for r in reads]))
    print(f"versions seen by the reader: {len(reads)}/{args.publishes}; inconsistent reads: {len(errors)}")
    print(f"throughput: {pubs_s:.0f} publishes/s ({pubs_s * mb / 1e3:.2f} GB/s), "
          f"{reads_s:.0f} reads/s ({reads_s * mb / 1e3:.2f} GB/s)")


if __name__ == "__main__":
    main()
