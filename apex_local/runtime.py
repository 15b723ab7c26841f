"""What every service main shares: config loading, role index, shutdown on SIGTERM/SIGINT,
exit codes. Keeps ``services/<role>.py`` thin (DESIGN.md §2, §7)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from apex_local.config import Config, ConfigError, load_config, run_id

DEFAULT_CONFIG = "configs/apex_cartpole.yaml"
EXIT_BAD_INPUT = 2


@dataclass
class ServiceContext:
    cfg: Config
    role: str
    index: int
    run_id: str
    args: argparse.Namespace

    @property
    def name(self) -> str:
        return f"{self.role}.{self.index}"

    def log(self, msg: str) -> None:
        print(f"[{self.name}] {msg}", flush=True)


def default_config_path() -> str:
    """$APEX_CONFIG, else configs/apex_cartpole.yaml (from the cwd, else from the source tree)."""
    env = os.environ.get("APEX_CONFIG")
    if env:
        return env
    if Path(DEFAULT_CONFIG).is_file():
        return DEFAULT_CONFIG
    return str(Path(__file__).resolve().parents[1] / DEFAULT_CONFIG)


def role_index(explicit: int | None) -> int:
    """``--index`` if given, else from honcho's HONCHO_PROCESS_NAME ('actor.3' -> 2; honcho counts from 1)."""
    if explicit is not None:
        return explicit
    name = os.environ.get("HONCHO_PROCESS_NAME", "")
    if "." in name:
        try:
            return max(0, int(name.rsplit(".", 1)[1]) - 1)
        except ValueError:
            pass
    return 0


def parse_service_args(role: str, argv: list[str] | None = None,
                       extra: callable | None = None) -> ServiceContext:
    p = argparse.ArgumentParser(prog=f"python -m services.{role}")
    p.add_argument("--config", "-c", default=None, help="topology YAML (default: $APEX_CONFIG or "
                                                      f"{DEFAULT_CONFIG})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--index", type=int, default=None, help="role index (default: from HONCHO_PROCESS_NAME)")
    if extra:
        extra(p)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config or default_config_path(), args.overrides)
        rid = run_id(cfg)
    except ConfigError as exc:
        print(f"[{role}] config error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    return ServiceContext(cfg, role, role_index(args.index), rid, args)


class Shutdown:
    """Turns SIGTERM/SIGINT into a flag the service loop polls (every loop waits <= ~100 ms,
    so a process exits well within 3 s). A second signal exits at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.requested:
            raise SystemExit(128 + signum)
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __bool__(self) -> bool:
        return self.requested

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.requested and time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))


def exit_now(code: int) -> None:
    """Leave a service process at once with ``code``, after it has closed and unlinked what it
    owns (``run_service`` does that): skips the interpreter's slow teardown of torch and
    friends, which on a loaded 2-core machine alone took over a second."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def limit_threads(n: int = 1) -> None:
    """Actors and the replay server run one torch/BLAS thread each (many processes, few cores)."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass


EXIT_NONFINITE = 3
EXIT_RESOURCE = 4  # a port in use, not enough /dev/shm, a socket path too long


class Every:
    """True once every ``seconds`` (periodic status lines, checkpoints, info requests)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.last = time.monotonic()

    def __call__(self) -> bool:
        now = time.monotonic()
        if self.seconds > 0 and now - self.last >= self.seconds:
            self.last = now
            return True
        return False


def run_service(ctx: ServiceContext, body) -> int:
    """Run ``body(shutdown, recorder, pidfile_paths)`` with the shared failure handling:
    resource errors (port in use, /dev/shm full) exit 4 naming the resource; a non-finite
    learner exits 3; SIGTERM/SIGINT exit 0 after ``body`` has cleaned up."""
    from apex_local.errors import BadInputError, NonFiniteLossError
    from apex_local.metrics import MetricsPortInUse, make_recorder
    from apex_local.transport import PortInUseError, ShmError, TransportError, register_process, run_paths

    shutdown = Shutdown()
    recorder = None
    pid = paths = None
    try:
        paths = run_paths(ctx.cfg, ctx.run_id)
        pid = register_process(paths, ctx.role, ctx.index)
        recorder = make_recorder(ctx.cfg.metrics, ctx.role, ctx.index, run_id=ctx.run_id)
        body(shutdown, recorder)
        return 0
    except (PortInUseError, MetricsPortInUse, ShmError, TransportError) as exc:
        print(f"[{ctx.name}] cannot start: {exc}", file=sys.stderr, flush=True)
        return EXIT_RESOURCE
    except (ConfigError, BadInputError) as exc:
        print(f"[{ctx.name}] bad input: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except NonFiniteLossError as exc:
        print(f"[{ctx.name}] stopping: {exc}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    finally:
        if recorder is not None and hasattr(recorder, "close"):
            recorder.close()
        if pid is not None:
            pid.close()
        if paths is not None:
            try:
                os.rmdir(paths.ipc_dir)  # the last process of the run removes the (empty) run dir
            except OSError:
                pass
