"""Evaluator process: ``python -m services.evaluator``. Every ``actor.eval_every_seconds`` it
plays ``actor.eval_episodes`` games with the newest weights (epsilon ``actor.eval_epsilon``,
noisy layers off) on its own envs and reports the mean return (and the human-normalised score
for Atari games with known references)."""
from __future__ import annotations


import numpy as np

from apex_local.runtime import exit_now, limit_threads, parse_service_args, run_service


def main(argv: list[str] | None = None) -> int:
    ctx = parse_service_args("evaluator", argv)

    def body(shutdown, recorder) -> None:
        from apex_local.agents.evaluation import evaluate_policy
        from apex_local.envs import env_spec
        from apex_local.networks import load_flat_parameters, make_network, num_flat_parameters
        from apex_local.transport import WeightsBoard, segment_name
        from apex_local.transport.shm import ShmError

        limit_threads(1)
        cfg = ctx.cfg
        spec = env_spec(cfg.env)
        net = make_network(cfg.network, spec.obs_shape, spec.obs_dtype, spec.num_actions)
        buf = np.empty(num_flat_parameters(net), np.float32)
        board, version, rounds = None, 0, 0
        ctx.log(f"run {ctx.run_id}: {cfg.actor.eval_episodes} greedy episodes every {cfg.actor.eval_every_seconds}s")
        try:
            while not shutdown:
                if board is None:
                    try:
                        board = WeightsBoard.attach(segment_name(ctx.run_id, "weights"))
                    except (ShmError, FileNotFoundError):
                        shutdown.sleep(0.2)
                        continue
                got = board.read(buf, min_version=version)
                if got is None:
                    shutdown.sleep(0.2)
                    continue
                load_flat_parameters(net, buf)
                version = got
                returns = evaluate_policy(net, cfg.env, cfg.actor.eval_episodes, seed=cfg.run.seed + 77_777 + rounds,
                                          epsilon=cfg.actor.eval_epsilon)
                rounds += 1
                mean = float(np.mean(returns))
                recorder.set("apex_evaluator_return", mean)
                recorder.set("apex_evaluator_weights_version", version)
                recorder.inc("apex_evaluator_episodes_total", len(returns))
                hns = spec.human_normalized(mean) if spec.is_atari else None
                if hns is not None:
                    recorder.set("apex_evaluator_human_normalized_score", hns)
                ctx.log(f"weights v{version}: mean return {mean:.1f} over {len(returns)} episodes"
                        + (f" (human-normalised {100 * hns:.0f}%)" if hns is not None else ""))
                shutdown.sleep(cfg.actor.eval_every_seconds)
            ctx.log(f"stopping (signal {shutdown.signal_name})")
        finally:
            if board is not None:
                board.close()

    return run_service(ctx, body)


if __name__ == "__main__":
    exit_now(main())
