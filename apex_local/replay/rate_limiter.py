"""Samples-per-insert rate limiter (Reverb's ``SampleToInsertRatio``).

Semantics follow reverb/cc/rate_limiter.cc and reverb/rate_limiters.py (Cassirer et al.
2021, "Reverb: A Framework for Experience Replay"). With I inserts, S sampled items,
D deletes and spi = samples_per_insert::

    size  = I - D
    diff  = I * spi - S                      sample credit left
    stage 1 (size < min_size):  inserts free, samples blocked
    stage 2: keep diff in [min_diff, max_diff] = spi * min_size -/+ error_buffer
             a sample of n items needs        diff - n   >= min_diff
             an insert (one more item) needs  diff + spi <= max_diff

    diff ^
         |  max_diff ......... inserts block above here ...............
         |            ~~~~~~~      (inside the band nobody waits)
         |  min_diff ......... samples block below here ...............
         +----------------------------------------------------> time

Who waits, in the replay server (this class itself never blocks; it only answers):
  * ``can_sample(batch_size)`` False -> the sample request is queued, not answered, until
    inserts arrive; the learner waits on its in-flight requests.
  * ``can_insert()`` False -> the server stops reading insert messages; actors fill their
    socket's send high-water mark and then block in send (with the send timeout).

Batches vs items: Reverb's units are single items. The server samples ``batch_size``
items at once and admits an insert message (a chunk of items) whole, checking only its
first item (``can_insert()`` with the default n=1, as Reverb awaits CanInsert(1) per
item); in stage 2 diff can therefore overshoot max_diff by up to (chunk - 1) * spi, but no
chunk size can deadlock. Deadlock needs both checks false at once:
max_diff - spi < diff < min_diff + batch, possible only if 2 * error_buffer < batch + spi,
so ``check_rate_limit_settings`` requires error_buffer >= max(batch_size, spi) (Reverb:
>= max(1, spi)).

spi == 0 means no ratio: inserts never block, samples block only below min_size.
"""
from __future__ import annotations

import math
import numbers
from typing import Mapping

from apex_local.config import ConfigError

__all__ = ["RateLimiter", "check_rate_limit_settings", "derived_error_buffer"]


def derived_error_buffer(samples_per_insert: float, min_size: int, batch_size: int) -> float:
    """The error buffer used when ``replay.spi_error_buffer`` is 0.

    Acme's tolerance, 10% of spi * min_size (acme/agents/jax/dqn: error_buffer =
    min_replay_size * samples_per_insert_tolerance_rate * spi, rate 0.1), floored at two
    batches and two inserts' worth of samples so it is always deadlock-free:
    ``max(2 * batch_size, 2 * spi, 0.1 * spi * min_size)``.
    """
    return float(max(2 * batch_size, 2 * samples_per_insert, 0.1 * samples_per_insert * min_size))


