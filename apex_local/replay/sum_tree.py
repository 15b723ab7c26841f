"""Vectorised segment trees for proportional prioritized replay.

Schaul et al. 2016, "Prioritized Experience Replay", §3.3 and Appendix B.2.1: a sum tree
whose leaves are the priorities p_i lets us draw i with probability p_i / sum_k p_k in
O(log N), and a min tree gives min_k p_k for the importance-sampling normaliser (§3.4).
Everything here is batched numpy: an update of B leaves or a descent of B values costs
O(log N) numpy calls on arrays of length <= B, never a Python loop over items.

Layout (implicit binary heap, leaves padded to a power of two L >= capacity)::

    node 1 = root, children of node i are 2i and 2i+1, leaf j lives at node L + j
    node 0 and the padding leaves [L + capacity, 2L) hold the neutral element
    (0 for sums, +inf for minimums), so padding is never sampled and never the minimum

    capacity 6 -> L = 8:                      1
                                      2               3
                                  4       5       6       7
                                 8 9    10 11   12 13   14 15   <- leaves 0..5, 14/15 padding

The array has 2L entries (``tree_size``); a caller may pass its own 1-D buffer of that
size (e.g. a view on shared memory, sized with ``tree_nbytes``). Parents are always
recomputed from their two children, never updated by deltas, so sums do not drift.
"""
from __future__ import annotations

import numpy as np

__all__ = ["MinTree", "SumTree", "tree_nbytes", "tree_size"]


def _num_leaves(capacity: int) -> int:
    return 1 << (int(capacity) - 1).bit_length()


def tree_size(capacity: int) -> int:
    """Number of array elements a tree of ``capacity`` leaves needs (2 * next power of two)."""
    if int(capacity) < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity!r}")
    return 2 * _num_leaves(capacity)


def tree_nbytes(capacity: int, dtype: np.dtype | type = np.float64) -> int:
    """Bytes of the buffer a ``SumTree``/``MinTree`` of ``capacity`` leaves needs."""
    return tree_size(capacity) * np.dtype(dtype).itemsize


