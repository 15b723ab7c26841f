"""The Grafana dashboard against a REAL Prometheus scraping real topologies.

Static part (always runs): provisioning files, datasource uid, the dashboard JSON's structure
(every panel and query on the provisioned datasource, unique ids, a non-overlapping 24-column
grid, known template variables, every row mapped to the runs it is checked against), every
metric it queries is catalogued; the shipped Prometheus config is valid (promtool, when installed).

Live part (needs the `prometheus` binary; .ci/run installs the Debian package): short topologies
(Ape-X with an evaluator; R2D2 and Gorila side by side), file_sd targets written by
`apex-local targets`, Prometheus on 127.0.0.1 scraping every second into a temporary TSDB;
every PromQL expression of each dashboard row must return data through /api/v1/query for each
run kind the row is mapped to in ``ROW_RUNS``. The R2D2/Gorila test also reads both runs with
`apex-local top --once`. Everything is stopped and removed after.

Grafana itself is not installed here (not in Debian's archive): the JSON is checked statically
and its queries through Prometheus, never loaded into a running Grafana.
"""
from __future__ import annotations

import contextlib
import json
import math
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
DS = {"type": "prometheus", "uid": UID}
RATE_WINDOW = "10s"  # $__rate_interval stand-in: 10 scrapes at 1 s
RANGE = "5m"  # $__range stand-in: longer than any live test
GRAFANA_VARIABLES = {"__rate_interval", "__range", "__interval"}  # built-ins the dashboard may use

# Which run kinds each row's queries must return data for (the live tests). Every row of the
# dashboard must be listed here (test_every_row_is_mapped_to_the_runs_that_check_it), so a new
# row cannot go unchecked. "Acting and evaluation" needs an evaluator: only the Ape-X run has one.
# The Gorila run hosts a replay per learner (learner.gorila_replay: local; the paramserver panels
# are the same either way): no replay server, so the Throughput row's replay panels have no data
# there (a shared-replay Gorila run uses the same replay server as Ape-X and R2D2).
ROW_RUNS = {
    "Throughput": ("apex", "r2d2"),
    "Learner": ("apex", "r2d2", "gorila"),
    "Acting and evaluation": ("apex",),
    "Errors": ("apex", "r2d2", "gorila"),
    "Memory": ("apex", "r2d2", "gorila"),
    "R2D2": ("r2d2",),
    "Gorila": ("gorila",),
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return out


def rows(dash: dict) -> dict[str, list[dict]]:
    """Row title -> the panels under it (those after it at the top level, or inside it when collapsed)."""
    out: dict[str, list[dict]] = {}
    current = None
    for p in dash["panels"]:
        if p["type"] == "row":
            current = p["title"]
            assert current not in out, f"two rows titled {current!r}"
            out[current] = list(p.get("panels", []))
        else:
            assert current is not None, f"panel {p['title']!r} is above the first row"
            out[current].append(p)
    return out


def expressions(dash: dict, run_kind: str | None = None) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard, or of the rows mapped to ``run_kind``."""
    return [(p["title"], t["expr"]) for row, ps in rows(dash).items()
            if run_kind is None or run_kind in ROW_RUNS.get(row, ()) for p in ps for t in p.get("targets", [])]


def substitute(expr: str, run: str) -> str:
    """Grafana's variables as Grafana would expand them for this run."""
    return (expr.replace("$__rate_interval", RATE_WINDOW).replace("$__range", RANGE)
            .replace("$run", re.escape(run)))


def run_variable_selector(dash: dict) -> str:
    """The series selector of the `run` variable's label_values(<selector>, run) query."""
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "run"]
    m = re.fullmatch(r"label_values\((.+),\s*run\)", var["query"]["query"])
    assert m, var["query"]
    return m.group(1)


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
    assert "${DS_" not in text and "__inputs" not in text  # no import-time placeholders
    dash = dashboard()
    assert dash["uid"] == "apex-local"
    for p in panels(dash):
        if p["type"] == "row":
            assert "targets" not in p, p["title"]
            continue
        assert p.get("datasource") == DS, p["title"]
        assert p.get("targets"), f"{p['title']}: no query"
        for t in p["targets"]:
            assert t.get("datasource") == DS, (p["title"], t.get("refId"))
    for var in dash["templating"]["list"]:
        assert var["datasource"] == DS, var["name"]


