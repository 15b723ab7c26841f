"""Metrics: components report numbers through a small ``Recorder``; only this module imports
prometheus_client (STYLE.md #11).

``CATALOGUE`` lists every series a role may export (name, type, help, labels). Names follow
DESIGN.md §8: prefix ``apex_``, base units, counters end in ``_total``, low-cardinality labels.
Each process serves one ``/metrics`` endpoint on ``metrics.host`` (127.0.0.1 by default) at
``metrics.base_port + role offset + index``.
"""
from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Iterable

ROLE_OFFSETS = {"replay": 0, "learner": 1, "evaluator": 2, "paramserver": 3, "actor": 100}


@dataclass(frozen=True)
class MetricDef:
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    unit: str = ""  # base unit for docs/metrics.md; "" = derived from the name (see metric_unit)
    collected: bool = False  # sampled from /proc by PrometheusRecorder at scrape time; roles never record it


_LAT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

CATALOGUE: dict[str, MetricDef] = {
    # actor
    "apex_actor_env_steps_total": MetricDef("counter", "Environment steps taken (agent steps, all envs)"),
    "apex_actor_episodes_total": MetricDef("counter", "Episodes finished (game over)"),
    "apex_actor_episode_return": MetricDef("gauge", "Return of the most recent finished episode (unclipped)"),
    "apex_actor_epsilon": MetricDef("gauge", "Exploration epsilon of this actor"),
    "apex_actor_weights_version": MetricDef("gauge", "Weights version the actor acts with"),
    "apex_actor_inserted_total": MetricDef("counter", "Items sent to replay"),
    "apex_actor_send_blocked_seconds_total": MetricDef("counter", "Time spent blocked sending to replay"),
    "apex_actor_ring_full_total": MetricDef(
        "counter", "Insert messages sent inline because the actor's shared-memory insert ring had no room "
                   "(its replay is behind)"),
    "apex_actor_env_errors_total": MetricDef("counter", "Environment errors survived (env rebuilt)"),
    # replay
    "apex_replay_size": MetricDef("gauge", "Items currently stored in replay"),
    "apex_replay_capacity": MetricDef("gauge", "Replay capacity in items"),
    "apex_replay_inserted_total": MetricDef("counter", "Items inserted into replay"),
    "apex_replay_ring_messages_total": MetricDef(
        "counter", "Insert messages read from actors' shared-memory insert rings (the rest came inline)"),
    "apex_replay_sampled_total": MetricDef("counter", "Items sampled from replay"),
    "apex_replay_priority_updates_total": MetricDef("counter", "Priority updates applied"),
    "apex_replay_stale_priority_updates_total": MetricDef(
        "counter", "Priority updates dropped because the slot was overwritten since it was sampled"),
    "apex_replay_rejected_messages_total": MetricDef(
        "counter", "Messages dropped by the replay server, by reason", ("reason",)),
    "apex_replay_env_steps_total": MetricDef("counter", "Env steps reported by actors"),
    "apex_replay_gap_items_total": MetricDef(
        "counter", "Items skipped because they reference frames the replay lost (it restarted mid-stream)"),
    "apex_replay_snapshots_total": MetricDef("counter", "Replay snapshots written"),
    "apex_replay_snapshot_errors_total": MetricDef(
        "counter", "Replay snapshots that could not be written (disk full, permissions)"),
    "apex_replay_snapshot_seconds": MetricDef("gauge", "Time the latest replay snapshot took to write"),
    # learner
    "apex_learner_updates_total": MetricDef("counter", "Learner gradient updates"),
    "apex_learner_loss": MetricDef("gauge", "Loss of the latest update"),
    "apex_learner_td_abs_mean": MetricDef("gauge", "Mean absolute TD error (or priority) of the latest batch"),
    "apex_learner_q_mean": MetricDef("gauge", "Mean Q-value of the latest batch"),
    "apex_learner_weights_version": MetricDef("gauge", "Version of the latest published weights"),
    "apex_learner_nonfinite_losses_total": MetricDef("counter", "Updates skipped because the loss was not finite"),
    "apex_learner_discarded_batches_total": MetricDef(
        "counter", "Updates discarded because their batch slot was reclaimed while the learner read it in place"),
    "apex_learner_batch_wait_seconds": MetricDef("histogram", "Time the learner waited for a batch", (), _LAT),
    "apex_learner_q_discrepancy": MetricDef("gauge", "R2D2 Q-value discrepancy, stored vs recomputed state"),
    # evaluator
    "apex_evaluator_return": MetricDef("gauge", "Mean greedy return of the latest evaluation"),
    "apex_evaluator_human_normalized_score": MetricDef("gauge", "Human-normalised score of the latest evaluation"),
    "apex_evaluator_weights_version": MetricDef("gauge", "Weights version of the latest evaluation"),
    "apex_evaluator_episodes_total": MetricDef("counter", "Evaluation episodes played"),
    # paramserver (Gorila)
    "apex_paramserver_gradients_applied_total": MetricDef("counter", "Gradients applied to the master net"),
    "apex_paramserver_gradients_dropped_total": MetricDef(
        "counter", "Gradients not applied, by reason (stale, non_finite, bad_message)", ("reason",)),
    "apex_paramserver_gradients_received_total": MetricDef(
        "counter", "Gradients received, by sending learner", ("learner",)),
    "apex_paramserver_staleness": MetricDef(
        "histogram", "Versions between the parameters a gradient was computed on and the master's", (),
        (0, 1, 2, 4, 8, 16, 32, 64, 128)),
    "apex_paramserver_weights_version": MetricDef("gauge", "Version of the master parameters"),
    "apex_learner_gradients_sent_total": MetricDef("counter", "Gradients pushed to the parameter server (Gorila)"),
    "apex_paramserver_env_steps_total": MetricDef(
        "counter", "Env steps reported by Gorila learners with local replay (the run ends at run.max_env_steps)"),
    # Gorila learner's own replay (learner.gorila_replay: local)
    "apex_learner_replay_size": MetricDef("gauge", "Items stored in this Gorila learner's local replay"),
    "apex_learner_replay_capacity": MetricDef("gauge", "Capacity of this Gorila learner's local replay in items"),
    "apex_learner_replay_inserted_total": MetricDef("counter", "Items inserted into this Gorila learner's local replay"),
    "apex_learner_replay_env_steps_total": MetricDef(
        "counter", "Env steps reported by the actors feeding this Gorila learner's local replay"),
    "apex_learner_replay_rejected_messages_total": MetricDef(
        "counter", "Insert messages dropped by this Gorila learner's local replay, by reason", ("reason",)),
    # every process (apex_local/monitoring/procstats.py), sampled at scrape time
    "apex_process_resident_memory_bytes": MetricDef(
        "gauge", "Resident memory of this process by kind (anon, file, shmem; they sum to VmRSS)", ("kind",),
        collected=True),
    "apex_process_shm_bytes": MetricDef(
        "gauge", "Bytes of apex_* /dev/shm segments this process maps (owned or attached)", collected=True),
    "apex_run_shm_bytes": MetricDef(
        "gauge", "Bytes allocated by all /dev/shm segments of this run (same in every process: take max)",
        collected=True),
}

