"""Prioritized and uniform samplers: hand-computed IS weights, validity, skipped priorities."""
import numpy as np
import pytest

from apex_local.config import ReplayConfig
from apex_local.replay.samplers import PrioritizedSampler, UniformSampler, beta_schedule, make_sampler

CHI2_999 = {3: 16.266, 5: 20.515, 7: 24.322, 9: 27.877}


def chi_square(counts, probs):
    counts = np.asarray(counts, dtype=np.float64)
    expected = counts.sum() * np.asarray(probs, dtype=np.float64)
    return float(((counts - expected) ** 2 / expected).sum())


def four_items(alpha=0.5, eps=0.0, seed=0):
    # td = [1, 4, 9, 16], eps 0, alpha 0.5 -> p = sqrt(td) = [1, 2, 3, 4], total 10,
    # P = [0.1, 0.2, 0.3, 0.4], N = 4
    s = PrioritizedSampler(4, alpha=alpha, priority_eps=eps, rng=np.random.default_rng(seed))
    s.add(np.arange(4), [1.0, 4.0, 9.0, 16.0])
    return s


# beta -> expected weight per index. w_i = (N P_i)^-beta / max_j (N P_j)^-beta, and the max
# is at P_min = 0.1:  N P = [0.4, 0.8, 1.2, 1.6] -> w_i = (P_i / 0.1)^-beta = (p_i / 1)^-beta
#   beta 0.5: [1, 1/sqrt(2), 1/sqrt(3), 1/2] = [1, 0.70711, 0.57735, 0.5]
#   beta 1:   [1, 1/2, 1/3, 1/4]
#   beta 0:   all 1
IS_WEIGHTS = [(0.5, [1.0, 0.70710678, 0.57735027, 0.5]), (1.0, [1.0, 0.5, 1 / 3, 0.25]),
              (0.0, [1.0, 1.0, 1.0, 1.0])]


@pytest.mark.parametrize("beta, expected", IS_WEIGHTS)
def test_is_weights_by_hand(beta, expected):
    s = four_items()
    assert s.total_priority == pytest.approx(10.0) and s.size == 4
    idx, w = s.sample(64, beta)
    assert idx.dtype == np.int64 and w.dtype == np.float32 and idx.shape == w.shape == (64,)
    np.testing.assert_allclose(w, np.asarray(expected)[idx], rtol=1e-6)
    assert set(idx.tolist()) == {0, 1, 2, 3}  # 64 strata of 10/64 each: every item is hit


def test_is_weights_normalised_by_whole_buffer_min():
    # invalidate item 0 (p=1): p_min becomes 2, so with beta 1 item 3 weighs 2/4 = 0.5 and
    # item 1 is now the max-weight item (1.0) -- the min is over the buffer, not the batch
    s = four_items()
    s.invalidate([0])
    idx, w = s.sample(32, 1.0)
    assert 0 not in idx
    np.testing.assert_allclose(w, np.array([np.nan, 1.0, 2 / 3, 0.5])[idx], rtol=1e-6)
    # a batch that happens to contain only item 3 is still normalised by p_min = 2
    s.invalidate([1, 2])
    s.add([1], [4.0])  # p = 2 again
    idx, w = s.sample(8, 1.0)
    np.testing.assert_allclose(w, np.where(idx == 3, 0.5, 1.0), rtol=1e-6)


def test_priority_eps_and_alpha():
    # p = (|td| + eps)^alpha:  td 0 with eps 0.5, alpha 2 -> 0.25; td 1.5 -> 4
    s = PrioritizedSampler(3, alpha=2.0, priority_eps=0.5)
    s.add([0, 1], [0.0, 1.5])
    np.testing.assert_allclose(s._sum.leaves, [0.25, 4.0, 0.0])
    assert s._min.min == 0.25 and s.max_priority == 2.0


