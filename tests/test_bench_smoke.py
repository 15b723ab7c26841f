"""The benchmark suite (`python -m bench`) runs end to end; its numbers are never checked here.

The suite itself is not part of the test run (its numbers go to docs/benchmarks.md). The default
suite runs every part in ``--smoke`` mode (tiny sizes, about 1.5 minutes on 2 cores) on a machine
without the optional peers, which are skipped with a line saying how to install them; the GPU
part is forced onto the CPU (APEX_BENCH_GPU_DEVICE=cpu) so that its code path runs too. The real
quick mode (about 10-15 minutes) is the slow-marked test: `python3 -m pytest -m slow`."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import __main__ as suite  # noqa: E402

SECTIONS = ("replay_peers", "solve", "actors_vs_sim", "apex_scaling", "r2d2_claims", "gpu")


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _installed(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def _check_common(text: str) -> None:
    for name in SECTIONS:
        b, e = suite.marker(name)
        assert b in text and e in text, f"section {name} missing"
    assert "FAILED" not in text, text[:4000]
    for needed in ("Versions:", "Python", "torch", "Machine (at the last write):", "benchmarks_learning.md"):
        assert needed in text, needed


@pytest.mark.timeout(420)
def test_smoke_mode_runs_every_part_and_writes_the_doc(tmp_path):
    doc = tmp_path / "benchmarks.md"
    shm0 = _shm()
    env = dict(os.environ, **{suite.GPU_DEVICE_ENV: "cpu"})
    out = subprocess.run([sys.executable, "-m", "bench", "all", "--smoke", "--doc", str(doc)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    text = doc.read_text()
    _check_common(text)
    # 1. replay: ours in-process (the 1.00x reference) and the replay server across processes
    assert "| apex_local | frames once" in text and "(1.00x)" in text
    assert re.search(r"\| apex_local_server \| [^|]+ \| [\d,]+ \(\d+\.\d\dx\)", text), text
    assert "Replay server CPU per sample+update cycle: server" in text
    # 2. time to solve: our DQN and our Ape-X topology each produced a row
    assert re.search(r"\| dqn \| 0 \| [^|]+ \| [^|]*\d", text) and re.search(r"\| apex_2actors \| 0 \|", text)
    # 3. actors vs simulator: all three sides measured
    for side in suite_sides():
        assert re.search(rf"\| 1 x \d+ \| {re.escape(side)} \| [\d,]+ \|", text), side
    # 4. Ape-X scaling: one actor count measured
    assert re.search(r"\| 1 \| 0 \| [\d,]+ \| \d+\.\d \|", text)
    # 5. R2D2 claims: four agents, Delta Q measured for both recurrent ones
    for agent in ("lstm_stored", "lstm_zero", "ff_1frame", "ff_4frames"):
        assert f"`{agent}`" in text
    assert len(re.findall(r"\| \d\.\d{4} / \d\.\d{4} \|", text)) == 2, text
    # 6. GPU part's code path (on the CPU here): both Pong topologies updated
    assert re.search(r"\| apex \| 1 \| \d+ \| \d+ \| 1\.00 \|", text) and re.search(r"\| r2d2 \| 1 \| \d+ \|", text)
    # missing peers are skipped with how to install them, not a crash
    if not _installed("cpprb"):
        assert "`cpprb` skipped: package `cpprb` not installed" in text and "pip install -e '.[bench]'" in text
    if not _installed("stable_baselines3"):
        assert "| sb3_dqn | 0 | skipped: package `stable-baselines3` not installed" in text
    assert not {n for n in _shm() - shm0 if n.startswith("apex_")}, "shared-memory segments left behind"


def suite_sides() -> tuple[str, ...]:
    from bench.bench_scaling import SIDES
    return tuple(SIDES.values())


def test_gpu_part_without_cuda_says_skipped_and_how_to_run_it(monkeypatch):
    monkeypatch.setattr(suite, "gpu_device", lambda: None)
    text = suite.part_gpu("quick", "stamp", None)
    assert "Skipped: no CUDA device" in text and "`python -m bench gpu`" in text


def test_a_failing_part_is_reported_the_others_kept_and_exit_1(monkeypatch, tmp_path, capsys):
    def boom(mode, stamp, img_dir):
        raise RuntimeError("replay server exited 1")

    def fine(mode, stamp, img_dir):
        return f"## fine\n\n{stamp}\nran in {mode} mode"

    monkeypatch.setattr(suite, "PARTS", {"replay_peers": ("x", boom), "solve": ("y", fine)})
    doc = tmp_path / "b.md"
    doc.write_text("old header\n\n<!-- bench:solve:begin -->\nold solve\n<!-- bench:solve:end -->\n")
    assert suite.main(["all", "--smoke", "--doc", str(doc)]) == 1
    text = doc.read_text()
    assert "**FAILED**" in text and "replay server exited 1" in text
    assert "ran in smoke mode" in text and "old solve" not in text and "old header" not in text
    assert "FAILED parts: replay_peers" in capsys.readouterr().err
    # a rerun of one part replaces its section and keeps the other
    assert suite.main(["solve", "--quick", "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "ran in quick mode" in text and "replay server exited 1" in text


def test_a_part_with_failed_runs_keeps_its_table_and_exits_1(monkeypatch, tmp_path):
    def partly(mode, stamp, img_dir):
        raise suite.PartFailed("## partly\n\n| dqn | 0 | 5,000 |", "apex_2actors seed 0: exited 1")

    monkeypatch.setattr(suite, "PARTS", {"solve": ("y", partly)})
    doc = tmp_path / "b.md"
    assert suite.main(["solve", "--smoke", "--doc", str(doc)]) == 1
    text = doc.read_text()
    assert "| dqn | 0 | 5,000 |" in text and "**FAILED** (in this run): apex_2actors seed 0: exited 1" in text


def test_scaling_claim_pairs_runs_by_seed():
    # hand-computed: 55.9 / 59.4 = 0.94, 80.4 / 67.6 = 1.19, not reached -> cap 300 / 41.9 = 7.16
    runs = [(1, 0, 59.4), (2, 0, 55.9), (1, 1, 67.6), (2, 1, 80.4), (1, 2, 41.9), (2, 2, None)]
    res = {"params": {"cap_s": 300.0}, "summary": [{"actors": 1, "env_steps_ratio": 1.0},
                                                    {"actors": 2, "env_steps_ratio": 1.09}],
           "runs": [{"actors": a, "seed": s, "time_to_threshold": t} for a, s, t in runs]}
    text = suite.scaling_claim("b", res)
    assert "per seed: 0.94, 1.19, 7.16 (1 of 3 seeds faster: no consistent direction)" in text, text
    assert "env steps/s x1.09" in text
    res["runs"] = [{"actors": a, "seed": s, "time_to_threshold": 10.0 if a == 2 else 20.0} for a, s, _ in runs]
    assert "(3 of 3 seeds faster: faster in every seed)" in suite.scaling_claim("a", res)
    res["runs"] = [r for r in res["runs"] if r["actors"] == 1]
    assert suite.scaling_claim("a", res) == ""  # one actor count: nothing to compare


def test_claims_reading_judges_by_the_seed_spread():
    from bench.bench_r2d2_claims import _compare

    assert _compare([250, 300, 280], [40, 42, 41]) == "higher in every seed (ranges do not overlap)"
    assert _compare([10, 20], [30, 40]) == "lower in every seed (ranges do not overlap)"
    assert "overlap" in _compare([150, 430, 190], [220, 180, 270])
    assert _compare([100], [50]) == "one seed: no spread to judge by"


def test_replay_rows_failed_vs_skipped():
    from bench.bench_replay_peers import failures, ok

    rows = [{"impl": "apex_local"}, {"impl": "cpprb", "skipped": "package `cpprb` not installed"},
            {"impl": "torchrl_tensor", "failed": "subprocess failed (exit -9)"}]
    assert [ok(r) for r in rows] == [True, False, False]
    assert failures(rows) == ["torchrl_tensor: subprocess failed (exit -9)"]


def test_cli_errors_name_the_problem():
    for args, msg in ((["nosuchpart"], "unknown part(s) ['nosuchpart']"),
                      (["all", "--quick", "--smoke"], "not allowed with argument")):
        out = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and msg in out.stderr, out.stderr


def test_list_names_the_parts():
    out = subprocess.run([sys.executable, "-m", "bench", "list"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    for name in SECTIONS:
        assert re.search(rf"^{name}\s", out.stdout, re.M), out.stdout


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_quick_mode_runs_end_to_end(tmp_path):
    doc = tmp_path / "benchmarks.md"
    out = subprocess.run([sys.executable, "-m", "bench", "all", "--quick", "--doc", str(doc)], cwd=ROOT,
                         capture_output=True, text=True, timeout=2300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    text = doc.read_text()
    _check_common(text)
    assert "mode: quick" in text


def test_bench_solve_overrides_reach_the_config_and_write_no_doc(monkeypatch, capsys):
    """--set (tuning sweeps) passes overrides to every run and never rewrites the docs page."""
    from bench import bench_solve

    seen = []
    monkeypatch.setattr(bench_solve, "write_doc", lambda text: seen.append("doc"))

    def fake(method, seed, budget, eval_every, episodes, threshold, verbose=True, overrides=()):
        seen.append((seed, overrides))
        return {"method": method, "seed": seed, "budget": budget, "solved": True, "env_steps": 5000, "seconds": 1.0,
                "best_eval": 500.0, "total_steps": 5000, "total_seconds": 1.0, "steps_per_s": 5000.0, "peak_load": 0.1}

    monkeypatch.setattr(bench_solve, "solve_one", fake)
    assert bench_solve.main(["--methods", "dqn", "--seeds", "2", "--first-seed", "4",
                             "--set", "learner.target_update_period=60", "--set", "learner.lr=0.002"]) == 0
    assert seen == [(4, ("learner.target_update_period=60", "learner.lr=0.002")),
                    (5, ("learner.target_update_period=60", "learner.lr=0.002"))]
    assert "| dqn | 5 | 5,000 |" in capsys.readouterr().out


def test_replay_peer_rounds_merge_to_medians_and_keep_failures():
    from bench.bench_replay_peers import merge_rounds

    runs = [{"impl": "cpprb", "fill_per_s": v, "cycles_per_s": c, "load_end": i}
            for i, (v, c) in enumerate([(100.0, 5.0), (300.0, 7.0), (200.0, 6.0)])]
    row = merge_rounds(runs)
    assert (row["fill_per_s"], row["cycles_per_s"], row["rounds"], row["load_end"]) == (200.0, 6.0, 3, 2)
    assert row["fill_per_s_rounds"] == [100.0, 300.0, 200.0]
    failed = merge_rounds([runs[0], {"impl": "cpprb", "failed": "exit 1"}])
    assert failed["failed"] == "exit 1" and "fill_per_s" not in failed
    assert merge_rounds([runs[0]])["fill_per_s"] == 100.0