# Units of the series whose name does not end in one (docs/metrics.md "unit" column).
_UNITS = {
    "apex_actor_env_steps_total": "steps", "apex_actor_episodes_total": "episodes",
    "apex_actor_episode_return": "return", "apex_actor_epsilon": "probability",
    "apex_actor_weights_version": "version", "apex_actor_inserted_total": "items",
    "apex_actor_env_errors_total": "errors", "apex_actor_ring_full_total": "messages",
    "apex_replay_size": "items", "apex_replay_capacity": "items", "apex_replay_inserted_total": "items",
    "apex_replay_ring_messages_total": "messages",
    "apex_replay_sampled_total": "items", "apex_replay_priority_updates_total": "items",
    "apex_replay_stale_priority_updates_total": "items", "apex_replay_rejected_messages_total": "messages",
    "apex_replay_env_steps_total": "steps", "apex_replay_gap_items_total": "items",
    "apex_replay_snapshots_total": "snapshots", "apex_replay_snapshot_errors_total": "snapshots",
    "apex_learner_updates_total": "updates", "apex_learner_loss": "1", "apex_learner_td_abs_mean": "return",
    "apex_learner_q_mean": "return", "apex_learner_weights_version": "version",
    "apex_learner_nonfinite_losses_total": "updates", "apex_learner_discarded_batches_total": "updates", "apex_learner_q_discrepancy": "ratio",
    "apex_evaluator_return": "return", "apex_evaluator_human_normalized_score": "ratio",
    "apex_evaluator_weights_version": "version", "apex_evaluator_episodes_total": "episodes",
    "apex_paramserver_gradients_applied_total": "gradients", "apex_paramserver_gradients_dropped_total": "gradients",
    "apex_paramserver_gradients_received_total": "gradients", "apex_paramserver_staleness": "versions",
    "apex_paramserver_weights_version": "version", "apex_learner_gradients_sent_total": "gradients",
    "apex_paramserver_env_steps_total": "steps", "apex_learner_replay_size": "items",
    "apex_learner_replay_capacity": "items", "apex_learner_replay_inserted_total": "items",
    "apex_learner_replay_env_steps_total": "steps", "apex_learner_replay_rejected_messages_total": "messages",
}


