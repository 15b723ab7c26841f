"""LearnerService resume rules (in-process; no replay server needed to construct it)."""
from __future__ import annotations

import uuid

import numpy as np

from apex_local.agents.checkpoint import load_checkpoint, save_checkpoint
from apex_local.config import Config, replace
from apex_local.envs import env_spec
from apex_local.roles.learner_loop import LearnerService


def _service(tmp_path, max_env_steps=1000):
    cfg = replace(Config(), **{"run.dir": str(tmp_path), "run.max_env_steps": max_env_steps,
                               "network.hidden_sizes": [8], "transport.ipc_dir": str(tmp_path / "ipc")})
    return LearnerService(cfg, "u" + uuid.uuid4().hex[:8], env_spec(cfg.env), log=lambda m: None)


def _checkpoint(tmp_path, env_steps):
    svc = _service(tmp_path)
    svc.learner.updates = 77
    save_checkpoint(svc.ckpt_path, {"config": svc.cfg.to_dict(), "learner": svc.learner.state_dict(),
                                    "env_steps": env_steps})
    svc.close()


def test_unfinished_run_resumes(tmp_path):
    _checkpoint(tmp_path, env_steps=500)
    svc = _service(tmp_path)
    try:
        assert svc.learner.updates == 77 and svc.env_steps == 500
        assert svc.learner.weights_version >= 1
    finally:
        svc.close()


def test_finished_run_starts_fresh_and_keeps_the_old_checkpoint(tmp_path):
    _checkpoint(tmp_path, env_steps=1000)
    svc = _service(tmp_path)
    try:
        assert svc.learner.updates == 0 and svc.env_steps == 0
        kept = load_checkpoint(tmp_path / "checkpoint.finished.pt")
        assert kept["env_steps"] == 1000 and kept["learner"]["updates"] == 77
        assert np.isfinite(svc.learner.flat_weights()).all()
    finally:
        svc.close()
