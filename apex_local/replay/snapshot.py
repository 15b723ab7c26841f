"""Replay snapshots: the whole replay (table arrays, frame store, sampler priorities, rate
limiter counters) plus the server's counters, in one file a restarted replay server restores.

Peers' users complain that a restored run starts with an empty buffer; with
``replay.snapshot_every_seconds > 0`` the replay server writes a snapshot on that period and
when it stops cleanly, and restores the newest one when it starts (DESIGN.md §9).

Format: an uncompressed ``.npz`` (numpy's zip of ``.npy`` members, read with
``allow_pickle=False``: no pickle anywhere). ``Replay.state_dict()`` is a nest of dicts with
arrays and plain scalars; arrays become members named by their path (``table/columns/action``),
and every scalar goes into one JSON member (``__meta__``) together with the format tag and the
caller's ``meta`` (env steps, episodes, config fingerprint). Written like checkpoints: temp
file, fsync, rename, fsync of the directory, so a snapshot cut off mid-write is never loaded;
a full disk is a clear `SnapshotError` and the previous snapshot stays.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from apex_local.errors import BadInputError

SNAPSHOT_NAME = "replay_snapshot.npz"
_FORMAT = "apex-local-replay-snapshot-v1"
_META = "__meta__"

__all__ = ["SNAPSHOT_NAME", "SnapshotError", "save_snapshot", "load_snapshot", "snapshot_nbytes",
           "remove_partial_snapshots"]


class SnapshotError(BadInputError):
    """A snapshot that cannot be written (disk full, permissions) or read (truncated, foreign,
    made for another replay layout); the message names the file."""


def _flatten(state: Mapping, prefix: str, arrays: dict, scalars: dict) -> None:
    for key, val in state.items():
        if "/" in str(key):
            raise ValueError(f"snapshot key {key!r} contains '/'")
        path = f"{prefix}{key}"
        if isinstance(val, Mapping):
            scalars[path] = {"__dict__": True}
            _flatten(val, path + "/", arrays, scalars)
        elif isinstance(val, np.ndarray):
            if val.dtype == object:
                raise ValueError(f"snapshot entry {path!r} is an object array (not storable without pickle)")
            arrays[path] = val
        elif isinstance(val, (np.integer, np.floating, np.bool_)):
            scalars[path] = val.item()
        elif val is None or isinstance(val, (bool, int, float, str)):
            scalars[path] = val
        else:
            raise ValueError(f"snapshot entry {path!r} has unsupported type {type(val).__name__}")


def _unflatten(arrays: Mapping[str, np.ndarray], scalars: Mapping[str, Any]) -> dict:
    out: dict = {}

    def put(path: str, value) -> None:
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        if isinstance(value, dict) and value.get("__dict__"):
            node.setdefault(leaf, {})
        else:
            node[leaf] = value

    for path in sorted(scalars, key=lambda p: p.count("/")):
        put(path, scalars[path])
    for path, arr in arrays.items():
        put(path, arr)
    return out


def snapshot_nbytes(state: Mapping) -> int:
    """Bytes of array data a snapshot of ``state`` writes (the file is this plus ~1 KiB a member)."""
    arrays: dict = {}
    _flatten(state, "", arrays, {})
    return sum(a.nbytes for a in arrays.values()) + 1024 * (len(arrays) + 1)


def save_snapshot(path: str | os.PathLike, state: Mapping, meta: Mapping | None = None) -> Path:
    """Atomically write ``state`` (``Replay.state_dict()``) and ``meta`` (JSON-able) to ``path``."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    scalars: dict[str, Any] = {}
    _flatten(state, "", arrays, scalars)
    header = json.dumps({"format": _FORMAT, "scalars": scalars, "meta": dict(meta or {})}).encode()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_partial_snapshots(path)  # a writer SIGKILLed mid-write left its temp file (GBs for Atari)
        need = sum(a.nbytes for a in arrays.values()) + len(header) + 1024 * (len(arrays) + 2)
        st = os.statvfs(path.parent)
        free = st.f_bavail * st.f_frsize
        if need > free:
            raise OSError(28, f"needs {need} bytes, {free} free")  # ENOSPC, before writing anything
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
                z.writestr(_META + ".json", header)
                for name, arr in arrays.items():
                    with z.open(name + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SnapshotError(f"could not write replay snapshot {path}: {exc.strerror or exc} "
                            f"(the previous snapshot, if any, is kept)") from exc
    return path


def remove_partial_snapshots(path: str | os.PathLike) -> list[Path]:
    """Delete temp files of writes to ``path`` that never finished (their writer was killed);
    one replay server writes a run's snapshot, so any such file is dead. Returns them."""
    path = Path(path)
    gone = []
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        try:
            tmp.unlink()
            gone.append(tmp)
        except FileNotFoundError:
            pass
    return gone


def load_snapshot(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state for ``Replay.load_state_dict``, meta). `SnapshotError` names the file if it is
    missing, truncated, or not an apex-local replay snapshot."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path, "r") as z:
            names = z.namelist()
            if _META + ".json" not in names:
                raise SnapshotError(f"{path} is not an apex-local replay snapshot (no {_META}.json)")
            header = json.loads(z.read(_META + ".json"))
            if header.get("format") != _FORMAT:
                raise SnapshotError(f"{path} has format {header.get('format')!r}, expected {_FORMAT!r}")
            arrays = {}
            for name in names:
                if name.endswith(".npy"):
                    with z.open(name) as member:
                        arrays[name[:-4]] = np.lib.format.read_array(member, allow_pickle=False)
    except SnapshotError:
        raise
    except FileNotFoundError:
        raise SnapshotError(f"no replay snapshot at {path}") from None
    except Exception as exc:  # noqa: BLE001 - a truncated zip raises several types
        raise SnapshotError(f"replay snapshot {path} is unreadable ({type(exc).__name__}: {exc})") from None
    return _unflatten(arrays, header.get("scalars", {})), dict(header.get("meta", {}))
