"""Per-record preparation (clean, check, window, tokenize) and duplicate-id detection."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.errors import RunnerError
from runner.input.batch import InputRecord, Reject, TokenizedRecord
from runner.input.prepare import DuplicateFilter, Preparer, chunk_starts, id_hashes, prepare_block
from runner.models.base import SequenceCodec

ALPHABET = "ACDEFGHIKLMNPQRSTVWYXBUZO"


class FakeProteinCodec(SequenceCodec):
    """A tiny per-residue codec: token = 4 + alphabet index, BOS 0 and EOS 2 (one each)."""

    kind = "protein"
    max_residues = 10
    special_start = 1
    special_end = 1
    default_pooling = "mean"

    def clean(self, raw: str) -> str:
        s = "".join(raw.split()).upper()
        return s[:-1] if s.endswith("*") else s

    def invalid_characters(self, seq: str) -> str:
        return "".join(sorted(set(seq) - set(ALPHABET)))

    def encode(self, seq: str) -> np.ndarray:
        ids = [0] + [4 + ALPHABET.index(c) for c in seq] + [2]
        return np.array(ids, dtype=np.int32)


def decode(tokens: np.ndarray) -> str:
    return "".join(ALPHABET[t - 4] for t in tokens[1:-1])


def rec(id_: str, seq: str, ordinal: int = 0, source: str = "in.fa") -> InputRecord:
    return InputRecord(id=id_, sequence=seq, source=source, ordinal=ordinal)


CODEC = FakeProteinCodec()


def test_clean_and_encode_short_sequence() -> None:
    out = Preparer(CODEC).prepare(rec("a", " mk\ntl*\n", ordinal=5))
    assert isinstance(out, list) and len(out) == 1
    w = out[0]
    assert (w.id, w.ordinal, w.residues, w.truncated, w.chunk_index, w.chunk_count, w.total_residues) == (
        "a",
        5,
        4,
        False,
        0,
        1,
        4,
    )
    assert w.tokens.dtype == np.int32 and decode(w.tokens) == "MKTL"


def test_only_one_trailing_stop_is_dropped() -> None:
    out = Preparer(CODEC).prepare(rec("a", "MK**"))
    assert isinstance(out, Reject) and out.reason == "invalid characters for protein model: *"


@pytest.mark.parametrize("raw", ["", "  \n", "*"])
def test_empty_sequence(raw: str) -> None:
    out = Preparer(CODEC).prepare(rec("a", raw, ordinal=3, source="x.fa"))
    assert out == Reject(id="a", source="x.fa", reason="empty sequence", ordinal=3)


def test_invalid_characters_sorted_distinct() -> None:
    out = Preparer(CODEC).prepare(rec("a", "MKJ1J-1"))
    assert isinstance(out, Reject) and out.reason == "invalid characters for protein model: -1J"


def test_missing_id_rejected() -> None:
    out = Preparer(CODEC).prepare(rec("", "MK"))
    assert isinstance(out, Reject) and out.reason.startswith("missing id")


def test_exactly_max_residues_is_not_cut() -> None:
    seq = "ACDEFGHIKL"
    for long in ("truncate", "chunk", "skip"):
        out = Preparer(CODEC, long=long, chunk_overlap=3).prepare(rec("a", seq))
        assert isinstance(out, list) and len(out) == 1 and not out[0].truncated
        assert decode(out[0].tokens) == seq


def test_truncate_keeps_first_residues() -> None:
    seq = "ACDEFGHIKLMNPQRST"
    (w,) = Preparer(CODEC, max_residues=5, long="truncate").prepare(rec("a", seq))
    assert decode(w.tokens) == "ACDEF" and w.truncated and w.residues == 5 and w.total_residues == 17


def test_skip_rejects_long() -> None:
    out = Preparer(CODEC, long="skip").prepare(rec("a", "A" * 11))
    assert isinstance(out, Reject)
    assert out.reason == "longer than 10 residues (11); use --long truncate or chunk"


def test_chunk_windows_exact_example() -> None:
    seq = "ACDEFGHIKLM"  # 11 residues, windows of 4, overlap 1 -> stride 3: 0, 3, 6, then 7 (ends at 11)
    ws = Preparer(CODEC, max_residues=4, long="chunk", chunk_overlap=1).prepare(rec("a", seq, ordinal=9))
    assert isinstance(ws, list)
    assert [decode(w.tokens) for w in ws] == ["ACDE", "EFGH", "HIKL", "IKLM"]
    assert [w.chunk_index for w in ws] == [0, 1, 2, 3]
    assert {(w.chunk_count, w.total_residues, w.ordinal, w.truncated) for w in ws} == {(4, 11, 9, False)}


@settings(max_examples=300, deadline=None)
@given(
    length=st.integers(1, 200),
    window=st.integers(1, 40),
    overlap_frac=st.floats(0, 0.99),
)
def test_chunks_cover_every_residue_with_right_overlap(length: int, window: int, overlap_frac: float) -> None:
    overlap = min(int(window * overlap_frac), window - 1)
    starts = chunk_starts(length, window, overlap)
    ends = [min(s + window, length) for s in starts]
    assert starts[0] == 0 and ends[-1] == length
    assert all(e - s == min(window, length) for s, e in zip(starts, ends, strict=True))
    # neighbours overlap by exactly `overlap`, except the last which may overlap more to end at the end
    for i in range(1, len(starts)):
        shared = ends[i - 1] - starts[i]
        assert shared >= overlap if i == len(starts) - 1 else shared == overlap
        assert starts[i] > starts[i - 1]  # progress, and no window repeats
    covered = np.zeros(length, dtype=bool)
    for s, e in zip(starts, ends, strict=True):
        covered[s:e] = True
    assert covered.all()


@settings(max_examples=100, deadline=None)
@given(
    seq=st.text(alphabet=ALPHABET, min_size=1, max_size=80), window=st.integers(2, 12), ov=st.integers(0, 11)
)
def test_chunk_tokens_match_residues(seq: str, window: int, ov: int) -> None:
    ov = min(ov, window - 1)
    ws = Preparer(CODEC, max_residues=window, long="chunk", chunk_overlap=ov).prepare(rec("s", seq))
    assert isinstance(ws, list)
    starts = chunk_starts(len(seq), window, ov)
    assert [decode(w.tokens) for w in ws] == [seq[s : s + window] for s in starts]
    assert all(w.residues == len(decode(w.tokens)) for w in ws)


def test_bad_settings() -> None:
    with pytest.raises(RunnerError, match="--long"):
        Preparer(CODEC, long="drop")
    with pytest.raises(RunnerError, match="--chunk-overlap"):
        Preparer(CODEC, max_residues=4, long="chunk", chunk_overlap=4)
    with pytest.raises(RunnerError, match="--max-residues"):
        Preparer(CODEC, max_residues=0)
    Preparer(CODEC, max_residues=4, long="truncate", chunk_overlap=128)  # overlap only matters for chunk


def test_preparer_pickles() -> None:
    p = pickle.loads(pickle.dumps(Preparer(CODEC, long="chunk", chunk_overlap=2)))
    assert p.max_residues == 10 and p.long == "chunk"


def test_duplicates_first_kept_within_and_across_blocks() -> None:
    d = DuplicateFilter(capacity=4)
    assert d.check(["a", "b", "a", "c", "b"], ["f1", "f1", "f2", "f2", "f2"]) == [
        None,
        None,
        "duplicate id (first seen in f1)",
        None,
        "duplicate id (first seen in f1)",
    ]
    assert d.check(["c", "d", "d"], "f3") == [
        "duplicate id (first seen in f2)",
        None,
        "duplicate id (first seen in f3)",
    ]
    assert d.seen_before(["a", "e"]).tolist() == [True, False]
    assert d.seen_before(["x", "x"]).tolist() == [False, True]  # no source: plain reason
    assert d.check(["x"], "f9") == ["duplicate id"]  # first seen with no source recorded
    assert len(d) == 6


def test_duplicate_filter_matches_a_set_through_growth() -> None:
    rng = np.random.default_rng(1)
    ids = [f"id{v}" for v in rng.integers(0, 30_000, 60_000)]
    d = DuplicateFilter(capacity=16)
    got = np.concatenate([d.seen_before(ids[i : i + 999]) for i in range(0, len(ids), 999)])
    seen: set[str] = set()
    expected = []
    for i in ids:
        expected.append(i in seen)
        seen.add(i)
    assert (got == np.array(expected)).all()
    assert len(d) == len(seen)
    assert len(seen) <= d.capacity * DuplicateFilter.MAX_LOAD
    d2 = pickle.loads(pickle.dumps(d))
    assert d2.seen_before(list(seen)[:100]).all()


def test_id_hashes_stable_and_nonzero() -> None:
    h = id_hashes(["a", "b", "a", ""])
    assert h.dtype == np.uint64 and h[0] == h[2] and h[0] != h[1] and (h != 0).all()
    assert id_hashes(["a"])[0] == h[0]  # same across calls (and processes: no Python hash seed)


def test_id_hashes_of_arrow_slices_and_long_ids_and_near_identical_ids() -> None:
    """Lists and (sliced) Arrow arrays hash alike; ids past the tabulated 128 bytes (BLAKE2b) too; ids that differ
    in one byte, by two swapped bytes or only in length never share a hash (200k of them, all distinct)."""
    ids = ["a", "", "é" * 70, "x" * 129, "x" * 128, "x" * 300, "y" + "x" * 299, "ab", "ba", "a\t"]
    h = id_hashes(ids)
    assert len(set(h.tolist())) == len(ids) and (h != 0).all()
    sliced = pa.array(["pad"] + ids + ["pad"]).slice(1, len(ids))
    assert id_hashes(sliced).tolist() == h.tolist()
    assert id_hashes(["x" * 300]).tolist() == [h[5]]
    near = [f"read{i:06d}" for i in range(100_000)]
    near += [s[:4] + s[5] + s[4] + s[6:] for s in near]  # two bytes swapped: equal under a plain XOR of bytes
    near += ["A" * n for n in range(1, 200)]  # only the length differs
    assert len(set(near)) == len(set(id_hashes(near).tolist()))


def test_duplicate_filter_reasons_name_the_first_file() -> None:
    d = DuplicateFilter()
    first = d.register(pa.array(["a", "b", "a"]), "f1.fa")
    assert first.tolist() == [-1, -1, 0]
    again = d.register(["b", "c", "c"], ["f2.fa", "f2.fa", "f2.fa"])
    assert d.reasons(again).to_pylist() == ["duplicate id (first seen in f1.fa)", None,
                                            "duplicate id (first seen in f2.fa)"]
    assert d.reasons(np.array([-1, -1], dtype=np.int32)).to_pylist() == [None, None]


def test_prepare_block_orders_and_dedups() -> None:
    pre = Preparer(CODEC, max_residues=4, long="chunk", chunk_overlap=1)
    d = DuplicateFilter()
    block1 = [rec("a", "MK", 0), rec("b", "MKJ", 1), rec("a", "AC", 2), rec("c", "ACDEFG", 3)]
    windows, rejects = prepare_block(block1, pre, d)
    assert [(w.id, w.chunk_index) for w in windows] == [("a", 0), ("c", 0), ("c", 1)]
    assert all(isinstance(w, TokenizedRecord) for w in windows)
    assert [(r.id, r.ordinal, r.reason) for r in rejects] == [
        ("b", 1, "invalid characters for protein model: J"),
        ("a", 2, "duplicate id (first seen in in.fa)"),
    ]
    # across blocks: b was seen (even though rejected), so a valid b later is still a duplicate
    windows, rejects = prepare_block([rec("b", "MK", 4), rec("", "MK", 5), rec("d", "M", 6)], pre, d)
    assert [w.id for w in windows] == ["d"]
    assert [(r.ordinal, r.reason.split(" (")[0]) for r in rejects] == [(4, "duplicate id"), (5, "missing id")]
    # without a filter nothing is a duplicate
    windows, rejects = prepare_block(block1, pre)
    assert [w.id for w in windows] == ["a", "a", "c", "c"] and len(rejects) == 1
