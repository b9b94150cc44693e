"""Part writing, rejects and chunk merging (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from runner.input.batch import Reject
from runner.output.sink import ChunkMerger, EmbeddedRows, PartWriter, RejectWriter, unwritable_reason


def rows(n: int, dim: int, start: int = 0) -> EmbeddedRows:
    rng = np.random.default_rng(start)
    return EmbeddedRows(
        ids=[f"s{i}" for i in range(start, start + n)],
        lengths=np.arange(start, start + n, dtype=np.int32),
        truncated=np.zeros(n, dtype=bool),
        vectors=rng.standard_normal((n, dim)).astype(np.float32),
        ordinals=np.arange(start, start + n, dtype=np.int64),
    )


def test_parts_roll_over_and_keep_every_row(tmp_path: Path) -> None:
    writer = PartWriter(tmp_path, embed_dim=4, rows_per_part=5)
    a, b = rows(7, 4), rows(6, 4, start=7)
    writer.write(a)
    assert writer.parts == ["part-00000.arrow"]  # the first 5 rows closed a part
    assert len(list((tmp_path / "embeddings").glob(".part-*.tmp"))) == 1  # the open part is hidden
    writer.write(b)
    writer.close()
    assert writer.parts == ["part-00000.arrow", "part-00001.arrow", "part-00002.arrow"]
    assert writer.rows_written == 13
    tables = [pa.ipc.open_file(tmp_path / "embeddings" / p).read_all() for p in writer.parts]
    assert [t.num_rows for t in tables] == [5, 5, 3]
    table = pa.concat_tables(tables)
    assert table.column("id").to_pylist() == a.ids + b.ids
    got = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 4)
    np.testing.assert_array_equal(got, np.concatenate([a.vectors, b.vectors]))
    assert not list((tmp_path / "embeddings").glob(".*"))


def test_discard_open_part_leaves_only_complete_parts(tmp_path: Path) -> None:
    writer = PartWriter(tmp_path, embed_dim=3, rows_per_part=4)
    writer.write(rows(6, 3))
    writer.discard_open_part()
    assert sorted(p.name for p in (tmp_path / "embeddings").iterdir()) == ["part-00000.arrow"]


def test_rejects_file(tmp_path: Path) -> None:
    writer = RejectWriter(tmp_path)
    writer.write([Reject("a", "x.fa", "empty sequence", 3), Reject("b", "x.fa", "invalid characters for protein: J", 7),
                  Reject("c", "y.fa", "duplicate id (first seen in x.fa)", 9)])
    writer.close()
    table = pa.ipc.open_file(tmp_path / "rejects.arrow").read_all()
    assert table.column_names == ["id", "source", "ordinal", "code", "reason"]
    assert table.column("id").to_pylist() == ["a", "b", "c"]
    assert table.column("ordinal").to_pylist() == [3, 7, 9]
    assert table.column("code").to_pylist() == ["empty_sequence", "invalid_characters", "duplicate_id"]
    assert writer.reasons == {"empty_sequence": 1, "invalid_characters": 1, "duplicate_id": 1}


def test_chunk_merger_weights_by_residues_in_any_order() -> None:
    merger = ChunkMerger()
    v = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([1.0, 1.0])]
    residues = [10, 30, 20]
    assert merger.add("p", 7, 2, 3, residues[2], 50, v[2]) is None
    assert merger.add("p", 7, 0, 3, residues[0], 50, v[0]) is None
    assert merger.add("p", 7, 0, 3, residues[0], 50, v[0]) is None  # a retried window counts once
    merged = merger.add("p", 7, 1, 3, residues[1], 50, v[1])
    expected = sum(r * x for r, x in zip(residues, v, strict=True)) / sum(residues)
    np.testing.assert_allclose(merged, expected, rtol=1e-6)
    assert merger.pending == 0


def test_out_and_token_folders_are_proved_writable_before_work(tmp_path: Path) -> None:
    """--out and an actor's token folder are created (parents too) and probed, leaving nothing behind; where they
    cannot be written, the driver's and the actor's one-line errors say why and what to do."""
    from runner.errors import RunnerError
    from runner.job import prepare_out_dir
    from runner.stages.embed_stage import open_token_shard

    out = tmp_path / "a" / "b"
    assert prepare_out_dir(out) == out and out.is_dir() and not list(out.iterdir())
    shard = out / "tokens" / "actor-0"
    assert open_token_shard(shard) == shard and shard.is_dir() and not list(shard.iterdir())

    blocker = tmp_path / "file"  # a file where a folder must go: mkdir fails with "Not a directory" or alike
    blocker.write_text("x")
    reason = unwritable_reason(blocker / "out", ".probe")
    assert reason and "\n" not in reason
    with pytest.raises(RunnerError) as driver:
        prepare_out_dir(blocker / "out")
    assert str(driver.value) == f"cannot write to --out {blocker / 'out'} ({reason}): choose a writable directory"
    with pytest.raises(RunnerError, match=r"cannot write per-token files to .*--per-token needs --out on a filesyst"):
        open_token_shard(blocker / "tokens")