def check_rate_limit_settings(samples_per_insert: float, min_size: int, error_buffer: float,
                              batch_size: int) -> float:
    """Refuse settings that make no sense or could deadlock; return the effective buffer.

    Raises ConfigError naming the config field and its value. Returns ``error_buffer``,
    or ``derived_error_buffer(...)`` when it is 0, or 0.0 when spi == 0 (no ratio).
    """
    if not (isinstance(samples_per_insert, numbers.Real) and math.isfinite(samples_per_insert)
            and samples_per_insert >= 0):
        raise ConfigError(f"replay.samples_per_insert = {samples_per_insert!r}: must be a finite "
                          "number >= 0 (0 = no rate limit)")
    if isinstance(min_size, bool) or not isinstance(min_size, numbers.Integral) or min_size < 1:
        raise ConfigError(f"replay.min_size = {min_size!r}: must be an integer >= 1 "
                          "(sampling starts once this many items are stored)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ConfigError(f"learner.batch_size = {batch_size!r}: must be an integer >= 1")
    if not (isinstance(error_buffer, numbers.Real) and math.isfinite(error_buffer)
            and error_buffer >= 0):
        raise ConfigError(f"replay.spi_error_buffer = {error_buffer!r}: must be a finite number "
                          ">= 0 (0 = derived)")
    if samples_per_insert == 0:
        return 0.0
    if error_buffer == 0:
        return derived_error_buffer(samples_per_insert, min_size, batch_size)
    if error_buffer < batch_size:
        raise ConfigError(
            f"replay.spi_error_buffer = {error_buffer!r} is smaller than learner.batch_size = "
            f"{batch_size}: with inserts blocked at the upper bound, a full batch could never be "
            f"sampled, so actors and learner would wait on each other forever; use >= {batch_size} "
            "(or 0 to derive one)")
    if error_buffer < samples_per_insert:
        raise ConfigError(
            f"replay.spi_error_buffer = {error_buffer!r} is smaller than replay.samples_per_insert = "
            f"{samples_per_insert!r}: one insert adds {samples_per_insert!r} samples of credit, more "
            f"than the buffer allows, so inserts could block for good; use >= {samples_per_insert!r} "
            "(or 0 to derive one)")
    return float(error_buffer)


class RateLimiter:
    """Counts inserts, samples and deletes and says whether either may proceed now.

    ``RateLimiter(samples_per_insert, min_size_to_sample, error_buffer, batch_size=...)``:
    the constructor runs ``check_rate_limit_settings`` (error_buffer 0 = derived) and
    raises ConfigError for settings that could deadlock. It never waits itself: the caller
    asks ``can_insert``/``can_sample`` and reports what it did with ``on_insert``/
    ``on_sample``/``on_delete``. See the module docstring for who blocks on a False.
    """

    def __init__(self, samples_per_insert: float, min_size_to_sample: int,
                 error_buffer: float = 0.0, *, batch_size: int = 1) -> None:
        self.error_buffer = check_rate_limit_settings(
            samples_per_insert, min_size_to_sample, error_buffer, batch_size)
        self.samples_per_insert = float(samples_per_insert)
        self.min_size_to_sample = int(min_size_to_sample)
        self.batch_size = int(batch_size)
        offset = self.samples_per_insert * self.min_size_to_sample  # credit at stage 2 entry
        self.min_diff = offset - self.error_buffer
        self.max_diff = offset + self.error_buffer
        self.inserts = 0
        self.samples = 0
        self.deletes = 0

    @property
    def size(self) -> int:
        """Items currently stored, as the limiter sees it (inserts - deletes)."""
        return self.inserts - self.deletes

    @property
    def diff(self) -> float:
        """Sample credit: inserts * spi - samples."""
        return self.inserts * self.samples_per_insert - self.samples

    def can_insert(self, n: int = 1) -> bool:
        """May ``n`` more items be inserted now (all n within the bounds; Reverb CanInsert)?

        The server asks with n=1 before reading each insert message and then admits the
        whole message (see module docstring). False -> the server stops reading insert
        messages and actors block on their send high-water mark.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}")
        if self.samples_per_insert == 0 or self.size + n <= self.min_size_to_sample:
            return True  # stage 1: inserts are free until min size is reached
        return (self.inserts + n) * self.samples_per_insert - self.samples <= self.max_diff

    def can_sample(self, n: int = 1) -> bool:
        """May ``n`` items (one batch: n = batch_size) be sampled now (Reverb CanSample)?

        False before ``min_size_to_sample`` items are stored, or when sampling n would push
        the credit below min_diff. False -> the server queues the sample request unanswered
        until inserts arrive. With n larger than the ``batch_size`` the settings were checked
        for, a True is not guaranteed ever to come.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}")
        if self.size < self.min_size_to_sample:
            return False
        if self.samples_per_insert == 0:
            return True
        return self.diff - n >= self.min_diff

    def on_insert(self, n: int = 1) -> None:
        """Record ``n`` items inserted."""
        self.inserts += self._count(n)

    def on_sample(self, n: int = 1) -> None:
        """Record ``n`` items sampled (batch_size per batch; repeats inside a batch count)."""
        self.samples += self._count(n)

    def on_delete(self, n: int = 1) -> None:
        """Record ``n`` items removed (overwritten in the ring, or dropped as invalid)."""
        n = self._count(n)
        if self.deletes + n > self.inserts:
            raise ValueError(f"{self.deletes + n} deletes would exceed {self.inserts} inserts")
        self.deletes += n

    @staticmethod
    def _count(n: int) -> int:
        if isinstance(n, bool) or int(n) != n or n < 0:
            raise ValueError(f"count must be an integer >= 0, got {n!r}")
        return int(n)

    def state(self) -> dict:
        """Settings, counters and current answers (plain numbers, for metrics and snapshots)."""
        return {
            "samples_per_insert": self.samples_per_insert,
            "min_size_to_sample": self.min_size_to_sample,
            "error_buffer": self.error_buffer,
            "min_diff": self.min_diff,
            "max_diff": self.max_diff,
            "inserts": self.inserts,
            "samples": self.samples,
            "deletes": self.deletes,
            "size": self.size,
            "diff": self.diff,
            "can_insert": self.can_insert(),
            "can_sample": self.can_sample(self.batch_size),
        }

    def restore(self, state: Mapping) -> None:
        """Take the counters from a ``state()`` snapshot (settings stay as constructed,
        like Reverb's checkpoint restore)."""
        inserts, samples, deletes = (self._count(state[k]) for k in ("inserts", "samples", "deletes"))
        if deletes > inserts:
            raise ValueError(f"snapshot has {deletes} deletes > {inserts} inserts")
        self.inserts, self.samples, self.deletes = inserts, samples, deletes