def test_dashboard_json_is_well_formed_for_grafana():
    """What Grafana needs to load the file as provisioned (Grafana is not installed here, so
    this is checked statically): schemaVersion, unique panel ids, known panel types, a grid of
    24 columns without overlaps (collapsed rows' panels laid out below their row), unique refIds,
    and only defined variables in the queries."""
    dash = dashboard()
    assert isinstance(dash.get("schemaVersion"), int) and dash["schemaVersion"] >= 36  # datasource {type, uid} refs
    assert dash["title"] and isinstance(dash.get("panels"), list) and dash["panels"]
    ids = [p["id"] for p in panels(dash)]
    assert all(isinstance(i, int) and i > 0 for i in ids) and len(ids) == len(set(ids)), ids
    assert {p["type"] for p in panels(dash)} <= {"row", "timeseries", "stat", "table", "gauge", "bargauge"}

    def cells(p):
        g = p["gridPos"]
        assert set(g) >= {"h", "w", "x", "y"} and all(isinstance(g[k], int) for k in "hwxy"), p["title"]
        assert g["w"] >= 1 and g["h"] >= 1 and g["x"] >= 0 and g["y"] >= 0 and g["x"] + g["w"] <= 24, (p["title"], g)
        return {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}

    def no_overlap(group):
        taken: dict = {}
        for p in group:
            for cell in cells(p):
                assert cell not in taken, f"{p['title']!r} overlaps {taken[cell]!r} at {cell}"
                taken[cell] = p["title"]

    no_overlap(dash["panels"])  # the layout as loaded (collapsed rows are one line high)
    for row in dash["panels"]:
        if row["type"] == "row":
            assert row["gridPos"]["w"] == 24 and row["gridPos"]["h"] == 1 and row["gridPos"]["x"] == 0
            assert bool(row["panels"]) == bool(row.get("collapsed")), f"row {row['title']!r}: panels iff collapsed"
            if row.get("collapsed"):  # expanded: its panels sit right below it
                no_overlap(row["panels"])
                assert min(p["gridPos"]["y"] for p in row["panels"]) == row["gridPos"]["y"] + 1, row["title"]
    defined = {v["name"] for v in dash["templating"]["list"]} | GRAFANA_VARIABLES
    for p in panels(dash):
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p.get("targets", []):
            assert t["expr"].strip() and t["expr"].count("(") == t["expr"].count(")"), (p["title"], t["expr"])
            used = set(re.findall(r"\$\{?(\w+)", t["expr"]))
            assert used <= defined, (p["title"], used - defined)


def test_template_variable_queries_are_valid():
    dash = dashboard()
    variables = dash["templating"]["list"]
    assert [v["name"] for v in variables] == ["run"]
    for var in variables:
        assert var["type"] == "query" and var["query"]["query"] == var["definition"]
    selector = run_variable_selector(dash)
    # a series selector every process of every method has (the live tests query it through Prometheus)
    assert re.fullmatch(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-z_]+="[^"]*"(, *[a-z_]+="[^"]*")*\})?', selector), selector
    assert selector.startswith("up{") and 'job="apex-local"' in selector


def test_every_row_is_mapped_to_the_runs_that_check_it():
    by_row = rows(dashboard())
    assert set(by_row) == set(ROW_RUNS), "add new rows to ROW_RUNS (which live run checks their queries)"
    for row, ps in by_row.items():
        assert ps, f"row {row!r} is empty"
        assert set(ROW_RUNS[row]) <= {"apex", "r2d2", "gorila"} and ROW_RUNS[row]
    for kind in ("apex", "r2d2", "gorila"):
        assert expressions(dashboard(), kind)
    assert len(expressions(dashboard())) == sum(len(p.get("targets", [])) for p in panels(dashboard()))


