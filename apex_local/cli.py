"""The ``apex-local`` command.

Exit codes: 0 ok, 1 runtime failure, 2 bad input (config, arguments, env id),
3 the learner stopped after too many non-finite losses in a row.
"""
from __future__ import annotations

import argparse
import json
import sys

from apex_local.config import ConfigError, dump_config, load_config

EXIT_BAD_INPUT = 2


def _add_config_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("config", nargs="?", help="topology YAML (default: $APEX_CONFIG)")
    else:
        p.add_argument("--config", "-c", help="topology YAML (default: $APEX_CONFIG)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one field (repeatable), e.g. --set learner.batch_size=64")


def _cmd_check_config(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from apex_local.envs import resolve_env_id

    resolve_env_id(cfg.env.id)  # an unknown env id is a config error too (exit 2, close matches)
    from apex_local.transport.curve import check_key_files

    checked = check_key_files(cfg.transport)  # CURVE key files named by the config (CurveKeyError: exit 2)
    print(dump_config(cfg), end="")
    for line in checked:
        print(f"apex-local: CURVE {line}: ok", file=sys.stderr)
    return 0


def _cmd_keys(args) -> int:
    from apex_local.transport.curve import generate_keys

    ks = generate_keys(args.out, clients=args.clients, force=args.force)
    print(f"wrote CURVE keys to {ks.out_dir} (directories 0700, files 0600):")
    for path in ks.files():
        print(f"  {path}")
    print("\nKeep server.key_secret and authorized/ on the host that runs replay + learner; copy server.key and "
          "one clients/client-K.key_secret (K >= 2) to each actor host.\nConfig lines:\n")
    print(ks.config_lines(), end="")
    return 0


def _cmd_envs(args) -> int:
    from apex_local.envs import describe_env_families

    print(describe_env_families())
    return 0


def _cmd_train(args) -> int:
    if not args.local:
        print("apex-local train runs the single-process mode and needs --local; the distributed "
              "topology is launched with `honcho start` (see README).", file=sys.stderr)
        return EXIT_BAD_INPUT
    import signal

    from apex_local.api import train

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C: final checkpoint
    summary = train(args.config, args.overrides)
    print(json.dumps(summary, sort_keys=True))
    return int(summary.get("exit_code", 0))


def _cmd_eval(args) -> int:
    from apex_local.api import evaluate

    result = evaluate(args.config, args.checkpoint, episodes=args.episodes, overrides=args.overrides,
                      seed=args.seed)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"mean return {result['mean_return']:.2f} over {result['episodes']} episodes "
              f"(min {min(result['returns']):.1f}, max {max(result['returns']):.1f})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apex-local", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate a config and print it resolved")
    _add_config_args(p, positional=True)
    p.set_defaults(fn=_cmd_check_config)

    p = sub.add_parser("envs", help="list environment families and example ids")
    p.set_defaults(fn=_cmd_envs)

    p = sub.add_parser("train", help="train in one process (--local)")
    _add_config_args(p)
    p.add_argument("--local", action="store_true", help="single-process mode (env + replay + learner)")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("eval", help="play greedy episodes with a checkpoint")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint file (.pt) or run directory")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("targets", help="write Prometheus file_sd targets for every process of a run")
    _add_monitoring_args(p)
    p.add_argument("--out", "-o", default=None, help="targets file (default: print to stdout), e.g. runs/targets.json")
    p.set_defaults(fn=_cmd_targets)

    p = sub.add_parser("top", help="live terminal view of a running run, read from its /metrics endpoints")
    _add_monitoring_args(p)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between frames (rates span one interval)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.set_defaults(fn=_cmd_top)

    p = sub.add_parser("keys", help="generate CURVE keys for remote actors (server + client certificates)")
    p.add_argument("--out", "-o", required=True, help="key directory (created 0700; files 0600)")
    p.add_argument("--clients", type=int, default=2,
                   help="client keypairs: client-1 for the host that binds, client-2.. for actor hosts (default 2)")
    p.add_argument("--force", action="store_true", help="replace existing keys (every host then needs the new files)")
    p.set_defaults(fn=_cmd_keys)

    try:
        from apex_local.transport import clean  # noqa: F401
    except ImportError:  # pragma: no cover - transport not built
        pass
    else:
        p = sub.add_parser("clean", help="remove shared memory and ipc files of runs whose processes are gone")
        p.add_argument("--run-id", default=None, help="only this run")
        p.add_argument("--dry-run", action="store_true")
        p.set_defaults(fn=_cmd_clean)
    return parser


def _add_monitoring_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--actors", type=int, default=None,
                   help="actors in the run (honcho -c actor=N; default: actor.num_actors when > 0)")
    p.add_argument("--learners", type=int, default=1, help="learners (Gorila runs several)")
    p.add_argument("--no-evaluator", dest="evaluator", action="store_false", help="the run has no evaluator")


def _monitored(args):
    """(processes, run id) of the run ``args`` describes; exits 2 on bad counts."""
    from apex_local.config import run_id
    from apex_local.monitoring.targets import run_processes

    cfg = load_config(args.config, args.overrides)
    actors = args.actors if args.actors is not None else cfg.actor.num_actors
    if args.actors is None and actors <= 0:
        raise ConfigError("--actors is required (actor.num_actors is 0: the count comes from honcho -c actor=N)")
    if actors < 0 or args.learners < 0:
        raise ConfigError(f"--actors and --learners must be >= 0, got {actors} and {args.learners}")
    if not cfg.metrics.enabled:
        print("apex-local: warning: metrics.enabled is false in this config; nothing will answer",
              file=sys.stderr)
    return run_processes(cfg, actors, args.learners, args.evaluator), run_id(cfg)


def _cmd_targets(args) -> int:
    from apex_local.monitoring.targets import file_sd_groups, write_targets

    processes, run = _monitored(args)
    groups = file_sd_groups(processes, run)
    if args.out:
        path = write_targets(args.out, groups)
        print(f"wrote {len(groups)} targets of run {run} to {path}", file=sys.stderr)
    else:
        print(json.dumps(groups, indent=2))
    return 0


def _cmd_top(args) -> int:
    from apex_local.monitoring.top import run_top

    if not args.interval > 0:
        raise ConfigError(f"--interval must be > 0, got {args.interval}")
    processes, run = _monitored(args)
    return run_top(processes, run, interval=args.interval, once=args.once)


def _cmd_clean(args) -> int:
    from apex_local.transport import clean

    report = clean(run_id=args.run_id, dry_run=args.dry_run)
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"apex-local: config error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the env factory reports bad ids as ValueError
        from apex_local.errors import BadInputError

        if isinstance(exc, BadInputError):
            print(f"apex-local: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
