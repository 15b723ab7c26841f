"""Actor process: ``python -m services.actor [--index K]`` (see apex_local/roles/actor_loop.py).

The index comes from ``--index`` or honcho's HONCHO_PROCESS_NAME (``actor.3`` -> 2). It sets
the actor's seed and its place on the Ape-X exploration ladder.
"""
from __future__ import annotations

import time

import numpy as np

from apex_local.runtime import Every, exit_now, limit_threads, parse_service_args, run_service


def main(argv: list[str] | None = None) -> int:
    ctx = parse_service_args("actor", argv)

    def body(shutdown, recorder) -> None:
        from apex_local.envs import env_spec
        from apex_local.roles.actor_loop import ActorService

        limit_threads(1)
        cfg = ctx.cfg
        actor = ActorService(cfg, ctx.run_id, env_spec(cfg.env), ctx.index, recorder, log=ctx.log)
        try:
            eps = np.atleast_1d(actor.eps(0))
            ctx.log(f"run {ctx.run_id}: {cfg.env.num_envs} x {cfg.env.id}, epsilon "
                    f"{', '.join(f'{e:.4f}' for e in eps)}; waiting for weights")
            actor.sync_weights(wait=True, shutdown=shutdown)
            status = Every(cfg.run.log_every_seconds)
            last, t_last = actor.env_steps, time.monotonic()
            while not shutdown:
                actor.step(shutdown)
                if status():
                    now = time.monotonic()
                    recent = list(actor.returns)[-10:]
                    ctx.log(f"env_steps={actor.env_steps} ({(actor.env_steps - last) / (now - t_last):.0f}/s) "
                            f"weights=v{actor.weights_version} return(last 10)="
                            f"{np.mean(recent) if recent else float('nan'):.1f} env_errors={actor.env_errors}")
                    last, t_last = actor.env_steps, now
            ctx.log(f"stopping (signal {shutdown.signal_name})")
        finally:
            actor.close()

    return run_service(ctx, body)


if __name__ == "__main__":
    exit_now(main())
