"""Time to solve CartPole-v1: our DQN and Ape-X topology vs Stable-Baselines3 and Tianshou DQN.

    python -m bench.bench_solve_peers [--methods dqn,apex_2actors,sb3_dqn,tianshou_dqn] [--seeds 3]
                                      [--budget N] [--quick] [--actors 2] [--json PATH]

Criterion (the same for every method, as in bench/bench_solve.py): a greedy mean return >= 475
(``--threshold``) over 10 (``--episodes``) evaluation episodes on separate envs, checked every
5,000 (``--eval-every``) env steps; the run stops at the first check that passes, or at the
budget. Reported: env steps and wall seconds at that check (evaluations included), in
bench_solve's row format (``bench_solve.table`` renders the rows).

Methods:

- ``dqn``: ``bench.bench_solve.solve_one('dqn', ...)``, our single-process DQN
  (configs/dqn_cartpole.yaml, run.torch_threads 1); evaluation epsilon ``actor.eval_epsilon``
  (0.001).
- ``apex_2actors`` (``apex_<N>actors`` with ``--actors N``): our Ape-X topology as real
  processes: replay + learner + N actors of configs/apex_cartpole.yaml (run.seed = seed), started
  with bench/_topo.py's Registry (tests/service_harness.py Topology). No evaluator service: this
  process polls the actors' ``apex_actor_env_steps_total`` (summed), and each time the sum passes
  the next multiple of ``--eval-every`` it reads the newest weights from the run's weights board
  and plays the evaluation episodes itself (``evaluate_policy``, epsilon ``actor.eval_epsilon``
  = 0.001) while the topology keeps running. The env steps recorded are the actors' sum scraped
  right after the weights were read. Wall seconds count from starting the processes, so process
  start-up (imports, shm, sockets) is included, and the evaluations share the 2 cores with the
  topology.
- ``sb3_dqn``: Stable-Baselines3 DQN with the rl-baselines3-zoo hyperparameters for CartPole-v1
  (``SB3_ZOO`` below); a callback evaluates every ``--eval-every`` env steps, greedy
  (``deterministic=True``), and stops ``learn`` at the first mean >= threshold.
- ``tianshou_dqn``: Tianshou 2.x DQN with the hyperparameters of Tianshou's CartPole DQN test
  (``TIANSHOU_TEST`` below), trained by its OffPolicyTrainer (no test collector: its built-in
  test step would use eps_test 0.05 and 100 episodes); the trainer's ``training_fn`` hook (called
  before every collect step) evaluates greedily with epsilon 0 (argmax Q, not their eps_test
  0.05) at the first collect boundary at or after each multiple of ``--eval-every`` total env
  steps (the 640 prefill steps included; with 10 envs x 10 steps per collect these are exactly
  the multiples of 5,000) and ends training. Tianshou JIT-compiles (numba) its n-step-return and
  buffer helpers when a process constructs its first algorithm / vector buffer (~10-20 s on 2
  loaded cores); that warm-up is done on throwaway objects before the clock starts and reported
  as ``warmup_seconds`` (not in the wall seconds).

The peers' evaluations (``greedy_returns``) play ``--episodes`` CartPole-v1 games in lockstep,
game i reset with seed ``seed + 10_000 + env_steps + i`` (ours use ``seed + 10_000 + env_steps``
for their eval envs; training envs are seeded with ``seed``), so evaluation seeds are distinct
from training seeds. Wall seconds count from building the envs and the agent (after the imports)
to the passing check, evaluations included, as ``train_local`` does for ours.

Isolation and threads: every run (ours included) runs in a fresh subprocess (``python -m
bench.bench_solve_peers --one METHOD --seed S --budget N --json OUT``, started with
``sys.executable``) so imports, torch threads and RNG state do not leak between runs. Every
in-process run calls ``torch.set_num_threads(1)`` (and OMP/MKL_NUM_THREADS=1 are set for the
subprocess): our local DQN already runs with ``run.torch_threads: 1``, the Ape-X services limit
their own threads, and the peers get the same single thread. The 1-minute load average is sampled
at start and at each evaluation (``peak_load``).

Peers are the optional ``bench`` extra (``pip install -e '.[bench]'``); a missing one gives a
'skipped' row instead of an error.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bench_solve  # noqa: E402
from bench._topo import stop_child  # noqa: E402

ENV_ID = "CartPole-v1"
APEX_CONFIG = "configs/apex_cartpole.yaml"
OURS = ("dqn", "apex")  # method-name prefixes of our rows (apex_<N>actors)
PEERS = ("sb3_dqn", "tianshou_dqn")
METHODS = ("dqn", "apex_2actors", "sb3_dqn", "tianshou_dqn")
# Held-out check (full mode of `python -m bench solve`): configs/dqn_cartpole.yaml was tuned on
# seeds 0-11 (docs/benchmarks_learning.md, "Tuning"), which include the 3 seeds above; these
# seeds were not used to choose any setting. Our DQN and the best peer of the main table.
HELD_OUT_SEEDS = tuple(range(12, 22))
HELD_OUT_METHODS = ("dqn", "sb3_dqn")
# method -> (import name, distribution name) of the peer package it needs
PEER_PACKAGES = {"sb3_dqn": ("stable_baselines3", "stable-baselines3"), "tianshou_dqn": ("tianshou", "tianshou")}
INSTALL_HINT = "pip install -e '.[bench]'"
# Env-step budgets per method: several times what each needs when it solves. Ape-X trades env
# steps for wall-clock (its actors generate data faster than one learner consumes it: the paper's
# point), so it gets more steps: 2 actors on CartPole solved at 120k-380k summed steps in 26-87 s
# on 2 cores (5 runs), at ~4,000 env steps/s.
BUDGETS = {"dqn": bench_solve.BUDGETS["dqn"], "apex": 800_000, "sb3_dqn": 100_000, "tianshou_dqn": 100_000}

# rl-baselines3-zoo, hyperparams/dqn.yml, entry "CartPole-v1" ("# Almost Tuned"), read at
# DLR-RM/rl-baselines3-zoo commit ce95481b041fe5314c1b2f1a53940d169b9253fc (the values the zoo's
# published sb3/dqn-CartPole-v1 model card lists too). An older revision of that file
# (019107eb..., lr 2.5e-4, batch 512, train_freq 16) is superseded.
SB3_ZOO = {
    "n_timesteps": 50_000,
    "policy": "MlpPolicy",
    "learning_rate": 2.3e-3,
    "batch_size": 64,
    "buffer_size": 100_000,
    "learning_starts": 1000,
    "gamma": 0.99,
    "target_update_interval": 10,
    "train_freq": 256,
    "gradient_steps": 128,
    "exploration_fraction": 0.16,
    "exploration_final_eps": 0.04,
    "policy_kwargs": {"net_arch": [256, 256]},
}

# Tianshou's CartPole-v1 DQN test, thu-ml/tianshou test/discrete/test_dqn.py (2.x API: DQN +
# DiscreteQLearningPolicy + OffPolicyTrainerParams; read from the 2.x copy of that file in
# eric-downes/tianshou_marl commit 0e538444d665c3d193f9eae6a4ec500aa374a004, the index's copy of
# thu-ml/tianshou's own being a 0.x revision). examples/discrete/discrete_dqn.py (thu-ml/tianshou
# commit 03132cc04cfe5c755baf441617bc7f52e2ae061c) uses the same values except hidden sizes
# [128, 128, 128] and no epsilon annealing. Their epoch / epoch_num_steps / 100 test episodes /
# reward_threshold 195 are replaced by this benchmark's criterion.
TIANSHOU_TEST = {
    "eps_test": 0.05,  # not used: our evaluation is greedy (epsilon 0)
    "eps_train": 0.1,  # annealed by their train_fn: 0.1 up to 10k steps, -> 0.01 at 50k
    "buffer_size": 20_000,
    "lr": 1e-3,
    "gamma": 0.9,
    "n_step": 3,
    "target_update_freq": 320,
    "collection_step_num_env_steps": 10,
    "update_per_step": 0.1,
    "batch_size": 64,
    "hidden_sizes": [128, 128, 128, 128],
    "num_train_envs": 10,
}


def budget_of(method: str) -> int:
    return BUDGETS["apex" if method.startswith("apex") else method]


def _loadavg() -> float:
    return os.getloadavg()[0]


def _row(method: str, seed: int, budget: int, evals: list[dict], solved: dict | None, total_steps: int,
         total_seconds: float, loads: list[float]) -> dict:
    """A result row with bench_solve.solve_one's keys."""
    best = max((e["mean_return"] for e in evals), default=float("nan"))
    return {"method": method, "seed": seed, "budget": budget, "solved": solved is not None,
            "env_steps": solved["env_steps"] if solved else None,
            "seconds": round(solved["seconds"], 1) if solved else None,
            "best_eval": best, "total_steps": int(total_steps), "total_seconds": round(total_seconds, 2),
            "steps_per_s": total_steps / max(total_seconds, 1e-9), "peak_load": max(loads),
            "evaluations": evals}


