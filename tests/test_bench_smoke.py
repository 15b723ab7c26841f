"""Smoke test: `python -m bench all --quick` runs end to end and writes its results file.

The benchmark suite itself is never part of the test run (its numbers go to docs/); this only
checks that quick mode works on a machine without the optional peers (they are skipped with a
line saying how to install them) — about 35 s on 2 cores."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_quick_mode_runs_and_writes_the_results_file(tmp_path):
    doc = tmp_path / "peers.md"
    out = subprocess.run([sys.executable, "-m", "bench", "all", "--quick", "--doc", str(doc)], cwd=ROOT,
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = doc.read_text()
    assert "| apex_local | frames once" in text and "(1.00x)" in text, text[:3000]  # our replay was measured
    assert "| dqn |" in text  # time to solve CartPole, our local DQN
    for needed in ("Versions:", "Python", "torch"):
        assert needed in text
    try:
        import cpprb  # noqa: F401
    except ImportError:  # the peer is skipped with a clear line, not a crash
        assert "`cpprb` skipped: package `cpprb` not installed" in text and "pip install -e '.[bench]'" in text


def test_list_names_the_parts():
    out = subprocess.run([sys.executable, "-m", "bench", "list"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "replay_peers" in out.stdout and "solve" in out.stdout, out.stdout