def test_dashboard_covers_the_required_panels_and_catalogued_metrics():
    dash = dashboard()
    exprs = " ".join(e for _, e in expressions(dash))
    required = ["apex_actor_env_steps_total", "apex_replay_size", "apex_replay_capacity", "apex_replay_inserted_total",
                "apex_replay_sampled_total", "apex_learner_updates_total", "apex_learner_loss",
                "apex_learner_td_abs_mean", "apex_actor_weights_version", "apex_learner_weights_version",
                "apex_actor_episode_return", "apex_actor_epsilon", "apex_evaluator_return",
                "apex_learner_batch_wait_seconds_bucket", "apex_replay_rejected_messages_total",
                "apex_actor_env_errors_total", "apex_process_resident_memory_bytes", "apex_run_shm_bytes",
                "apex_process_shm_bytes", "process_start_time_seconds",  # restarts
                "apex_learner_q_discrepancy",  # R2D2
                "apex_paramserver_gradients_applied_total", "apex_paramserver_gradients_received_total",
                "apex_paramserver_staleness_bucket", "apex_paramserver_gradients_dropped_total",
                "apex_learner_gradients_sent_total", "apex_paramserver_weights_version",  # Gorila
                "apex_learner_replay_size", "apex_learner_replay_inserted_total"]  # Gorila local replay
    for name in required:
        assert name in exprs, name
    assert "histogram_quantile" in exprs
    for name in set(re.findall(r"\b(apex_[a-z0-9_]+)", exprs)):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in CATALOGUE or base in CATALOGUE, f"dashboard queries {name}, not in CATALOGUE"
    by_row = rows(dash)
    r2d2 = " ".join(t["expr"] for p in by_row["R2D2"] for t in p["targets"])
    gorila = " ".join(t["expr"] for p in by_row["Gorila"] for t in p["targets"])
    assert "apex_learner_q_discrepancy" in r2d2
    assert all(n in gorila for n in ("apex_paramserver_gradients_applied_total", "apex_paramserver_staleness_bucket",
                                     "apex_paramserver_gradients_dropped_total", "by (learner)"))


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

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the prometheus binary is not installed (apt-get install -y prometheus; .ci/run does)")

R2D2_FAST = {"run.max_env_steps": 10**9, "replay.min_size": 32, "learner.batch_size": 8,
             "replay.samples_per_insert": 0}  # no limiter: 100 updates (the first Q discrepancy) in seconds
GORILA_FAST = {"run.max_env_steps": 10**9, "replay.min_size": 300, "learner.batch_size": 32}  # min_size per learner


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def query(api: str, q: str) -> list[dict]:
    """Result series of an instant query (an invalid expression raises: HTTP 400)."""
    got = _get(f"{api}/query?" + urllib.parse.urlencode({"query": q}))
    assert got["status"] == "success", (q, got)
    return got["data"]["result"]


def values(api: str, q: str) -> list[float]:
    return [float(s["value"][1]) for s in query(api, q)]


