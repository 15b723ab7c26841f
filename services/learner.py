"""Learner process: ``python -m services.learner`` (see apex_local/roles/learner_loop.py).

Exits 0 when ``run.max_env_steps`` (actor env steps, counted by replay) or ``run.max_updates``
is reached, after a final checkpoint, so ``honcho start`` takes the whole run down cleanly.
"""
from __future__ import annotations

import os
import sys
import time

from apex_local.runtime import EXIT_BAD_INPUT, Every, exit_now, parse_service_args, run_service


def main(argv: list[str] | None = None) -> int:
    ctx = parse_service_args("learner", argv, extra=lambda p: p.add_argument(
        "--fresh", action="store_true", help="ignore an existing checkpoint in run.dir (also: APEX_FRESH=1)"))

    def body(shutdown, recorder) -> None:
        from apex_local.agents.builders import set_torch_threads
        from apex_local.envs import env_spec
        from apex_local.roles.learner_loop import LearnerService

        cfg = ctx.cfg
        spec = env_spec(cfg.env)
        threads = set_torch_threads(cfg, spec)
        if cfg.run.method == "gorila":  # Nair et al. 2015: push gradients to services/paramserver.py
            from apex_local.roles.gorila_learner import GorilaLearnerService

            svc = GorilaLearnerService(cfg, ctx.run_id, spec, ctx.index, recorder, log=ctx.log)
        else:
            fresh = ctx.args.fresh or os.environ.get("APEX_FRESH") == "1"
            svc = LearnerService(cfg, ctx.run_id, spec, recorder, log=ctx.log, resume=not fresh)
        ctx.log(f"run {ctx.run_id}: training on {svc.learner.device} ({threads} threads), "
                f"{cfg.run.max_env_steps} env steps")
        status, ckpt = Every(cfg.run.log_every_seconds), Every(cfg.learner.checkpoint_every_seconds)
        last_updates, last_ckpt_updates, t_last = svc.learner.updates, svc.learner.updates, time.monotonic()
        try:
            while not shutdown and not svc.done():
                svc.step()
                u = svc.learner.updates
                every_u = cfg.learner.checkpoint_every_updates
                if ckpt() or (every_u and u - last_ckpt_updates >= every_u):
                    svc.checkpoint()
                    last_ckpt_updates = u
                if status():
                    now = time.monotonic()
                    ctx.log(f"updates={u} ({(u - last_updates) / (now - t_last):.0f}/s) "
                            f"env_steps={svc.env_steps} replay={svc.replay_info.get('size', 0)} "
                            f"loss={svc.metrics.get('loss', float('nan')):.4f} v{svc.learner.weights_version}"
                            + (f" q_discrepancy={svc.metrics['q_discrepancy']:.4f}" if "q_discrepancy" in svc.metrics
                               else ""))
                    last_updates, t_last = u, now
            svc.checkpoint()
            why = "signal " + shutdown.signal_name if shutdown else (
                f"reached {svc.env_steps} env steps / {svc.learner.updates} updates")
            ctx.log(f"stopping ({why}); checkpoint {svc.ckpt_path}")
        finally:
            svc.close()

    if ctx.index > 0 and ctx.cfg.run.method != "gorila":
        print(f"[{ctx.name}] bad input: run.method '{ctx.cfg.run.method}' has exactly one learner, this is learner "
              f"index {ctx.index}; only Gorila (run.method: gorila) runs several (drop -c learner=N)",
              file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return run_service(ctx, body)


if __name__ == "__main__":
    exit_now(main())
