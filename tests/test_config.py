"""Config: round trip, overrides, and every validation error path (table-driven)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from apex_local.config import (Config, ConfigError, config_from_dict, dump_config, load_config,
                               parse_override, replace, run_dir, run_id)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_validate():
    cfg = config_from_dict({})
    assert cfg == Config()


def test_round_trip_through_yaml(tmp_path):
    cfg = config_from_dict({"learner": {"batch_size": 32}, "network": {"hidden_sizes": [64, 32]},
                            "env": {"kwargs": {"a": 1}}})
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    again = load_config(p)
    assert again == cfg
    assert again.network.hidden_sizes == (64, 32)
    assert again.env.kwargs == {"a": 1}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)


def test_overrides_convert_types(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learner:\n  batch_size: 32\n")
    cfg = load_config(p, ["learner.batch_size=64", "learner.lr=3e-4", "replay.prioritized=false",
                          "network.hidden_sizes=[8,8]", "env.id=Acrobot-v1", "run.max_env_steps=1_000"])
    assert cfg.learner.batch_size == 64 and cfg.learner.lr == 3e-4
    assert cfg.replay.prioritized is False
    assert cfg.network.hidden_sizes == (8, 8)
    assert cfg.env.id == "Acrobot-v1" and cfg.run.max_env_steps == 1000


def test_apex_config_env_var(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  seed: 7\n")
    monkeypatch.setenv("APEX_CONFIG", str(p))
    assert load_config().run.seed == 7
    monkeypatch.delenv("APEX_CONFIG")
    with pytest.raises(ConfigError, match="APEX_CONFIG"):
        load_config()


BAD = [
    # (yaml text or overrides, message fragments)
    ({"learner": {"batch_sise": 3}}, ["learner.batch_sise", "did you mean 'batch_size'"]),
    ({"lerner": {}}, ["unknown section 'lerner'", "did you mean 'learner'"]),
    ({"learner": {"batch_size": "big"}}, ["learner.batch_size", "expected an integer", "'big'"]),
    ({"learner": {"batch_size": 0}}, ["learner.batch_size", "out of range"]),
    ({"learner": {"lr": -1.0}}, ["learner.lr", "out of range"]),
    ({"learner": {"lr": 0.0}}, ["learner.lr", "must be > 0"]),
    ({"replay": {"prioritized": "maybe"}}, ["replay.prioritized", "true or false"]),
    ({"replay": {"gamma": 1.5}}, ["replay.gamma", "1.5", "out of range"]),
    ({"replay": {"min_size": 10, "capacity": 5}}, ["replay.min_size", "replay.capacity"]),
    ({"transport": {"kind": "udp"}}, ["transport.kind", "'udp'", "ipc, tcp"]),
    ({"learner": {"optimizer": "adamw"}}, ["learner.optimizer", "did you mean 'adam'"]),
    ({"network": {"categorical": True, "v_min": 5.0, "v_max": -5.0}}, ["network.v_min"]),
    ({"network": {"hidden_sizes": [64, -1]}}, ["network.hidden_sizes", "positive"]),
    ({"network": {"noisy": True}}, ["network.noisy", "actor.exploration"]),
    ({"network": {"lstm_size": 8}, "run": {"method": "r2d2"}, "env": {"frame_stack": 4}},
     ["env.frame_stack", "recurrent"]),
    ({"learner": {"drqn_update": "random"}}, ["learner.drqn_update", "recurrent"]),
    ({"env": {"id": "ALE/Pong-v5", "mask_velocity": True}}, ["env.mask_velocity", "CartPole"]),
    ({"actor": {"eps_start": 0.1, "eps_end": 0.5}}, ["actor.eps_end"]),
    ({"env": "CartPole-v1"}, ["section 'env'", "mapping"]),
    ({"metrics": {"base_port": 80}}, ["metrics.base_port", "out of range"]),
]


@pytest.mark.parametrize("data,fragments", BAD, ids=[str(i) for i in range(len(BAD))])
def test_validation_errors_name_field_and_value(tmp_path, data, fragments):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(p)
    for frag in fragments:
        assert frag in str(info.value), (frag, str(info.value))


@pytest.mark.parametrize("text,fragment", [
    ("learner: [1, 2\n", "malformed YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
])
def test_malformed_files(tmp_path, text, fragment):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/x.yaml")


@pytest.mark.parametrize("text,fragment", [
    ("learner.batch_size", "section.field=value"),
    ("batch_size=3", "section.field"),
    ("lerner.batch_size=3", "did you mean 'learner'"),
])
def test_bad_overrides(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_override(text)


def test_replace_validates():
    cfg = Config()
    assert replace(cfg, **{"learner.batch_size": 8}).learner.batch_size == 8
    with pytest.raises(ConfigError, match="learner.batch_size"):
        replace(cfg, **{"learner.batch_size": -8})


def test_run_id_is_stable_and_overridable(monkeypatch):
    monkeypatch.delenv("APEX_RUN_ID", raising=False)
    a, b = Config(), Config()
    assert run_id(a) == run_id(b)
    assert run_id(a) != run_id(replace(a, **{"run.seed": 1}))
    monkeypatch.setenv("APEX_RUN_ID", "myrun")
    assert run_id(a) == "myrun"
    assert str(run_dir(a)) == "runs/myrun"


def test_cli_check_config_exit_codes(tmp_path):
    good = CONFIGS[0]
    r = subprocess.run([sys.executable, "-m", "apex_local.cli", "check-config", str(good)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "learner:" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  batch_sise: 3\n")
    r = subprocess.run([sys.executable, "-m", "apex_local.cli", "check-config", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "learner.batch_sise" in r.stderr and "batch_size" in r.stderr
    r = subprocess.run([sys.executable, "-m", "apex_local.cli", "check-config", str(good),
                        "--set", "learner.batch_size=-1"], capture_output=True, text=True)
    assert r.returncode == 2 and "learner.batch_size" in r.stderr
