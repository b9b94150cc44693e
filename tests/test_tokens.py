"""Per-token files without Ray: the stitch rule, packing a chunked sequence's windows together, and keeping token
files exactly-once (reconcile on resume and at the end of a run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from runner.input.batch import TokenizedRecord
from runner.input.packing import pack_block
from runner.input.prepare import chunk_starts
from runner.output.checksums import (
    FileChecksum,
    append_records,
    check_file,
    file_crc,
    read_records,
)
from runner.output.resume import scan_parts
from runner.output.sink import EmbeddedRows, OutputSpec, PartWriter
from runner.output.tokens import (
    count_rows,
    reconcile,
    remove_temporaries,
    stitch_cuts,
    stitch_windows,
    token_schema,
    token_table,
    write_token_file,
)
from runner.output.verify import verify_dir
from runner.stages.embed_stage import residue_index


@pytest.mark.parametrize(("total", "width", "overlap"), [(25, 10, 3), (2500, 1022, 128), (50, 10, 9), (31, 10, 0), (7, 10, 2)])
def test_stitch_takes_each_residue_from_the_window_whose_centre_is_nearest(total: int, width: int, overlap: int) -> None:
    starts = chunk_starts(total, width, overlap)
    window = min(width, total)
    windows = [np.arange(s, s + window, dtype=np.float64)[:, None] * 1000 + i for i, s in enumerate(starts)]  # [w, 1]
    stitched = stitch_windows(windows, total, window, overlap)[:, 0]
    positions, source = np.divmod(stitched, 1000)
    assert positions.tolist() == list(range(total))  # every residue once, in order
    for p, i in zip(positions.astype(int), source.astype(int), strict=True):
        holding = [k for k, s in enumerate(starts) if s <= p < s + window]
        best = min(holding, key=lambda k: (abs(p - (starts[k] + (window - 1) / 2)), -k))
        assert i == best, (p, i, best)
    assert stitch_cuts(total, window, overlap)[0] == 0 and stitch_cuts(total, window, overlap)[-1] == total


def test_residue_index_skips_the_specials() -> None:
    cu = np.array([0, 4, 6, 11], dtype=np.int32)  # windows of 4, 2 (no residue) and 5 tokens
    assert residue_index(cu, 1, 1).tolist() == [1, 2, 7, 8, 9]


def window(ordinal: int, index: int, count: int, tokens: int) -> TokenizedRecord:
    return TokenizedRecord(f"s{ordinal}", ordinal, np.zeros(tokens, np.int32), tokens - 2, False, index, count, 0)


def test_pack_block_keeps_a_chunked_sequences_windows_together() -> None:
    records = [window(0, 0, 1, 30), *[window(1, i, 3, 40) for i in range(3)], window(2, 0, 1, 50),
               *[window(3, i, 2, 20) for i in range(2)]]
    apart = pack_block(records, 60)
    assert any(len({int(c) for c, o in zip(b.chunk_index, b.ordinals, strict=True) if o == 1}) < 3 for b in apart)
    together = pack_block(records, 60, keep_chunks_together=True)
    for ordinal, count in ((1, 3), (3, 2)):
        holding = [b for b in together if ordinal in b.ordinals.tolist()]
        assert len(holding) == 1 and holding[0].ordinals.tolist().count(ordinal) == count
    oversized = next(b for b in together if 1 in b.ordinals.tolist())
    assert oversized.num_tokens == 120 > 60 and oversized.chunk_index.tolist() == [0, 1, 2]  # its own batch
    assert sorted(o for b in together for o in b.ordinals.tolist()) == sorted(r.ordinal for r in records)


SPEC = OutputSpec((2,), ("mean",), 3, per_token="float32")


def token_file(out: Path, ids: list[str], ordinals: list[int]) -> str:
    shard = out / "tokens" / "host-cpu-1"
    shard.mkdir(parents=True, exist_ok=True)
    lengths = np.array([2] * len(ids), np.int32)
    arrays = [np.arange(6 * len(ids), dtype=np.float32).reshape(-1, 3) + 100 * ordinals[0]]
    written = write_token_file(shard, token_table(ids, np.array(ordinals), arrays, lengths,
                                                  token_schema((2,), 3, "float32")))
    append_records(out, [written.record("host-cpu-1")])  # as the driver journals it with the part committing it
    return f"host-cpu-1/{written.name}"


def write_part(out: Path, number: int, ids: list[str], ordinals: list[int], files: list[str], rows: list[int]) -> str:
    writer = PartWriter(out, 3, 100, first_part=number, per_token=True)
    n = len(ids)
    writer.write(EmbeddedRows(ids, np.full(n, 2, np.int32), np.zeros(n, bool), np.zeros((n, 3), np.float32),
                              np.array(ordinals, np.int64), tokens_file=files, tokens_row=np.array(rows, np.int32)))
    writer.close()
    return writer.parts[0]


def read_row(out: Path, name: str, row: int) -> tuple[str, np.ndarray]:
    table = pa.ipc.open_file(out / "tokens" / name).read_all()
    return table["id"][row].as_py(), table["layer2"][row].values.flatten().to_numpy()


def test_reconcile_deletes_unreferenced_and_rewrites_partly_referenced_files(tmp_path: Path) -> None:
    full = token_file(tmp_path, ["a", "b"], [0, 1])
    partial = token_file(tmp_path, ["c", "d", "e"], [2, 3, 4])  # a retried batch's copy, or a lost part's rows
    orphan = token_file(tmp_path, ["f"], [5])  # written by an actor whose batch never reached a part
    (tmp_path / "tokens" / "host-cpu-1" / ".tok-0123456789abcdef0123456789abcdef.arrow.tmp").write_bytes(b"half")
    e_before = read_row(tmp_path, partial, 2)[1]
    p0 = write_part(tmp_path, 0, ["a", "b", "c"], [0, 1, 2], [full, full, partial], [0, 1, 0])
    p1 = write_part(tmp_path, 1, ["e"], [4], [partial], [2])
    assert remove_temporaries(tmp_path) == 1
    report = reconcile(tmp_path, [p0, p1])
    assert (report.deleted, report.rewritten, report.files) == (1, 1, 2)
    names = {f"{p.parent.name}/{p.name}" for p in (tmp_path / "tokens").glob("*/tok-*.arrow")}
    assert full in names and orphan not in names and partial not in names
    pooled = pa.concat_tables([pa.ipc.open_file(tmp_path / "embeddings" / p).read_all() for p in (p0, p1)])
    for sid, name, row in zip(pooled["id"].to_pylist(), pooled["tokens_file"].to_pylist(), pooled["tokens_row"].to_pylist(),
                              strict=True):
        assert read_row(tmp_path, name, row)[0] == sid
    new = pooled["tokens_file"].to_pylist()[3]
    assert pa.ipc.open_file(tmp_path / "tokens" / new).read_all()["id"].to_pylist() == ["c", "e"]
    np.testing.assert_array_equal(read_row(tmp_path, new, 1)[1], e_before)  # the values moved unchanged
    assert reconcile(tmp_path, [p0, p1]).deleted == 0  # idempotent


def test_resume_redoes_a_part_pointing_at_a_missing_token_file(tmp_path: Path) -> None:
    kept = token_file(tmp_path, ["a"], [0])
    lost = token_file(tmp_path, ["b"], [1])
    write_part(tmp_path, 0, ["a"], [0], [kept], [0])
    write_part(tmp_path, 1, ["b"], [1], [lost], [0])
    (tmp_path / "tokens" / lost).unlink()
    state = scan_parts(tmp_path, schema=SPEC.schema(), per_token=True)
    assert state.parts == ["part-00000.arrow"] and state.redone_parts == ["part-00001.arrow"]
    assert state.done.contains(np.array([0, 1])).tolist() == [True, False]


def test_reconcile_keeps_a_row_that_dedup_copies_share(tmp_path: Path) -> None:
    """--dedup writes a repeated sequence's row as a copy of its first record's, token pointer included."""
    shared = token_file(tmp_path, ["a", "b"], [0, 1])
    part = write_part(tmp_path, 0, ["a", "b", "a-copy", "a-copy2"], [0, 1, 2, 3], [shared] * 4, [0, 1, 0, 0])
    report = reconcile(tmp_path, [part])
    assert (report.deleted, report.rewritten, report.files, report.broken_parts) == (0, 0, 1, [])
    half = token_file(tmp_path, ["c", "d"], [4, 5])
    part2 = write_part(tmp_path, 1, ["c", "c-copy"], [4, 6], [half, half], [0, 0])  # d's row is not pointed at
    assert reconcile(tmp_path, [part, part2]).rewritten == 1
    table = pa.ipc.open_file(tmp_path / "embeddings" / part2).read_all()
    assert len(set(table["tokens_file"].to_pylist())) == 1 and table["tokens_row"].to_pylist() == [0, 0]


def test_a_rewritten_part_keeps_a_valid_checksum(tmp_path: Path) -> None:
    partial = token_file(tmp_path, ["c", "d"], [0, 1])
    part = write_part(tmp_path, 0, ["c"], [0], [partial], [0])
    assert reconcile(tmp_path, [part]).rewritten == 1
    record = read_records(tmp_path)[f"embeddings/{part}"]
    assert check_file(tmp_path / "embeddings" / part, record) is None


def test_a_token_files_checksum_is_computed_as_it_is_written(tmp_path: Path) -> None:
    shard = tmp_path / "shard"
    shard.mkdir()
    table = token_table(["a", "b"], np.array([0, 1]), [np.arange(15, dtype=np.float32).reshape(5, 3)],
                        np.array([2, 3], np.int32), token_schema((2,), 3, "float32"))
    written = write_token_file(shard, table)
    crc, size = file_crc(shard / written.name)
    assert (written.rows, written.bytes, written.crc32) == (2, size, crc)
    assert written.record("shard").name == f"tokens/shard/{written.name}"
    assert pa.ipc.open_file(shard / written.name).read_all().equals(table)
    assert [p.name for p in shard.iterdir()] == [written.name]  # no temporary left



def test_the_benchmarks_unsummed_write_stores_the_same_file_without_a_crc(tmp_path: Path) -> None:
    # RUNNER_BENCH_NO_TOKEN_CRC (the checksum's A/B benchmark) must change only the CRC, not the bytes written.
    table = token_table(["a", "b"], np.array([0, 1]), [np.arange(15, dtype=np.float32).reshape(5, 3)],
                        np.array([2, 3], np.int32), token_schema((2,), 3, "float32"))
    summed, unsummed = tmp_path / "summed", tmp_path / "unsummed"
    summed.mkdir()
    unsummed.mkdir()
    with_crc = write_token_file(summed, table)
    without = write_token_file(unsummed, table, summed=False)
    assert without.crc32 == "00000000" != with_crc.crc32
    assert (unsummed / without.name).read_bytes() == (summed / with_crc.name).read_bytes()
    assert without.bytes == with_crc.bytes


def flip_vector_bytes(path: Path, values: np.ndarray) -> None:
    """Complement 8 bytes inside the stored `values` (float32) of file `path`: same size, structure and footer."""
    data = bytearray(path.read_bytes())
    start = data.find(values.astype(np.float32).tobytes()) + 4
    assert start >= 4
    data[start : start + 8] = bytes(255 - b for b in data[start : start + 8])
    path.write_bytes(bytes(data))


def test_resume_deletes_a_corrupt_token_file_with_every_part_pointing_at_it(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    good = token_file(tmp_path, ["a"], [0])
    bad = token_file(tmp_path, ["b", "c", "d"], [1, 2, 3])
    write_part(tmp_path, 0, ["a", "b"], [0, 1], [good, bad], [0, 0])
    write_part(tmp_path, 1, ["c"], [2], [bad], [1])
    write_part(tmp_path, 2, ["d"], [3], [bad], [2])
    assert scan_parts(tmp_path, schema=SPEC.schema(), per_token=True).redone_parts == []  # sound as written
    flip_vector_bytes(tmp_path / "tokens" / bad, np.arange(18) + 100)  # token_file's values for ordinal 1
    assert count_rows(tmp_path / "tokens" / bad) == 3  # the footer still reads: only the checksum can tell
    with caplog.at_level("WARNING", logger="runner"):
        state = scan_parts(tmp_path, schema=SPEC.schema(), per_token=True)
    assert state.parts == [] and state.redone_parts == ["part-00000.arrow", "part-00001.arrow", "part-00002.arrow"]
    assert state.bad_token_files == [bad] and not (tmp_path / "tokens" / bad).exists()
    assert state.done.count == 0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and bad in lines[0] and "checksum mismatch" in lines[0] and "part-00002.arrow" in lines[0]
    records = read_records(tmp_path)
    assert f"tokens/{bad}" not in records and f"tokens/{good}" in records
    assert not any(name.startswith("embeddings/") for name in records)  # the deleted parts' records went too


def test_resume_redoes_the_parts_of_a_truncated_token_file(tmp_path: Path) -> None:
    kept = token_file(tmp_path, ["a"], [0])
    cut = token_file(tmp_path, ["b"], [1])
    write_part(tmp_path, 0, ["a"], [0], [kept], [0])
    write_part(tmp_path, 1, ["b"], [1], [cut], [0])
    path = tmp_path / "tokens" / cut
    path.write_bytes(path.read_bytes()[:-40])
    state = scan_parts(tmp_path, schema=SPEC.schema(), per_token=True)
    assert state.parts == ["part-00000.arrow"] and state.bad_token_files == [cut]


def test_reconcile_journals_the_rewritten_token_file(tmp_path: Path) -> None:
    partial = token_file(tmp_path, ["c", "d"], [0, 1])
    part = write_part(tmp_path, 0, ["d"], [1], [partial], [1])
    assert reconcile(tmp_path, [part]).rewritten == 1
    new = pa.ipc.open_file(tmp_path / "embeddings" / part).read_all()["tokens_file"][0].as_py()
    records = read_records(tmp_path)
    assert f"tokens/{partial}" not in records
    assert check_file(tmp_path / "tokens" / new, records[f"tokens/{new}"]) is None
    assert records[f"tokens/{new}"]["rows"] == 1
    assert scan_parts(tmp_path, schema=SPEC.schema(), per_token=True).parts == [part]


def test_part_writer_journals_the_token_files_before_the_part(tmp_path: Path) -> None:
    writer = PartWriter(tmp_path, 3, 100, per_token=True)
    record = FileChecksum("tokens/s/tok-0123456789abcdef0123456789abcdef.arrow", 2, 100, "0badcafe")
    writer.note_token_files([record])
    writer.write(EmbeddedRows(["a"], np.full(1, 2, np.int32), np.zeros(1, bool), np.zeros((1, 3), np.float32),
                              np.array([0], np.int64), tokens_file=["s/x"], tokens_row=np.array([0], np.int32)))
    assert read_records(tmp_path) == {}  # nothing journaled while the part is open
    writer.close()
    lines = (tmp_path / "checksums.jsonl").read_text().splitlines()
    assert [json.loads(line)["file"] for line in lines] == [record.name, "embeddings/part-00000.arrow"]
    writer2 = PartWriter(tmp_path, 3, 100, first_part=1, per_token=True)
    writer2.write(EmbeddedRows(["b"], np.full(1, 2, np.int32), np.zeros(1, bool), np.zeros((1, 3), np.float32),
                               np.array([1], np.int64), tokens_file=["s/x"], tokens_row=np.array([1], np.int32)))
    writer2.close()
    assert len((tmp_path / "checksums.jsonl").read_text().splitlines()) == 3  # each record once


def write_manifest(out: Path, parts: list[str], rows: int, dedup: bool = False) -> None:
    """The fields runner verify reads from a complete job's manifest (the rest of a real one does not matter here)."""
    manifest = {"status": "complete", "parts": parts, "counts": {"rows": rows, "rejects": 0, "records_read": rows},
                **({"dedup": {"repeats": 1}} if dedup else {})}
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_verify_checks_token_rows_exactly_once(tmp_path: Path) -> None:
    shared = token_file(tmp_path, ["a", "b"], [0, 1])
    parts = [write_part(tmp_path, 0, ["a", "b", "a-copy"], [0, 1, 2], [shared] * 3, [0, 1, 0])]
    write_manifest(tmp_path, parts, 3, dedup=True)
    report = verify_dir(tmp_path)
    assert report.ok, report.problems
    assert (report.token_files, report.token_rows) == (1, 2)
    write_manifest(tmp_path, parts, 3, dedup=False)  # without --dedup, a row may only point at its own sequence's
    assert verify_dir(tmp_path).problems == [f"{tmp_path / 'embeddings' / parts[0]}: 1 row(s) point at another "
                                             "sequence's per-token row"]

    extra = token_file(tmp_path, ["c", "d"], [3, 4])  # c's row is pointed at, d's is not; e's file by no part
    parts.append(write_part(tmp_path, 1, ["c"], [3], [extra], [0]))
    orphan = token_file(tmp_path, ["e"], [5])
    write_manifest(tmp_path, parts, 4, dedup=True)
    problems = verify_dir(tmp_path).problems
    assert any(p.startswith(f"{tmp_path / 'tokens' / extra}: 1 per-token row(s) no stored row") for p in problems)
    assert any(p.startswith(f"{tmp_path / 'tokens' / orphan}: no part points at it") for p in problems)
    assert len(problems) == 2, problems


