"""Shared-memory segments as files in /dev/shm, opened with os.open + mmap (DESIGN.md §9).

Why not `multiprocessing.shared_memory`: before Python 3.13 every process that *attaches*
registers the segment with its resource_tracker, which unlinks it when that process exits,
pulling the replay out from under everybody. Opening ``/dev/shm/<name>`` ourselves registers
nothing: only the creator ever unlinks (on ``close()``, at exit via atexit, or as a context
manager), and an attach-only process can exit or crash without side effects. The names are
the same ones ``shm_open`` uses, so other tools can still open them.

Names are ``apex_<run>_<what>`` (`segment_name`), which is how the janitor (`rundir.clean`)
finds the segments of dead runs.

Sizes are checked against the free space of the tmpfs *before* allocating
(`check_free_space`), and the file is ``posix_fallocate``d so its pages exist: a full
/dev/shm is a clear `ShmError` at creation, never a SIGBUS on a later write.
"""
from __future__ import annotations

import atexit
import errno
import mmap
import os
import re
from typing import Any

import numpy as np

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")

__all__ = ["SHM_DIR", "ShmError", "Segment", "segment_name", "free_bytes", "check_free_space",
           "ndarray_view", "ShmAllocator", "allocator"]


class ShmError(RuntimeError):
    """A shared-memory segment could not be created or attached; the message says why."""


def segment_name(run_id: str, what: str) -> str:
    return f"apex_{run_id}_{what}"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)  # pragma: no cover


def free_bytes(path: str = SHM_DIR) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_free_space(nbytes: int, path: str = SHM_DIR, *, name: str = "") -> None:
    """Raise `ShmError` if ``nbytes`` do not fit in the free space of ``path`` (a tmpfs)."""
    avail = free_bytes(path)
    if nbytes > avail:
        raise ShmError(
            f"shared-memory segment {name or '?'!r} needs {nbytes} bytes ({_human(nbytes)}) but only "
            f"{avail} bytes ({_human(avail)}) are free in {path}: remove dead runs with `apex-local clean`, "
            f"lower replay.capacity, or grow the tmpfs (sudo mount -o remount,size=<N>G {path})")


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ShmError(f"bad shared-memory segment name {name!r}: use 1-200 characters of [A-Za-z0-9_.-]")


