"""Cost of metrics: actor throughput with the Prometheus recorder vs metrics disabled.

    python -m bench.bench_metrics [--config configs/apex_cartpole.yaml] [--pairs 40] [--seconds 0.5]

One `ActorService` runs in this process (transport replaced by no-ops: ``send_message``
returns at once and weights are never synced, so the actor loop, the hottest recorder user, is
all that is measured). Short windows alternate A B B A ... between

- **on**: a `PrometheusRecorder` whose ``/metrics`` a thread of this process scrapes every
  ``--scrape-every`` seconds of "on" time (5 s, as configs/prometheus/prometheus.yml; the
  client side of the scrape is counted against "on" too, so this overstates the cost), and
- **off**: a `NullRecorder` and no scraping (``metrics.enabled: false``; only the idle HTTP
  thread of the other recorder stays, ~0.1% of a core).

Same env, network and machine load (the workstation is shared, so load drifts). The result is
env steps per CPU second of this process (all its threads, HTTP server and scraper included;
insensitive to other users taking the cores), on / off, over all windows (includes the
scrapes); the median over adjacent window pairs and the wall-clock ratio are printed too. The per-call cost of ``inc``/``set``/``observe``
and the recorder calls per vector step give the expected ratio independently.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
import urllib.request
import uuid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def per_call_ns(rec, n: int = 100_000) -> dict[str, float]:
    out = {}
    for verb, call in (("inc", lambda: rec.inc("apex_actor_env_steps_total", 4)),
                       ("set", lambda: rec.set("apex_actor_epsilon", 0.1)),
                       ("observe", lambda: rec.observe("apex_learner_batch_wait_seconds", 0.002))):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                call()
            best = min(best, (time.perf_counter() - t0) / n * 1e9)
        out[verb] = best
    return out


class _Never:
    """A shutdown flag that never fires."""

    def __bool__(self) -> bool:
        return False

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/apex_cartpole.yaml")
    p.add_argument("--pairs", type=int, default=40, help="on/off window pairs")
    p.add_argument("--seconds", type=float, default=0.5, help="CPU seconds per window")
    p.add_argument("--scrape-every", type=float, default=5.0, help="seconds of 'on' time between scrapes")
    args = p.parse_args(argv)

    from apex_local.config import load_config
    from apex_local.envs import env_spec
    from apex_local.metrics import NullRecorder, PrometheusRecorder
    from apex_local.roles import actor_loop
    from apex_local.runtime import limit_threads

    limit_threads(1)  # as services/actor.py
    actor_loop.send_message = lambda *a, **k: True  # no replay: measure the actor loop only
    cfg = load_config(args.config, ["metrics.enabled=true"])
    run = "bm" + uuid.uuid4().hex[:8]
    port = _free_port()
    prom = PrometheusRecorder("127.0.0.1", port, {"role": "actor", "index": "0"}, run_id=run)
    stop, scraping = threading.Event(), threading.Event()
    scrapes = [0]

    def scraper():
        on_time = 0.0
        while not stop.wait(0.05):
            if scraping.is_set():
                on_time += 0.05
                if on_time >= args.scrape_every:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
                    on_time -= args.scrape_every
                    scrapes[0] += 1

    threading.Thread(target=scraper, daemon=True).start()

    class Counting(NullRecorder):
        calls = 0

        def inc(self, *a, **k):
            Counting.calls += 1

        set = observe = inc

    actor = actor_loop.ActorService(cfg, run, env_spec(cfg.env), 0, Counting(), log=lambda m: None)
    actor.sync_weights = lambda *x, **k: False
    never = _Never()
    for _ in range(500):  # warm up, and count recorder calls per vector step
        actor.step(never)
    calls_per_step = Counting.calls / 500
    null = NullRecorder()

    def window(on: bool) -> tuple[float, float]:
        actor.rec = prom if on else null
        scraping.set() if on else scraping.clear()
        s0, t0, c0 = actor.env_steps, time.perf_counter(), time.process_time()
        while time.process_time() - c0 < args.seconds:
            actor.step(never)
        steps, c, w = actor.env_steps - s0, time.process_time() - c0, time.perf_counter() - t0
        totals[on][0] += steps
        totals[on][1] += c
        return steps / c, steps / w

    cpu, wall = {True: [], False: []}, {True: [], False: []}
    totals = {True: [0, 0.0], False: [0, 0.0]}
    for i in range(args.pairs):
        for on in ((True, False) if i % 2 == 0 else (False, True)):  # ABBA: linear drift cancels
            c, w = window(on)
            cpu[on].append(c)
            wall[on].append(w)
    stop.set()
    calls_prom, calls_null = per_call_ns(prom), per_call_ns(null)
    actor.close()
    prom.close()

    def ratio(d):
        return statistics.median(a / b for a, b in zip(d[True], d[False]))

    step_ns = 1e9 * cfg.env.num_envs / statistics.median(cpu[False])  # one vector step, metrics off
    extra_ns = calls_per_step * ((calls_prom["inc"] + calls_prom["set"]) - (calls_null["inc"] + calls_null["set"])) / 2
    print(f"config {args.config}: {cfg.env.id} x {cfg.env.num_envs} envs; {args.pairs} pairs of "
          f"{args.seconds:g} CPU-s windows (ABBA); load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    for on, name in ((True, "metrics on "), (False, "metrics off")):
        print(f"  {name}  median {statistics.median(cpu[on]):7.0f} env steps per CPU second, "
              f"{statistics.median(wall[on]):7.0f} per wall second")
    total = (totals[True][0] / totals[True][1]) / (totals[False][0] / totals[False][1])
    print(f"  ratio on/off: {total:.3f} per CPU second over all windows ({scrapes[0]} scrapes); median of pairs "
          f"{ratio(cpu):.3f} per CPU second, {ratio(wall):.3f} per wall second")
    print(f"  expected from call costs: {calls_per_step:.2f} recorder calls per vector step x "
          f"{extra_ns / max(calls_per_step, 1e-9) / 1000:.2f} us = {100 * extra_ns / step_ns:.2f}% of a "
          f"{step_ns / 1000:.0f} us step -> {1 - extra_ns / step_ns:.4f}")
    print("  per call (ns): " + ", ".join(f"{v} prometheus {calls_prom[v]:.0f} / null {calls_null[v]:.0f}"
                                          for v in calls_prom))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