def _skipped(method: str, seed: int) -> dict | None:
    pkg = PEER_PACKAGES.get(method)
    if pkg and importlib.util.find_spec(pkg[0]) is None:
        return {"method": method, "seed": seed, "skipped": f"package `{pkg[1]}` not installed ({INSTALL_HINT})"}
    return None


def greedy_returns(act, episodes: int, seed: int) -> list[float]:
    """Play ``episodes`` CartPole-v1 games in lockstep (game i reset with seed ``seed + i``);
    ``act(obs[k, 4]) -> actions[k]`` is called on the observations of the games still running."""
    import gymnasium as gym

    envs = [gym.make(ENV_ID) for _ in range(episodes)]
    try:
        obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)]).astype(np.float32)
        returns = np.zeros(episodes)
        live = np.ones(episodes, bool)
        while live.any():
            idx = np.flatnonzero(live)
            actions = np.asarray(act(obs[idx])).reshape(-1)
            for j, a in zip(idx, actions):
                o, r, term, trunc, _ = envs[j].step(int(a))
                returns[j] += r
                obs[j] = o
                if term or trunc:
                    live[j] = False
    finally:
        for e in envs:
            e.close()
    return returns.tolist()


def _log(verbose: bool, method: str, seed: int, steps: int, seconds: float, mean: float) -> None:
    if verbose:
        print(f"  {method} seed={seed} steps={steps} t={seconds:.0f}s greedy mean={mean:.1f}",
              file=sys.stderr, flush=True)


