"""Single-process mode (DESIGN.md §10): env(s) + replay + learner in one process, wired from
the same builders the services use. The debugging path and the reference the distributed
run is compared against.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from typing import Callable

import numpy as np

from apex_local.agents.builders import (make_accumulator, make_learner, make_local_replay, push_chunk,
                                       set_torch_threads)
from apex_local.agents.checkpoint import CHECKPOINT_NAME, save_checkpoint
from apex_local.agents.evaluation import evaluate_policy
from apex_local.agents.policy import EpsilonSchedule, Policy
from apex_local.config import Config, run_dir
from apex_local.envs import make_vector_env
from apex_local.errors import NonFiniteLossError
from apex_local.losses import DISCREPANCY_EVERY, q_value_discrepancy
from apex_local.metrics import Recorder
from apex_local.replay.samplers import UniformSampler, beta_schedule

EvalHook = Callable[[int, float, list], None]
# flush the accumulator into the replay every this many vector steps: one insert of 4 steps costs
# about what one of 1 step does (CartPole: ~0.25 ms), and the newest 3 steps wait at most 3 steps
LOCAL_INSERT_EVERY = 4


class StatusLine:
    """Periodic one-line progress: env steps/s, updates/s, replay size, recent return."""

    def __init__(self, every: float, out=sys.stdout, prefix: str = "local") -> None:
        self.every, self.out, self.prefix = every, out, prefix
        self.t0 = self.t_last = time.monotonic()
        self.steps_last = self.updates_last = 0

    def maybe(self, steps: int, updates: int, extra: str | Callable[[], str], force: bool = False) -> None:
        """Print when ``every`` seconds have passed (or ``force``); ``extra`` may be a callable,
        formatted only then (the local trainer calls this every env step)."""
        if not force and self.every <= 0:
            return
        now = time.monotonic()
        if not force and now - self.t_last < self.every:
            return
        extra = extra() if callable(extra) else extra
        dt = max(now - self.t_last, 1e-9)
        print(f"[{self.prefix}] t={now - self.t0:6.0f}s steps={steps} ({(steps - self.steps_last) / dt:.0f}/s) "
              f"updates={updates} ({(updates - self.updates_last) / dt:.0f}/s) {extra}", file=self.out, flush=True)
        self.t_last, self.steps_last, self.updates_last = now, steps, updates


def train_local(cfg: Config, *, eval_every_steps: int = 0, eval_episodes: int | None = None,
                on_eval: EvalHook | None = None, stop_on_return: float | None = None,
                recorder: Recorder | None = None, out=sys.stdout) -> dict:
    """Train until ``run.max_env_steps``; returns a run summary dict.

    ``eval_every_steps`` > 0 plays ``eval_episodes`` greedy games every that many env steps
    (``on_eval(env_steps, seconds, returns)`` is called); ``stop_on_return`` ends the run once
    a greedy mean return reaches it (time-to-solve benchmarks).
    """
    rec = recorder or Recorder()
    t_start = time.monotonic()
    n_envs = cfg.env.num_envs
    venv = make_vector_env(cfg.env, n_envs, seed=cfg.run.seed)
    spec = venv.spec
    set_torch_threads(cfg, spec)
    learner = make_learner(cfg, spec)
    replay = make_local_replay(cfg, spec, seed=cfg.run.seed)
    acc = make_accumulator(cfg, spec, n_envs)
    policy = Policy(learner.online, n_envs, seed=cfg.run.seed + 1, noise=True)
    eps_of = EpsilonSchedule(cfg.actor, 0, n_envs)
    status = StatusLine(cfg.run.log_every_seconds, out)
    out_dir = run_dir(cfg)
    lc = cfg.learner
    returns: deque = deque(maxlen=100)
    evals: list[dict] = []
    env_steps = vec_steps = episodes = 0
    last_ckpt = time.monotonic()
    exit_code, solved_at, metrics = 0, None, {}
    interrupted = False
    next_eval = eval_every_steps if eval_every_steps > 0 else None
    recurrent = bool(getattr(learner.online, "recurrent", False))
    prioritized = not isinstance(replay.sampler, UniformSampler)
    discrepancy: list[dict] = []  # R2D2 §3 Q-value discrepancy every DISCREPANCY_EVERY updates (recurrent nets)

    obs = venv.reset(seed=cfg.run.seed)
    acc.reset(obs)
    try:
        while env_steps < cfg.run.max_env_steps:
            eps = eps_of(env_steps)
            actions, _, state = policy.act(obs, eps, need_q=False)  # uniform/max priorities: no actor q
            obs, reward, term, trunc, info = venv.step(actions)
            acc.step(actions, reward, term, trunc, obs, info["final_obs"],
                     **({"state_h": state[0].cpu().numpy(), "state_c": state[1].cpu().numpy()}
                        if state is not None else {}))
            policy.reset_state(term | trunc)
            env_steps += n_envs
            vec_steps += 1
            for i in np.flatnonzero(info["game_over"]):
                episodes += 1
                returns.append(float(info["episode_return"][i]))
                rec.set("apex_actor_episode_return", float(info["episode_return"][i]))
            if vec_steps % LOCAL_INSERT_EVERY == 0:
                push_chunk(replay, acc, actor_id=0)

            if vec_steps % lc.train_every == 0 and replay.can_sample(lc.batch_size):
                for _ in range(lc.updates_per_train):
                    sample = replay.sample(lc.batch_size, beta_schedule(cfg.replay, learner.updates))
                    batch = learner.to_batch(dict(sample.batch, weight=sample.weights))
                    result = learner.update(batch)
                    if result.priorities is not None:
                        if prioritized:  # (a uniform sampler has no priorities to update)
                            replay.update_priorities(sample.indices, sample.generations, result.priorities)
                        metrics = result.metrics
                    if recurrent and learner.updates % DISCREPANCY_EVERY == 0:  # as the topology learner does
                        d = q_value_discrepancy(learner.online, batch, cfg.replay.burn_in)
                        discrepancy.append({"updates": learner.updates, "env_steps": env_steps, "q_discrepancy": d})
                        rec.set("apex_learner_q_discrepancy", d)
            if next_eval is not None and env_steps >= next_eval:
                next_eval += eval_every_steps
                rs = evaluate_policy(learner.online, cfg.env, eval_episodes or cfg.actor.eval_episodes,
                                     seed=cfg.run.seed + 10_000 + env_steps, epsilon=cfg.actor.eval_epsilon)
                evals.append({"env_steps": env_steps, "seconds": time.monotonic() - t_start,
                              "mean_return": float(np.mean(rs))})
                if on_eval:
                    on_eval(env_steps, time.monotonic() - t_start, rs)
                if stop_on_return is not None and np.mean(rs) >= stop_on_return:
                    solved_at = evals[-1]
                    break
            if lc.checkpoint_every_seconds > 0 and time.monotonic() - last_ckpt > lc.checkpoint_every_seconds:
                save_checkpoint(out_dir / CHECKPOINT_NAME, _ckpt_state(cfg, learner, env_steps, episodes))
                last_ckpt = time.monotonic()
            eps_now = float(eps) if np.ndim(eps) == 0 else float(np.mean(eps))
            rec.set("apex_actor_epsilon", eps_now)
            status.maybe(env_steps, learner.updates,
                         lambda: f"replay={replay.size} eps={eps_now:.3f} return={_mean(returns, 20)} "
                                 f"loss={metrics.get('loss', float('nan')):.4f}")
    except NonFiniteLossError as exc:
        print(f"[local] stopping: {exc}", file=sys.stderr, flush=True)
        exit_code = NonFiniteLossError.exit_code
    except KeyboardInterrupt:  # Ctrl-C (and SIGTERM via the CLI): stop cleanly, keep a checkpoint
        print(f"[local] interrupted at {env_steps} env steps; writing a final checkpoint", file=sys.stderr,
              flush=True)
        interrupted = True
    finally:
        venv.close()
    path = save_checkpoint(out_dir / CHECKPOINT_NAME, _ckpt_state(cfg, learner, env_steps, episodes))
    status.maybe(env_steps, learner.updates, f"replay={replay.size} return={_mean(returns, 20)} done",
                 force=True)
    return {
        "env_steps": env_steps, "updates": learner.updates, "episodes": episodes,
        "mean_return_100": float(np.mean(returns)) if returns else None,
        "wall_seconds": round(time.monotonic() - t_start, 2), "checkpoint": str(path),
        "nonfinite_losses": learner.nonfinite_total, "evaluations": evals, "solved": solved_at,
        "exit_code": exit_code, "interrupted": interrupted, "q_discrepancy": discrepancy,
    }


def _mean(xs, n: int) -> str:
    xs = list(xs)[-n:]
    return f"{np.mean(xs):.1f}" if xs else "n/a"


def _ckpt_state(cfg: Config, learner, env_steps: int, episodes: int) -> dict:
    return {"config": cfg.to_dict(), "learner": learner.state_dict(), "env_steps": env_steps,
            "episodes": episodes}
