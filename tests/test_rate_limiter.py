"""Rate limiter: hand-traced insert/sample sequences, deadlock settings refused."""
import itertools

import numpy as np
import pytest

from apex_local.config import ConfigError, config_from_dict
from apex_local.replay.rate_limiter import RateLimiter, check_rate_limit_settings, derived_error_buffer

# (spi, min_size, error_buffer, batch, [(op, n, can_insert(), can_sample(batch)) ...])
# each step applies op (on_insert / on_sample / on_delete of n; None = nothing) then checks.
# diff = inserts*spi - samples; offset = spi*min_size; min/max_diff = offset -/+ buffer
SEQUENCES = {
    "unlimited: only min size": (0, 3, 0, 2, [
        (None, 0, True, False),
        ("insert", 2, True, False),
        ("insert", 1, True, True),                   # size 3 == min size
        ("sample", 100, True, True),                 # no ratio
        ("delete", 1, True, False),                  # size 2 < 3
    ]),
    "spi 1, min 2, buffer 4 (min_diff -2, max_diff 6)": (1, 2, 4, 2, [
        (None, 0, True, False),
        ("insert", 2, True, True),                   # diff 2; next insert: 3 <= 6; 2-2 >= -2
        ("sample", 2, True, True),                   # diff 0; 0-2 = -2 >= -2
        ("sample", 2, True, False),                  # diff -2; -4 < -2
        ("insert", 4, True, True),                   # diff 2
        ("insert", 4, False, True),                  # diff 6; one more -> 7 > 6
        ("sample", 2, True, True),                   # diff 4; 5 <= 6
    ]),
    "spi 4, min 1, buffer 8 (min_diff -4, max_diff 12)": (4, 1, 8, 8, [
        (None, 0, True, False),                      # stage 1: 0+1 <= 1
        ("insert", 1, True, True),                   # diff 4; next: 8 <= 12; 4-8 = -4 >= -4
        ("insert", 1, True, True),                   # diff 8; next: 12 <= 12
        ("insert", 1, False, True),                  # diff 12; next: 16 > 12
        ("sample", 8, True, True),                   # diff 4
        ("sample", 8, True, False),                  # diff -4; -12 < -4
    ]),
    "spi 0.5, min 4, buffer 2 (min_diff 0, max_diff 4)": (0.5, 4, 2, 2, [
        ("insert", 4, True, True),                   # diff 2; 2-2 = 0 >= 0; next 2.5 <= 4
        ("sample", 2, True, False),                  # diff 0
        ("insert", 3, True, False),                  # diff 1.5; 1.5-2 < 0
        ("insert", 1, True, True),                   # diff 2
        ("insert", 4, False, True),                  # diff 4; next 4.5 > 4
    ]),
    "deletes drop below min size": (1, 3, 4, 1, [
        ("insert", 3, True, True),                   # diff 3, size 3
        ("delete", 1, True, False),                  # size 2 < 3: stage 1 again
        ("insert", 1, True, True),                   # diff 4, size 3
    ]),
    "chunk overshoots min size": (1, 10, 8, 4, [
        ("insert", 9, True, False),                  # stage 1
        ("insert", 50, False, True),                 # admitted whole: diff 59 > max_diff 18
        ("sample", 40, False, True),                 # diff 19; next 20 > 18
        ("sample", 4, True, True),                   # diff 15; next 16 <= 18
    ]),
}


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_sequences(name):
    spi, min_size, buffer, batch, steps = SEQUENCES[name]
    lim = RateLimiter(spi, min_size, buffer, batch_size=batch)
    for op, n, can_insert, can_sample in steps:
        if op is not None:
            getattr(lim, f"on_{op}")(n)
        assert (lim.can_insert(), lim.can_sample(batch)) == (can_insert, can_sample), (op, n, lim.state())


def test_can_insert_n_is_reverbs_all_items_check():
    lim = RateLimiter(1, 2, 4, batch_size=2)        # max_diff 6
    lim.on_insert(4)                                 # diff 4
    assert lim.can_insert(2) and not lim.can_insert(3)
    assert lim.can_sample(6) and not lim.can_sample(7)  # min_diff -2


