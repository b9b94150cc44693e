"""Packing windows into token-budget batches: property tests over random window lengths and budgets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.errors import RunnerError
from runner.input.batch import PackedBatch, TokenizedRecord
from runner.input.packing import make_batch, pack, pack_block, packing_efficiency


def windows_from_lengths(lengths: list[int]) -> list[TokenizedRecord]:
    """Window i has `lengths[i]` tokens, each token encoding (i, position) so content can be checked."""
    out = []
    for i, n in enumerate(lengths):
        out.append(
            TokenizedRecord(
                id=f"w{i}",
                ordinal=i,
                tokens=(np.arange(n, dtype=np.int32) + 1000 * i),
                residues=max(n - 2, 0),
                truncated=i % 3 == 0,
                chunk_index=i % 2,
                chunk_count=2,
                total_residues=n + 5,
            )
        )
    return out


def check_batches(batches: list[PackedBatch], windows: list[TokenizedRecord], budget: int) -> None:
    by_id = {w.id: w for w in windows}
    seen: list[str] = []
    for b in batches:
        n = len(b.ids)
        assert b.token_budget == budget
        assert b.cu_seqlens.dtype == np.int32 and b.cu_seqlens[0] == 0 and len(b.cu_seqlens) == n + 1
        assert (np.diff(b.cu_seqlens) >= 0).all() and b.cu_seqlens[-1] == len(b.tokens) == len(b.positions)
        assert b.tokens.dtype == np.int32 and b.positions.dtype == np.int32
        # budget respected, except a lone window longer than the budget
        assert b.num_tokens <= budget or (n == 1 and b.num_tokens > budget)
        assert all(len(a) == n for a in (b.ordinals, b.residues, b.truncated, b.chunk_index, b.chunk_count))
        assert len(b.total_residues) == n
        for j, wid in enumerate(b.ids):
            w = by_id[wid]
            s, e = int(b.cu_seqlens[j]), int(b.cu_seqlens[j + 1])
            assert np.array_equal(b.tokens[s:e], w.tokens)  # content preserved, window not split
            assert np.array_equal(b.positions[s:e], np.arange(e - s))
            assert b.ordinals[j] == w.ordinal and b.residues[j] == w.residues
            assert b.truncated[j] == w.truncated and b.chunk_index[j] == w.chunk_index
            assert b.chunk_count[j] == w.chunk_count and b.total_residues[j] == w.total_residues
        seen.extend(b.ids)
    assert sorted(seen) == sorted(w.id for w in windows)  # every window exactly once
    assert len(seen) == len(set(seen))


lengths_st = st.lists(st.integers(1, 60), min_size=0, max_size=80)
budget_st = st.integers(1, 200)


@settings(max_examples=300, deadline=None)
@given(lengths=lengths_st, budget=budget_st)
def test_pack_block_properties(lengths: list[int], budget: int) -> None:
    windows = windows_from_lengths(lengths)
    batches = pack_block(windows, budget)
    check_batches(batches, windows, budget)
    # windows inside a batch keep input order
    for b in batches:
        assert list(b.ordinals) == sorted(b.ordinals)
    # first fit: a window went to a later batch only because it did not fit any earlier one, so every
    # earlier batch is too full for the smallest window of any later batch
    loads = [b.num_tokens for b in batches]
    smallest = [int(np.diff(b.cu_seqlens).min()) for b in batches]
    for j in range(len(batches)):
        for i in range(j):
            if loads[i] <= budget:
                assert loads[i] + smallest[j] > budget
    if lengths:
        fitting = [n for n in lengths if n <= budget]
        assert len(batches) >= len(lengths) - len(fitting) + -(-sum(fitting) // budget)


@settings(max_examples=300, deadline=None)
@given(lengths=lengths_st, budget=budget_st)
def test_pack_stream_properties(lengths: list[int], budget: int) -> None:
    windows = windows_from_lengths(lengths)
    batches = list(pack(iter(windows), budget))
    check_batches(batches, windows, budget)
    # the stream keeps arrival order, so concatenating all batches gives back every token in order
    flat = np.concatenate([b.tokens for b in batches]) if batches else np.zeros(0, np.int32)
    expect = np.concatenate([w.tokens for w in windows]) if windows else np.zeros(0, np.int32)
    assert np.array_equal(flat, expect)
    # greedy: a batch was closed only because the next window would not fit
    for a, b in zip(batches, batches[1:], strict=False):
        assert a.num_tokens + int(b.cu_seqlens[1]) > budget


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, budget=budget_st)
def test_efficiency(lengths: list[int], budget: int) -> None:
    batches = pack_block(windows_from_lengths(lengths), budget)
    eff = packing_efficiency(batches)
    if not batches:
        assert eff == 0.0
    else:
        assert eff == pytest.approx(sum(lengths) / (len(batches) * budget))


def test_oversize_window_gets_its_own_batch() -> None:
    windows = windows_from_lengths([3, 50, 4, 2])
    batches = pack_block(windows, 10)
    assert [b.ids for b in batches] == [["w1"], ["w0", "w2", "w3"]]
    assert [b.ids for b in pack(windows, 10)] == [["w0"], ["w1"], ["w2", "w3"]]


def test_ffd_fills_better_than_stream() -> None:
    windows = windows_from_lengths([6, 5, 5, 4, 4, 6])  # 30 tokens, budget 10 -> 3 full batches possible
    assert len(pack_block(windows, 10)) == 3
    assert packing_efficiency(pack_block(windows, 10)) == pytest.approx(1.0)
    assert len(list(pack(windows, 10))) > 3


def test_make_batch_roundtrips_through_a_row() -> None:
    b = make_batch(windows_from_lengths([3, 1, 4]), 16)
    assert b.cu_seqlens.tolist() == [0, 3, 4, 8] and b.positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert b.max_seqlen == 4
    r = PackedBatch.from_row(b.to_row())
    assert np.array_equal(r.tokens, b.tokens) and r.ids == b.ids and r.token_budget == 16


def test_bad_budget() -> None:
    with pytest.raises(RunnerError):
        pack_block(windows_from_lengths([1]), 0)
    with pytest.raises(RunnerError):
        list(pack(windows_from_lengths([1]), 0))
    assert pack_block([], 8) == [] and list(pack([], 8)) == []
