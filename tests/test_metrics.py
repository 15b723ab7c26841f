"""Metrics (apex_local/metrics.py): the port table, the Prometheus endpoint on loopback, port
conflicts, the null recorder, and the catalogue as the only source of metric names."""
from __future__ import annotations

import re
import socket
import urllib.request
from types import SimpleNamespace

import pytest

from apex_local.metrics import (CATALOGUE, MetricsPortInUse, NullRecorder, PrometheusRecorder, Recorder,
                                check_port_free, make_recorder, metrics_port)

HOST = "127.0.0.1"


def free_port() -> int:
    """A port the kernel considers free right now (bind to 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


@pytest.fixture
def recorders():
    """Collects PrometheusRecorders and closes them at the end, whatever the test did."""
    made: list[PrometheusRecorder] = []
    yield made
    for rec in made:
        rec.close()


# ---------------------------------------------------------------------- port table

@pytest.mark.parametrize("role,index,offset", [
    ("replay", 0, 0),
    ("learner", 0, 1),
    ("evaluator", 0, 2),
    ("paramserver", 0, 3),
    ("actor", 0, 100),
    ("actor", 1, 101),
    ("actor", 15, 115),
    ("learner", 1, 21),  # Gorila learner j > 0: +20+j
    ("learner", 3, 23),
    ("replay", 5, 0),  # only actors and learners use the index
    ("evaluator", 7, 2),
])
def test_metrics_port_table(role, index, offset):
    assert metrics_port(9400, role, index) == 9400 + offset
    assert metrics_port(20000, role, index) == 20000 + offset


def test_metrics_ports_of_a_topology_are_distinct():
    ports = [metrics_port(9400, r) for r in ("replay", "learner", "evaluator", "paramserver")]
    ports += [metrics_port(9400, "learner", j) for j in range(1, 16)]
    ports += [metrics_port(9400, "actor", i) for i in range(64)]
    assert len(ports) == len(set(ports))


def test_metrics_port_unknown_role():
    with pytest.raises(ValueError, match="unknown role 'acter'"):
        metrics_port(9400, "acter")


# ---------------------------------------------------------------------- Prometheus endpoint

def test_prometheus_recorder_serves_metrics_on_loopback(recorders):
    port = free_port()
    rec = PrometheusRecorder(HOST, port, {"role": "actor", "index": "3"})
    recorders.append(rec)
    assert rec.port == port
    rec.inc("apex_actor_env_steps_total", 40)
    rec.inc("apex_actor_env_steps_total", 2)
    rec.set("apex_actor_epsilon", 0.25)
    rec.inc("apex_replay_rejected_messages_total", reason="bad_shape")
    rec.observe("apex_learner_batch_wait_seconds", 0.003)
    text = scrape(port)

    # counters: exported with exactly one _total suffix, const labels on every series
    assert 'apex_actor_env_steps_total{index="3",role="actor"} 42.0' in text
    assert "apex_actor_env_steps_total_total" not in text
    assert re.search(r"^# TYPE apex_actor_env_steps(_total)? counter$", text, re.M)
    assert 'apex_actor_epsilon{index="3",role="actor"} 0.25' in text
    assert 'apex_replay_rejected_messages_total{index="3",reason="bad_shape",role="actor"} 1.0' in text
    assert 'apex_learner_batch_wait_seconds_count{index="3",role="actor"} 1.0' in text
    assert 'apex_learner_batch_wait_seconds_bucket{index="3",le="0.005",role="actor"} 1.0' in text
    # the in-memory view agrees with what is exported
    assert rec.get("apex_actor_env_steps_total") == 42.0
    assert rec.get("apex_replay_rejected_messages_total", reason="bad_shape") == 1.0


def test_prometheus_recorder_binds_loopback_only(recorders):
    port = free_port()
    recorders.append(PrometheusRecorder(HOST, port, {"role": "replay", "index": "0"}))
    addrs = [a for a in _local_ipv4_addresses() if not a.startswith("127.")]
    for addr in addrs[:2]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            assert s.connect_ex((addr, port)) != 0, f"metrics endpoint reachable on {addr}:{port}"


def _local_ipv4_addresses() -> list[str]:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)})
    except OSError:
        return []


def test_catalogue_names_follow_the_conventions():
    for name, d in CATALOGUE.items():
        assert name.startswith("apex_"), name
        assert d.kind in ("counter", "gauge", "histogram"), name
        assert name.endswith("_total") == (d.kind == "counter"), name
        assert not {"role", "index"} & set(d.labels), name  # const labels come from the recorder


def test_every_catalogue_series_is_exported(recorders):
    port = free_port()
    rec = PrometheusRecorder(HOST, port, {"role": "learner", "index": "0"})
    recorders.append(rec)
    record = {"counter": rec.inc, "gauge": rec.set, "histogram": rec.observe}
    for name, d in CATALOGUE.items():
        record[d.kind](name, 1.0, **{label: "x" for label in d.labels})
    text = scrape(port)
    for name, d in CATALOGUE.items():
        series = name + ("_count" if d.kind == "histogram" else "")
        assert f"\n{series}{{" in text, name


def test_port_in_use_raises_naming_the_port(recorders):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind((HOST, 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        with pytest.raises(MetricsPortInUse, match=str(port)) as info:
            PrometheusRecorder(HOST, port, {"role": "replay", "index": "0"})
        assert "metrics.base_port" in str(info.value)
        assert isinstance(info.value, OSError)
        with pytest.raises(MetricsPortInUse, match=f"{HOST}:{port}"):
            check_port_free(HOST, port)


def test_second_recorder_on_a_live_port_fails(recorders):
    port = free_port()
    first = PrometheusRecorder(HOST, port, {"role": "evaluator", "index": "0"})
    recorders.append(first)
    with pytest.raises(MetricsPortInUse, match=str(port)):
        PrometheusRecorder(HOST, port, {"role": "evaluator", "index": "0"})
    first.set("apex_evaluator_return", 12.5)
    assert 'apex_evaluator_return{index="0",role="evaluator"} 12.5' in scrape(port)


def test_close_frees_the_port_when_never_scraped(recorders):
    port = free_port()
    PrometheusRecorder(HOST, port, {"role": "replay", "index": "0"}).close()
    check_port_free(HOST, port)
    recorders.append(PrometheusRecorder(HOST, port, {"role": "replay", "index": "0"}))


def test_restart_on_the_same_port_after_a_scrape(recorders):
    port = free_port()
    first = PrometheusRecorder(HOST, port, {"role": "replay", "index": "0"})
    # a scrape the way Prometheus ends it: the server closes the connection first (read to EOF)
    with socket.create_connection((HOST, port), timeout=5) as conn:
        conn.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 200") and b"apex_replay_size" in reply
    first.close()
    recorders.append(PrometheusRecorder(HOST, port, {"role": "replay", "index": "0"}))


def test_make_recorder_uses_the_port_table(recorders):
    base = free_port()
    while base + 100 > 65_000:  # keep actor offsets in range
        base = free_port()
    cfg = SimpleNamespace(enabled=True, host=HOST, base_port=base)
    for role, index in (("replay", 0), ("actor", 2)):
        port = metrics_port(base, role, index)
        try:
            check_port_free(HOST, port)
        except MetricsPortInUse:
            pytest.skip(f"port {port} is taken by something else")
    rec = make_recorder(cfg, "replay")
    recorders.append(rec)
    assert isinstance(rec, PrometheusRecorder) and rec.port == base
    actor = make_recorder(cfg, "actor", 2)
    recorders.append(actor)
    assert actor.port == base + 102
    actor.set("apex_actor_epsilon", 0.4)
    assert 'apex_actor_epsilon{index="2",role="actor"} 0.4' in scrape(base + 102)


# ---------------------------------------------------------------------- null / in-memory recorders

def test_make_recorder_disabled_is_null_and_binds_nothing():
    port = free_port()
    rec = make_recorder(SimpleNamespace(enabled=False, host=HOST, base_port=port), "replay")
    assert isinstance(rec, NullRecorder)
    check_port_free(HOST, port)


def test_null_recorder_is_silent():
    rec = NullRecorder()
    rec.inc("apex_actor_env_steps_total", 5)
    rec.set("apex_actor_epsilon", 0.1)
    rec.observe("apex_learner_batch_wait_seconds", 0.2)
    rec.inc("apex_replay_rejected_messages_total", reason="oversized")
    assert rec.values == {}
    assert rec.get("apex_actor_env_steps_total") == 0.0


def test_recorder_keeps_values_per_label_set():
    rec = Recorder()
    rec.inc("apex_replay_inserted_total", 3)
    rec.inc("apex_replay_inserted_total")
    rec.set("apex_replay_size", 10)
    rec.set("apex_replay_size", 7)
    rec.inc("apex_replay_rejected_messages_total", reason="a")
    rec.inc("apex_replay_rejected_messages_total", 2, reason="b")
    assert rec.get("apex_replay_inserted_total") == 4.0
    assert rec.get("apex_replay_size") == 7.0
    assert rec.get("apex_replay_rejected_messages_total", reason="a") == 1.0
    assert rec.get("apex_replay_rejected_messages_total", reason="b") == 2.0


@pytest.mark.parametrize("call", [
    lambda r: r.inc("apex_actor_env_step_total"),
    lambda r: r.set("apex_replay_sise", 1.0),
    lambda r: r.observe("apex_learner_batch_wait", 0.1),
    lambda r: r.get("not_a_metric"),
])
def test_unknown_metric_names_raise_keyerror(call, recorders):
    with pytest.raises(KeyError, match="CATALOGUE"):
        call(Recorder())
    port = free_port()
    prom = PrometheusRecorder(HOST, port, {"role": "replay", "index": "0"})
    recorders.append(prom)
    with pytest.raises(KeyError):
        call(prom)