def _check(act, steps: int, t_start: float, evals: list, loads: list, state: dict, *, method: str, seed: int,
           episodes: int, threshold: float, verbose: bool) -> bool:
    """One greedy evaluation at ``steps`` env steps, recorded in ``evals`` / ``loads``; True (and
    ``state['solved']`` set) when its mean reaches ``threshold``."""
    rs = greedy_returns(act, episodes, seed + 10_000 + steps)
    now = time.monotonic() - t_start
    evals.append({"env_steps": steps, "seconds": now, "mean_return": float(np.mean(rs))})
    loads.append(_loadavg())
    _log(verbose, method, seed, steps, now, evals[-1]["mean_return"])
    if evals[-1]["mean_return"] >= threshold:
        state["solved"] = evals[-1]
        return True
    return False


# ------------------------------------------------------------------ runs (in the subprocess)
def _run_dqn_here(seed, budget, eval_every, episodes, threshold, verbose=True, **_) -> dict:
    import torch

    torch.set_num_threads(1)  # train_local sets it again from run.torch_threads (1)
    return bench_solve.solve_one("dqn", seed, budget, eval_every, episodes, threshold, verbose=verbose)


def _run_sb3_here(seed, budget, eval_every, episodes, threshold, verbose=True, **_) -> dict:
    import torch
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback

    torch.set_num_threads(1)
    hp = dict(SB3_ZOO)
    n_timesteps = hp.pop("n_timesteps")
    # learn() for the zoo's n_timesteps (the callback ends it at the budget), so that the epsilon
    # schedule (a fraction of total_timesteps) is the zoo's; a longer budget keeps it in steps.
    total = max(budget, n_timesteps)
    hp["exploration_fraction"] *= n_timesteps / total
    method, loads, evals = "sb3_dqn", [_loadavg()], []
    state = {"next": eval_every, "solved": None}
    t_start = time.monotonic()
    model = DQN(hp.pop("policy"), ENV_ID, seed=seed, device="cpu", verbose=0, **hp)

    class SolveCheck(BaseCallback):
        def _on_step(self) -> bool:
            n = self.num_timesteps
            if n >= state["next"]:
                state["next"] += eval_every
                if _check(lambda o: model.predict(o, deterministic=True)[0], n, t_start, evals, loads, state,
                          method=method, seed=seed, episodes=episodes, threshold=threshold, verbose=verbose):
                    return False
            return n < budget

    model.learn(total_timesteps=total, callback=SolveCheck(), progress_bar=False)
    return _row(method, seed, budget, evals, state["solved"], model.num_timesteps, time.monotonic() - t_start,
                loads)


