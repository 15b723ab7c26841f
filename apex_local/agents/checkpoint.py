"""Checkpoints: written to a temp file, fsynced, renamed (DESIGN.md §9), so a checkpoint cut
off mid-write is never loaded; resume restores nets, optimizer, counters, RNG and the
weights version (see ``Learner.state_dict``)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from apex_local.errors import BadInputError

CHECKPOINT_NAME = "checkpoint.pt"
_MAGIC = "apex-local-checkpoint-v1"


class CheckpointError(BadInputError):
    """A missing, truncated or foreign checkpoint (the CLI exits 2 naming the path)."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``path`` (temp file + fsync + rename + fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"magic": _MAGIC, "state": state}, buf)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write checkpoint {path}: {exc}") from exc
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory holding ``checkpoint.pt``."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return p


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    p = resolve_checkpoint(path)
    try:
        blob = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise CheckpointError(f"checkpoint {p} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(blob, dict) or blob.get("magic") != _MAGIC:
        raise CheckpointError(f"{p} is not an apex-local checkpoint")
    return blob["state"]
