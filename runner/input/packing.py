"""Packing tokenized windows into batches of at most a token budget, with no padding.

A `PackedBatch` is the windows' tokens back to back plus `cu_seqlens` offsets, which is what varlen
attention kernels take. `pack` packs a stream greedily in arrival order; `pack_block` packs a whole block
first-fit-decreasing, which fills batches much better when window lengths vary. A window is never split:
one longer than the budget (possible only when the budget is below the longest window) gets its own batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from runner.errors import RunnerError
from runner.input.batch import PackedBatch, TokenizedRecord


def _check_budget(token_budget: int) -> int:
    if int(token_budget) < 1:
        raise RunnerError(f"token budget must be at least 1 token, not {token_budget}")
    return int(token_budget)


def make_batch(windows: Sequence[TokenizedRecord], token_budget: int) -> PackedBatch:
    """One packed batch of the given windows, in the given order."""
    lens = np.array([len(w.tokens) for w in windows], dtype=np.int32)
    cu = np.zeros(len(windows) + 1, dtype=np.int32)
    np.cumsum(lens, out=cu[1:])
    total = int(cu[-1])
    if windows:
        tokens = np.concatenate([w.tokens for w in windows]).astype(np.int32, copy=False)
    else:
        tokens = np.zeros(0, dtype=np.int32)
    # position inside its own window: global index minus the start of the window it belongs to.
    # Everything stays int32: int64 temporaries of a large batch cost ~8x more (allocation + bandwidth).
    positions = np.arange(total, dtype=np.int32) - np.repeat(cu[:-1], lens)
    return PackedBatch(
        tokens=tokens,
        positions=positions,
        cu_seqlens=cu,
        ids=[w.id for w in windows],
        ordinals=np.array([w.ordinal for w in windows], dtype=np.int64),
        residues=np.array([w.residues for w in windows], dtype=np.int32),
        truncated=np.array([w.truncated for w in windows], dtype=bool),
        chunk_index=np.array([w.chunk_index for w in windows], dtype=np.int32),
        chunk_count=np.array([w.chunk_count for w in windows], dtype=np.int32),
        total_residues=np.array([w.total_residues for w in windows], dtype=np.int32),
        token_budget=token_budget,
    )


def pack(records: Iterable[TokenizedRecord], token_budget: int) -> Iterator[PackedBatch]:
    """Pack a stream in arrival order: a batch is emitted when the next window would overflow it."""
    budget = _check_budget(token_budget)
    current: list[TokenizedRecord] = []
    used = 0
    for w in records:
        n = len(w.tokens)
        if current and used + n > budget:
            yield make_batch(current, budget)
            current, used = [], 0
        current.append(w)
        used += n
    if current:
        yield make_batch(current, budget)


def pack_block(
    records: Sequence[TokenizedRecord], token_budget: int, keep_chunks_together: bool = False
) -> list[PackedBatch]:
    """Pack a block first-fit-decreasing: longest windows first, each into the first batch it fits.

    Every window lands in exactly one batch; inside a batch windows keep their input order. Batches come
    out in the order they were opened (the one holding the longest window first). With `keep_chunks_together`
    (--per-token, where the actor stitches a chunked sequence's windows into one array) all windows of a
    sequence are packed as one unit: into one batch, a batch of their own when together they exceed the budget.
    """
    budget = _check_budget(token_budget)
    records = list(records)
    if not records:
        return []
    units: list[list[int]] | None = None  # indices of records packed as one (None: every record alone)
    if keep_chunks_together and any(w.chunk_count > 1 for w in records):
        units = []
        unit_of: dict[int, int] = {}
        for i, w in enumerate(records):
            if w.chunk_count > 1 and w.ordinal in unit_of:
                units[unit_of[w.ordinal]].append(i)
                continue
            unit_of[w.ordinal] = len(units)
            units.append([i])
    n = len(records) if units is None else len(units)
    lens = [len(w.tokens) for w in records] if units is None else [
        sum(len(records[i].tokens) for i in unit) for unit in units
    ]
    order = sorted(range(n), key=lambda i: -lens[i])  # stable: equal lengths keep input order
    members: list[list[int]] = []
    # A max tree over the free tokens of each batch (leaf b = batch b, -1 = not opened) finds the first
    # batch with room in O(log n): a linear scan costs ~10 us per window at a few hundred open batches.
    # First fit leaves at most one batch half empty or less, so batches < 2 * fitting tokens / budget + 1,
    # plus one per window over budget; sizing the tree by that (not by n) keeps it shallow.
    fitting = sum(x for x in lens if x <= budget)
    oversize = sum(1 for x in lens if x > budget)
    max_batches = min(n, oversize + 2 * (fitting // budget) + 3)
    size_p = 1 << max(max_batches - 1, 1).bit_length()
    tree = [-1] * (2 * size_p)
    for i in order:
        size = lens[i]
        if tree[1] >= size:
            node = 1
            while node < size_p:  # descend to the leftmost leaf with room
                node = 2 * node if tree[2 * node] >= size else 2 * node + 1
            b = node - size_p
            members[b].append(i)
            value = tree[node] - size
        else:
            # nothing open fits: open a batch (a window over budget fills its own batch completely)
            b = len(members)
            members.append([i])
            node = b + size_p
            value = max(budget - size, -1)
        tree[node] = value
        node >>= 1
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            tree[node] = left if left >= right else right
            node >>= 1
    if units is not None:
        members = [[r for u in m for r in units[u]] for m in members]
    return [make_batch([records[i] for i in sorted(m)], budget) for m in members]


def packing_efficiency(batches: Sequence[PackedBatch]) -> float:
    """Real tokens over budgeted tokens (sum of num_tokens / sum of token budgets); 0.0 with no batches.

    It can exceed 1 only through lone windows longer than the budget.
    """
    budget = sum(int(b.token_budget) for b in batches)
    if budget <= 0:
        return 0.0
    return sum(b.num_tokens for b in batches) / budget