class _StopTraining(Exception):
    """Raised from the Tianshou trainer's training_fn to end training (solved or budget)."""


def _run_tianshou_here(seed, budget, eval_every, episodes, threshold, verbose=True, **_) -> dict:
    import gymnasium as gym
    import torch
    from tianshou.algorithm import DQN
    from tianshou.algorithm.modelfree.dqn import DiscreteQLearningPolicy
    from tianshou.algorithm.optim import AdamOptimizerFactory
    from tianshou.data import Collector, CollectStats, VectorReplayBuffer
    from tianshou.env import DummyVectorEnv
    from tianshou.trainer import OffPolicyTrainerParams
    from tianshou.utils.net.common import Net
    from tianshou.utils.torch_utils import policy_within_training_step

    torch.set_num_threads(1)
    a = TIANSHOU_TEST
    method, loads, evals = "tianshou_dqn", [_loadavg()], []
    # Not timed: Tianshou JIT-compiles (numba) its n-step-return and buffer helpers when the first
    # algorithm / vector buffer of a process is constructed (~10-20 s on 2 loaded cores, every fresh
    # process); done here on throwaway objects so that, as for the other in-process runs, the
    # clock measures setup + training + evaluations only (reported as warmup_seconds).
    t_warm = time.monotonic()
    env = gym.make(ENV_ID)
    DQN(policy=DiscreteQLearningPolicy(model=Net(state_shape=env.observation_space.shape,
                                                 action_shape=int(env.action_space.n), hidden_sizes=[8]),
                                       action_space=env.action_space),
        optim=AdamOptimizerFactory(lr=a["lr"]), gamma=a["gamma"], n_step_return_horizon=a["n_step"],
        target_update_freq=a["target_update_freq"])
    VectorReplayBuffer(64, buffer_num=2)
    env.close()
    warmup = time.monotonic() - t_warm

    np.random.seed(seed)
    torch.manual_seed(seed)
    t_start = time.monotonic()
    env = gym.make(ENV_ID)
    train_envs = DummyVectorEnv([lambda: gym.make(ENV_ID) for _ in range(a["num_train_envs"])])
    train_envs.seed(seed)
    net = Net(state_shape=env.observation_space.shape, action_shape=int(env.action_space.n),
              hidden_sizes=a["hidden_sizes"])
    policy = DiscreteQLearningPolicy(model=net, action_space=env.action_space, observation_space=env.observation_space,
                                     eps_training=a["eps_train"], eps_inference=a["eps_test"])
    algorithm = DQN(policy=policy, optim=AdamOptimizerFactory(lr=a["lr"]), gamma=a["gamma"],
                    n_step_return_horizon=a["n_step"], target_update_freq=a["target_update_freq"])
    buf = VectorReplayBuffer(a["buffer_size"], buffer_num=a["num_train_envs"])
    train_collector = Collector[CollectStats](algorithm, train_envs, buf, exploration_noise=True)
    with policy_within_training_step(policy):  # their initial collection (batch_size x envs)
        train_collector.reset()
        prefill = train_collector.collect(n_step=a["batch_size"] * a["num_train_envs"]).n_collected_steps

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        q, _ = net(torch.as_tensor(obs, dtype=torch.float32))
        return q.argmax(-1).numpy()  # greedy: epsilon 0

    state = {"next": eval_every, "solved": None, "total": prefill}

    def training_fn(epoch: int, env_step: int) -> None:
        # their epsilon annealing (on the trainer's env_step, which excludes the prefill)
        if env_step <= 10_000:
            policy.set_eps_training(a["eps_train"])
        elif env_step <= 50_000:
            policy.set_eps_training(a["eps_train"] - (env_step - 10_000) / 40_000 * (0.9 * a["eps_train"]))
        else:
            policy.set_eps_training(0.1 * a["eps_train"])
        total = state["total"] = prefill + env_step
        if total >= state["next"]:
            state["next"] = (total // eval_every + 1) * eval_every
            if _check(act, total, t_start, evals, loads, state, method=method, seed=seed, episodes=episodes,
                      threshold=threshold, verbose=verbose):
                raise _StopTraining
        if total >= budget:
            raise _StopTraining

    params = OffPolicyTrainerParams(
        training_collector=train_collector, test_collector=None,
        max_epochs=math.ceil(budget / eval_every) + 2, epoch_num_steps=eval_every,
        collection_step_num_env_steps=a["collection_step_num_env_steps"], batch_size=a["batch_size"],
        update_step_num_gradient_steps_per_sample=a["update_per_step"], training_fn=training_fn,
        test_in_training=False, logger=None, verbose=False, show_progress=False)
    try:
        algorithm.run_training(params)
    except _StopTraining:
        pass
    finally:
        train_envs.close()
        env.close()
    row = _row(method, seed, budget, evals, state["solved"], state["total"], time.monotonic() - t_start, loads)
    row["warmup_seconds"] = round(warmup, 1)
    return row


def _run_apex_here(seed, budget, eval_every, episodes, threshold, verbose=True, actors=2, **_) -> dict:
    import torch

    from apex_local.agents.evaluation import evaluate_policy
    from apex_local.envs import env_spec
    from apex_local.networks import load_flat_parameters, make_network, num_flat_parameters
    from apex_local.transport import WeightsBoard, segment_name
    from apex_local.transport.shm import ShmError
    from bench._topo import Registry

    torch.set_num_threads(1)  # this process's evaluations; the services set their own
    method = f"apex_{actors}actors"
    tmp = Path(tempfile.mkdtemp(prefix="bench_solve_peers_"))
    reg = Registry(tmp)
    board, completed = None, False
    try:
        t = reg.topology("apex", {"run.seed": seed, "run.max_env_steps": 10**9, "run.log_every_seconds": 5,
                                  "learner.checkpoint_every_seconds": 0}, APEX_CONFIG)
        cfg = t.cfg
        spec = env_spec(cfg.env)
        net = make_network(cfg.network, spec.obs_shape, spec.obs_dtype, spec.num_actions)
        buf = np.empty(num_flat_parameters(net), np.float32)
        roles = [("replay", 0), ("learner", 0)] + [("actor", i) for i in range(actors)]
        loads, evals, solved = [_loadavg()], [], None
        next_check, steps, last_version = eval_every, 0, 0

        def alive() -> None:
            for role, idx in roles:
                m = reg.members[f"{role}.{idx}"]
                if m.proc.poll() is not None:
                    raise RuntimeError(f"{method}: {m.name} exited {m.proc.returncode}:\n{t.log(m.name)[-2000:]}")

        def env_steps() -> int:
            return int(sum(t.metrics("actor", i).get("apex_actor_env_steps_total", 0.0) for i in range(actors)))

        t0 = time.monotonic()
        for role, idx in roles:
            reg.start_service(t, role, idx)
        while True:
            alive()
            steps = env_steps()
            if steps >= next_check:
                version = None
                wait_until = time.monotonic() + 120
                while version is None:  # the newest published weights (wait for a first version)
                    if board is None:
                        try:
                            board = WeightsBoard.attach(segment_name(t.run_id, "weights"))
                        except (ShmError, FileNotFoundError):
                            board = None
                    if board is not None:
                        version = board.read(buf, min_version=0)
                    if version is None:
                        if time.monotonic() > wait_until:
                            raise RuntimeError(f"{method}: no weights published after {steps} env steps")
                        alive()
                        time.sleep(0.05)
                steps = env_steps()  # env steps at the moment the weights were read (just after)
                seconds = time.monotonic() - t0
                load_flat_parameters(net, buf)
                rs = evaluate_policy(net, cfg.env, episodes, seed=seed + 10_000 + steps, epsilon=cfg.actor.eval_epsilon)
                mean = float(np.mean(rs))
                # seconds: when the evaluation finished (as for the in-process runs)
                evals.append({"env_steps": steps, "seconds": time.monotonic() - t0, "read_at_seconds": seconds,
                              "mean_return": mean, "weights_version": version,
                              "new_weights": version != last_version})
                last_version = version
                loads.append(_loadavg())
                _log(verbose, method, seed, steps, evals[-1]["seconds"], mean)
                next_check = (steps // eval_every + 1) * eval_every
                if mean >= threshold:
                    solved = evals[-1]
                    break
            if steps >= budget:
                break
            time.sleep(0.1)
        total_seconds = time.monotonic() - t0
        steps = max(steps, env_steps())
        row = _row(method, seed, budget, evals, solved, steps, total_seconds, loads)
        codes = t.stop(signal.SIGINT, timeout=10.0)
        for role, idx in roles:  # those that exited; any still running stay for reg.close() to stop
            if t.procs[f"{role}.{idx}"].poll() is not None:
                reg.members.pop(f"{role}.{idx}", None)
        bad = {n: c for n, (c, _) in codes.items() if c != 0}
        if bad:
            print(f"[bench_solve_peers] {method}: processes did not exit 0 at stop: {bad}", file=sys.stderr)
            row["stop_codes"] = bad
        completed = True
        return row
    finally:
        if board is not None:
            board.close()
        left = reg.close()  # SIGCONT + SIGINT, then SIGKILL what is left; removes shm segments / ipc dirs
        if left:
            print(f"[bench_solve_peers] {method}: left behind after stop: {left}", file=sys.stderr)
            if completed:
                raise RuntimeError(f"{method}: left behind after stop: {left}")
        if completed and not left:
            shutil.rmtree(tmp, ignore_errors=True)  # logs kept when something went wrong


RUNNERS = {"dqn": _run_dqn_here, "sb3_dqn": _run_sb3_here, "tianshou_dqn": _run_tianshou_here,
           "apex": _run_apex_here}


# ------------------------------------------------------------------ public API (spawn a subprocess)
def run_isolated(method: str, seed: int, budget: int, eval_every: int = 5000, episodes: int = 10,
                 threshold: float = 475.0, actors: int = 2, verbose: bool = True) -> dict:
    """One run of ``method`` in a fresh ``python -m bench.bench_solve_peers --one ...`` subprocess;
    returns its row (or a 'skipped' row when the peer package is missing)."""
    skipped = _skipped(method, seed)
    if skipped:
        return skipped
    with tempfile.TemporaryDirectory(prefix="bench_solve_peers_row_") as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "bench.bench_solve_peers", "--one", method, "--seed", str(seed),
               "--budget", str(budget), "--eval-every", str(eval_every), "--episodes", str(episodes),
               "--threshold", str(threshold), "--actors", str(actors), "--json", str(out)]
        if not verbose:
            cmd.append("--quiet")
        pp = os.environ.get("PYTHONPATH")
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(ROOT) + (os.pathsep + pp if pp else ""))
        p = subprocess.Popen(cmd, cwd=ROOT, env=env)
        try:
            rc = p.wait()
        except BaseException:  # Ctrl-C / SIGTERM here: let the child clean up (it stops its processes)
            stop_child(p)
            raise
        if rc != 0 or not out.exists():
            raise RuntimeError(f"{method} seed {seed}: `{shlex.join(cmd)}` exited {rc} without a result")
        return json.loads(out.read_text())