def metric_unit(name: str) -> str:
    """The unit of a catalogue series: explicit, else from a base-unit suffix (``_seconds``,
    ``_bytes``, optionally before ``_total``), else from the table above."""
    d = CATALOGUE[name]
    if d.unit:
        return d.unit
    stem = name.removesuffix("_total")
    for unit in ("seconds", "bytes"):
        if stem.endswith("_" + unit):
            return unit
    return _UNITS.get(name, "1")


def metric_roles(name: str) -> str:
    """Which processes export a series: a role name, or "all" for process-level series."""
    if name.startswith(("apex_process_", "apex_run_")):
        return "all"
    role = name.split("_")[1]
    return role if role in ROLE_OFFSETS else "all"


class Recorder:
    """In-memory recorder (single-process mode and tests): keeps the last value / running sum."""

    def __init__(self) -> None:
        self.values: dict[tuple, float] = {}

    @staticmethod
    def _key(name: str, labels: dict) -> tuple:
        if name not in CATALOGUE:
            raise KeyError(f"metric {name!r} is not in apex_local.metrics.CATALOGUE")
        return (name, *sorted(labels.items()))

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        k = self._key(name, labels)
        self.values[k] = self.values.get(k, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        self.values[self._key(name, labels)] = float(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        k = self._key(name, labels)
        self.values[k] = self.values.get(k, 0.0) + value

    def get(self, name: str, **labels: str) -> float:
        return self.values.get(self._key(name, labels), 0.0)


class NullRecorder(Recorder):
    """Discards everything (metrics disabled)."""

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        pass

    def set(self, name: str, value: float, **labels: str) -> None:
        pass

    def observe(self, name: str, value: float, **labels: str) -> None:
        pass


class MetricsPortInUse(OSError):
    pass


class PrometheusRecorder(Recorder):
    """Exports the catalogue's series on an HTTP ``/metrics`` endpoint.

    ``const_labels`` (role, index) are attached to every series of this process. Counters and
    histograms of this role without further labels are exported from the start (at 0), so a
    dashboard query such as ``rate(apex_actor_env_errors_total[1m])`` has data before the first
    error. The ``collected`` series (RSS, /dev/shm) are read from /proc at each scrape;
    ``run_id`` names the run whose segments ``apex_run_shm_bytes`` adds up (default:
    ``$APEX_RUN_ID``, else guessed from the segments this process maps).

    Counters and gauges live in the in-memory ``values`` (under a lock) and are turned into
    samples at scrape time: a recorder call on the hot path is a dict lookup and an add (about
    a third of a prometheus_client child update). Histograms use prometheus_client's.
    """

    def __init__(self, host: str, port: int, const_labels: dict[str, str],
                 names: Iterable[str] | None = None, run_id: str | None = None) -> None:
        super().__init__()
        import threading

        import prometheus_client as pc  # only import site of prometheus_client

        pc.disable_created_metrics()  # no *_created series: they double the series count for nothing
        self._registry = pc.CollectorRegistry()
        self._const = dict(const_labels)
        self._lock = threading.Lock()
        self._names = [n for n in (names or CATALOGUE)]
        self._hist = {}
        self._series: dict = {}  # call key -> (in-memory key, kind, histogram child or None)
        role = self._const.get("role", "")
        for name in self._names:
            d = CATALOGUE[name]
            if d.kind == "histogram":
                self._hist[name] = pc.Histogram(name, d.help, tuple(self._const) + d.labels, registry=self._registry,
                                                buckets=d.buckets or pc.Histogram.DEFAULT_BUCKETS)
            if d.kind != "gauge" and not d.labels and not d.collected and metric_roles(name) == role:
                if d.kind == "counter":  # export 0 until the first event
                    self.inc(name, 0.0)
                else:
                    self._series_of(name, {})  # creates the histogram's child: zero buckets
        self._registry.register(_Values(self))
        collected = [n for n in self._names if CATALOGUE[n].collected]
        if collected:
            self._registry.register(_ProcessStats(collected, self._const, run_id))
        if pc.__dict__.get("process_collector"):
            pc.ProcessCollector(registry=self._registry)
        check_port_free(host, port)
        try:
            self._server, self._thread = _serve(self._registry, host, port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise _port_in_use(host, port) from None
            raise
        self.port = port

    def _series_of(self, name: str, labels: dict):
        """(in-memory key, kind, histogram child) of one series, validated once and cached."""
        fast = (name, *labels.items()) if labels else name
        entry = self._series.get(fast)
        if entry is None:
            vkey = self._key(name, labels)  # raises KeyError for names not in CATALOGUE
            d = CATALOGUE[name]
            if sorted(labels) != sorted(d.labels):
                raise ValueError(f"metric {name!r} takes labels {list(d.labels)}, got {sorted(labels)}")
            h = self._hist.get(name)
            child = h.labels(**self._const, **labels) if h is not None and (self._const or labels) else h
            entry = self._series[fast] = (vkey, d.kind, child)
        return entry

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        vkey, kind, _ = self._series_of(name, labels)
        if kind == "histogram" or (kind == "counter" and value < 0):
            raise ValueError(f"cannot inc {kind} {name!r} by {value}")
        with self._lock:
            self.values[vkey] = self.values.get(vkey, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        vkey, kind, _ = self._series_of(name, labels)
        if kind != "gauge":
            raise ValueError(f"cannot set {kind} {name!r}")
        self.values[vkey] = float(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        vkey, kind, child = self._series_of(name, labels)
        if child is None:
            raise ValueError(f"cannot observe {kind} {name!r}")
        child.observe(value)
        with self._lock:
            self.values[vkey] = self.values.get(vkey, 0.0) + value

    def snapshot(self) -> list[tuple[tuple, float]]:
        with self._lock:
            return list(self.values.items())

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Values:
    """prometheus_client collector: the recorder's counters and gauges, as samples at scrape time."""

    def __init__(self, rec: PrometheusRecorder) -> None:
        self.rec = rec

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        by_name: dict[str, list] = {}
        for vkey, value in self.rec.snapshot():
            by_name.setdefault(vkey[0], []).append((dict(vkey[1:]), value))
        const = self.rec._const
        for name in self.rec._names:
            d = CATALOGUE[name]
            if d.kind == "histogram" or d.collected:
                continue  # (a family without samples still gets its HELP/TYPE lines, as before)
            family = (CounterMetricFamily if d.kind == "counter" else GaugeMetricFamily)(
                name, d.help, labels=list(const) + list(d.labels))
            for labels, value in by_name.get(name, ()):
                family.add_metric(list(const.values()) + [labels[k] for k in d.labels], value)
            yield family


class _ProcessStats:
    """prometheus_client collector for the ``collected`` catalogue series (RSS, /dev/shm)."""

    def __init__(self, names: list[str], const: dict[str, str], run_id: str | None) -> None:
        import os

        self.names = set(names)
        self.const = const
        self.run_id = run_id or os.environ.get("APEX_RUN_ID") or None

    def describe(self):
        return []  # not checked against other collectors' names at registration

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from apex_local.monitoring import procstats

        keys = list(self.const)
        values = list(self.const.values())
        name = "apex_process_resident_memory_bytes"
        if name in self.names:
            g = GaugeMetricFamily(name, CATALOGUE[name].help, labels=keys + ["kind"])
            for kind, n in procstats.resident_bytes().items():
                g.add_metric(values + [kind], n)
            yield g
        mapped = procstats.mapped_shm()
        name = "apex_process_shm_bytes"
        if name in self.names:
            g = GaugeMetricFamily(name, CATALOGUE[name].help, labels=keys)
            g.add_metric(values, sum(mapped.values()))
            yield g
        name = "apex_run_shm_bytes"
        if name in self.names:
            if self.run_id is None:  # cached once found: the run of a process never changes
                self.run_id = procstats.guess_run_id(mapped)
            g = GaugeMetricFamily(name, CATALOGUE[name].help, labels=keys)
            # run unknown: this process maps nothing yet (0), so nothing of the run is known
            g.add_metric(values, procstats.run_shm_bytes(self.run_id) if self.run_id else sum(mapped.values()))
            yield g


def _serve(registry, host: str, port: int):
    """prometheus_client's WSGI exporter on a daemon thread that polls every 50 ms, so
    ``close()`` returns in ~50 ms (start_http_server polls every 0.5 s; services must exit
    within 3 s of SIGTERM)."""
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    class _Quiet(WSGIRequestHandler):
        def log_message(self, *args) -> None:  # no access log on stderr
            pass

    httpd = make_server(host, port, make_wsgi_app(registry), ThreadingWSGIServer, handler_class=_Quiet)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                              name="metrics-http")
    thread.start()
    return httpd, thread


def _port_in_use(host: str, port: int) -> MetricsPortInUse:
    return MetricsPortInUse(f"metrics port {host}:{port} is already in use (set metrics.base_port or "
                            "metrics.enabled: false)")


def check_port_free(host: str, port: int) -> None:
    """Fail fast, naming the port, if ``host:port`` is taken (DESIGN.md §9)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: connections a scrape left in TIME_WAIT are not a listener
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise _port_in_use(host, port) from None
            raise


def metrics_port(base_port: int, role: str, index: int = 0) -> int:
    """``base + role offset + index`` (not honcho's $PORT, which moves when the Procfile changes).

    replay +0, learner 0 +1 (Gorila learner j > 0: +20+j), evaluator +2, paramserver +3,
    actor i +100+i.
    """
    if role not in ROLE_OFFSETS:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLE_OFFSETS)}")
    if role == "learner" and index > 0:
        return base_port + 20 + index
    return base_port + ROLE_OFFSETS[role] + (index if role == "actor" else 0)


def make_recorder(metrics_cfg, role: str, index: int = 0, run_id: str | None = None) -> Recorder:
    """The recorder a service uses: Prometheus when enabled, else a NullRecorder. ``run_id``:
    the run whose /dev/shm total ``apex_run_shm_bytes`` reports (default ``$APEX_RUN_ID``)."""
    if not metrics_cfg.enabled:
        return NullRecorder()
    port = metrics_port(metrics_cfg.base_port, role, index)
    return PrometheusRecorder(metrics_cfg.host, port, {"role": role, "index": str(index)}, run_id=run_id)
