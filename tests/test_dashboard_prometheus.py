"""The Grafana dashboard against a REAL Prometheus scraping a real topology.

Static part (always runs): provisioning files, datasource uid, dashboard JSON, every metric it
queries is catalogued; the shipped Prometheus config is valid (promtool, when installed).

Live part (needs the `prometheus` binary; .ci/run installs the Debian package): replay +
learner + actor + evaluator on CartPole, file_sd targets written by `apex-local targets`,
Prometheus on 127.0.0.1 scraping every second into a temporary TSDB; every PromQL expression of
the dashboard must return data through /api/v1/query. Everything is stopped and removed after.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from apex_local.metrics import CATALOGUE

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "configs" / "grafana" / "dashboards" / "apex-local.json"
DATASOURCE = ROOT / "configs" / "grafana" / "provisioning" / "datasources" / "apex.yaml"
PROVIDER = ROOT / "configs" / "grafana" / "provisioning" / "dashboards" / "apex.yaml"
PROM_CONFIG = ROOT / "configs" / "prometheus" / "prometheus.yml"
UID = "apex-prometheus"
RATE_WINDOW = "10s"  # $__rate_interval stand-in: 10 scrapes at 1 s


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return out


def expressions(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard."""
    return [(p["title"], t["expr"]) for p in panels(dash) for t in p.get("targets", [])]


def substitute(expr: str, run: str) -> str:
    """Grafana's variables as Grafana would expand them for this run."""
    return expr.replace("$__rate_interval", RATE_WINDOW).replace("$run", re.escape(run))


# ---------------------------------------------------------------------- static

def test_datasource_has_the_fixed_uid_and_local_url():
    ds = yaml.safe_load(DATASOURCE.read_text())["datasources"]
    assert len(ds) == 1
    assert ds[0]["uid"] == UID and ds[0]["type"] == "prometheus"
    assert ds[0]["url"] == "http://127.0.0.1:9090"


def test_dashboard_provider_points_at_the_dashboards_folder():
    prov = yaml.safe_load(PROVIDER.read_text())["providers"]
    assert len(prov) == 1 and prov[0]["type"] == "file"
    path = prov[0]["options"]["path"]
    assert path.replace("${APEX_LOCAL_ROOT}", str(ROOT)) == str(DASHBOARD.parent)


def test_dashboard_uses_only_the_provisioned_datasource():
    text = DASHBOARD.read_text()
    assert "${DS_" not in text and "__inputs" not in text
    dash = dashboard()
    assert dash["uid"] == "apex-local"
    seen = 0
    for p in panels(dash):
        for obj in [p] + p.get("targets", []):
            if "datasource" in obj:
                assert obj["datasource"] == {"type": "prometheus", "uid": UID}, p["title"]
                seen += 1
    for var in dash["templating"]["list"]:
        assert var["datasource"] == {"type": "prometheus", "uid": UID}
    assert seen > 20


def test_dashboard_covers_the_required_panels_and_catalogued_metrics():
    dash = dashboard()
    exprs = " ".join(e for _, e in expressions(dash))
    required = ["apex_actor_env_steps_total", "apex_replay_size", "apex_replay_capacity", "apex_replay_inserted_total",
                "apex_replay_sampled_total", "apex_learner_updates_total", "apex_learner_loss",
                "apex_learner_td_abs_mean", "apex_actor_weights_version", "apex_learner_weights_version",
                "apex_actor_episode_return", "apex_actor_epsilon", "apex_evaluator_return",
                "apex_learner_batch_wait_seconds_bucket", "apex_replay_rejected_messages_total",
                "apex_actor_env_errors_total", "apex_process_resident_memory_bytes", "apex_run_shm_bytes",
                "apex_process_shm_bytes"]
    for name in required:
        assert name in exprs, name
    assert "histogram_quantile" in exprs
    for name in set(re.findall(r"\b(apex_[a-z0-9_]+)", exprs)):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in CATALOGUE or base in CATALOGUE, f"dashboard queries {name}, not in CATALOGUE"
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))


def test_prometheus_config_reads_file_sd_targets_every_5s():
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    assert cfg["global"]["scrape_interval"] == "5s"
    (job,) = cfg["scrape_configs"]
    assert job["honor_labels"] is True
    files = job["file_sd_configs"][0]["files"]
    assert (PROM_CONFIG.parent / files[0]).resolve() == (ROOT / "runs" / "targets*.json").resolve()