# (spi, min_size, error_buffer, batch_size, field named, value named)
REFUSED = [
    (-1.0, 10, 0, 4, "replay.samples_per_insert", "-1.0"),
    (float("nan"), 10, 0, 4, "replay.samples_per_insert", "nan"),
    (float("inf"), 10, 0, 4, "replay.samples_per_insert", "inf"),
    (1.0, 0, 0, 4, "replay.min_size", "0"),
    (1.0, 10, -1.0, 4, "replay.spi_error_buffer", "-1.0"),
    (1.0, 10, 0, 0, "learner.batch_size", "0"),
    (1.0, 10, 3.0, 4, "replay.spi_error_buffer = 3.0 is smaller than learner.batch_size = 4", ""),
    (8.0, 10, 4.0, 4, "replay.spi_error_buffer = 4.0 is smaller than replay.samples_per_insert", "8.0"),
    (0.5, 100, 63.0, 64, "replay.spi_error_buffer", "63.0"),
]


@pytest.mark.parametrize("spi, min_size, buffer, batch, field, value", REFUSED)
def test_deadlock_settings_refused(spi, min_size, buffer, batch, field, value):
    with pytest.raises(ConfigError) as err:
        check_rate_limit_settings(spi, min_size, buffer, batch)
    assert field in str(err.value) and value in str(err.value)
    with pytest.raises(ConfigError):
        RateLimiter(spi, min_size, buffer, batch_size=batch)


@pytest.mark.parametrize("spi, min_size, buffer, batch, effective", [
    (2.0, 1000, 0, 64, 200.0),        # max(2*64, 2*2, 0.1*2*1000) = 200
    (1.0, 100, 0, 32, 64.0),          # max(64, 2, 10)
    (100.0, 1, 0, 4, 200.0),          # max(8, 200, 10)
    (1.0, 100, 32.0, 32, 32.0),       # explicit and >= max(batch, spi)
    (0.0, 100, 5.0, 64, 0.0),         # no ratio: no buffer
])
def test_effective_error_buffer(spi, min_size, buffer, batch, effective):
    assert check_rate_limit_settings(spi, min_size, buffer, batch) == effective
    if buffer == 0 and spi > 0:
        assert derived_error_buffer(spi, min_size, batch) == effective
        assert RateLimiter(spi, min_size, 0, batch_size=batch).error_buffer == effective


def test_config_cross_check_uses_rate_limit_settings():
    with pytest.raises(ConfigError, match="replay.spi_error_buffer"):
        config_from_dict({"replay": {"samples_per_insert": 4, "spi_error_buffer": 8},
                          "learner": {"batch_size": 64}})
    cfg = config_from_dict({"replay": {"samples_per_insert": 4, "spi_error_buffer": 64},
                            "learner": {"batch_size": 64}})
    assert cfg.replay.samples_per_insert == 4


@pytest.mark.parametrize("spi, min_size, buffer, batch", list(itertools.product(
    [0.25, 1.0, 4.0, 32.0], [1, 50], ["derived", "smallest"], [1, 8, 64])))
def test_accepted_settings_never_deadlock(spi, min_size, buffer, batch):
    # a greedy server: sample a batch when allowed, else admit an insert message of a random
    # size (1..50 items, a whole chunk) when allowed; both refused = deadlock
    eb = 0.0 if buffer == "derived" else float(max(batch, spi))  # smallest accepted
    lim = RateLimiter(spi, min_size, eb, batch_size=batch)
    rng = np.random.default_rng(0)
    capacity = 200
    for _ in range(3000):
        if lim.can_sample(batch):
            lim.on_sample(batch)
        elif lim.can_insert():
            n = int(rng.integers(1, 51))
            lim.on_insert(n)
            overflow = max(0, lim.size - capacity)  # ring buffer: oldest items deleted
            lim.on_delete(overflow)
        else:
            pytest.fail(f"deadlock: {lim.state()}")
    assert lim.samples > 0


def test_state_restore_and_counter_checks():
    lim = RateLimiter(2.0, 4, 16, batch_size=8)
    lim.on_insert(10)
    lim.on_sample(8)
    lim.on_delete(2)
    st = lim.state()
    assert {k: st[k] for k in ("inserts", "samples", "deletes", "size", "diff")} == \
        {"inserts": 10, "samples": 8, "deletes": 2, "size": 8, "diff": 12.0}
    assert (st["min_diff"], st["max_diff"], st["can_insert"], st["can_sample"]) == (-8.0, 24.0, True, True)
    other = RateLimiter(2.0, 4, 16, batch_size=8)
    other.restore(st)
    assert other.state() == st
    with pytest.raises(ValueError):
        lim.on_delete(9)                         # more deletes than inserts
    with pytest.raises(ValueError):
        lim.on_insert(-1)
    with pytest.raises(ValueError):
        lim.can_sample(0)
