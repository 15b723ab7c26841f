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
    "apex_actor_env_errors_total": MetricDef("counter", "Environment errors survived (env rebuilt)"),
    # replay
    "apex_replay_size": MetricDef("gauge", "Items currently stored in replay"),
    "apex_replay_capacity": MetricDef("gauge", "Replay capacity in items"),
    "apex_replay_inserted_total": MetricDef("counter", "Items inserted into replay"),
    "apex_replay_sampled_total": MetricDef("counter", "Items sampled from replay"),
    "apex_replay_priority_updates_total": MetricDef("counter", "Priority updates applied"),
    "apex_replay_stale_priority_updates_total": MetricDef(
        "counter", "Priority updates dropped because the slot was overwritten since it was sampled"),
    "apex_replay_rejected_messages_total": MetricDef(
        "counter", "Messages dropped by the replay server, by reason", ("reason",)),
    "apex_replay_env_steps_total": MetricDef("counter", "Env steps reported by actors"),
    # learner
    "apex_learner_updates_total": MetricDef("counter", "Learner gradient updates"),
    "apex_learner_loss": MetricDef("gauge", "Loss of the latest update"),
    "apex_learner_td_abs_mean": MetricDef("gauge", "Mean absolute TD error (or priority) of the latest batch"),
    "apex_learner_q_mean": MetricDef("gauge", "Mean Q-value of the latest batch"),
    "apex_learner_weights_version": MetricDef("gauge", "Version of the latest published weights"),
    "apex_learner_nonfinite_losses_total": MetricDef("counter", "Updates skipped because the loss was not finite"),
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
}


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

    ``const_labels`` (role, index) are attached to every series of this process.
    """

    def __init__(self, host: str, port: int, const_labels: dict[str, str],
                 names: Iterable[str] | None = None) -> None:
        super().__init__()
        import prometheus_client as pc  # only import site of prometheus_client

        self._registry = pc.CollectorRegistry()
        self._const = dict(const_labels)
        self._metrics = {}
        const_names = tuple(self._const)
        for name in names or CATALOGUE:
            d = CATALOGUE[name]
            labels = const_names + d.labels
            if d.kind == "counter":
                m = pc.Counter(name.removesuffix("_total"), d.help, labels, registry=self._registry)
            elif d.kind == "gauge":
                m = pc.Gauge(name, d.help, labels, registry=self._registry)
            else:
                m = pc.Histogram(name, d.help, labels, registry=self._registry,
                                 buckets=d.buckets or pc.Histogram.DEFAULT_BUCKETS)
            self._metrics[name] = m
        if pc.__dict__.get("process_collector"):
            pc.ProcessCollector(registry=self._registry)
        check_port_free(host, port)
        try:
            self._server, self._thread = _serve(self._registry, host, port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MetricsPortInUse(
                    f"metrics port {host}:{port} is already in use (set metrics.base_port or "
                    "metrics.enabled: false)") from None
            raise
        self.port = port

    def _child(self, name: str, labels: dict):
        m = self._metrics[name]
        return m.labels(**self._const, **labels) if (self._const or labels) else m

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        super().inc(name, value, **labels)
        self._child(name, labels).inc(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        super().set(name, value, **labels)
        self._child(name, labels).set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        super().observe(name, value, **labels)
        self._child(name, labels).observe(value)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


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


def check_port_free(host: str, port: int) -> None:
    """Fail fast, naming the port, if ``host:port`` is taken (DESIGN.md §9)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: connections a scrape left in TIME_WAIT are not a listener
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MetricsPortInUse(
                    f"metrics port {host}:{port} is already in use (set metrics.base_port or "
                    "metrics.enabled: false)") from None
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


def make_recorder(metrics_cfg, role: str, index: int = 0) -> Recorder:
    """The recorder a service uses: Prometheus when enabled, else a NullRecorder."""
    if not metrics_cfg.enabled:
        return NullRecorder()
    port = metrics_port(metrics_cfg.base_port, role, index)
    return PrometheusRecorder(metrics_cfg.host, port, {"role": role, "index": str(index)})
