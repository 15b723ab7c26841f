"""Python API and CLI end to end with tiny budgets (each run a few hundred env steps).

Covers: ``apex_local.train`` from a YAML path and from (method, env_id); ``apex_local.evaluate``;
``apex-local train --local`` / ``eval --json`` / ``envs`` as real subprocesses; exit 2 for
``train`` without ``--local``; checkpoints written under ``run.dir``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import apex_local
from apex_local.agents.checkpoint import CHECKPOINT_NAME, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DQN = ROOT / "configs" / "dqn_cartpole.yaml"

# Just enough steps that sampling starts and a few updates run.
TINY = ["run.max_env_steps=200", "replay.min_size=32", "learner.batch_size=16",
        "learner.checkpoint_every_seconds=0", "run.log_every_seconds=0"]
# Recurrent: short sequences so a few are stored in 200 steps.
TINY_SEQ = ["replay.burn_in=2", "replay.sequence_length=8", "replay.sequence_period=4",
            "replay.min_size=8", "replay.capacity=256", "learner.batch_size=4", "env.num_envs=2"]


def _entry_point() -> list[str]:
    """The installed ``apex-local`` console script of this interpreter (not a pyenv shim, which
    adds seconds per call), else the module it runs."""
    script = Path(sys.executable).parent / "apex-local"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("apex-local")
    return [found] if found else [sys.executable, "-m", "apex_local.cli"]


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("APEX_CONFIG", None)
    env.pop("APEX_RUN_ID", None)
    return subprocess.run([*_entry_point(), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _last_json(stdout: str) -> dict:
    """The CLI prints status lines, then one JSON object as its last line."""
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


def _check_summary(summary: dict, run_dir: Path, max_steps: int = 200) -> None:
    assert summary["exit_code"] == 0
    assert summary["env_steps"] >= max_steps
    assert summary["updates"] > 0, "training never sampled a batch"
    assert summary["nonfinite_losses"] == 0
    ckpt = Path(summary["checkpoint"])
    assert ckpt == run_dir / CHECKPOINT_NAME and ckpt.is_file()
    state = load_checkpoint(run_dir)  # a run directory resolves to its checkpoint
    assert state["env_steps"] == summary["env_steps"]


@pytest.fixture(scope="module")
def dqn_run(tmp_path_factory):
    """One tiny DQN run shared by the evaluate tests."""
    run_dir = tmp_path_factory.mktemp("dqn") / "run"
    summary = apex_local.train(str(DQN), TINY + [f"run.dir={run_dir}"])
    return run_dir, summary


def test_train_from_yaml_returns_summary_with_checkpoint(dqn_run):
    run_dir, summary = dqn_run
    _check_summary(summary, run_dir)
    assert summary["evaluations"] == [] and summary["solved"] is None


def test_evaluate_returns_mean_and_episodes(dqn_run):
    run_dir, summary = dqn_run
    for where in (summary["checkpoint"], run_dir):  # file or run directory
        result = apex_local.evaluate(str(DQN), where, episodes=3)
        assert result["episodes"] == 3 and len(result["returns"]) == 3
        assert result["mean_return"] == pytest.approx(sum(result["returns"]) / 3)
        assert all(1 <= r <= 500 for r in result["returns"])
    # without a config the checkpoint's own config is used
    if not os.environ.get("APEX_CONFIG"):
        again = apex_local.evaluate(None, run_dir, episodes=3)
        assert again == result  # same seed, same weights: same games


@pytest.mark.parametrize("method,extra", [("dqn", []), ("rainbow", []), ("r2d2", TINY_SEQ)],
                         ids=["dqn", "rainbow", "r2d2"])
def test_one_call_train_by_method(tmp_path, method, extra):
    run_dir = tmp_path / "run"
    summary = apex_local.train(method=method, env_id="CartPole-v1",
                               overrides=TINY + extra + [f"run.dir={run_dir}"])
    _check_summary(summary, run_dir)
    cfg = load_checkpoint(run_dir)["config"]
    assert cfg["run"]["method"] == method and cfg["env"]["id"] == "CartPole-v1"
    assert (cfg["network"]["lstm_size"] > 0) == (method == "r2d2")
    assert cfg["network"]["categorical"] == (method == "rainbow")


def test_cli_train_then_eval_json(tmp_path):
    run_dir = tmp_path / "run"
    sets = [a for o in TINY + [f"run.dir={run_dir}"] for a in ("--set", o)]
    r = _cli("train", "--local", "--config", str(DQN), *sets)
    assert r.returncode == 0, r.stderr
    summary = _last_json(r.stdout)
    _check_summary(summary, run_dir)

    r = _cli("eval", "--config", str(DQN), "--checkpoint", str(run_dir), "--episodes", "3", "--json")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stdout  # exactly one JSON object
    result = json.loads(lines[0])
    assert result["episodes"] == 3 and len(result["returns"]) == 3
    assert result["mean_return"] == pytest.approx(sum(result["returns"]) / 3)


def test_cli_train_without_local_exits_2(tmp_path):
    r = _cli("train", "--config", str(DQN), "--set", f"run.dir={tmp_path / 'run'}")
    assert r.returncode == 2
    assert "--local" in r.stderr and "honcho" in r.stderr
    assert not (tmp_path / "run").exists()


def test_cli_envs_lists_families():
    r = _cli("envs")
    assert r.returncode == 0, r.stderr
    assert "Atari" in r.stdout and "CartPole" in r.stdout
