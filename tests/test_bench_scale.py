"""scripts/bench_driver.py (the driver at scale, with instant stand-in actors) and scripts/bench_dedup.py (the
repeated-sequence input of `bench.py dedup`). CPU only, no Ray."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "scripts")):  # as `python scripts/bench_driver.py` sees them
    if _path not in sys.path:
        sys.path.insert(0, _path)

import bench_driver  # noqa: E402
from bench_dedup import write_repeated_fasta  # noqa: E402
from conftest import read_fasta  # noqa: E402

from runner.stages.embed_stage import output_schema  # noqa: E402


def test_repeated_fasta_has_the_asked_share_of_repeats(tmp_path: Path) -> None:
    info = write_repeated_fasta(tmp_path / "r.fasta", 1000, 0.4, median=40, lo=10)
    seqs = [s.upper() for _, s in read_fasta(tmp_path / "r.fasta")]
    assert len(seqs) == 1000 and len(set(seqs)) == info["distinct"] == 600
    assert info["tokens"] == sum(map(len, seqs)) + 2 * 1000


def test_instant_stand_in_returns_the_embed_stage_schema(tmp_path: Path) -> None:
    """The stand-in runs EmbedStage's own row code: its output is what the driver gets from real actors."""
    import numpy as np

    from runner.input.batch import TokenizedRecord
    from runner.input.packing import make_batch

    stage = bench_driver.instant_stage(32, tmp_path)
    windows = [TokenizedRecord(f"s{i}", i, np.arange(5, dtype=np.int32), 3, False) for i in range(4)]
    row = make_batch(windows, 64).to_row()
    out = stage(pa.Table.from_pylist([row]))
    expected = output_schema(32)
    assert out.select(expected.names).schema.equals(expected)  # (EmbedStage.__call__ may add columns of its own)
    assert out.column("id").to_pylist() == ["s0", "s1", "s2", "s3"]


def test_measure_accounts_every_record_and_derives_cores(tmp_path: Path) -> None:
    """Plain and --dedup runs through the real read, pack, stand-in and driver code; rows + rejects = records."""
    fasta = tmp_path / "r.fasta"
    write_repeated_fasta(fasta, 600, 0.4, median=40, lo=10)
    plain = bench_driver.measure(fasta, tmp_path / "out", 16, 128, 2048, 100, dedup=False)
    dedup = bench_driver.measure(fasta, tmp_path / "out", 16, 128, 2048, 100, dedup=True)
    assert plain["rows"] == dedup["rows"] == 600
    assert dedup["dedup"]["repeats"] == 240 and dedup["dedup"]["copies_written"] == 240
    assert dedup["tokens_embedded"] == plain["tokens_embedded"] - dedup["dedup"]["tokens_saved"]
    # --part-writer actors: the stand-in actors stage the parts, the driver commits them; --dedup's copies are
    # read back from committed parts
    actors = bench_driver.measure(fasta, tmp_path / "out", 16, 128, 2048, 100, dedup=False, part_writer="actors")
    actors_dedup = bench_driver.measure(fasta, tmp_path / "out", 16, 128, 2048, 100, dedup=True, part_writer="actors")
    assert actors["rows"] == actors_dedup["rows"] == 600 and actors_dedup["dedup"]["copies_written"] == 240
    assert actors["parts_committed_from_actors"] == actors["parts"] > 0 and plain["parts_committed_from_actors"] == 0
    derived = bench_driver.derive(plain, 1280, 60)
    at8, at64 = derived["at"]["8_h200"], derived["at"]["64_h200"]
    assert at64["tokens_per_s"] == 8 * at8["tokens_per_s"] == 64 * 330_000
    assert at64["cores"]["driver"] > at8["cores"]["driver"] > 0


def test_read_stage_bench_counts_every_record_of_each_input_variant(tmp_path: Path) -> None:
    """--stages read: plain, gzipped, Illumina-named and repeated inputs hold the same records count; the named
    headers give the same sequences; the tokens embedded drop by the repeats; keeps-up figures are derived."""
    from bench_data import write_short_fasta

    fasta = tmp_path / "m60.fasta"
    info = write_short_fasta(fasta, 500, median=60, lo=10)
    variants = bench_driver.read_inputs(tmp_path, fasta, 60, 500, dedup=True)
    assert [v[0] for v in variants] == ["plain", "gz", "named", "dedup40"]
    named = read_fasta(tmp_path / "m60-named.fasta")
    assert [s for _, s in named] == [s for _, s in read_fasta(fasta)]
    assert named[0][0].startswith("A00123:8:H5KJHDSXX:") and len({i for i, _ in named}) == 500
    results = {name: bench_driver.measure_read(path, 128, dedup) for name, path, dedup in variants}
    assert {r["records"] for r in results.values()} == {500}
    assert results["plain"]["tokens_embedded"] == results["gz"]["tokens_embedded"] == info["tokens"]
    assert results["dedup40"]["tokens_embedded"] < 0.7 * info["tokens"]
    derived = bench_driver.derive(results["plain"], 1280, 60)
    assert derived["one_driver_keeps_up_with_h200s"] is None
    assert 0 < derived["one_read_task_with_handoff_keeps_up_with_h200s"] <= derived["one_read_task_keeps_up_with_h200s"]


def test_dedup_bench_compares_repeats_and_the_plain_run(tmp_path: Path) -> None:
    """bench.py dedup's checks on two hand-made outputs: repeats equal to their first record, ids, cosines."""
    import numpy as np
    from bench_dedup import busy_seconds, compare_vectors

    fasta = tmp_path / "r.fasta"
    fasta.write_text(">a\nMKV\n>b\nmkv\n>c\nWW\nW\n")  # b repeats a (case), c is its own sequence over two lines

    def out(name: str, vectors: dict[str, list[float]]) -> Path:
        (tmp_path / name / "embeddings").mkdir(parents=True)
        ids = list(vectors)
        flat = pa.array(np.array([vectors[i] for i in ids], np.float32).ravel())
        table = pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(flat, 2)})
        with pa.ipc.new_file(str(tmp_path / name / "embeddings" / "part-00000.arrow"), table.schema) as w:
            w.write_table(table)
        return tmp_path / name

    plain = out("plain", {"a": [1, 0], "b": [1, 0.1], "c": [0, 1]})
    dedup = out("dedup", {"a": [1, 0], "b": [1, 0], "c": [0, 1]})
    got = compare_vectors(plain, dedup, fasta)
    assert got["same_ids"] and got["repeats_equal_first_record"]
    assert got["max_abs_diff_vs_plain"] == np.float32(0.1)
    assert got["min_cosine_vs_plain"] == round(1 / np.sqrt(1.01), 6)  # b: (1, 0.1) against (1, 0)
    broken = out("broken", {"a": [1, 0], "b": [0, 1], "c": [0, 1]})
    assert not compare_vectors(plain, broken, fasta)["repeats_equal_first_record"]
    assert busy_seconds({"throughput": {"actors": {"x": {"busy_seconds": 1.5}, "y": {"busy_seconds": 2}}}}) == 3.5