def test_alpha_zero_is_uniform():
    s = PrioritizedSampler(8, alpha=0.0, priority_eps=1e-6, rng=np.random.default_rng(3))
    s.add(np.arange(8), [0.0, 1.0, 5.0, 100.0, 0.5, 2.0, 7.0, 1e6])
    np.testing.assert_array_equal(s._sum.leaves, np.ones(8))
    draws, weights = [], []
    for _ in range(200):
        idx, w = s.sample(1000, beta=1.0)
        draws.append(idx)
        weights.append(w)
    assert (np.concatenate(weights) == 1.0).all()
    counts = np.bincount(np.concatenate(draws), minlength=8)
    assert chi_square(counts, np.full(8, 1 / 8)) < CHI2_999[7]


def test_prioritized_frequencies_chi_square():
    # p = td (alpha 1, eps 0) = [1, 2, 3, 4, 5, 6]; 200k draws
    s = PrioritizedSampler(6, alpha=1.0, priority_eps=0.0, rng=np.random.default_rng(7))
    s.add(np.arange(6), np.arange(1.0, 7.0))
    counts = np.bincount(np.concatenate([s.sample(500, 0.4)[0] for _ in range(400)]), minlength=6)
    assert chi_square(counts, np.arange(1, 7) / 21) < CHI2_999[5]


def test_invalidated_items_are_never_sampled():
    s = PrioritizedSampler(8, alpha=0.6, priority_eps=1e-6, rng=np.random.default_rng(0))
    s.add(np.arange(8))
    s.set_priorities([1, 5], [100.0, 100.0])  # the heaviest items
    s.invalidate([1, 5, 5])
    assert s.size == 6
    s.set_priorities([1], [50.0])  # a stale update must not revive the slot
    drawn = np.concatenate([s.sample(256, 0.4)[0] for _ in range(40)])
    assert not np.isin(drawn, [1, 5]).any()
    assert set(drawn.tolist()) == {0, 2, 3, 4, 6, 7}
    s.add([5])  # rewritten slot: sampleable again
    assert s.size == 7 and 5 in np.concatenate([s.sample(256, 0.4)[0] for _ in range(10)])


def test_non_finite_or_negative_td_is_skipped():
    s = PrioritizedSampler(4, alpha=1.0, priority_eps=0.0)
    s.add(np.arange(4), [1.0, 1.0, 1.0, 1.0])
    skipped = s.set_priorities([0, 1, 2, 3], [np.nan, -1.0, np.inf, 3.0])
    assert skipped == 3
    np.testing.assert_array_equal(s._sum.leaves, [1.0, 1.0, 1.0, 3.0])  # only item 3 written
    assert s.max_priority == 3.0
    # add: an unusable initial priority falls back to max priority; the item is still added
    assert s.add([0], [np.nan]) == 1
    assert s._sum.get([0])[0] == 3.0 and s.size == 4


def test_new_items_get_max_priority():
    s = PrioritizedSampler(4, alpha=0.5, priority_eps=0.0)
    assert s.max_priority == 1.0
    s.add([0])                                    # p = 1^0.5 = 1
    s.set_priorities([0], [9.0])                  # raw 9 -> p = 3, max_priority 9
    s.add([1])                                    # p = 9^0.5 = 3
    s.set_priorities([0], [0.25])                 # max never decreases
    s.add([2])
    np.testing.assert_allclose(s._sum.leaves, [0.5, 3.0, 3.0, 0.0])
    assert s.max_priority == 9.0


def test_size_counts_distinct_valid_items():
    s = PrioritizedSampler(6, alpha=0.6, priority_eps=1e-6)
    s.add([0, 1, 1, 2])
    assert s.size == 3
    s.add([2, 3])
    assert s.size == 4
    s.invalidate([3, 3, 4])                       # 4 was never valid
    assert s.size == 3


def test_empty_sampler_raises():
    for s in (PrioritizedSampler(4, 0.6, 1e-6), UniformSampler(4)):
        with pytest.raises(RuntimeError, match="nothing to sample"):
            s.sample(2, 0.4)
        s.add([1])
        s.invalidate([1])
        with pytest.raises(RuntimeError, match="nothing to sample"):
            s.sample(2, 0.4)


