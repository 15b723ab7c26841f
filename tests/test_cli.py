"""The ``apex-local`` command as a user runs it: a real subprocess (``python -m apex_local.cli``),
checked for exit codes (0 ok, 2 bad input) and for messages that name the offending field."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m apex_local.cli ARGS`` from the repository root, without the caller's
    APEX_CONFIG / APEX_RUN_ID leaking in."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("APEX_CONFIG", "APEX_RUN_ID")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "apex_local.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------- check-config

def test_configs_dir_is_not_empty():
    assert len(CONFIGS) >= 4, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_check_config_accepts_every_shipped_config(path):
    r = cli("check-config", str(path))
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)  # the resolved config, every section present
    assert set(resolved) == {"run", "env", "network", "replay", "learner", "actor", "transport", "metrics"}
    assert resolved == yaml.safe_load(cli("check-config", str(path)).stdout)  # deterministic


def test_check_config_reads_apex_config():
    r = cli("check-config", env={"APEX_CONFIG": str(CONFIGS[0])})
    assert r.returncode == 0, r.stderr
    r = cli("check-config")
    assert r.returncode == 2
    assert "APEX_CONFIG" in r.stderr


def test_check_config_applies_overrides():
    r = cli("check-config", str(ROOT / "configs" / "dqn_cartpole.yaml"), "--set", "learner.batch_size=17",
            "--set", "env.num_envs=3")
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)
    assert resolved["learner"]["batch_size"] == 17 and resolved["env"]["num_envs"] == 3


BROKEN = [
    # (file text, fragments stderr must contain)
    ("learner:\n  batch_sise: 64\n", ["learner.batch_sise", "did you mean 'batch_size'"]),
    ("replay:\n  prioritised: true\n", ["replay.prioritised", "did you mean 'prioritized'"]),
    ("lerner:\n  batch_size: 64\n", ["unknown section 'lerner'", "did you mean 'learner'"]),
    ("learner:\n  batch_size: lots\n", ["learner.batch_size", "expected an integer", "'lots'"]),
    ("replay:\n  prioritized: perhaps\n", ["replay.prioritized", "true or false"]),
    ("network:\n  hidden_sizes: 64\n", ["network.hidden_sizes", "list"]),
    ("env:\n  num_envs: 2.5\n", ["env.num_envs", "expected an integer"]),
    ("replay:\n  gamma: 1.5\n", ["replay.gamma", "1.5", "out of range"]),
    ("learner:\n  batch_size: 0\n", ["learner.batch_size", "out of range"]),
    ("metrics:\n  base_port: 80\n", ["metrics.base_port", "80", "out of range"]),
    ("transport:\n  kind: udp\n", ["transport.kind", "'udp'", "ipc, tcp"]),
    ("learner: [1, 2\n", ["malformed YAML"]),
    ("learner:\n  batch_size: 64\n   lr: 0.1\n", ["malformed YAML"]),
    ("- run\n- env\n", ["top level must be a mapping"]),
    ("env: CartPole-v1\n", ["section 'env'", "mapping"]),
]


@pytest.mark.parametrize("text,fragments", BROKEN, ids=[f"broken{i}" for i in range(len(BROKEN))])
def test_check_config_broken_file_exits_2_naming_the_field(tmp_path, text, fragments):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    r = cli("check-config", str(path))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("apex-local: config error:"), r.stderr
    assert str(path) in r.stderr  # which file
    for frag in fragments:
        assert frag in r.stderr, (frag, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("override,fragments", [
    ("learner.batch_sise=3", ["learner.batch_sise", "did you mean 'batch_size'"]),
    ("learner.batch_size=-1", ["learner.batch_size", "out of range"]),
    ("learner.lr=fast", ["learner.lr", "expected a number", "'fast'"]),
    ("lerner.lr=0.1", ["unknown section 'lerner'", "did you mean 'learner'"]),
    ("learner.lr", ["section.field=value"]),
])
def test_check_config_bad_override_exits_2(override, fragments):
    r = cli("check-config", str(ROOT / "configs" / "dqn_cartpole.yaml"), "--set", override)
    assert r.returncode == 2, (r.returncode, r.stderr)
    for frag in fragments:
        assert frag in r.stderr, (frag, r.stderr)
    assert "Traceback" not in r.stderr


def test_check_config_missing_file_exits_2(tmp_path):
    r = cli("check-config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert "not found" in r.stderr and "nope.yaml" in r.stderr


def test_unknown_command_and_train_without_local_exit_2():
    assert cli("frobnicate").returncode == 2  # argparse
    r = cli("train", "--config", str(ROOT / "configs" / "dqn_cartpole.yaml"))
    assert r.returncode == 2
    assert "--local" in r.stderr and "honcho start" in r.stderr


# ---------------------------------------------------------------------- envs

def test_envs_lists_the_families():
    r = cli("envs")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Atari" in out and "ALE/Pong-v5" in out
    assert "ymnasium" in out and "CartPole-v1" in out
    assert "package.module:" in out  # custom envs
    assert "flicker_prob" in out and "mask_velocity" in out  # partial observability


# ---------------------------------------------------------------------- unknown env id

def test_unknown_env_id_exits_2_with_a_suggestion(tmp_path):
    r = cli("train", "--local", "--config", str(ROOT / "configs" / "dqn_cartpole.yaml"),
            "--set", "env.id=CartPol-v1", "--set", f"run.dir={tmp_path}/run", "--set", "run.max_env_steps=10",
            "--set", "metrics.enabled=false")
    assert "CartPole-v1" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr)


# ---------------------------------------------------------------------- clean

def test_clean_dry_run_exits_0(tmp_path):
    r = cli("clean", "--dry-run", env={"XDG_RUNTIME_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("would remove"), r.stdout  # the report as text, not a JSON string


def test_clean_dry_run_reports_a_dead_run_and_removes_nothing(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run_dir = tmp_path / "apex-local" / "clitestdeadrun"
    run_dir.mkdir(parents=True, mode=0o700)
    (run_dir / "replay.0.pid").write_text(f"{int(dead.stdout)} 1\n")
    r = cli("clean", "--dry-run", "--run-id", "clitestdeadrun", env={"XDG_RUNTIME_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "would remove" in r.stdout and str(run_dir) in r.stdout
    assert run_dir.is_dir() and (run_dir / "replay.0.pid").is_file()  # a dry run touches nothing
