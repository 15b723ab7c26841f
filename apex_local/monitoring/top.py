"""``apex-local top``: a live terminal view of a running topology, read from each process's
``/metrics`` endpoint (the same numbers Prometheus scrapes; no Prometheus needed).

Each frame compares two scrapes ``interval`` seconds apart, so rates are per second over that
interval. A process that does not answer is shown as ``down`` with the reason; it never stops
the view. ``--once`` prints one frame (after one interval) and exits.

Per method: a Gorila run (its process list has a parameter server) shows the parameter
server's applied gradients/s, per-learner received rates, mean staleness and drops, and each
learner's gradients sent/s (and its own replay's size and inserts/s with
``learner.gorila_replay: local``); an R2D2 learner adds its latest Q-value discrepancy.
"""
from __future__ import annotations

import math
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from apex_local.monitoring.scrape import Scrape, scrape
from apex_local.monitoring.targets import Process

CLEAR = "\x1b[H\x1b[2J"
RED, GREEN, DIM, RESET = "\x1b[31m", "\x1b[32m", "\x1b[2m", "\x1b[0m"


def _num(v: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:{spec}}{suffix}"


def _bytes(v: float | None) -> str:
    if v is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return "-"  # pragma: no cover


def rate(cur: Scrape, prev: Scrape | None, name: str, **match: str) -> float | None:
    """Per-second increase of a counter between two scrapes; None when unknown (first
    scrape, process down, or the counter went back: the process restarted)."""
    if prev is None or not (cur.ok and prev.ok) or cur.time <= prev.time:
        return None
    a, b = prev.get(name, None, **match), cur.get(name, None, **match)
    if a is None or b is None or b < a:
        return None
    return (b - a) / (cur.time - prev.time)