class Segment:
    """One mapped /dev/shm file. ``owner`` (the creator) unlinks it on close; attachers never do."""

    def __init__(self, name: str, path: str, mm: mmap.mmap, owner: bool, inode: int) -> None:
        self.name, self.path, self.owner, self.inode = name, path, owner, inode
        self.mmap = mm
        self.size = len(mm)
        self._pid = os.getpid()
        self._closed = False
        if owner:
            atexit.register(self._at_exit)

    @classmethod
    def create(cls, name: str, nbytes: int, *, replace: bool = False, shm_dir: str = SHM_DIR) -> "Segment":
        """Create and fully allocate a zeroed segment. ``replace``: unlink an existing file of
        that name first (a restarted owner; attachers of the old file keep their old mapping)."""
        _check_name(name)
        nbytes = int(nbytes)
        if nbytes <= 0:
            raise ShmError(f"segment {name!r}: size must be > 0 bytes, got {nbytes}")
        path = os.path.join(shm_dir, name)
        if replace:
            _unlink(path)
        check_free_space(nbytes, shm_dir, name=name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ShmError(f"shared-memory segment {name!r} already exists ({path}): another process of this "
                           "run is alive, or a crashed run left it behind (run `apex-local clean`)") from None
        try:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise ShmError(f"shared-memory segment {name!r}: {path} ran out of space allocating "
                                   f"{nbytes} bytes ({_human(nbytes)}); {free_bytes(shm_dir)} bytes free") from None
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(fd, nbytes)  # a filesystem without fallocate
            # MAP_POPULATE: map every (already allocated) page now, not on first touch; a replay
            # writing fresh pages otherwise pays a fault per 4 KiB (Pong frames: 163 -> 32 us per
            # 50-frame insert; ~0.4 s per GiB at creation)
            mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            inode = os.fstat(fd).st_ino
        except BaseException:
            _unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(name, path, mm, owner=True, inode=inode)

    @classmethod
    def attach(cls, name: str, *, readonly: bool = False, shm_dir: str = SHM_DIR) -> "Segment":
        """Map an existing segment. Registers nothing: exiting never unlinks it."""
        _check_name(name)
        path = os.path.join(shm_dir, name)
        try:
            fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        except FileNotFoundError:
            raise ShmError(f"shared-memory segment {name!r} does not exist ({path}): is its owner running "
                           "with the same run id (APEX_RUN_ID)?") from None
        try:
            st = os.fstat(fd)
            if st.st_size == 0:
                raise ShmError(f"shared-memory segment {name!r} is empty (its creator is still allocating?)")
            mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE)
        finally:
            os.close(fd)
        return cls(name, path, mm, owner=False, inode=st.st_ino)

    def replaced(self) -> bool:
        """True when the file under this name is gone or is another file (owner restarted)."""
        try:
            return os.stat(self.path).st_ino != self.inode
        except FileNotFoundError:
            return True

    def close(self) -> None:
        """Unmap (deferred to GC while numpy views still exist); the owner also unlinks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.owner:
            atexit.unregister(self._at_exit)
            self.unlink()
        try:
            self.mmap.close()
        except BufferError:
            pass  # views still exported: the mapping goes away with the last view

    def unlink(self) -> None:
        """Remove the name (owner only; never from a forked child, never a replacement file)."""
        if self.owner and os.getpid() == self._pid and not self.replaced():
            _unlink(self.path)

    def _at_exit(self) -> None:
        self.close()

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, {self.size} bytes, {'owner' if self.owner else 'attached'})"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def ndarray_view(segment: Segment, offset: int, shape: tuple[int, ...] | int, dtype: Any) -> np.ndarray:
    """An ndarray over ``segment`` bytes [offset, offset + nbytes); bounds and alignment checked."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset < 0 or offset + nbytes > segment.size:
        raise ShmError(f"view [{offset}, {offset + nbytes}) outside segment {segment.name!r} of {segment.size} bytes")
    if offset % dtype.alignment:
        raise ShmError(f"view offset {offset} is not aligned to {dtype.alignment} bytes for {dtype}")
    return np.ndarray(shape, dtype=dtype, buffer=segment.mmap, offset=offset)


class ShmAllocator:
    """``(name, shape, dtype) -> np.ndarray`` in shared memory: one segment per array, named
    ``<prefix>_<name>``. Injected into replay storage; ``close()`` unlinks everything it made."""

    def __init__(self, prefix: str, *, replace: bool = False, shm_dir: str = SHM_DIR) -> None:
        self.prefix, self.replace, self.shm_dir = prefix, replace, shm_dir
        self.segments: dict[str, Segment] = {}

    def __call__(self, name: str, shape: tuple[int, ...] | int, dtype: Any) -> np.ndarray:
        if name in self.segments:
            raise ShmError(f"allocator {self.prefix!r}: array {name!r} allocated twice")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        seg = Segment.create(f"{self.prefix}_{name}", max(nbytes, 1), replace=self.replace, shm_dir=self.shm_dir)
        self.segments[name] = seg
        return ndarray_view(seg, 0, shape, dtype)

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.segments.values())

    def close(self) -> None:
        for seg in self.segments.values():
            seg.close()

    def __enter__(self) -> "ShmAllocator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def allocator(prefix: str, *, replace: bool = False) -> ShmAllocator:
    """The injectable allocator for replay storage, e.g. ``allocator(segment_name(rid, 'replay'))``."""
    return ShmAllocator(prefix, replace=replace)
