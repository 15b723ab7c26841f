"""The processes of a run and their metrics endpoints, as Prometheus file_sd targets.

``apex-local targets --config C --actors N [--learners M] --out runs/targets.json`` writes one
target group per process::

    [{"targets": ["127.0.0.1:9400"], "labels": {"role": "replay", "index": "0", "run": "r1a2b3c4d5"}},
     {"targets": ["127.0.0.1:9401"], "labels": {"role": "learner", "index": "0", "run": "r1a2b3c4d5"}}, ...]

``configs/prometheus/prometheus.yml`` reads ``runs/targets*.json`` (file_sd_configs, re-read on
change), so a second run only needs its own targets file. Ports: `apex_local.metrics.metrics_port`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from apex_local.metrics import metrics_port


@dataclass(frozen=True)
class Process:
    role: str
    index: int
    host: str
    port: int

    @property
    def name(self) -> str:
        return f"{self.role}.{self.index}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"


def scrape_host(host: str) -> str:
    """Where to connect for an endpoint bound to ``host`` (a wildcard bind is reached on loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host


def run_processes(cfg, actors: int, learners: int = 1, evaluator: bool = True) -> list[Process]:
    """Every process of a topology: replay, learner(s), evaluator, the Gorila parameter server
    (``run.method: gorila``), actors 0..N-1, with the metrics endpoint each one binds. A Gorila
    run whose learners host their own replay (``learner.gorila_replay: local``) has no replay
    endpoint: its replay process idles without a metrics port."""
    if actors < 0 or learners < 0:
        raise ValueError(f"need actors >= 0 and learners >= 0, got actors={actors}, learners={learners}")
    host, base = scrape_host(cfg.metrics.host), cfg.metrics.base_port
    local_replay = cfg.run.method == "gorila" and getattr(cfg.learner, "gorila_replay", "shared") == "local"
    roles = ([] if local_replay else [("replay", 0)]) + [("learner", j) for j in range(learners)]
    if evaluator:
        roles.append(("evaluator", 0))
    if cfg.run.method == "gorila":
        roles.append(("paramserver", 0))
    roles += [("actor", i) for i in range(actors)]
    return [Process(role, i, host, metrics_port(base, role, i)) for role, i in roles]


def file_sd_groups(processes: list[Process], run: str) -> list[dict]:
    """One file_sd target group per process, labelled role, index and run."""
    return [{"targets": [p.address], "labels": {"role": p.role, "index": str(p.index), "run": run}}
            for p in processes]


def write_targets(path: str | os.PathLike, groups: list[dict]) -> Path:
    """Write atomically (temp file + rename): Prometheus re-reads the file when it changes and
    must never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(groups, indent=2) + "\n")
    os.replace(tmp, path)
    return path
