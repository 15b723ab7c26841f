"""The per-run ipc directory, pid files, and the janitor that removes what dead runs left.

Layout::

    ${transport.ipc_dir or $XDG_RUNTIME_DIR or /tmp}/apex-local/          (mode 0700)
        <run_id>/                                                         (mode 0700)
            replay.sock, replay_sample.sock, ...   ipc endpoints (sockets.endpoints)
            <role>.<index>.pid                     "<pid> <start time>" of each live process

A run is *live* when one of its pid files names a live Python process (pid + start time
from /proc, so a recycled pid does not count) or when any process still maps one of its
segments (/proc/*/maps). `clean` removes the segments (``/dev/shm/apex_<run>_*``) and the
ipc directory of every run that is not live, and leaves live runs alone.
"""
from __future__ import annotations

import atexit
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apex_local.transport.shm import SHM_DIR, ShmError

__all__ = ["RunPaths", "ipc_base", "run_paths", "PidFile", "register_process", "process_alive",
           "CleanReport", "clean"]


def ipc_base(ipc_dir: str = "") -> Path:
    return Path(ipc_dir or os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / "apex-local"


@dataclass(frozen=True)
class RunPaths:
    run_id: str
    base: Path  # .../apex-local
    ipc_dir: Path  # .../apex-local/<run_id>

    def pid_file(self, role: str, index: int = 0) -> Path:
        return self.ipc_dir / f"{role}.{index}.pid"

    def socket(self, role: str) -> Path:
        return self.ipc_dir / f"{role}.sock"


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise ShmError(f"{path} belongs to uid {st.st_uid}, not to you: set transport.ipc_dir to a directory of yours")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def run_paths(cfg: Any, run_id: str | None = None) -> RunPaths:
    """Create (0700) and return the ipc directory of this run. ``cfg``: a `Config`, or a
    `TransportConfig` together with ``run_id``."""
    if run_id is None:
        from apex_local.config import run_id as _run_id

        run_id = _run_id(cfg)
    transport = getattr(cfg, "transport", cfg)
    base = ipc_base(transport.ipc_dir)
    paths = RunPaths(run_id, base, base / run_id)
    _private_dir(base)
    _private_dir(paths.ipc_dir)
    return paths


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, or None if it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = text.rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 (state) is rest[0]
    return rest[0], int(rest[19])  # field 22: starttime


def process_alive(pid: int, start: int | None = None) -> bool:
    """A live (not zombie) Python process with that pid (and start time, when given)."""
    st = _stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    if start is not None:
        return st[1] == start
    try:
        return b"python" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class PidFile:
    """``<role>.<index>.pid`` in the run's ipc dir; removed by ``close()`` or at exit."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.pid = os.getpid()
        st = _stat(self.pid)
        tmp = self.path.with_name(f".{self.path.name}.{self.pid}")
        tmp.write_text(f"{self.pid} {st[1] if st else ''}\n")
        os.replace(tmp, self.path)
        atexit.register(self.close)

    def close(self) -> None:
        atexit.unregister(self.close)
        if os.getpid() != self.pid:
            return
        try:  # remove only our own file (a successor may have replaced it)
            if self.path.read_text().split()[0] == str(self.pid):
                self.path.unlink()
        except (FileNotFoundError, IndexError):
            pass

    def __enter__(self) -> "PidFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def register_process(paths: RunPaths, role: str, index: int = 0) -> PidFile:
    return PidFile(paths.pid_file(role, index))


def _read_pid_file(path: Path) -> tuple[int, int | None] | None:
    try:
        parts = path.read_text().split()
        return int(parts[0]), (int(parts[1]) if len(parts) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None


def _mapped_segments(shm_dir: str) -> set[str]:
    """Names of apex_* files in ``shm_dir`` that some readable process has mapped."""
    prefix = os.path.join(shm_dir, "apex_")
    names: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find(prefix)
                    if i >= 0 and not line.rstrip().endswith("(deleted)"):
                        names.add(os.path.basename(line[i:].rstrip("\n")))
        except OSError:
            continue
    return names


@dataclass
class CleanReport:
    removed_segments: list[str] = field(default_factory=list)
    removed_dirs: list[str] = field(default_factory=list)
    live_runs: list[str] = field(default_factory=list)
    dry_run: bool = False

    def __str__(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{verb} {len(self.removed_segments)} segment(s), {len(self.removed_dirs)} ipc dir(s); "
                 f"{len(self.live_runs)} live run(s) left alone"]
        lines += [f"  segment /dev/shm/{s}" for s in self.removed_segments]
        lines += [f"  dir {d}" for d in self.removed_dirs]
        lines += [f"  live run {r}" for r in self.live_runs]
        return "\n".join(lines)


def clean(run_id: str | None = None, dry_run: bool = False, *, ipc_base_dir: str | Path | None = None,
          shm_dir: str = SHM_DIR) -> CleanReport:
    """Remove segments and ipc dirs of runs with no live process (all runs, or one ``run_id``).

    Runs are discovered from the ipc dirs under ``ipc_base_dir`` (default: `ipc_base`) and
    from ``apex_<run>_*`` names in ``shm_dir``. A segment name is attributed to the longest
    known run id it starts with; for unknown runs, to the text up to the next '_'. A mapped
    segment is never removed, whatever run it is attributed to.
    """
    base = Path(ipc_base_dir) if ipc_base_dir is not None else ipc_base()
    dirs = {p.name: p for p in base.iterdir() if p.is_dir()} if base.is_dir() else {}
    known = sorted(set(dirs) | ({run_id} if run_id else set()), key=len, reverse=True)
    segments: dict[str, list[str]] = {}
    for name in sorted(os.listdir(shm_dir)):
        if not name.startswith("apex_"):
            continue
        run = next((r for r in known if name.startswith(f"apex_{r}_")), name[5:].split("_", 1)[0])
        segments.setdefault(run, []).append(name)
    mapped = _mapped_segments(shm_dir)
    report = CleanReport(dry_run=dry_run)
    for run in sorted(set(dirs) | set(segments)):
        if run_id is not None and run != run_id:
            continue
        pids = [_read_pid_file(p) for p in dirs[run].glob("*.pid")] if run in dirs else []
        live = any(p is not None and process_alive(*p) for p in pids)
        if live or any(s in mapped for s in segments.get(run, [])):
            report.live_runs.append(run)
            continue
        for seg in segments.get(run, []):
            report.removed_segments.append(seg)
            if not dry_run:
                try:
                    os.unlink(os.path.join(shm_dir, seg))
                except FileNotFoundError:
                    pass
        if run in dirs:
            report.removed_dirs.append(str(dirs[run]))
            if not dry_run:
                shutil.rmtree(dirs[run], ignore_errors=True)
    return report
