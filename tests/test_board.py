"""Weights board: seqlock reads across processes, non-finite refusal, writer restart, PUB/SUB."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from apex_local.config import TransportConfig
from apex_local.transport import ShmError, WeightsBoard, WeightsPublisher, WeightsSubscriber, new_context, segment_name
from apex_local.transport.shm import SHM_DIR, Segment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def name():
    n = segment_name("t" + uuid.uuid4().hex[:10], "weights")
    yield n
    Path(SHM_DIR, n).unlink(missing_ok=True)


def test_publish_read_and_min_version(name):
    with WeightsBoard.create(name, 10) as board:
        reader = WeightsBoard.attach(name)
        out = np.zeros(10, np.float32)
        assert reader.version == 0 and reader.read(out) is None
        board.publish(np.arange(10, dtype=np.float32), version=3)
        assert reader.version == 3
        assert reader.read(out) == 3 and np.array_equal(out, np.arange(10))
        assert reader.read(out, min_version=3) is None  # nothing newer
        board.publish(np.ones(10), version=4)
        assert reader.read(out, min_version=3) == 4 and (out == 1).all()
        with pytest.raises(ValueError, match="10"):
            board.publish(np.ones(11), version=5)
        with pytest.raises(ValueError, match="version"):
            board.publish(np.ones(10), version=0)
        reader.close()


def test_publish_torch_tensor(name):
    torch = pytest.importorskip("torch")
    with WeightsBoard.create(name, 6) as board:
        board.publish(torch.arange(6, dtype=torch.float32).reshape(2, 3), version=1)
        out = np.zeros(6, np.float32)
        assert board.read(out) == 1 and np.array_equal(out, np.arange(6))


def test_nonfinite_params_are_refused(name):
    with WeightsBoard.create(name, 8) as board:
        reader = WeightsBoard.attach(name)
        out = np.zeros(8, np.float32)
        bad = np.ones(8, np.float32)
        bad[5] = np.nan
        board.publish(bad, version=2)
        assert reader.read(out) is None and reader.stats["nonfinite"] == 1
        assert reader.read(out) is None and reader.stats["nonfinite"] == 1  # not re-read until a new version
        board.publish(np.full(8, np.inf, np.float32), version=3)
        assert reader.read(out) is None and reader.stats["nonfinite"] == 2
        board.publish(np.full(8, 2.0, np.float32), version=4)
        assert reader.read(out) == 4 and (out == 2).all()
        reader.close()


def test_reader_follows_a_restarted_writer(name):
    first = WeightsBoard.create(name, 4)
    first.publish(np.ones(4), version=7)
    reader = WeightsBoard.attach(name)
    out = np.zeros(4, np.float32)
    assert reader.read(out) == 7
    first.close()
    second = WeightsBoard.create(name, 4)  # the learner restarted from a checkpoint at version 5
    second.publish(np.full(4, 5.0), version=5)
    assert reader.read(out, min_version=7) is None  # callers ignore versions going backwards
    assert reader.stats["reattached"] == 1
    second.publish(np.full(4, 8.0), version=8)
    assert reader.read(out, min_version=7) == 8 and (out == 8).all()
    reader.close()
    second.close()


def test_attach_rejects_other_segments(name):
    with Segment.create(name, 128):
        with pytest.raises(ShmError, match="not a weights board"):
            WeightsBoard.attach(name)


WRITER = """
import random, sys, time, numpy as np
from apex_local.transport import WeightsBoard
board = WeightsBoard.create(sys.argv[1], int(sys.argv[2]))
vecs = [np.zeros(board.numel, np.float32), np.zeros(board.numel, np.float32)]
print("ready", flush=True)
end, v = time.monotonic() + float(sys.argv[3]), 0
while time.monotonic() < end:
    v += 1
    vec = vecs[v % 2]
    vec[:] = v                     # all elements == version; consecutive versions alternate buffers
    board.publish(vec, v)
    if v % 2:                      # short random gaps, so reads both collide and complete
        time.sleep(random.random() * 3e-4)
print(v, flush=True)
board.close()
"""


def test_seqlock_no_torn_reads_across_processes(name):
    numel = 1 << 18
    writer = subprocess.Popen([sys.executable, "-c", WRITER, name, str(numel), "2.5"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        board = WeightsBoard.attach(name)
        out = np.zeros(numel, np.float32)
        last, reads, end = 0, 0, time.monotonic() + 2.0
        while time.monotonic() < end:
            v = board.read(out, min_version=last)
            if v is None:
                continue
            assert v > last
            lo, hi = out.min(), out.max()
            assert lo == hi == v, f"torn read: version {v}, values in [{lo}, {hi}]"
            last, reads = v, reads + 1
        published = int(writer.stdout.readline())
        assert writer.wait(10) == 0
        board.close()
    finally:
        writer.kill()
        writer.wait()
    assert reads > 20 and published > reads, (reads, published, board.stats)
    print(f"\n{reads} consistent reads of {published} versions; reader stats {board.stats}")


def test_pub_sub_variant():
    tcfg = TransportConfig()
    ctx = new_context()
    with tempfile.TemporaryDirectory(prefix="apx") as d:
        endpoint = f"ipc://{d}/weights.sock"
        pub = WeightsPublisher(ctx, endpoint, tcfg, numel=5)
        sub = WeightsSubscriber(ctx, endpoint, tcfg, numel=5)
        out = np.zeros(5, np.float32)
        got, deadline = None, time.monotonic() + 5
        while got is None and time.monotonic() < deadline:  # slow joiner: publish until it arrives
            pub.publish(np.full(5, 3.0), version=3)
            time.sleep(0.01)
            got = sub.read(out)
        assert got == 3 and (out == 3).all()
        pub.publish(np.full(5, np.nan), version=4)
        time.sleep(0.05)
        assert sub.read(out, min_version=3) is None and sub.stats["rejected"] >= 1
        pub.close()
        sub.close()
    ctx.term()