def test_procfile_monitoring_runs_the_shipped_config_on_loopback():
    (line,) = [x for x in (ROOT / "Procfile.monitoring").read_text().splitlines() if x and not x.startswith("#")]
    name, cmd = line.split(":", 1)
    assert name == "prometheus"
    assert "--config.file=configs/prometheus/prometheus.yml" in cmd and "--web.listen-address=127.0.0.1:" in cmd


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_accepts_the_prometheus_config():
    r = subprocess.run(["promtool", "check", "config", str(PROM_CONFIG)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------- live

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="the prometheus binary is not installed (apt-get install -y prometheus; .ci/run does)")
def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path):
    from service_harness import Topology

    t = Topology(tmp_path / "topo", {"run.max_env_steps": 10**9, "replay.min_size": 300,
                                    "actor.eval_every_seconds": 2, "actor.eval_episodes": 2,
                                    "env.num_envs": 2, "learner.batch_size": 32})
    prom = None
    tsdb = tmp_path / "tsdb"
    try:
        for role in ("replay", "learner", "actor", "evaluator"):
            t.start(role, 0)
        targets = tmp_path / "targets.json"
        r = subprocess.run([sys.executable, "-m", "apex_local.cli", "targets", "--config", str(t.config_path),
                            "--actors", "1", "--out", str(targets)], cwd=ROOT, env=t.env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        groups = json.loads(targets.read_text())
        assert {g["labels"]["role"] for g in groups} == {"replay", "learner", "evaluator", "actor"}
        assert {g["labels"]["run"] for g in groups} == {t.run_id}

        cfg = yaml.safe_load(PROM_CONFIG.read_text())  # the shipped config, made fast and local
        cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        cfg["scrape_configs"][0]["file_sd_configs"] = [{"files": [str(targets)], "refresh_interval": "1s"}]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        port = _free_port()
        api = f"http://127.0.0.1:{port}/api/v1"
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--web.listen-address=127.0.0.1:{port}",
             f"--storage.tsdb.path={tsdb}", "--log.level=warn"],
            stdout=open(tmp_path / "prometheus.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)

        def ready():
            if prom.poll() is not None:
                raise AssertionError("prometheus exited:\n" + (tmp_path / "prometheus.log").read_text()[-3000:])
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1).status == 200
            except OSError:
                return False

        t.wait_for(ready, 60, "prometheus ready")
        t.wait_for(lambda: t.metrics("evaluator").get("apex_evaluator_episodes_total", 0) > 0, 150,
                   "a first evaluation")

        # the dashboard's $run variable: label_values(apex_replay_size, run)
        def runs():
            return _get(f"{api}/label/run/values?" + urllib.parse.urlencode({"match[]": "apex_replay_size"}))["data"]

        t.wait_for(lambda: t.run_id in runs(), 60, "prometheus scraping the run (the $run variable)")

        queries = [(title, substitute(e, t.run_id)) for title, e in expressions(dashboard())]
        empty = queries
        deadline = time.monotonic() + 60
        while empty and time.monotonic() < deadline:
            time.sleep(1.0)
            empty = [(title, q) for title, q in empty
                     if not _get(f"{api}/query?" + urllib.parse.urlencode({"query": q}))["data"]["result"]]
        assert not empty, "dashboard queries without data:\n" + "\n".join(f"  [{a}] {q}" for a, q in empty)
        for title, q in queries:  # shown with pytest -s
            res = _get(f"{api}/query?" + urllib.parse.urlencode({"query": q}))["data"]["result"]
            print(f"[{title}] {len(res)} series, first {res[0]['metric']} = {res[0]['value'][1]}")

        # a few values that must make sense, not only exist
        def value(q):
            return [float(s["value"][1]) for s in _get(f"{api}/query?" + urllib.parse.urlencode({"query": q}))["data"]["result"]]
        assert value(f'sum(rate(apex_actor_env_steps_total{{run="{t.run_id}"}}[{RATE_WINDOW}]))')[0] > 0
        assert value(f'up{{job="apex-local",run="{t.run_id}"}}') == [1.0] * 4
        assert value(f'max(apex_run_shm_bytes{{run="{t.run_id}"}})')[0] > 0
        assert value(f'apex_replay_capacity{{run="{t.run_id}",role="replay",index="0"}}') == [t.cfg.replay.capacity]
    finally:
        codes = t.stop(signal.SIGINT, timeout=5.0)
        t.kill_all()
        if prom is not None and prom.poll() is None:
            prom.terminate()
            try:
                prom.wait(timeout=10)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait(timeout=5)
        shutil.rmtree(tsdb, ignore_errors=True)
    assert all(code == 0 for code, _ in codes.values()), (codes, t.dump())
    assert t.leftovers() == []
    assert not tsdb.exists()
