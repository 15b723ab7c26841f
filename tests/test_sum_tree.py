"""Sum tree / min tree: hand-computed sums, descent boundaries, sampling frequencies."""
import numpy as np
import pytest

from apex_local.replay.sum_tree import MinTree, SumTree, tree_nbytes, tree_size

# chi-square 0.999 quantiles (df -> critical value), so a correct sampler fails 1 in 1000
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322,
            8: 26.124, 9: 27.877}


def chi_square(counts, probs):
    counts = np.asarray(counts, dtype=np.float64)
    expected = counts.sum() * np.asarray(probs, dtype=np.float64)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("capacity, size", [(1, 2), (5, 16), (6, 16), (7, 16), (8, 16), (9, 32)])
def test_tree_size_pads_to_power_of_two(capacity, size):
    assert tree_size(capacity) == size
    assert tree_nbytes(capacity) == size * 8
    assert tree_nbytes(capacity, np.float32) == size * 4
    assert SumTree(capacity)._tree.shape == (size,)


# (capacity, [(indices, values), ...] applied in order, expected leaves)
UPDATES = [
    (5, [([0, 1, 2, 3, 4], [1, 2, 3, 4, 5])], [1, 2, 3, 4, 5]),
    (5, [([4], [7]), ([0], [0.5]), ([4], [1])], [0.5, 0, 0, 0, 1]),
    (6, [([5, 0], [2, 3]), ([2, 3], [1, 1])], [3, 0, 1, 1, 0, 2]),
    (7, [([6], [9]), ([6], [0])], [0, 0, 0, 0, 0, 0, 0]),
    (8, [(np.arange(8), np.arange(8) * 0.5)], [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5]),
    (5, [([1, 3, 1], [5, 2, 7])], [0, 7, 0, 2, 0]),        # duplicate: last write wins
    (6, [([2, 2, 2, 0], [1, 2, 3, 4])], [4, 0, 3, 0, 0, 0]),
    (7, [([3, 1], 2.5)], [0, 2.5, 0, 2.5, 0, 0, 0]),      # scalar broadcast
]


@pytest.mark.parametrize("capacity, updates, leaves", UPDATES)
def test_update_totals_and_leaves(capacity, updates, leaves):
    tree = SumTree(capacity)
    for idx, vals in updates:
        tree.update(np.asarray(idx), vals)
    np.testing.assert_array_equal(tree.leaves, leaves)
    np.testing.assert_array_equal(tree.get(np.arange(capacity)), leaves)
    assert tree.total == pytest.approx(sum(leaves))
    rebuilt = SumTree(capacity)
    rebuilt.set_all(leaves)
    np.testing.assert_array_equal(rebuilt._tree, tree._tree)  # incremental == bulk


def test_sparse_updates_equal_bulk_rebuild():
    # many small batches (the O(B log N) path) on a deep tree == one O(N) rebuild
    rng = np.random.default_rng(2)
    tree, mins = SumTree(1000), MinTree(1000)
    for _ in range(200):
        idx = rng.integers(0, 1000, 50)
        vals = rng.random(50) * (rng.random(50) < 0.8)
        tree.update(idx, vals)
        mins.update(idx, np.where(vals > 0, vals, np.inf))
    bulk, bulk_min = SumTree(1000), MinTree(1000)
    bulk.set_all(tree.leaves)
    bulk_min.set_all(mins.leaves)
    np.testing.assert_allclose(tree._tree, bulk._tree, rtol=1e-12)
    np.testing.assert_array_equal(mins._tree, bulk_min._tree)
    big = SumTree(1000)
    big.update(np.arange(1000), tree.leaves)  # > N/8 leaves: the rebuild path
    np.testing.assert_array_equal(big._tree, bulk._tree)