def _wait(predicate, timeout: float, what: str, topologies=(), interval: float = 0.5):
    """``predicate()`` until truthy; fails early when a process of ``topologies`` died."""
    end = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        for t in topologies:
            for name, p in t.procs.items():
                if p.poll() is not None:
                    raise AssertionError(f"{name} exited {p.returncode} while waiting for {what}:\n"
                                         f"{t.log(name)[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                                 + "\n".join(t.dump() for t in topologies))
        time.sleep(interval)


def write_targets(t, path: Path, *args: str) -> list[dict]:
    """`apex-local targets` for topology ``t`` (its config and run id), as a user would run it."""
    r = subprocess.run([sys.executable, "-m", "apex_local.cli", "targets", "--config", str(t.config_path),
                        "--out", str(path), *args], cwd=ROOT, env=t.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    groups = json.loads(path.read_text())
    assert {g["labels"]["run"] for g in groups} == {t.run_id}
    return groups


@contextlib.contextmanager
def prometheus(tmp_path: Path, target_files: list[Path]):
    """The shipped config, made fast and local (1 s scrapes of ``target_files``), served on a free
    loopback port from a temporary TSDB; yields the API base URL. Stopped and its TSDB removed
    on exit, whatever happened."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["scrape_configs"][0]["file_sd_configs"] = [{"files": [str(f) for f in target_files],
                                                     "refresh_interval": "1s"}]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(cfg))
    tsdb, log = tmp_path / "tsdb", tmp_path / "prometheus.log"
    port = _free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={tsdb}", "--log.level=warn"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError("prometheus exited:\n" + log.read_text()[-3000:])
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1).status == 200
            except OSError:
                return False

        _wait(ready, 60, "prometheus ready")
        yield f"http://127.0.0.1:{port}/api/v1"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(tsdb, ignore_errors=True)
    assert not tsdb.exists()


def wait_for_the_run_variable(api: str, run: str, topologies) -> None:
    """The dashboard's `run` variable (label_values(<selector>, run)) lists ``run``."""
    match = run_variable_selector(dashboard())

    def listed():
        return run in _get(f"{api}/label/run/values?" + urllib.parse.urlencode({"match[]": match}))["data"]

    _wait(listed, 60, f"prometheus scraping run {run} (the $run variable)", topologies)


def assert_rows_return_data(api: str, runs: dict[str, str], topologies, timeout: float = 90) -> None:
    """Every expression of every row mapped (ROW_RUNS) to each run kind in ``runs`` (kind -> run
    id) returns at least one series, with $run set to that run."""
    pending = [(kind, title, substitute(e, run)) for kind, run in runs.items()
               for title, e in expressions(dashboard(), kind)]
    checked = list(pending)
    end = time.monotonic() + timeout
    while pending and time.monotonic() < end:
        pending = [(k, title, q) for k, title, q in pending if not query(api, q)]
        if pending:
            _wait(lambda: True, 0, "", topologies)  # a dead process fails here, not as missing data
            time.sleep(1.0)
    assert not pending, "dashboard queries without data:\n" + "\n".join(f"  {k} [{a}] {q}" for k, a, q in pending)
    for kind, title, q in checked:  # shown with pytest -s
        res = query(api, q)
        print(f"{kind} [{title}] {len(res)} series, first {res[0]['metric']} = {res[0]['value'][1]}")


def _stop(t) -> dict:
    codes = t.stop(signal.SIGINT, timeout=5.0)
    t.kill_all()
    return codes


@pytest.mark.timeout(240)
@needs_prometheus
def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path):
    """Ape-X: every row mapped to "apex"; then an actor restart shows on the restarts panel."""
    from service_harness import Topology

    t = Topology(tmp_path / "topo", {"run.max_env_steps": 10**9, "replay.min_size": 300,
                                    "actor.eval_every_seconds": 2, "actor.eval_episodes": 2,
                                    "env.num_envs": 2, "learner.batch_size": 32})
    codes = {}
    try:
        for role in ("replay", "learner", "actor", "evaluator"):
            t.start(role, 0)
        groups = write_targets(t, tmp_path / "targets.json", "--actors", "1")
        assert {g["labels"]["role"] for g in groups} == {"replay", "learner", "evaluator", "actor"}
        with prometheus(tmp_path, [tmp_path / "targets.json"]) as api:
            t.wait_for(lambda: t.metrics("evaluator").get("apex_evaluator_episodes_total", 0) > 0, 150,
                       "a first evaluation")
            wait_for_the_run_variable(api, t.run_id, [t])
            assert_rows_return_data(api, {"apex": t.run_id}, [t], timeout=60)

            # a few values that must make sense, not only exist
            sel = f'run="{t.run_id}"'
            assert values(api, f"sum(rate(apex_actor_env_steps_total{{{sel}}}[{RATE_WINDOW}]))")[0] > 0
            assert values(api, f'up{{job="apex-local",{sel}}}') == [1.0] * 4
            assert values(api, f"max(apex_run_shm_bytes{{{sel}}})")[0] > 0
            assert values(api, f'apex_replay_capacity{{{sel},role="replay",index="0"}}') == [t.cfg.replay.capacity]

            # the restarts panel counts a restarted actor (and nothing else)
            (restarts,) = [e for title, e in expressions(dashboard()) if title.startswith("Restarts")]
            restarts = substitute(restarts, t.run_id)
            assert set(values(api, restarts)) == {0.0}
            old = t.procs["actor.0"]
            old.send_signal(signal.SIGINT)
            assert old.wait(timeout=10) == 0, t.log("actor.0")[-2000:]
            t.start("actor", 0)

            def restarted():
                got = {(s["metric"]["role"], s["metric"]["index"]): float(s["value"][1]) for s in query(api, restarts)}
                return got.get(("actor", "0")) == 1.0 and got

            got = _wait(restarted, 60, "the actor restart on the restarts panel", [t])
            assert {k: v for k, v in got.items() if v} == {("actor", "0"): 1.0}, got
            # stop it acting, not starting up (its metrics endpoint answers before the env and net exist)
            t.wait_for(lambda: t.metrics("actor").get("apex_actor_env_steps_total", 0) > 0, 60,
                       "the restarted actor stepping")
    finally:
        codes = _stop(t)
    assert all(code == 0 for code, _ in codes.values()), (codes, t.dump())
    assert t.leftovers() == []


@pytest.mark.timeout(300)
@needs_prometheus
def test_r2d2_and_gorila_rows_return_data_from_a_real_prometheus(tmp_path):
    """An R2D2 run (replay, learner, actor) and a Gorila run (parameter server, 2 learners with
    their own replay, 2 actors) side by side, scraped by one Prometheus from the targets `apex-local targets` wrote:
    every row mapped to "r2d2" / "gorila" returns data for its run; `apex-local top --once` shows
    the Q discrepancy and the parameter server's rates."""
    from service_harness import Topology

    r2d2 = Topology(tmp_path / "r2d2", R2D2_FAST, base="configs/r2d2_cartpole_masked.yaml")
    gorila = Topology(tmp_path / "gorila", GORILA_FAST, base="configs/gorila_cartpole_local.yaml")
    both = [r2d2, gorila]
    codes = {}
    try:
        for role, idx in (("replay", 0), ("learner", 0), ("actor", 0)):
            r2d2.start(role, idx)
        for role, idx in (("paramserver", 0), ("learner", 0), ("learner", 1), ("actor", 0), ("actor", 1)):
            gorila.start(role, idx)  # (honcho also starts `replay`, which idles without a metrics port)
        groups = write_targets(r2d2, tmp_path / "targets-r2d2.json", "--actors", "1", "--no-evaluator")
        assert sorted((g["labels"]["role"], g["labels"]["index"]) for g in groups) == [
            ("actor", "0"), ("learner", "0"), ("replay", "0")]
        gorila_args = ("--actors", "2", "--learners", "2", "--no-evaluator")
        groups = write_targets(gorila, tmp_path / "targets-gorila.json", *gorila_args)
        assert sorted((g["labels"]["role"], g["labels"]["index"]) for g in groups) == [
            ("actor", "0"), ("actor", "1"), ("learner", "0"), ("learner", "1"), ("paramserver", "0")]

        with prometheus(tmp_path, [tmp_path / "targets-r2d2.json", tmp_path / "targets-gorila.json"]) as api:
            for t in both:
                wait_for_the_run_variable(api, t.run_id, both)
            for t, n in ((gorila, 5), (r2d2, 3)):  # every target of the targets file scraped and up
                _wait(lambda: values(api, f'up{{job="apex-local",run="{t.run_id}"}}') == [1.0] * n, 30,
                      f"{n} targets of the {t.cfg.run.method} run up", both)
            _wait(lambda: "apex_learner_q_discrepancy" in r2d2.metrics("learner"), 120,
                  "the first R2D2 Q discrepancy (100 learner updates)", both)
            assert_rows_return_data(api, {"r2d2": r2d2.run_id, "gorila": gorila.run_id}, both, timeout=60)

            from test_monitoring import _listening  # /proc/net/tcp LISTEN addresses

            for group in groups:  # the Gorila roles too (paramserver, learner 1): loopback only by default
                port = int(group["targets"][0].rsplit(":", 1)[1])
                assert _listening(port) == [f"127.0.0.1:{port}"], group
            for t in both:  # no counter (nor histogram count/sum/bucket) of either run went back, scrape to scrape
                def counters(t=t):
                    return query(api, f'{{__name__=~"apex_.+_(total|count|sum|bucket)", run="{t.run_id}"}}[{RANGE}]')

                # more than 20 series with 5+ scrapes each (some appear late; on a loaded box, later still)
                series = _wait(lambda: (got := counters()) and sum(len(s["values"]) >= 5 for s in got) > 20 and got,
                               30, f"20+ counter series of the {t.cfg.run.method} run scraped 5 times", both)
                for s in series:
                    v = [float(x) for _, x in s["values"]]
                    assert v == sorted(v), (t.cfg.run.method, s["metric"], v)

            g = f'run="{gorila.run_id}"'
            _wait(lambda: [v for v in values(api, f"sum(rate(apex_paramserver_gradients_applied_total{{{g}}}"
                                                  f"[{RATE_WINDOW}]))") if v > 0], 30, "a parameter server applying", both)
            # each learner's own replay filled (an actor that started before learner 1's pid file existed feeds
            # learner 0 until its next route check, so learner 1's replay may start a scrape or two later)
            _wait(lambda: len(values(api, f"apex_learner_replay_size{{{g}}} > 0")) == 2, 30,
                  "both Gorila learners' own replays filled", both)

            def learners_sending():  # a learner starts pushing once its own replay reached min_size
                by_learner = query(api, f"sum by (learner) (apex_paramserver_gradients_received_total{{{g}}})")
                return {s["metric"]["learner"] for s in by_learner if float(s["value"][1]) > 0}

            _wait(lambda: learners_sending() == {"0", "1"}, 30, "gradients from both Gorila learners scraped", both)
            assert learners_sending() == {"0", "1"}
            (dq,) = _wait(lambda: values(api, f'apex_learner_q_discrepancy{{run="{r2d2.run_id}"}}'), 30,
                          "the Q discrepancy scraped", both)
            assert math.isfinite(dq) and dq >= 0

            def top(t, *args):
                r = subprocess.run([sys.executable, "-m", "apex_local.cli", "top", "--config", str(t.config_path),
                                    *args, "--once", "--interval", "1"], cwd=ROOT, env=t.env,
                                   capture_output=True, text=True, timeout=60)
                assert r.returncode == 0, r.stderr
                return {line.split()[0]: line for line in r.stdout.splitlines()
                        if line.split() and "." in line.split()[0]}

            lines = top(gorila, *gorila_args)
            assert set(lines) == {"learner.0", "learner.1", "paramserver.0", "actor.0", "actor.1"}, lines
            assert all(line.split()[1] == "up" for line in lines.values()), lines
            ps = lines["paramserver.0"]
            m = re.search(r"gradients applied ([\d,.]+)/s", ps)
            assert m and float(m.group(1).replace(",", "")) > 0, ps
            assert "received by learner [0 " in ps and ", 1 " in ps and "staleness mean" in ps, ps
            for j in (0, 1):
                assert re.search(r"gradients sent [\d,.]+/s", lines[f"learner.{j}"]), lines[f"learner.{j}"]
                assert re.search(r"local replay [\d,]+/[\d,]+ insert", lines[f"learner.{j}"]), lines[f"learner.{j}"]
            lines = top(r2d2, "--actors", "1", "--no-evaluator")
            m = re.search(r"q discrepancy (\S+)", lines["learner.0"])
            assert m and math.isfinite(float(m.group(1))), lines["learner.0"]
            assert "gradients sent" not in lines["learner.0"]
    finally:
        for t in both:
            codes.update({f"{t.cfg.run.method} {k}": v for k, v in _stop(t).items()})
    assert all(code == 0 for code, _ in codes.values()), (codes, r2d2.dump(), gorila.dump())
    assert r2d2.leftovers() == [] and gorila.leftovers() == []
