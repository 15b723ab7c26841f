"""Monitoring around a live topology: endpoints bind loopback only, counters never go back,
`apex-local targets` writes the file_sd list of the run, `apex-local top` shows every role
and survives processes that are down."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apex_local.config import config_from_dict
from apex_local.metrics import CATALOGUE, metrics_port
from apex_local.monitoring.scrape import Scrape, parse_text, scrape
from apex_local.monitoring.targets import file_sd_groups, run_processes, write_targets
from apex_local.monitoring.top import TopView, rate

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apex_local.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------- targets

def test_targets_cover_every_process_with_its_port_and_labels():
    cfg = config_from_dict({"metrics": {"base_port": 12000}, "run": {"method": "apex"}})
    groups = file_sd_groups(run_processes(cfg, actors=3), "myrun")
    got = {(g["labels"]["role"], g["labels"]["index"]): g["targets"] for g in groups}
    assert got == {("replay", "0"): ["127.0.0.1:12000"], ("learner", "0"): ["127.0.0.1:12001"],
                   ("evaluator", "0"): ["127.0.0.1:12002"], ("actor", "0"): ["127.0.0.1:12100"],
                   ("actor", "1"): ["127.0.0.1:12101"], ("actor", "2"): ["127.0.0.1:12102"]}
    assert all(g["labels"]["run"] == "myrun" and set(g["labels"]) == {"role", "index", "run"} for g in groups)


def test_gorila_targets_add_the_parameter_server_and_learners():
    cfg = config_from_dict({"metrics": {"base_port": 12000, "host": "0.0.0.0"}, "run": {"method": "gorila"}})
    procs = run_processes(cfg, actors=1, learners=3, evaluator=False)
    assert [(p.role, p.index, p.port) for p in procs] == [
        ("replay", 0, 12000), ("learner", 0, 12001), ("learner", 1, 12021), ("learner", 2, 12022),
        ("paramserver", 0, 12003), ("actor", 0, 12100)]
    assert {p.host for p in procs} == {"127.0.0.1"}  # a wildcard bind is scraped on loopback


def test_gorila_with_local_replay_has_no_replay_target():
    cfg = config_from_dict({"metrics": {"base_port": 12000}, "run": {"method": "gorila"},
                            "learner": {"gorila_replay": "local"}})  # its replay process idles, no metrics port
    procs = run_processes(cfg, actors=2, learners=2, evaluator=False)
    assert [p.name for p in procs] == ["learner.0", "learner.1", "paramserver.0", "actor.0", "actor.1"]


def test_targets_command_writes_the_file_atomically(tmp_path):
    out = tmp_path / "sub" / "targets.json"
    r = cli("targets", "--config", "configs/apex_cartpole.yaml", "--actors", "2", "--set", "metrics.base_port=15000",
            "--out", str(out), env={**_env(), "APEX_RUN_ID": "runA"})
    assert r.returncode == 0, r.stderr
    assert "wrote 5 targets of run runA" in r.stderr
    groups = json.loads(out.read_text())
    assert [g["targets"][0] for g in groups] == ["127.0.0.1:15000", "127.0.0.1:15001", "127.0.0.1:15002",
                                                 "127.0.0.1:15100", "127.0.0.1:15101"]
    assert {g["labels"]["run"] for g in groups} == {"runA"}
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["targets.json"]  # no temp file left
    write_targets(out, groups[:1])
    assert len(json.loads(out.read_text())) == 1


def test_targets_to_stdout_and_bad_counts():
    r = cli("targets", "--config", "configs/apex_cartpole.yaml", "--actors", "1")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 4
    r = cli("targets", "--config", "configs/apex_cartpole.yaml")  # actor.num_actors: 0 -> must be given
    assert r.returncode == 2 and "--actors" in r.stderr
    r = cli("targets", "--config", "configs/apex_cartpole.yaml", "--actors", "-1")
    assert r.returncode == 2


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "APEX_RUN_ID"}


# ---------------------------------------------------------------------- scrape parser, top rendering

def test_parse_text_reads_labels_escapes_and_special_values():
    text = ('# HELP x_total a\n# TYPE x_total counter\nx_total{a="1",b="q\\"uote"} 3.0\n'
            'y 4e+06\nz{le="+Inf"} +Inf\nbroken line\nw NaN 1712345678\n')
    got = parse_text(text)
    assert got[0] == ("x_total", {"a": "1", "b": 'q"uote'}, 3.0)
    assert got[1] == ("y", {}, 4e6)
    assert got[2][2] == float("inf")
    assert got[3][0] == "w" and got[3][2] != got[3][2]  # NaN
    assert len(got) == 4


def test_top_frame_rates_lag_and_down_processes():
    cfg = config_from_dict({"metrics": {"base_port": 12000}})
    procs = run_processes(cfg, actors=2)
    view = TopView(procs, "r1", interval=1.0)
    lab = {"index": "0"}

    def s(t, samples):
        return Scrape(True, t, [(n, dict(lab, **extra), v) for n, extra, v in samples])

    prev = {"replay.0": s(0, [("apex_replay_inserted_total", {}, 100), ("apex_replay_sampled_total", {}, 0)]),
            "learner.0": s(0, [("apex_learner_updates_total", {}, 10)]),
            "evaluator.0": Scrape(False, 0, error="refused"),
            "actor.0": s(0, [("apex_actor_env_steps_total", {}, 1000), ("apex_actor_episodes_total", {}, 4)]),
            "actor.1": Scrape(False, 0, error="refused")}
    cur = {"replay.0": s(2, [("apex_replay_inserted_total", {}, 300), ("apex_replay_sampled_total", {}, 1600),
                             ("apex_replay_size", {}, 500), ("apex_replay_capacity", {}, 1000)]),
           "learner.0": s(2, [("apex_learner_updates_total", {}, 30), ("apex_learner_weights_version", {}, 12),
                              ("apex_learner_loss", {}, 0.5)]),
           "evaluator.0": Scrape(False, 2, error="Connection refused"),
           "actor.0": s(2, [("apex_actor_env_steps_total", {}, 3000), ("apex_actor_episodes_total", {}, 5),
                            ("apex_actor_episode_return", {}, 42.0), ("apex_actor_weights_version", {}, 9),
                            ("apex_actor_epsilon", {}, 0.4)]),
           "actor.1": Scrape(False, 2, error="Connection refused")}
    view.prev = prev
    text = view.frame(cur)
    view.close()
    lines = {line.split()[0]: line for line in text.splitlines() if line[:1].isalpha() and "." in line.split()[0]}
    assert "size 500/1,000 (50%)" in lines["replay.0"] and "insert 100/s" in lines["replay.0"]
    assert "sample 800/s" in lines["replay.0"] and "sample/insert 8.00" in lines["replay.0"]
    assert "updates 10.0/s" in lines["learner.0"] and "loss 0.5" in lines["learner.0"]
    assert "steps 1,000/s" in lines["actor.0"] and "lag 3" in lines["actor.0"] and "return 42.0" in lines["actor.0"]
    assert lines["actor.1"].split()[1] == "down" and "Connection refused" in lines["actor.1"]
    assert lines["evaluator.0"].split()[1] == "down"
    assert "1,000 env steps/s in total (1 of 2 up)" in text
    # a counter that went back (process restarted) has no rate, not a negative one
    assert rate(s(3, [("c_total", {}, 1)]), s(1, [("c_total", {}, 5)]), "c_total") is None


def test_scrape_of_a_closed_port_is_down_not_an_exception():
    got = scrape("http://127.0.0.1:1/metrics", timeout=0.5)
    assert not got.ok and got.error


def test_top_once_with_everything_down_exits_0():
    from service_harness import free_port_block

    r = cli("top", "--config", "configs/apex_cartpole.yaml", "--actors", "1", "--once", "--interval", "0.1",
            "--set", f"metrics.base_port={free_port_block()}")  # nothing listens there
    assert r.returncode == 0, r.stderr
    for name in ("replay.0", "learner.0", "evaluator.0", "actor.0"):
        assert any(line.startswith(name) and " down " in line for line in r.stdout.splitlines()), r.stdout


# ---------------------------------------------------------------------- live topology

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from service_harness import Topology

    t = Topology(tmp_path_factory.mktemp("mon"), {"run.max_env_steps": 10**9, "replay.min_size": 300,
                                                 "env.num_envs": 2, "learner.batch_size": 32})
    try:
        for role in ("replay", "learner", "actor"):
            t.start(role, 0)
        t.wait_for(lambda: t.metrics("learner").get("apex_learner_updates_total", 0) > 0, 120, "learner updates")
        t.wait_for(lambda: t.metrics("actor").get("apex_actor_episodes_total", 0) > 0, 60, "an episode")
        yield t
    finally:
        t.stop(signal.SIGINT, timeout=5.0)
        t.kill_all()


def _listening(port: int) -> list[str]:
    """Local addresses (ip:port) of LISTEN sockets on ``port``, from /proc/net/tcp and tcp6."""
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, p = fields[1].split(":")
            if fields[3] == "0A" and int(p, 16) == port:
                if width == 8:  # little-endian IPv4
                    ip = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
                else:
                    ip = "ipv6:" + addr
                out.append(f"{ip}:{port}")
    return out


def test_metrics_endpoints_listen_on_loopback_only(live):
    assert config_from_dict({}).metrics.host == "127.0.0.1"  # the default the harness keeps
    assert live.cfg.metrics.host == "127.0.0.1"
    for role in ("replay", "learner", "actor"):
        port = metrics_port(live.metrics_base, role, 0)
        assert _listening(port) == [f"127.0.0.1:{port}"], role


def _counters(text: str) -> dict[str, float]:
    kinds = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            kinds[name] = kind
    out = {}
    for name, labels, value in parse_text(text):
        family = next((f for f in (name, name.removesuffix("_total"), name.rsplit("_", 1)[0]) if f in kinds), None)
        if family and (kinds[family] == "counter" or (kinds[family] == "histogram" and not name.endswith("_created"))):
            out[name + json.dumps(labels, sort_keys=True)] = value
    return out


def test_counters_only_increase_across_a_run(live):
    import urllib.request

    def grab():
        return {role: _counters(urllib.request.urlopen(
            f"http://127.0.0.1:{metrics_port(live.metrics_base, role, 0)}/metrics", timeout=5).read().decode())
            for role in ("replay", "learner", "actor")}

    first = grab()
    time.sleep(2.5)
    second = grab()
    grew = 0
    for role in first:
        assert first[role], role
        for key, v in first[role].items():
            assert key in second[role], f"{role}: {key} disappeared"
            assert second[role][key] >= v, f"{role}: {key} went from {v} to {second[role][key]}"
            grew += second[role][key] > v
    assert grew >= 5
    names = {k.split("{")[0] for k in first["actor"]}
    assert "apex_actor_env_steps_total" in names and "process_cpu_seconds_total" in names
    assert {n for n in CATALOGUE if CATALOGUE[n].kind == "counter" and n.startswith("apex_actor_")} <= names


def test_top_once_shows_every_role_and_the_missing_ones_as_down(live):
    r = cli("top", "--config", str(live.config_path), "--actors", "2", "--once", "--interval", "1",
            env=live.env, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.split() and "." in line.split()[0]}
    for name in ("replay.0", "learner.0", "actor.0"):
        assert lines[name].split()[1] == "up", r.stdout
    assert "size " in lines["replay.0"] and "updates " in lines["learner.0"] and "steps " in lines["actor.0"]
    assert "MiB" in lines["actor.0"]  # RSS column
    for name in ("actor.1", "evaluator.0"):  # not started: down, and the frame still printed
        assert lines[name].split()[1] == "down", r.stdout
    assert f"run {live.run_id}" in r.stdout
    assert "\x1b[" not in r.stdout  # no ANSI codes when not a terminal / --once


def test_top_frame_shows_gorila_and_r2d2_details():
    cfg = config_from_dict({"metrics": {"base_port": 12000}, "run": {"method": "gorila"}})
    procs = run_processes(cfg, actors=1, learners=2, evaluator=False)
    assert [p.name for p in procs] == ["replay.0", "learner.0", "learner.1", "paramserver.0", "actor.0"]
    view = TopView(procs, "g1", interval=1.0)

    def s(t, samples):
        return Scrape(True, t, [(n, labels, v) for n, labels, v in samples])

    def ps(t, applied, got0, got1, stale, count, total):
        return s(t, [("apex_paramserver_gradients_applied_total", {}, applied),
                     ("apex_paramserver_gradients_received_total", {"learner": "0"}, got0),
                     ("apex_paramserver_gradients_received_total", {"learner": "1"}, got1),
                     ("apex_paramserver_gradients_dropped_total", {"reason": "stale"}, stale),
                     ("apex_paramserver_gradients_dropped_total", {"reason": "non_finite"}, 0),
                     ("apex_paramserver_staleness_count", {}, count), ("apex_paramserver_staleness_sum", {}, total),
                     ("apex_paramserver_weights_version", {}, applied + 1)])

    def learner(t, sent, **extra):
        return s(t, [("apex_learner_updates_total", {}, sent), ("apex_learner_gradients_sent_total", {}, sent)]
                 + [(n, {}, v) for n, v in extra.items()])

    down = Scrape(False, 0, error="refused")
    view.prev = {"replay.0": down, "learner.0": learner(0, 10), "learner.1": learner(0, 4),
                 "paramserver.0": ps(0, 10, 8, 4, 2, 12, 12), "actor.0": down}
    cur = {"replay.0": down, "learner.0": learner(2, 30), "learner.1": learner(2, 24),
           "paramserver.0": ps(2, 48, 28, 24, 2, 52, 92), "actor.0": down}
    lines = {line.split()[0]: line for line in view.frame(cur).splitlines() if line.startswith(("learner", "param"))}
    view.close()
    p = lines["paramserver.0"]
    assert "gradients applied 19.0/s" in p and "received by learner [0 10.0/s, 1 10.0/s]" in p, p
    assert "staleness mean 2.0" in p and "dropped stale 2" in p and "non_finite" not in p and "weights v49" in p, p
    assert "gradients sent 10.0/s" in lines["learner.0"] and "q discrepancy" not in lines["learner.0"]

    # R2D2 (no parameter server): the learner's Q discrepancy, no gradients column
    procs = run_processes(config_from_dict({"metrics": {"base_port": 12000}}), actors=0, evaluator=False)
    view = TopView(procs, "r1", interval=1.0)
    view.prev = {"replay.0": down, "learner.0": learner(0, 0)}
    text = view.frame({"replay.0": down, "learner.0": learner(1, 100, apex_learner_q_discrepancy=0.0421)})
    view.close()
    (line,) = [x for x in text.splitlines() if x.startswith("learner.0")]
    assert "q discrepancy 0.0421" in line and "gradients sent" not in line, line
