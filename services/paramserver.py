"""Parameter-server process: ``python -m services.paramserver`` (Gorila; see
apex_local/roles/paramserver.py).

With ``run.method: gorila`` it binds the 'paramserver' PULL endpoint, creates the weights and
target boards, applies the learners' gradients, publishes weights every
``learner.publish_every`` applied updates, checkpoints to ``run.dir`` every
``learner.checkpoint_every_seconds`` and at exit (a restart resumes; ``--fresh`` ignores the
checkpoint). With the shared replay it never ends the run itself: the learners exit 0 at
``run.max_env_steps`` and honcho then stops it with SIGTERM. With ``learner.gorila_replay:
local`` only it knows the run's env steps (summed from the learners' gradients), so it writes
the final checkpoint and exits 0 at ``run.max_env_steps``, and honcho stops the rest.

For any other method (Ape-X, R2D2, ...) it prints one line saying it is idle and waits for
SIGTERM/SIGINT, then exits 0. Why: honcho stops every process as soon as one exits, so a
paramserver that exited at once would end every non-Gorila run; idling lets one Procfile serve
all topologies. Idle, it owns nothing (no socket, no shared memory, no metrics port, no pid file).
"""
from __future__ import annotations

import time

from apex_local.runtime import Every, Shutdown, exit_now, limit_threads, parse_service_args, run_service


def idle(ctx, why: str = "") -> int:
    """Print one line, wait for SIGTERM/SIGINT, exit 0, owning nothing (also used by
    services/replay.py when Gorila learners host their own replay)."""
    shutdown = Shutdown()
    why = why or (f"run.method is '{ctx.cfg.run.method}', the parameter server only serves Gorila "
                  "(run.method: gorila)")
    ctx.log(f"idle: {why}; waiting for SIGTERM")
    while not shutdown:
        shutdown.sleep(1.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    ctx = parse_service_args("paramserver", argv, extra=lambda p: p.add_argument(
        "--fresh", action="store_true", help="ignore an existing checkpoint in run.dir"))
    if ctx.cfg.run.method != "gorila":
        return idle(ctx)

    def body(shutdown, recorder) -> None:
        from apex_local.agents.builders import set_torch_threads
        from apex_local.envs import env_spec
        from apex_local.roles.paramserver import ParamServerService

        cfg = ctx.cfg
        spec = env_spec(cfg.env)
        limit_threads(1)
        set_torch_threads(cfg, spec)
        svc = ParamServerService(cfg, ctx.run_id, spec, recorder, log=ctx.log, resume=not ctx.args.fresh)
        core = svc.core
        ctx.log(f"run {ctx.run_id}: master v{core.version}, {core.num_params} parameters, "
                f"{cfg.learner.optimizer} lr={cfg.learner.lr}, staleness bound {cfg.learner.gorila_staleness_bound} "
                f"({cfg.learner.gorila_stale_policy})")
        status, ckpt = Every(cfg.run.log_every_seconds), Every(cfg.learner.checkpoint_every_seconds)
        last_applied, last_recv, t_last = core.applied, sum(core.received.values()), time.monotonic()
        try:
            while not shutdown and not svc.done():
                svc.step(50)
                if ckpt():
                    svc.checkpoint()
                if status():
                    now, recv = time.monotonic(), sum(core.received.values())
                    dt = max(1e-9, now - t_last)
                    ctx.log(f"applied={core.applied} ({(core.applied - last_applied) / dt:.0f}/s) "
                            f"received={(recv - last_recv) / dt:.0f}/s v{core.version} target v{core.target_version} "
                            f"dropped={core.dropped} learners={sorted(core.received)}"
                            + (f" env_steps={core.env_steps}" if svc.counts_env_steps else ""))
                    last_applied, last_recv, t_last = core.applied, recv, now
            svc.checkpoint()
            why = f"signal {shutdown.signal_name}" if shutdown else f"reached {core.env_steps} env steps"
            ctx.log(f"stopping ({why}); {core.applied} applied updates, checkpoint {svc.ckpt_path}")
        finally:
            svc.close()

    return run_service(ctx, body)


if __name__ == "__main__":
    exit_now(main())
