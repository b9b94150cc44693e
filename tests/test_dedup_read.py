"""--dedup's read task, columnar: cleaning, checks, hashes and representatives over whole runs of Arrow columns.

Every result is compared with the per-record path it replaced (each codec's `clean` / `invalid_characters`,
`Preparer.check`, a dict of cleaned sequences -> first ordinal), on inputs made to catch the differences: case,
whitespace of every kind inside a sequence (Unicode too), stop codons, unknown letters, empty sequences, non-ASCII
text that upper-cases to ASCII, sequences over --max-residues under each --long policy, DNA/RNA, several files
(FASTA and Parquet), repeated ids and resume bitmaps.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.input.batch import InputRecord
from runner.input.dedup import TABULATED_SEQUENCE_BYTES, sequence_hashes
from runner.input.prepare import Preparer
from runner.input.sources import read_runs
from runner.input.stream import ReadSettings, read_blocks
from runner.models.base import SequenceCodec
from runner.models.dnabert import DnabertCodec
from runner.models.esm2 import Esm2Codec
from runner.models.esmc import EsmcCodec
from runner.output.resume import OrdinalSet

REPO = Path(__file__).resolve().parents[1]

# Pieces that sequences are glued from: residues, case, whitespace (ASCII and Unicode: U+00A0, U+2003, U+0085,
# \x1c), stops, letters no model has, digits, non-ASCII letters that str.upper() maps to ASCII ('ſ' -> 'S',
# 'ı' -> 'I', 'ß' -> 'SS') or not ('é'), the ESM C chain break, and DNA/RNA letters.
PIECES = ["M", "K", "V", "A", "W", "mkv", "acgt", "ACGT", "u", "U", "N", "n", "X", "x", "B", "Z", "O", "J", "1",
          "*", "**", " ", "\t", "\x0b", "\x1c", "\u00a0", "\u2003", "\u0085", "ſ", "ı", "ß", "é", "|", "-", "."]


def tricky_sequences(rng: random.Random, n: int, pool: int = 150) -> list[str]:
    """n sequences drawn from a pool (so many repeat, some only after cleaning), plus fixed edge cases."""
    base = ["", " ", "*", "**", "mkv*", "MKV", "M K\tV", "MKV **", "ſ", "\u00a0MKV\u00a0", "acgu", "ACGT", "AC GT*",
            "a" * 40, "A" * 41, "W" * 7]
    for _ in range(pool):
        k = rng.randint(1, 12)
        base.append("".join(rng.choice(PIECES) for _ in range(k)))
    for letters in ("MKVWLacdmkv* \t", "ACGTNacgtnu \t"):  # embeddable ones (mostly), protein and DNA
        base += ["".join(rng.choice(letters) for _ in range(rng.randint(1, 30))) for _ in range(pool)]
    base.append("L" * (TABULATED_SEQUENCE_BYTES + 5))  # hashed by BLAKE2b
    return [rng.choice(base) for _ in range(n)]


def dna_codec() -> DnabertCodec:
    spec = importlib.util.spec_from_file_location("tiny_dnabert", REPO / "scripts" / "tiny_dnabert.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tiny_dnabert"] = module
    spec.loader.exec_module(module)
    return DnabertCodec(module.train_tokenizer().to_str(), max_residues=40)


CODECS = {"esm2": Esm2Codec, "esmc": EsmcCodec, "dnabert": dna_codec}


@pytest.mark.parametrize("name", sorted(CODECS))
def test_clean_and_valid_columns_equal_the_codecs_own_methods(name: str) -> None:
    codec = CODECS[name]()
    raw = tricky_sequences(random.Random(1), 3000)
    column = pa.array(raw, pa.string())
    for arr, texts in ((column, raw), (column.slice(17, 2000), raw[17:2017])):  # an offset slice too
        cleaned = codec.clean_column(arr)
        assert cleaned.to_pylist() == [codec.clean(s) for s in texts]
        assert codec.valid_column(cleaned).tolist() == [not codec.invalid_characters(codec.clean(s)) for s in texts]
    # the cases the fast path leaves to `clean` itself really are there
    assert codec.clean("ſ") == "S" and codec.clean("\u00a0M\u2003K") == "MK"


class CustomClean(SequenceCodec):
    """A codec with its own rules (no vectorised twin): the column methods must call them."""

    kind = "protein"
    max_residues = 10
    special_start = special_end = 1
    default_pooling = "mean"

    def clean(self, raw: str) -> str:
        return raw.strip().lower()

    def invalid_characters(self, seq: str) -> str:
        return "".join(sorted(set(seq) - set("mkv")))

    def encode(self, seq: str) -> np.ndarray:
        return np.zeros(len(seq) + 2, dtype=np.int32)


def test_codecs_with_their_own_clean_keep_it() -> None:
    class Shouting(Esm2Codec):
        def clean(self, raw: str) -> str:
            return super().clean(raw) + "!"

    raw = pa.array([" mkv ", "MKV*", ""])
    assert CustomClean().clean_column(raw).to_pylist() == ["mkv", "mkv*", ""]
    assert CustomClean().valid_column(pa.array(["mkv", "mkv*", ""])).tolist() == [True, False, True]
    assert Shouting().clean_column(raw).to_pylist() == ["MKV!", "MKV!", "!"]


def test_check_column_equals_check() -> None:
    rng = random.Random(2)
    raw = tricky_sequences(rng, 2000)
    ids = [rng.choice(["", "a", "b", "id"]) + str(i % 5) if i % 7 else "" for i in range(len(raw))]
    for codec in (Esm2Codec(), dna_codec()):
        for long in ("truncate", "chunk", "skip"):
            preparer = Preparer(codec, max_residues=20, long=long, chunk_overlap=5)
            cleaned, lengths, ok = preparer.check_column(pa.array(ids), pa.array(raw))
            for i, (rid, seq) in enumerate(zip(ids, raw, strict=True)):
                expected = preparer.check(InputRecord(rid, seq, "f", i))
                assert ok[i] == isinstance(expected, str), (rid, seq, long)
                if ok[i]:
                    assert (cleaned[i].as_py(), lengths[i]) == (expected, len(expected))


def test_window_totals_equal_window_residues() -> None:
    for long in ("truncate", "chunk", "skip"):
        for overlap in (0, 3, 9):
            preparer = Preparer(Esm2Codec(), max_residues=10, long=long, chunk_overlap=overlap)
            lengths = np.arange(1, 120)
            windows, residues = preparer.window_totals(lengths)
            expected = [preparer.window_residues(int(n)) for n in lengths]
            assert windows.tolist() == [len(w) for w in expected]
            assert residues.tolist() == [sum(w) for w in expected]


def test_sequence_hashes_equal_for_equal_sequences_and_distinct_otherwise() -> None:
    rng = random.Random(3)
    letters = "ACDEFGHIKLMNPQRSTVWY"
    distinct = {"", "A", "AA", "é", "Aé", "A" * TABULATED_SEQUENCE_BYTES, "A" * (TABULATED_SEQUENCE_BYTES + 1)}
    while len(distinct) < 20000:
        n = rng.choice([1, 2, 3, 5, 60, 61, 300, TABULATED_SEQUENCE_BYTES - 1, 3000])
        distinct.add("".join(rng.choice(letters) for _ in range(n)))
    # near-identical pairs: one letter changed, letters swapped, one letter more
    for s in list(distinct)[:500]:
        if len(s) > 2:
            distinct |= {s[:-1] + ("A" if s[-1] != "A" else "C"), s[1] + s[0] + s[2:], s + s[-1]}
    seqs = sorted(distinct)
    h = sequence_hashes(seqs)
    assert h.shape == (len(seqs), 2) and h.dtype == np.uint64
    assert len(np.unique(h, axis=0)) == len(seqs)
    # the same strings give the same hashes from a list, a shuffled Arrow array and an offset slice of one
    order = rng.sample(range(len(seqs)), len(seqs))
    shuffled = pa.array([seqs[i] for i in order])
    assert (sequence_hashes(shuffled) == h[order]).all()
    assert (sequence_hashes(shuffled.slice(100, 50)) == h[order[100:150]]).all()


def reference_repeats(paths: list[Path], id_column: str, seq_column: str, preparer: Preparer,
                      ) -> tuple[dict[int, int], dict[int, list[int]]]:
    """The per-record path the read task had: each record checked and cleaned on its own (`Preparer.check`), a
    dict of cleaned sequence -> first ordinal; repeated ids (first kept) and rejected records not registered.
    Returns {ordinal: representative} of the repeats and {ordinal: its [distinct, repeats, residues, tokens]}."""
    first_seq: dict[str, int] = {}
    seen_ids: set[str] = set()
    copies: dict[int, int] = {}
    share: dict[int, list[int]] = {}
    specials = preparer.codec.special_start + preparer.codec.special_end
    for run in read_runs(paths, id_column, seq_column):
        for r in run.records():
            dup = r.id in seen_ids
            if r.id:
                seen_ids.add(r.id)
            if dup or not r.id:
                continue
            seq = preparer.check(r)
            if not isinstance(seq, str):
                continue
            rep = first_seq.setdefault(seq, r.ordinal)
            if rep == r.ordinal:
                share[r.ordinal] = [1, 0, 0, 0]
            else:
                copies[r.ordinal] = rep
                w = preparer.window_residues(len(seq))
                share[r.ordinal] = [0, 1, sum(w), sum(w) + specials * len(w)]
    return copies, share


def write_inputs(tmp_path: Path, raw: list[str]) -> list[Path]:
    """The records over three files: two FASTA (whitespace-free text can travel in FASTA lines) and a Parquet
    table (anything, line ends and Unicode spaces included); ids repeat now and then, some are empty."""
    rng = random.Random(4)
    ids = [f"r{i}" if rng.random() > 0.05 else rng.choice(["r1", "r7", "r30"]) for i in range(len(raw))]
    third = len(raw) // 3
    a, b, c = tmp_path / "a.fasta", tmp_path / "b.fa", tmp_path / "c.parquet"
    # FASTA lines hold no control bytes (a binary file is refused): those stay in the Parquet third
    fasta_safe = ["".join(ch for ch in s if ch >= " " or ch == "\t") for s in raw]
    for path, lo, hi in ((a, 0, third), (b, third, 2 * third)):
        path.write_text("".join(f">{ids[i]} description\n{fasta_safe[i]}\n" for i in range(lo, hi)), encoding="utf-8")
    pq.write_table(pa.table({"id": ids[2 * third :], "sequence": raw[2 * third :]}), c)
    return [a, b, c]


@pytest.mark.parametrize("codec_name,long", [("esm2", "truncate"), ("esm2", "chunk"), ("esm2", "skip"),
                                             ("dnabert", "chunk"), ("dnabert", "skip")])
def test_read_blocks_repeats_and_counts_equal_the_per_record_path(tmp_path: Path, codec_name: str, long: str) -> None:
    codec = CODECS[codec_name]()
    rng = random.Random(5)
    raw = tricky_sequences(rng, 3000)
    paths = write_inputs(tmp_path, raw)
    preparer = Preparer(codec, max_residues=12, long=long, chunk_overlap=4)
    copies, share = reference_repeats(paths, "id", "sequence", preparer)
    assert len(copies) > 300 and len(share) - len(copies) > 30  # many repeats, many distinct sequences

    def check(done: OrdinalSet | None) -> None:
        settings = ReadSettings(tuple(map(str, paths)), "id", "sequence", 97, done.bits if done else np.zeros(0, np.uint8),
                                dedup=preparer)
        blocks = list(read_blocks(settings))
        got: dict[int, int] = {}
        for block in blocks:
            ordinals = block.column("ordinal").to_pylist()
            for o, rep in zip(ordinals, block.column("copy_of").to_pylist(), strict=True):
                if rep is not None:
                    got[o] = rep
            expected = np.sum([share.get(o, [0, 0, 0, 0]) for o in ordinals], axis=0).tolist()
            assert block.column("dedup_counts")[0].as_py() == expected
            assert all(c is None for c in block.column("dedup_counts").to_pylist()[1:])
            # a repeat travels without its text, every other record (not done) with it
            seq = block.column("sequence").to_pylist()
            done_col = block.column("done").to_pylist()
            assert all((s is None) == (o in copies or d) for s, o, d in zip(seq, ordinals, done_col, strict=True))
        assert got == copies

    check(None)
    # resume: a bitmap of finished records, representatives among them; the table and the answers are the same
    done = OrdinalSet()
    done.add(np.array(sorted(rng.sample(range(len(raw)), 1200)), dtype=np.int64))
    check(done)