def solve_dqn(seed: int, budget: int, eval_every: int = 5000, episodes: int = 10, threshold: float = 475.0) -> dict:
    """Our single-process DQN (bench_solve.solve_one('dqn', ...)) in a fresh subprocess."""
    return run_isolated("dqn", seed, budget, eval_every, episodes, threshold)


def solve_sb3(seed: int, budget: int, eval_every: int = 5000, episodes: int = 10, threshold: float = 475.0) -> dict:
    """Stable-Baselines3 DQN, rl-baselines3-zoo CartPole-v1 hyperparameters (method 'sb3_dqn')."""
    return run_isolated("sb3_dqn", seed, budget, eval_every, episodes, threshold)


def solve_tianshou(seed: int, budget: int, eval_every: int = 5000, episodes: int = 10,
                   threshold: float = 475.0) -> dict:
    """Tianshou DQN, hyperparameters of its CartPole DQN test (method 'tianshou_dqn')."""
    return run_isolated("tianshou_dqn", seed, budget, eval_every, episodes, threshold)


def solve_apex(seed: int, budget: int, actors: int = 2, eval_every: int = 5000, episodes: int = 10,
               threshold: float = 475.0) -> dict:
    """Our Ape-X topology (replay + learner + ``actors`` actors as processes), method 'apex_<N>actors'."""
    return run_isolated(f"apex_{actors}actors", seed, budget, eval_every, episodes, threshold, actors=actors)