def test_buffers_and_state_roundtrip():
    specs = PrioritizedSampler.buffer_specs(6)
    bufs = {name: np.ones(shape, dtype) for name, (shape, dtype) in specs.items()}
    s = PrioritizedSampler(6, 0.6, 1e-6, rng=np.random.default_rng(5), buffers=bufs)
    assert s.size == 0 and s._sum.total == 0 and np.shares_memory(s._sum._tree, bufs["sum"])
    s.add(np.arange(5), [0.5, 2.0, 1.0, 0.1, 3.0])
    s.invalidate([2])
    copy = PrioritizedSampler(6, 0.6, 1e-6, rng=np.random.default_rng(5))
    copy.restore(s.state())
    assert copy.size == s.size and copy.max_priority == s.max_priority
    a, b = s.sample(16, 0.5), copy.sample(16, 0.5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError):
        PrioritizedSampler(6, 0.6, 1e-6, buffers={"sum": np.zeros(8)})
    with pytest.raises(ValueError, match="unknown buffers"):
        UniformSampler(6, buffers={"sum": np.zeros(16)})


def test_uniform_never_returns_unwritten_or_invalid_slots():
    s = UniformSampler(10, rng=np.random.default_rng(0))
    s.add(np.arange(6))
    idx, w = s.sample(60_000)
    assert (w == 1.0).all() and w.dtype == np.float32 and idx.dtype == np.int64
    assert idx.max() <= 5
    assert chi_square(np.bincount(idx, minlength=6), np.full(6, 1 / 6)) < CHI2_999[5]
    s.invalidate([1, 4])                          # rejection path (density 4/6)
    idx, _ = s.sample(40_000)
    assert set(idx.tolist()) == {0, 2, 3, 5}
    assert chi_square(np.bincount(idx, minlength=6)[[0, 2, 3, 5]], np.full(4, 1 / 4)) < CHI2_999[3]


def test_uniform_sparse_fallback():
    s = UniformSampler(1000, rng=np.random.default_rng(1))
    s.add(np.arange(1000))
    s.invalidate(np.setdiff1d(np.arange(1000), [3, 500]))  # density 0.002 -> list valid slots
    assert s.size == 2
    idx, _ = s.sample(1000)
    assert set(idx.tolist()) == {3, 500}
    assert s.set_priorities([3, 500], [np.nan, 1.0]) == 1  # same skipped count as prioritized
    copy = UniformSampler(1000)
    copy.restore(s.state())
    assert copy.size == 2 and set(copy.sample(100)[0].tolist()) <= {3, 500}


def test_make_sampler_and_beta_schedule():
    rng = np.random.default_rng(0)
    p = make_sampler(ReplayConfig(prioritized=True, alpha=0.7, priority_eps=0.01), 16, rng)
    assert isinstance(p, PrioritizedSampler) and (p.alpha, p.priority_eps, p.capacity) == (0.7, 0.01, 16)
    assert isinstance(make_sampler(ReplayConfig(prioritized=False), 16, rng), UniformSampler)


@pytest.mark.parametrize("beta, final, anneal, update, expected", [
    (0.4, 1.0, 0, 0, 0.4), (0.4, 1.0, 0, 10**9, 0.4),          # 0 = constant
    (0.4, 1.0, 100, 0, 0.4), (0.4, 1.0, 100, 50, 0.7), (0.4, 1.0, 100, 100, 1.0),
    (0.4, 1.0, 100, 1000, 1.0), (0.5, 0.5, 10, 5, 0.5), (0.2, 0.6, 4, 1, 0.3),
])
def test_beta_schedule(beta, final, anneal, update, expected):
    cfg = ReplayConfig(beta=beta, beta_final=final, beta_anneal_updates=anneal)
    assert beta_schedule(cfg, update) == pytest.approx(expected)
