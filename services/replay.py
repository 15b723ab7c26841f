"""Replay server process: ``python -m services.replay`` (see apex_local/roles/replay_server.py)."""
from __future__ import annotations

import os

from apex_local.runtime import Every, exit_now, limit_threads, parse_service_args, run_service


def main(argv: list[str] | None = None) -> int:
    ctx = parse_service_args("replay", argv, extra=lambda p: p.add_argument(
        "--fresh", action="store_true", help="ignore a replay snapshot in run.dir (also: APEX_FRESH=1)"))
    if ctx.cfg.run.method == "gorila" and ctx.cfg.learner.gorila_replay == "local":
        from services.paramserver import idle  # each Gorila learner hosts its own replay: nothing to serve

        return idle(ctx, "learner.gorila_replay is 'local': every Gorila learner hosts its own replay")

    def body(shutdown, recorder) -> None:
        from apex_local.envs import env_spec
        from apex_local.roles.replay_server import ReplayServer

        limit_threads(1)
        spec = env_spec(ctx.cfg.env)
        fresh = ctx.args.fresh or os.environ.get("APEX_FRESH") == "1"
        server = ReplayServer(ctx.cfg, ctx.run_id, spec, recorder, log=ctx.log, restore=not fresh)
        every = Every(ctx.cfg.run.log_every_seconds)
        last = {"ins": 0, "smp": 0}

        def status(s) -> None:
            if every():
                dt = every.seconds
                ctx.log(f"size={s.replay.size}/{s.replay.capacity} inserts={(s.replay.inserted - last['ins']) / dt:.0f}/s "
                        f"samples={(s.replay.sampled - last['smp']) / dt:.0f}/s env_steps={s.env_steps} "
                        f"rejected={sum(s.rejected.values())}")
                last.update(ins=s.replay.inserted, smp=s.replay.sampled)

        ctx.log(f"run {ctx.run_id}: serving {spec.env_id} replay (capacity {ctx.cfg.replay.capacity})")
        try:
            server.run(shutdown, status)
        finally:
            server.close()
            ctx.log("stopped")

    return run_service(ctx, body)


if __name__ == "__main__":
    exit_now(main())
