"""The read task (runner.input.stream.read_blocks) against a plain reference: the same records, ordinals,
duplicate-id rejects and resume flags on tricky inputs, whatever the chunk and block sizes."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fasta_reference import TRICKY_FASTA, reference_fasta

from runner.errors import RunnerError
from runner.input import sources
from runner.input.stream import DONE_ROWS_FACTOR, ReadSettings, read_blocks
from runner.output.resume import OrdinalSet


def _inputs(tmp_path: Path, tables: bool = True) -> tuple[list[Path], list[tuple[str, str, str]]]:
    """Every tricky FASTA (every second one gzipped), a Parquet and a CSV file with ids repeated across files;
    and the (id, sequence, source) a plain reader gives, in order."""
    paths: list[Path] = []
    expected: list[tuple[str, str, str]] = []
    for i, data in enumerate(TRICKY_FASTA):
        p = tmp_path / f"t{i}.fa"
        p.write_bytes(gzip.compress(data) if i % 2 else data)
        paths.append(p)
        expected += [(rid, seq, str(p)) for rid, seq in reference_fasta(data)]
    if not tables:
        return paths, expected
    rows = [("x", "MK"), ("p", "AC"), ("t0", "GG"), ("", "MK"), ("t0", "WW")]
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [r[0] for r in rows], "sequence": [r[1] for r in rows]}), table)
    csv = tmp_path / "t.csv"
    csv.write_text("id,sequence\n" + "".join(f"{i},{s}\n" for i, s in rows[::-1]))
    paths += [table, csv]
    expected += [(i, s, str(table)) for i, s in rows] + [(i, s, str(csv)) for i, s in rows[::-1]]
    return paths, expected


def _reference_rows(expected: list[tuple[str, str, str]], done: set[int]) -> list[dict]:
    """RECORD_SCHEMA rows as the read task must make them: first record of an id kept (empty ids not checked),
    finished records (resume) without their text."""
    first_seen: dict[str, str] = {}
    rows = []
    for ordinal, (rid, seq, source) in enumerate(expected):
        duplicate = None
        if rid:
            if rid in first_seen:
                duplicate = f"duplicate id (first seen in {first_seen[rid]})"
            else:
                first_seen[rid] = source
        finished = ordinal in done
        rows.append({"id": None if finished else rid, "sequence": None if finished else seq,
                     "source": None if finished else source, "ordinal": ordinal,
                     "duplicate": None if finished else duplicate, "done": finished, "copy_of": None,
                     "dedup_counts": None})
    return rows


@pytest.mark.parametrize("chunk", [3, 64, 4 << 20])
@pytest.mark.parametrize("per_block", [1, 4, 2048])
def test_read_blocks_match_a_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int,
                                       per_block: int) -> None:
    monkeypatch.setattr(sources, "CHUNK_BYTES", chunk)
    paths, expected = _inputs(tmp_path, tables=chunk >= 64)  # pyarrow's CSV blocks (CHUNK_BYTES) hold whole lines
    assert sum(1 for rid, _, _ in expected if rid == "x") >= 2  # ids repeated across files (and within, below)
    for done in (set(), {o for o in range(len(expected)) if o % 3 and o != 7}):
        bits = OrdinalSet()
        bits.add(np.array(sorted(done), dtype=np.int64))
        settings = ReadSettings(tuple(map(str, paths)), "id", "sequence", per_block,
                                bits.bits if done else np.zeros(0, dtype=np.uint8))
        blocks = list(read_blocks(settings))
        assert pa.concat_tables(blocks).to_pylist() == _reference_rows(expected, done)
        _check_cuts(blocks, per_block)


def _check_cuts(blocks: list[pa.Table], per_block: int) -> None:
    """Every block but the last closes exactly when it holds `per_block` records to embed, or the row cap."""
    for i, block in enumerate(blocks):
        to_embed = block.num_rows - sum(block.column("done").to_pylist())
        assert to_embed <= per_block and block.num_rows <= per_block * DONE_ROWS_FACTOR
        if i < len(blocks) - 1:
            assert to_embed == per_block or block.num_rows == per_block * DONE_ROWS_FACTOR
            last_done = block.column("done")[-1].as_py()
            assert not last_done or block.num_rows == per_block * DONE_ROWS_FACTOR  # cut right after a record to embed


def test_read_blocks_on_many_records_with_resume(tmp_path: Path) -> None:
    """Random short reads over several chunks and files, ids repeated, 80 % of records finished already."""
    rng = random.Random(3)
    paths, expected = [], []
    for f in range(3):
        recs = [(f"r{rng.randrange(30_000)}", "".join(rng.choices("ACDEFGHIKLMNPQRSTVWY", k=rng.randint(1, 150))))
                for _ in range(8000)]
        p = tmp_path / f"m{f}.fa"
        p.write_text("".join(f">{i} read {n}\n{s[:60]}\n{s[60:]}\n" for n, (i, s) in enumerate(recs)))
        paths.append(p)
        expected += [(i, s, str(p)) for i, s in recs]
    done = {o for o in range(len(expected)) if rng.random() < 0.8}
    bits = OrdinalSet()
    bits.add(np.array(sorted(done), dtype=np.int64))
    blocks = list(read_blocks(ReadSettings(tuple(map(str, paths)), "id", "sequence", 300, bits.bits)))
    assert pa.concat_tables(blocks).to_pylist() == _reference_rows(expected, done)
    _check_cuts(blocks, 300)


def test_read_blocks_stop_at_binary_garbage_naming_the_line(tmp_path: Path) -> None:
    """Records before the garbage come out (the job streams), then one line naming the file and line."""
    good, bad = tmp_path / "good.fa", tmp_path / "bad.fa"
    good.write_text(">g1\nMK\n>g2\nAC\n")
    bad.write_bytes(b">b1\nMK\nAC\n" + bytes(range(256)) * 4)
    blocks = read_blocks(ReadSettings((str(good), str(bad)), "id", "sequence", 1))
    assert [next(blocks).column("id").to_pylist() for _ in range(2)] == [["g1"], ["g2"]]
    with pytest.raises(RunnerError, match=r"bad\.fa line 4: binary data \(byte 0x00\)"):
        next(blocks)