# ------------------------------------------------------------------ reporting
def _is_result(r: dict) -> bool:
    return "skipped" not in r and "failed" not in r


def table(rows: list[dict]) -> str:
    """bench_solve.table for the rows that ran, then one line per skipped / failed run."""
    lines = [bench_solve.table([r for r in rows if _is_result(r)])]
    for r in rows:
        if not _is_result(r):
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r['failed']}"
            lines.append(f"| {r['method']} | {r['seed']} | {why} | | | | |")
    return "\n".join(lines)


def _is_ours(method: str) -> bool:
    return method.startswith(OURS)


def summary(rows: list[dict]) -> str:
    """Per method: medians over solved seeds, and the ratios to the best peer (target: our best
    wall-clock <= half the best peer's)."""
    stats = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ran = [r for r in mine if _is_result(r)]
        ok = [r for r in ran if r["solved"]]
        stats[method] = {"runs": len(ran), "skipped": len(mine) - len(ran), "solved": len(ok),
                         "seconds": float(np.median([r["seconds"] for r in ok])) if ok else None,
                         "steps": float(np.median([r["env_steps"] for r in ok])) if ok else None,
                         "budget": max((r["budget"] for r in ran), default=None)}
    peers = {m: s for m, s in stats.items() if not _is_ours(m) and s["seconds"] is not None}
    ours = {m: s for m, s in stats.items() if _is_ours(m) and s["seconds"] is not None}
    best_peer = min(peers, key=lambda m: peers[m]["seconds"]) if peers else None
    lines = ["Summary (medians over the solved seeds; ratios are method / best peer, lower is better):", ""]
    for m, s in stats.items():
        if s["runs"] == 0:
            lines.append(f"- `{m}`: skipped")
            continue
        if s["seconds"] is None:
            lines.append(f"- `{m}`: solved 0/{s['runs']} seeds within {s['budget']:,} env steps")
            continue
        text = (f"- `{m}`: solved {s['solved']}/{s['runs']}"
                + (f" ({s['skipped']} more skipped / failed)" if s["skipped"] else "")
                + f"; median {s['seconds']:.1f} wall s, {s['steps']:,.0f} env steps")
        if best_peer is not None:
            b = peers[best_peer]
            text += (f"; / best peer `{best_peer}`: wall {s['seconds'] / b['seconds']:.2f}x, "
                     f"env steps {s['steps'] / b['steps']:.2f}x")
        lines.append(text)
    lines.append("")
    if ours and best_peer is not None:
        best_ours = min(ours, key=lambda m: ours[m]["seconds"])
        r = ours[best_ours]["seconds"] / peers[best_peer]["seconds"]
        lines.append(f"Target (issue: half the best peer's wall-clock): our best `{best_ours}` / best peer "
                     f"`{best_peer}` = {r:.2f} -> {'met' if r <= 0.5 else 'missed'} (needs <= 0.50).")
    elif ours:
        lines.append("Target (half the best peer's wall-clock): no peer solved in this run, ratio undefined.")
    else:
        lines.append("Target (half the best peer's wall-clock): none of our methods solved in this run.")
    return "\n".join(lines)