class _SegmentTree:
    """Shared storage, batch update and bulk rebuild; subclasses fix the operator."""

    _op: np.ufunc
    _neutral: float

    def __init__(self, capacity: int, dtype: np.dtype | type = np.float64,
                 buffer: np.ndarray | None = None) -> None:
        n = tree_size(capacity)  # validates capacity
        self.capacity = int(capacity)
        self._first_leaf = n // 2
        self._depth = self._first_leaf.bit_length() - 1  # levels between root and leaves
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise ValueError(f"tree dtype must be floating point, got {dtype}")
        if buffer is None:
            self._tree = np.full(n, self._neutral, dtype=dtype)
        else:
            if not isinstance(buffer, np.ndarray) or buffer.ndim != 1 or buffer.size != n:
                raise ValueError(
                    f"buffer must be a 1-D numpy array of {n} elements for capacity {capacity} "
                    f"(tree_size), got {getattr(buffer, 'shape', type(buffer).__name__)}")
            if buffer.dtype != dtype or not buffer.flags.c_contiguous or not buffer.flags.writeable:
                raise ValueError(f"buffer must be a writeable, contiguous {dtype} array, "
                                 f"got dtype {buffer.dtype}")
            buffer.fill(self._neutral)  # a fresh tree: every leaf empty
            self._tree = buffer
        self._pairs = self._tree.reshape(-1, 2)  # view: row i holds the children of node i

    tree_size = staticmethod(tree_size)
    tree_nbytes = staticmethod(tree_nbytes)

    @property
    def dtype(self) -> np.dtype:
        return self._tree.dtype

    @property
    def leaves(self) -> np.ndarray:
        """Read-only view of the ``capacity`` leaf values."""
        view = self._tree[self._first_leaf:self._first_leaf + self.capacity].view()
        view.flags.writeable = False
        return view

    def _indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= self.capacity):
            bad = idx[(idx < 0) | (idx >= self.capacity)][0]
            raise IndexError(f"index {bad} out of range for capacity {self.capacity}")
        return idx

    def _check_values(self, values: np.ndarray) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def get(self, indices) -> np.ndarray:
        """Leaf values at ``indices`` (a copy, same dtype as the tree)."""
        return self._tree[self._indices(indices) + self._first_leaf]

    def update(self, indices, values) -> None:
        """Set leaves ``indices`` to ``values`` (scalar or same length) and fix their ancestors.

        Duplicate indices: the last write wins, as in a sequential loop. Cost: one stable
        argsort of B, then per level one gather/op/scatter of B nodes (O(B log N)); when
        more than max(64, N/8) leaves change, one O(N) rebuild instead.
        """
        idx = self._indices(indices)
        if idx.size == 0:
            return
        vals = np.asarray(values, dtype=self._tree.dtype).ravel()
        if vals.size == 1 and idx.size != 1:
            vals = np.broadcast_to(vals, idx.shape)
        if vals.shape != idx.shape:
            raise ValueError(f"{idx.size} indices but {vals.size} values")
        self._check_values(vals)
        if idx.size > 1 and idx[-1] - idx[0] == idx.size - 1 and np.all(idx[1:] - idx[:-1] == 1):
            self._update_range(int(idx[0]), vals)  # a replay insert's slots: one slice per level
            return
        order = np.argsort(idx, kind="stable")
        ordered = idx[order]
        last = np.empty(ordered.size, dtype=bool)  # last occurrence of each index
        last[-1] = True
        np.not_equal(ordered[1:], ordered[:-1], out=last[:-1])
        nodes = ordered[last] + self._first_leaf  # sorted, unique
        self._tree.put(nodes, vals[order[last]])
        if self._rebuild_is_cheaper(nodes.size):
            self._rebuild()  # a large share of the leaves changed: O(N) contiguous beats B log N
            return
        pairs, op = self._pairs, self._op
        for _ in range(self._depth):  # level by level towards the root
            nodes = nodes >> 1  # repeats are harmless: the same value is written twice
            children = pairs.take(nodes, axis=0)  # row i of pairs = nodes 2i, 2i+1
            self._tree.put(nodes, op(children[:, 0], children[:, 1]))

    def _update_range(self, start: int, vals: np.ndarray) -> None:
        """Leaves ``start .. start + len(vals) - 1`` (consecutive, ascending) set to ``vals``; the
        parents of a contiguous range are a contiguous range, so each level is one slice op
        (bit-identical to the general path: the same children, the same order)."""
        lo = start + self._first_leaf
        hi = lo + vals.size - 1  # inclusive
        tree, op = self._tree, self._op
        tree[lo:hi + 1] = vals
        if self._rebuild_is_cheaper(vals.size):
            self._rebuild()
            return
        for _ in range(self._depth):
            lo, hi = lo >> 1, hi >> 1  # ufuncs buffer overlapping input / output (top levels)
            op(tree[2 * lo:2 * hi + 2:2], tree[2 * lo + 1:2 * hi + 2:2], out=tree[lo:hi + 1])

    def _rebuild_is_cheaper(self, changed: int) -> bool:
        """Above max(64, N/8) changed leaves one O(N) contiguous rebuild beats B log N updates."""
        return changed > max(64, self._first_leaf // 8)

    def _rebuild(self) -> None:
        """Recompute every parent from its children, one contiguous level at a time."""
        tree, level = self._tree, self._first_leaf
        while level > 1:  # nodes [level/2, level) from children [level, 2 level)
            self._op(tree[level:2 * level:2], tree[level + 1:2 * level:2], out=tree[level // 2:level])
            level //= 2

    def set_all(self, values) -> None:
        """Replace every leaf (``capacity`` values) and rebuild all parents in O(N)."""
        vals = np.asarray(values, dtype=self._tree.dtype).ravel()
        if vals.size != self.capacity:
            raise ValueError(f"set_all needs {self.capacity} values, got {vals.size}")
        self._check_values(vals)
        first = self._first_leaf
        self._tree[first:first + self.capacity] = vals
        self._tree[first + self.capacity:] = self._neutral
        self._rebuild()

    def __len__(self) -> int:
        return self.capacity


class SumTree(_SegmentTree):
    """Sum tree over non-negative finite priorities (Schaul et al. 2016, App. B.2.1).

    A leaf holding 0 is an empty slot: a descent never returns a zero-priority leaf or a padding
    leaf >= capacity, even when float rounding makes a query land on or past a boundary.
    """

    _op = np.add
    _neutral = 0.0

    def _check_values(self, values: np.ndarray) -> None:
        if not (np.isfinite(values).all() and (values >= 0).all()):
            raise ValueError("sum tree values must be finite and >= 0")

    @property
    def total(self) -> float:
        """Sum of all leaves (the root)."""
        return float(self._tree[1])

    def find_prefix_sum(self, values) -> np.ndarray:
        """For each v, the smallest leaf i with p_0 + ... + p_i > v (int64 indices).

        A negative v counts as 0; v >= total (or a v pushed past a subtree's mass by
        rounding) returns the last non-zero leaf at or before where v points. The guard:
        step right only if the right child has mass, so every node visited has mass > 0
        and the leaf reached has priority > 0. Raises ValueError if the tree is empty.
        """
        v = np.array(values, dtype=np.float64, copy=True).ravel()
        if np.isnan(v).any():
            raise ValueError("prefix-sum query values must not be NaN")
        if not self._tree[1] > 0:
            raise ValueError("cannot search an empty sum tree (total priority is 0)")
        np.clip(v, 0.0, None, out=v)
        pairs = self._pairs
        node = np.ones(v.size, dtype=np.int64)
        for _ in range(self._depth):
            children = pairs.take(node, axis=0)  # (B, 2): left and right child masses
            left_sum = children[:, 0]
            go_right = (v >= left_sum) & (children[:, 1] > 0)
            v -= left_sum * go_right
            node = node * 2 + go_right
        return node - self._first_leaf

    def sample(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """Stratified proportional sampling (Schaul et al. 2016, App. B.2.1).

        [0, total) is split into ``batch_size`` equal strata and one value is drawn
        uniformly in each, so a batch covers the priority mass evenly; marginally each
        index is still drawn with probability p_i / total. Returns int64 indices in stratum
        order (not shuffled; an index may repeat).
        """
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        total = self.total
        if not total > 0:
            raise ValueError("cannot sample from an empty sum tree (total priority is 0)")
        segment = total / batch_size
        values = (np.arange(batch_size, dtype=np.float64) + rng.random(batch_size)) * segment
        return self.find_prefix_sum(values)


class MinTree(_SegmentTree):
    """Min tree; empty slots hold +inf, so ``min`` is the minimum over filled slots."""

    _op = np.minimum
    _neutral = np.inf

    def _check_values(self, values: np.ndarray) -> None:
        if np.isnan(values).any():
            raise ValueError("min tree values must not be NaN (use +inf for an empty slot)")

    @property
    def min(self) -> float:
        """Minimum over all leaves; +inf when every slot is empty."""
        return float(self._tree[1])
