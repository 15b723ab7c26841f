"""Process-level numbers read from /proc and /dev/shm (Linux), cheap enough for every scrape.

- `resident_bytes`: RSS split as the kernel reports it (/proc/<pid>/status RssAnon, RssFile,
  RssShmem; they sum to VmRSS). Pages of /dev/shm segments a process touched count in its
  RssShmem, so the replay server's RSS includes the replay storage it has written.
- `mapped_shm`: the ``apex_*`` /dev/shm segments a process maps (owned or attached), from
  /proc/<pid>/maps, with the mapped bytes of each.
- `run_shm_bytes`: the bytes allocated by all segments of one run (``/dev/shm/apex_<run>_*``).
"""
from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "apex_"

_RSS_FIELDS = {"RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}


def resident_bytes(pid: int | str = "self") -> dict[str, int]:
    """{'anon': B, 'file': B, 'shmem': B} of a process; {} if it is gone or /proc is missing."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in _RSS_FIELDS:
                    out[_RSS_FIELDS[parts[0]]] = int(parts[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return {}
    return out


def mapped_shm(pid: int | str = "self", shm_dir: str = SHM_DIR) -> dict[str, int]:
    """{segment name: mapped bytes} of the ``apex_*`` files under ``shm_dir`` a process maps.

    A segment unlinked while still mapped (its owner restarted) keeps its name and still
    counts: its pages stay allocated until the last mapping goes."""
    prefix = os.path.join(shm_dir, SEGMENT_PREFIX)
    sizes: dict[tuple[str, str], int] = {}
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                i = line.find(prefix)
                if i < 0:
                    continue
                fields = line.split(None, 5)
                start, end = (int(x, 16) for x in fields[0].split("-"))
                name = os.path.basename(line[i:].rstrip("\n").removesuffix(" (deleted)"))
                key = (name, fields[4])  # (name, inode): an old and a new file of one name differ
                sizes[key] = sizes.get(key, 0) + (end - start)
    except (OSError, ValueError, IndexError):
        return {}
    out: dict[str, int] = {}
    for (name, _), n in sizes.items():
        out[name] = out.get(name, 0) + n
    return out


def run_shm_bytes(run_id: str, shm_dir: str = SHM_DIR) -> int:
    """Bytes allocated (st_blocks x 512) by the files ``apex_<run_id>_*`` under ``shm_dir``."""
    prefix = f"{SEGMENT_PREFIX}{run_id}_"
    total = 0
    try:
        with os.scandir(shm_dir) as it:
            for entry in it:
                if entry.name.startswith(prefix):
                    try:
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:  # removed meanwhile
                        continue
    except OSError:
        return 0
    return total


def guess_run_id(segment_names, ipc_base: Path | None = None) -> str | None:
    """The run of mapped segments ``apex_<run>_<what>``: the longest run directory under the
    ipc base that prefixes a name (as `apex-local clean` attributes segments), else the text
    up to the next ``_``. None without segments."""
    names = [n[len(SEGMENT_PREFIX):] for n in segment_names if n.startswith(SEGMENT_PREFIX)]
    if not names:
        return None
    if ipc_base is None:
        ipc_base = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / "apex-local"
    try:
        known = sorted((p.name for p in ipc_base.iterdir() if p.is_dir()), key=len, reverse=True)
    except OSError:
        known = []
    for run in known:
        if any(n.startswith(f"{run}_") for n in names):
            return run
    return names[0].split("_", 1)[0] or None