class TopView:
    """Keeps the previous scrape of every process and the recent episode returns per actor."""

    def __init__(self, processes: list[Process], run: str, interval: float = 2.0, timeout: float = 1.0,
                 returns_kept: int = 10) -> None:
        self.processes = processes
        self.run = run
        self.interval = interval
        self.timeout = timeout
        self.prev: dict[str, Scrape] = {}
        self.returns: dict[str, deque] = {p.name: deque(maxlen=returns_kept) for p in processes if p.role == "actor"}
        self.gorila = any(p.role == "paramserver" for p in processes)
        self._pool = ThreadPoolExecutor(max_workers=min(16, max(1, len(processes))))

    def poll(self) -> dict[str, Scrape]:
        scrapes = list(self._pool.map(lambda p: scrape(p.url, self.timeout), self.processes))
        return {p.name: s for p, s in zip(self.processes, scrapes)}

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    # ------------------------------------------------------------------ rendering
    def frame(self, cur: dict[str, Scrape], color: bool = False) -> str:
        """Render one frame from ``cur`` and the previous scrapes, then remember ``cur``."""
        paint = (lambda text, c: f"{c}{text}{RESET}") if color else (lambda text, c: text)
        learner_version = max((s.get("apex_learner_weights_version", -math.inf) for n, s in cur.items()
                               if s.ok and n.startswith("learner.")), default=-math.inf)
        ps_version = next((s.get("apex_paramserver_weights_version") for n, s in cur.items()
                           if s.ok and n.startswith("paramserver.")), None)
        newest = ps_version if ps_version is not None else (None if learner_version == -math.inf else learner_version)
        lines = [f"apex-local top   run {self.run}   {time.strftime('%H:%M:%S')}   "
                 f"rates over {self.interval:g} s   (Ctrl-C quits)", "",
                 f"{'PROCESS':<14}{'STATE':<7}{'RSS':>11}{'SHM':>11}   DETAILS"]
        total_steps, actors_up, run_shm = 0.0, 0, None
        for p in self.processes:
            s, prev = cur[p.name], self.prev.get(p.name)
            if not s.ok:
                lines.append(f"{p.name:<14}{paint('down   ', RED)}"
                             f"{'':>22}   {p.address}: {s.error}")
                continue
            rss = s.get("apex_process_resident_memory_bytes")
            if rss is None:
                rss = s.get("process_resident_memory_bytes")
            shm = s.get("apex_process_shm_bytes")
            run_total = s.get("apex_run_shm_bytes")
            if run_total is not None:
                run_shm = max(run_shm or 0.0, run_total)
            detail = getattr(self, f"_{p.role}", lambda *a: "")(p, s, prev, newest)
            if p.role == "actor":
                actors_up += 1
                total_steps += rate(s, prev, "apex_actor_env_steps_total") or 0.0
            lines.append(f"{p.name:<14}{paint('up     ', GREEN)}"
                         f"{_bytes(rss):>11}{_bytes(shm):>11}   {detail}")
        n_actors = sum(p.role == "actor" for p in self.processes)
        lines += ["", f"actors: {_num(total_steps)} env steps/s in total ({actors_up} of {n_actors} up)   "
                      f"run /dev/shm: {_bytes(run_shm)}"]
        self.prev = cur
        return "\n".join(lines)

    def _replay(self, p, s, prev, newest) -> str:
        size, cap = s.get("apex_replay_size"), s.get("apex_replay_capacity")
        ins, smp = rate(s, prev, "apex_replay_inserted_total"), rate(s, prev, "apex_replay_sampled_total")
        ratio = smp / ins if ins and smp is not None else None
        fill = f" ({100 * size / cap:.0f}%)" if size is not None and cap else ""
        rejected = s.get("apex_replay_rejected_messages_total", 0.0)
        return (f"size {_num(size)}/{_num(cap)}{fill}  insert {_num(ins)}/s  sample {_num(smp)}/s  "
                f"sample/insert {_num(ratio, '.2f')}  env steps {_num(rate(s, prev, 'apex_replay_env_steps_total'))}/s"
                f"  rejected {_num(rejected)}")

    def _learner(self, p, s, prev, newest) -> str:
        wait_n = rate(s, prev, "apex_learner_batch_wait_seconds_count")
        wait_s = rate(s, prev, "apex_learner_batch_wait_seconds_sum")
        wait = 1000 * wait_s / wait_n if wait_n and wait_s is not None else None
        text = (f"updates {_num(rate(s, prev, 'apex_learner_updates_total'), ',.1f')}/s  "
                f"loss {_num(s.get('apex_learner_loss'), '.4g')}  |td| {_num(s.get('apex_learner_td_abs_mean'), '.4g')}  "
                f"q {_num(s.get('apex_learner_q_mean'), '.4g')}  weights v{_num(s.get('apex_learner_weights_version'))}  "
                f"batch wait {_num(wait, '.1f')} ms")
        if self.gorila:  # every learner exports the counter (at 0): show it where it means something
            text += f"  gradients sent {_num(rate(s, prev, 'apex_learner_gradients_sent_total'), ',.1f')}/s"
        size = s.get("apex_learner_replay_size")  # a Gorila learner's own replay (learner.gorila_replay: local)
        if size is not None:
            text += (f"  local replay {_num(size)}/{_num(s.get('apex_learner_replay_capacity'))}"
                     f" insert {_num(rate(s, prev, 'apex_learner_replay_inserted_total'))}/s")
        dq = s.get("apex_learner_q_discrepancy")  # R2D2 learners, after their first measurement
        if dq is not None:
            text += f"  q discrepancy {_num(dq, '.4f')}"
        return text

    def _evaluator(self, p, s, prev, newest) -> str:
        if not s.get("apex_evaluator_episodes_total"):
            return "no evaluation yet (waiting for weights or playing)"
        hns = s.get("apex_evaluator_human_normalized_score")
        return (f"return {_num(s.get('apex_evaluator_return'), '.1f')}"
                + (f"  human-normalised {100 * hns:.0f}%" if hns is not None else "")
                + f"  (weights v{_num(s.get('apex_evaluator_weights_version'))}, "
                  f"{_num(s.get('apex_evaluator_episodes_total'))} episodes)")

    def _paramserver(self, p, s, prev, newest) -> str:
        received = ", ".join(
            f"{who} {_num(rate(s, prev, 'apex_paramserver_gradients_received_total', learner=who), ',.1f')}/s"
            for who in sorted(s.by_label("apex_paramserver_gradients_received_total", "learner")))
        dropped = s.by_label("apex_paramserver_gradients_dropped_total", "reason")
        dropped_text = ", ".join(f"{reason} {_num(n)}" for reason, n in sorted(dropped.items()) if n > 0) or "0"
        n = rate(s, prev, "apex_paramserver_staleness_count")
        total = rate(s, prev, "apex_paramserver_staleness_sum")
        staleness = total / n if n and total is not None else None
        return (f"gradients applied {_num(rate(s, prev, 'apex_paramserver_gradients_applied_total'), ',.1f')}/s  "
                f"received by learner [{received or 'none yet'}]  staleness mean {_num(staleness, '.1f')}  "
                f"dropped {dropped_text}  weights v{_num(s.get('apex_paramserver_weights_version'))}")

    def _actor(self, p, s, prev, newest) -> str:
        version = s.get("apex_actor_weights_version")
        lag = newest - version if newest is not None and version is not None else None
        episodes = s.get("apex_actor_episodes_total", 0.0)
        last = s.get("apex_actor_episode_return")
        before = prev.get("apex_actor_episodes_total", 0.0) if prev is not None and prev.ok else 0.0
        recent = self.returns[p.name]
        if last is not None and episodes > before:
            recent.append(last)
        avg = sum(recent) / len(recent) if recent else None
        return (f"steps {_num(rate(s, prev, 'apex_actor_env_steps_total'))}/s  eps {_num(s.get('apex_actor_epsilon'), '.4f')}"
                f"  weights v{_num(version)} lag {_num(lag)}  return {_num(last, '.1f')} "
                f"(avg {_num(avg, '.1f')} of {len(recent)} seen)  episodes {_num(episodes)}"
                f"  env errors {_num(s.get('apex_actor_env_errors_total', 0.0))}")


def run_top(processes: list[Process], run: str, interval: float = 2.0, once: bool = False, out=None) -> int:
    """Print frames until Ctrl-C (or one frame with ``once``). Returns an exit code (0)."""
    out = out or sys.stdout
    tty = hasattr(out, "isatty") and out.isatty() and not once
    view = TopView(processes, run, interval)
    try:
        view.prev = view.poll()
        while True:
            time.sleep(interval)
            text = view.frame(view.poll(), color=tty)
            out.write((CLEAR if tty else "") + text + "\n")
            out.flush()
            if once:
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        view.close()