def test_verify_names_a_corrupt_token_file_and_the_parts_pointing_at_it(tmp_path: Path) -> None:
    good = token_file(tmp_path, ["a"], [0])
    bad = token_file(tmp_path, ["b"], [1])
    parts = [write_part(tmp_path, 0, ["a", "b"], [0, 1], [good, bad], [0, 0])]
    write_manifest(tmp_path, parts, 2)
    assert verify_dir(tmp_path).ok
    flip_vector_bytes(tmp_path / "tokens" / bad, np.arange(6) + 100)
    problems = verify_dir(tmp_path).problems
    assert problems[0].startswith(f"{tmp_path / 'tokens' / bad}: checksum mismatch")
    assert problems[1] == (f"{tmp_path / 'embeddings' / parts[0]}: points at per-token file {tmp_path / 'tokens' / bad}"
                           ", which is missing, unusable or shorter than the rows pointed at")
    assert len(problems) == 2


def test_a_large_token_files_record_matches_its_bytes(tmp_path: Path) -> None:
    # tens of MiB, as an actor's batch: pyarrow hands the sink many buffers, each summed as it goes out
    rng = np.random.default_rng(0)
    lengths = np.array([4000, 1, 12000], np.int32)
    arrays = [rng.standard_normal((int(lengths.sum()), 640), dtype=np.float32).astype(np.float16) for _ in range(2)]
    table = token_table(["a", "b", "c"], np.arange(3), arrays, lengths, token_schema((5, 6), 640, "float16"))
    written = write_token_file(tmp_path, table)
    assert written.bytes > 32 << 20
    assert (written.crc32, written.bytes) == file_crc(tmp_path / written.name)
    assert check_file(tmp_path / written.name, {"rows": 3, "bytes": written.bytes, "crc32": written.crc32}) is None
