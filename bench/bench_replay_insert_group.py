"""Per-message cost of `Replay.insert_many` against the group size (the replay server's reader
stores up to `INSERT_GROUP` queued messages, at most `INSERT_GROUP_FRAMES` frames, together).

    python -m bench.bench_replay_insert_group [--groups 1,4,8,12,16,24,32] [--messages 2400] [--repeats 3]

Pong-shaped messages (bench_replay.ChunkSource: 50 n-step transitions, 55 new 84x84 frames) into
an in-process prioritized replay of 100k items; the ring is written once first (so no run pays
first-touch page faults), then each repeat inserts ``--messages`` fresh messages of a new actor.
Prints the best repeat's microseconds per message for each group size (the frame cap is raised
to fit the group). In-process, no decoding: the server's reader adds ~0.06 ms per message.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import apex_local.replay.replay as replay_module
from apex_local.api import resolve_config
from apex_local.replay.replay import make_replay
from bench.bench_replay import ChunkSource

FRAMES_PER_MESSAGE = 55


def per_message_us(group: int, messages: int, repeats: int, capacity: int = 100_000) -> float:
    saved = replay_module.INSERT_GROUP_FRAMES
    replay_module.INSERT_GROUP_FRAMES = max(saved, group * FRAMES_PER_MESSAGE + 64)
    try:
        cfg = resolve_config("configs/apex_pong.yaml", [f"replay.capacity={capacity}", "replay.min_size=512",
                                                        "replay.samples_per_insert=0"])
        replay = make_replay(cfg, (84, 84), np.uint8, 4, num_actions=6, rng=np.random.default_rng(0))
        warm = ChunkSource(np.random.default_rng(0))
        for _ in range(0, 2 * capacity // 50, group):
            replay.insert_many([(0, warm.next()) for _ in range(group)])
        best = float("inf")
        for rep in range(repeats):
            src = ChunkSource(np.random.default_rng(rep + 1))
            chunks = [src.next() for _ in range(messages)]
            t0 = time.perf_counter()
            for g in range(0, messages, group):
                replay.insert_many([(rep + 1, c) for c in chunks[g:g + group]])
            best = min(best, time.perf_counter() - t0)
        return 1e6 * best / messages
    finally:
        replay_module.INSERT_GROUP_FRAMES = saved


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", default="1,4,8,12,16,24,32")
    ap.add_argument("--messages", type=int, default=2400)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print("| messages per group | us per message (best of %d) |" % args.repeats)
    print("|---|---|")
    for g in (int(x) for x in args.groups.split(",")):
        print(f"| {g} | {per_message_us(g, args.messages, args.repeats):.0f} |", flush=True)


if __name__ == "__main__":
    main()