@pytest.mark.parametrize("capacity", [1, 2, 5, 1000, 4096])
def test_contiguous_range_updates_equal_the_general_path(capacity):
    # a replay insert's slots are one ascending run: that path must give the same tree, bit for bit
    rng = np.random.default_rng(capacity)
    for cls, gen in ((SumTree, lambda n: rng.random(n)), (MinTree, lambda n: np.where(rng.random(n) < 0.9,
                                                                                        rng.random(n), np.inf))):
        fast, slow = cls(capacity), cls(capacity)
        for start, n in [(0, 1), (0, min(3, capacity)), (capacity - 1, 1), (max(0, capacity - 50), min(50, capacity)),
                         *((int(s), 50) for s in rng.integers(0, max(1, capacity - 50), 20))]:
            n = min(n, capacity - start)
            idx, vals = np.arange(start, start + n), gen(n)
            fast.update(idx, vals)
            order = rng.permutation(n)  # same writes, out of order: the general path
            slow.update(idx[order], vals[order])
            np.testing.assert_array_equal(fast._tree, slow._tree)
        big = cls(capacity)
        big.update(np.arange(capacity), fast.leaves)  # a range above N/8: the rebuild
        np.testing.assert_array_equal(big._tree, fast._tree)


def test_internal_nodes_capacity_5_by_hand():
    # leaves 1..5 at nodes 8..12, padding 13..15 = 0
    #   node 4 = 1+2 = 3, node 5 = 3+4 = 7, node 6 = 5+0 = 5, node 7 = 0
    #   node 2 = 3+7 = 10, node 3 = 5+0 = 5, root = 15
    tree = SumTree(5)
    tree.update(np.arange(5), [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(tree._tree[1:8], [15, 10, 5, 3, 7, 5, 0])
    tree.update([2], [0])                                  # node 5 -> 4, node 2 -> 7, root -> 12
    np.testing.assert_array_equal(tree._tree[1:8], [12, 7, 5, 3, 4, 5, 0])


# priorities [1, 2, 0, 3, 4] (capacity 5, total 10): leaf 0 owns [0,1), leaf 1 [1,3),
# leaf 2 nothing, leaf 3 [3,6), leaf 4 [6,10]; queries outside [0, total] are clipped
DESCENT = [(0.0, 0), (0.5, 0), (np.nextafter(1.0, 0), 0), (1.0, 1), (2.999, 1), (3.0, 3),
           (5.999, 3), (6.0, 4), (9.999, 4), (10.0, 4), (10.5, 4), (-1.0, 0)]


@pytest.mark.parametrize("value, index", DESCENT)
def test_find_prefix_sum_boundaries(value, index):
    tree = SumTree(5)
    tree.update(np.arange(5), [1, 2, 0, 3, 4])
    assert tree.find_prefix_sum([value]).tolist() == [index]


@pytest.mark.parametrize("priorities, value, index", [
    ([1, 2, 0, 0, 0], 3.0, 1),         # == total, zero leaves after: last non-zero leaf
    ([0, 0, 0, 5, 0, 0], 0.0, 3),      # leading zero leaves are skipped
    ([0, 0, 0, 5, 0, 0], 5.0, 3),
    ([0, 0, 0, 0, 0, 0, 2], 2.0, 6),   # only the last leaf
    ([7], 7.0, 0),                     # capacity 1: the root is the leaf
])
def test_find_prefix_sum_never_returns_empty_leaf(priorities, value, index):
    tree = SumTree(len(priorities))
    tree.update(np.arange(len(priorities)), priorities)
    assert tree.find_prefix_sum([value]).tolist() == [index]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rounding_never_yields_zero_or_padding(dtype):
    # random priorities with many zeros; query exactly at every cumulative boundary,
    # at total and just past it: the leaf reached must have priority > 0
    rng = np.random.default_rng(0)
    for capacity in (5, 6, 7, 8, 13, 100):
        p = rng.random(capacity) * (rng.random(capacity) < 0.5)
        p[rng.integers(capacity)] = 0.1
        tree = SumTree(capacity, dtype=dtype)
        tree.update(np.arange(capacity), p)
        cum = np.cumsum(tree.leaves.astype(np.float64))
        total = tree.total
        queries = np.concatenate([cum, np.nextafter(cum, 0), [total, np.nextafter(total, np.inf)],
                                  rng.random(1000) * total])
        idx = tree.find_prefix_sum(queries)
        assert idx.min() >= 0 and idx.max() < capacity
        assert (tree.get(idx) > 0).all()


def test_find_prefix_sum_matches_searchsorted():
    rng = np.random.default_rng(1)
    p = rng.random(1000) * (rng.random(1000) < 0.7)
    tree = SumTree(1000)
    tree.update(np.arange(1000), p)
    cum = np.cumsum(p)
    values = rng.random(5000) * cum[-1]
    values = values[np.abs(values[:, None] - cum[None, :]).min(axis=1) > 1e-9]  # off boundaries
    np.testing.assert_array_equal(tree.find_prefix_sum(values), np.searchsorted(cum, values, "right"))


def test_sampling_frequencies_match_priorities():
    # 200k stratified draws from priorities [1, 2, 3, 4, 0, 10]; leaf 4 must never appear
    p = np.array([1, 2, 3, 4, 0, 10], dtype=np.float64)
    tree = SumTree(6)
    tree.update(np.arange(6), p)
    rng = np.random.default_rng(1234)
    draws = np.concatenate([tree.sample(1000, rng) for _ in range(200)])
    counts = np.bincount(draws, minlength=6)
    assert counts[4] == 0
    nz = p > 0
    assert chi_square(counts[nz], p[nz] / p.sum()) < CHI2_999[4]
    # i.i.d. descent of uniform values as well
    iid = np.bincount(tree.find_prefix_sum(rng.random(200_000) * tree.total), minlength=6)
    assert iid[4] == 0 and chi_square(iid[nz], p[nz] / p.sum()) < CHI2_999[4]


@pytest.mark.parametrize("priorities, batch, expected", [
    ([1] * 7, 7, list(range(7))),            # one item per stratum exactly
    ([3, 1], 4, [0, 0, 0, 1]),                # strata [0,1),[1,2),[2,3) -> 0, [3,4) -> 1
    ([2, 0, 2], 2, [0, 2]),
    ([1, 1, 0, 0, 2], 4, [0, 1, 4, 4]),
])
def test_stratified_sampling_is_one_draw_per_stratum(priorities, batch, expected):
    tree = SumTree(len(priorities))
    tree.update(np.arange(len(priorities)), priorities)
    for seed in range(20):
        assert tree.sample(batch, np.random.default_rng(seed)).tolist() == expected


# (capacity, updates, expected min)
MIN_CASES = [
    (5, [], np.inf),
    (5, [([0, 4], [3.0, 2.0])], 2.0),
    (6, [([0, 4], [3.0, 2.0]), ([4], [np.inf])], 3.0),   # emptied slot no longer the min
    (7, [([1, 2, 3], [5.0, 0.25, 9.0]), ([2, 2], [0.1, 8.0])], 5.0),  # last write wins
    (8, [(np.arange(8), np.arange(8, 0, -1))], 1.0),
]


@pytest.mark.parametrize("capacity, updates, expected", MIN_CASES)
def test_min_tree(capacity, updates, expected):
    tree = MinTree(capacity)
    for idx, vals in updates:
        tree.update(idx, vals)
    assert tree.min == expected
    rebuilt = MinTree(capacity)
    rebuilt.set_all(tree.leaves)
    assert rebuilt.min == expected


def test_caller_buffer_is_used_and_cleared():
    buf = np.full(tree_size(6), 42.0)
    tree = SumTree(6, buffer=buf)
    assert tree.total == 0.0 and np.shares_memory(tree._tree, buf)
    tree.update([3], [2.5])
    assert buf[1] == 2.5
    mbuf = np.zeros(tree_size(6))
    assert MinTree(6, buffer=mbuf).min == np.inf
    with pytest.raises(ValueError, match="16 elements"):
        SumTree(6, buffer=np.zeros(8))
    with pytest.raises(ValueError, match="float64"):
        SumTree(6, buffer=np.zeros(16, dtype=np.float32))


def test_bad_inputs_are_refused():
    tree = SumTree(5)
    with pytest.raises(IndexError):
        tree.update([5], [1.0])
    with pytest.raises(IndexError):
        tree.get([-1])
    with pytest.raises(ValueError):
        tree.update([0], [-1.0])
    with pytest.raises(ValueError):
        tree.update([0], [np.nan])
    with pytest.raises(ValueError):
        tree.update([0, 1], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="empty"):
        tree.find_prefix_sum([0.0])
    with pytest.raises(ValueError, match="empty"):
        tree.sample(4, np.random.default_rng(0))
    with pytest.raises(ValueError):
        SumTree(0)
    tree.update([], [])  # empty update is a no-op
    assert tree.total == 0.0