# ------------------------------------------------------------------ CLI
def _one(args) -> int:
    """The subprocess side: run one method/seed here and write its row as JSON."""
    def on_term(signum, frame):  # SIGTERM -> KeyboardInterrupt so that `finally` clean-up runs
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    method = args.one
    row = _skipped(method, args.seed)
    if row is None:
        key = "apex" if method.startswith("apex") else method
        if key not in RUNNERS:
            raise SystemExit(f"unknown method {method!r}")
        actors = args.actors
        if key == "apex" and method != "apex":
            actors = int(method[len("apex_"):].removesuffix("actors"))
        row = RUNNERS[key](seed=args.seed, budget=args.budget, eval_every=args.eval_every, episodes=args.episodes,
                           threshold=args.threshold, verbose=not args.quiet, actors=actors)
    Path(args.json).write_text(json.dumps(row, default=float))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_solve_peers", description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma list of: dqn, apex_<N>actors (apex_2actors), sb3_dqn, tianshou_dqn")
    p.add_argument("--seeds", type=int, default=None, help="N seeds: first..first+N-1 (default 3, quick 1)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="first seed (e.g. seeds no config was tuned on)")
    p.add_argument("--budget", type=int, default=None, help="env steps per run (default per method: "
                   + ", ".join(f"{k} {v:,}" for k, v in BUDGETS.items()) + ")")
    p.add_argument("--quick", action="store_true", help="1 seed (the budgets stay: a run stops when it solves)")
    p.add_argument("--actors", type=int, default=2, help="actors of the Ape-X topology (method apex_<N>actors)")
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--threshold", type=float, default=475.0)
    p.add_argument("--json", default="", help="write the rows here (with --one: the one row)")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one method here
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        if not args.json or args.budget is None:
            p.error("--one needs --json and --budget")
        return _one(args)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if not (m in ("dqn",) + PEERS or
                                      (m.startswith("apex_") and m.endswith("actors")
                                       and m[len("apex_"):-len("actors")].isdigit()))]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from dqn, apex_<N>actors, sb3_dqn, tianshou_dqn")
    methods = [f"apex_{args.actors}actors" if m == "apex_2actors" and args.actors != 2 else m for m in methods]
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    load0 = os.getloadavg()
    rows, failed = [], False
    for method in methods:
        budget = args.budget or budget_of(method)
        for seed in range(args.first_seed, args.first_seed + seeds):
            t0 = time.monotonic()
            try:
                actors = int(method[len("apex_"):-len("actors")]) if method.startswith("apex_") else args.actors
                row = run_isolated(method, seed, budget, args.eval_every, args.episodes, args.threshold, actors=actors)
            except RuntimeError as exc:
                failed = True
                row = {"method": method, "seed": seed, "failed": str(exc).splitlines()[0]}
                print(f"[bench_solve_peers] {exc}", file=sys.stderr, flush=True)
            rows.append(row)
            if "skipped" in row:
                msg = f"skipped ({row['skipped']})"
            elif "failed" in row:
                msg = "failed"
            elif row["solved"]:
                msg = f"solved at {row['env_steps']} steps, {row['seconds']:.0f}s"
            else:
                msg = f"not solved in {budget} steps (best {row['best_eval']:.1f})"
            print(f"[bench_solve_peers] {method} seed {seed}: {msg} [{time.monotonic() - t0:.0f}s]",
                  file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    print(table(rows))
    print()
    print(summary(rows))
    print(f"\nLoad average (1 min) at start / end: {load0[0]:.1f} / {load1[0]:.1f}; per run, the peak sampled at "
          "its evaluations (last column).")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
