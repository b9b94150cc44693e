"""--dedup: each distinct cleaned sequence embedded once, every id its row (the same vector), exactly once.

Unit tests drive the read task's table, the pack stage and the driver's CopyWriter without Ray; the end-to-end
tests run `runner embed --dedup` on CPU with a tiny ESM-2 and compare with a run without --dedup.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from conftest import pythonpath_with

from runner.cli import cli
from runner.input.batch import InputRecord, Reject
from runner.input.dedup import CopyWriter, SequenceTable, sequence_hashes
from runner.input.prepare import Preparer
from runner.input.stream import PackSettings, ReadSettings, pack_records, read_blocks
from runner.models.esm2 import Esm2Codec
from runner.output.resume import OrdinalSet
from runner.output.sink import EmbeddedRows, PartWriter

REPO = Path(__file__).resolve().parents[1]
AMINO = list("ACDEFGHIKLMNPQRSTVWY")


# --- the read task's table ------------------------------------------------------------------------------


def test_sequence_table_first_record_wins_across_blocks_and_growth() -> None:
    """Representatives equal a dict's first-seen answer, through in-block repeats and many doublings."""
    rng = np.random.default_rng(3)
    pool = ["".join(rng.choice(AMINO, size=int(rng.integers(5, 30)))) for _ in range(3000)]
    table = SequenceTable(capacity=16)
    first: dict[str, int] = {}
    ordinal = 0
    for _ in range(10):
        block = [pool[int(i)] for i in rng.integers(0, len(pool), size=700)]
        ordinals = np.arange(ordinal, ordinal + len(block))
        reps = table.assign(sequence_hashes(block), ordinals)
        for seq, o, r in zip(block, ordinals.tolist(), reps.tolist(), strict=True):
            assert r == first.setdefault(seq, o), seq
        ordinal += len(block)
    assert len(table) == len(first)
    # at most 70 % full, and doubled no further than the last block needed (its keys counted as new)
    assert len(first) <= table.capacity * table.MAX_LOAD < 2 * (len(first) + 700)
    assert table.nbytes == 24 * table.capacity


def test_sequence_table_keys_differing_in_one_half_are_distinct() -> None:
    """Both 64-bit halves of a key are compared: keys sharing the slot-index half stay distinct."""
    table = SequenceTable(capacity=16)
    hashes = np.array([[1, 5], [2, 5], [1, 5], [2, 21]], dtype=np.uint64)  # 5 and 21 share a slot in 16
    assert table.assign(hashes, np.array([10, 11, 12, 13])).tolist() == [10, 11, 10, 13]
    assert table.assign(hashes[[1, 3]], np.array([20, 21])).tolist() == [11, 13]


def records_fasta(path: Path, entries: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f">{i}\n{s}\n" for i, s in entries))
    return path


def test_read_task_marks_repeats_of_cleaned_sequences_across_files(tmp_path: Path) -> None:
    """Cleaning decides (case, trailing '*'); rejects are not registered; done records still are (resume)."""
    a = records_fasta(tmp_path / "a.fasta", [("a0", "MKV"), ("a1", "mkv*"), ("a2", "MKX1"), ("a3", "MKX1"),
                                             ("a0", "MKV"), ("a5", "WWW")])
    b = records_fasta(tmp_path / "b.fasta", [("b0", "www"), ("b1", "MKV"), ("b2", "")])
    preparer = Preparer(Esm2Codec())
    settings = ReadSettings((str(a), str(b)), "id", "sequence", 4, dedup=preparer)
    table = pa.concat_tables(read_blocks(settings))
    assert table.column("copy_of").to_pylist() == [None, 0, None, None, None, None, 5, 0, None]
    assert table.column("sequence").to_pylist()[1] is None  # a repeat travels without its text
    counts = np.sum([c for c in table.column("dedup_counts").to_pylist() if c], axis=0).tolist()
    # 2 distinct (MKV, WWW); 3 repeats of 3 residues each, 5 tokens each with <cls> and <eos>
    assert counts == [2, 3, 9, 15]

    # Resume: record 0 done. It is still registered, so its repeats still point at it.
    done = OrdinalSet()
    done.add(np.array([0]))
    resumed = pa.concat_tables(read_blocks(ReadSettings((str(a), str(b)), "id", "sequence", 4, done.bits,
                                                        dedup=preparer)))
    assert resumed.column("copy_of").to_pylist() == table.column("copy_of").to_pylist()

    packed = pack_records(table, PackSettings(Esm2Codec(), None, "truncate", 128, 1024))
    last = packed.slice(packed.num_rows - 1).to_pylist()[0]
    assert (last["copy_ids"], last["copy_ordinals"], last["copy_of"]) == (["a1", "b0", "b1"], [1, 6, 7], [0, 5, 0])
    assert last["copy_sources"] == [str(a), str(b), str(b)]
    embedded = [i for row in packed.column("ids").to_pylist() for i in row]
    assert sorted(embedded) == ["a0", "a5"]  # repeats are never tokenized or packed
    rejected = dict(zip(last["reject_ids"], last["reject_reasons"], strict=True))
    assert set(rejected) == {"a2", "a3", "a0", "b2"}  # each invalid record rejected on its own, as without dedup


def test_chunk_window_residues_match_prepare() -> None:
    codec = Esm2Codec()
    for long in ("truncate", "chunk"):
        preparer = Preparer(codec, max_residues=10, long=long, chunk_overlap=3)
        for n in (1, 10, 11, 17, 40):
            windows = preparer.prepare(InputRecord("x", "A" * n, "f", 0))
            assert preparer.window_residues(n) == [w.residues for w in windows]


# --- the driver's CopyWriter ----------------------------------------------------------------------------


def rows(ordinals: list[int], dim: int = 4) -> EmbeddedRows:
    o = np.array(ordinals, dtype=np.int64)
    return EmbeddedRows([f"s{i}" for i in ordinals], (o % 7 + 1).astype(np.int32), o % 2 == 0,
                        np.stack([np.full(dim, i, dtype=np.float32) for i in ordinals]), o)


def read_parts(out: Path) -> pa.Table:
    parts = sorted((out / "embeddings").glob("part-*.arrow"))
    return pa.concat_tables([pa.ipc.open_file(p).read_all() for p in parts])


def test_copy_writer_copies_rows_in_any_order_once_the_original_is_in_a_complete_part(tmp_path: Path) -> None:
    """Repeats arriving before and after their original, retried twice, originals in earlier and open parts."""
    writer = PartWriter(tmp_path, 4, rows_per_part=3)
    written = OrdinalSet()
    copies = CopyWriter(writer, written, [], threads=0, max_wait=0)  # in this thread, every flush writes

    def write(ordinals: list[int]) -> None:
        written.add(np.array(ordinals))
        writer.write(rows(ordinals))

    def request(pairs: list[tuple[int, int]]) -> None:
        assert not copies.request([f"s{c}" for c, _ in pairs], np.array([c for c, _ in pairs]),
                                  ["f"] * len(pairs), np.array([r for _, r in pairs]))

    request([(10, 0)])  # before its original arrives
    assert copies.flush() == 0 and copies.waiting == 1
    write([0, 1])  # the original is in the open part: not yet
    assert copies.flush() == 0
    write([2])  # part-00000 complete: the copy is written
    assert copies.flush() == 1 and copies.waiting == 0
    request([(11, 1), (11, 1), (12, 2)])  # a retried block delivers a repeat twice
    request([(13, 4)])
    write([4, 5, 6])
    copies.finish()  # closes the open part, writes the rest
    assert copies.duplicates_dropped == 1
    table = read_parts(tmp_path)
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert sorted(by_id) == sorted(f"s{i}" for i in (0, 1, 2, 4, 5, 6, 10, 11, 12, 13))
    for copy, original in ((10, 0), (11, 1), (12, 2), (13, 4)):
        row, orig = by_id[f"s{copy}"], by_id[f"s{original}"]
        assert row["ordinal"] == copy
        assert row["embedding"] == orig["embedding"] and row["length"] == orig["length"]
        assert row["truncated"] == orig["truncated"]
    assert table.column("ordinal").to_pylist().count(11) == 1
    assert copies.counts.copies_written == 4


def test_copy_writer_after_restart_reads_originals_from_earlier_parts(tmp_path: Path) -> None:
    """Resume: the original is in a complete part of the earlier run; a copy already written is not redone."""
    writer = PartWriter(tmp_path, 4, rows_per_part=2)
    writer.write(rows([0, 1, 2, 3, 7]))
    writer.close()
    done = OrdinalSet()
    done.add(np.array([0, 1, 2, 3, 7]))
    rerun = PartWriter(tmp_path, 4, rows_per_part=2, first_part=writer.next_part)
    copies = CopyWriter(rerun, done, writer.parts, threads=0, max_wait=0)
    copies.request(["s8", "s9", "s7"], np.array([8, 9, 7]), ["f"] * 3, np.array([3, 0, 1]))
    assert copies.flush() == 2  # s7 was written by the earlier run (as a copy of s1): not again
    copies.finish()
    table = read_parts(tmp_path)
    assert sorted(table.column("id").to_pylist()) == ["s0", "s1", "s2", "s3", "s7", "s8", "s9"]
    got = {r["id"]: r["embedding"][0] for r in table.to_pylist()}
    assert (got["s8"], got["s9"]) == (3.0, 0.0)


def part_rows_of(rows_table: pa.Table) -> dict[int, dict]:
    return {r["ordinal"]: r for r in rows_table.to_pylist()}


@pytest.mark.parametrize("threads", [0, 3])
def test_copy_writer_bulk_copies_across_parts_equal_their_originals(tmp_path: Path, threads: int) -> None:
    """Hundreds of repeats of originals spread over the driver's own parts (several record batches each) and parts
    the actors staged, requested in random order, some before their original's part is committed (one only after
    a staged part waited in the group commit), some twice: every copy is its original's row bit for bit (two vector
    columns, per-token pointer, windows, length, truncated) with its own id and ordinal, each ordinal once, every
    part journaled with its checksum; several copy parts (part_rows) written by `threads` threads."""
    from runner.output.checksums import check_file, read_records
    from runner.output.sink import embedding_schema
    from runner.output.staged import StagedPart, staged_dir, write_staged_part

    rng = np.random.default_rng(5)
    columns = ("layer1_mean", "layer1_max")
    writer = PartWriter(tmp_path, 8, rows_per_part=50, columns=columns, per_token=True, commit_seconds=3600)
    written = OrdinalSet()
    copies = CopyWriter(writer, written, [], threads=threads, part_rows=64, max_wait=0)
    originals = np.arange(400)
    repeat_ordinals = np.arange(400, 1000)
    rep_of = rng.choice(originals, size=len(repeat_ordinals))

    def original_rows(ordinals: np.ndarray) -> EmbeddedRows:
        n = len(ordinals)
        return EmbeddedRows([f"s{o}" for o in ordinals], rng.integers(1, 99, n).astype(np.int32), rng.random(n) < 0.3,
                            rng.standard_normal((n, 16)).astype(np.float32), ordinals.astype(np.int64),
                            windows=rng.integers(1, 4, n).astype(np.int32),
                            tokens_file=[f"a/tok-{o % 7}.arrow" for o in ordinals],
                            tokens_row=(ordinals % 13).astype(np.int32))

    def request(index: np.ndarray) -> None:
        assert not copies.request([f"s{o}" for o in repeat_ordinals[index]], repeat_ordinals[index],
                                  ["in.fasta"] * len(index), rep_of[index])

    order = rng.permutation(len(repeat_ordinals))
    request(order[:150])  # before any original is written
    copies.flush()
    shard = staged_dir(tmp_path) / "actor-1"
    shard.mkdir(parents=True)
    schema = embedding_schema(8, columns, per_token=True)
    from runner.output.sink import part_record_batch

    for start in range(0, 400, 40):
        block = originals[start : start + 40]
        written.add(block)
        if start % 80:  # the driver writes this block: a part of several record batches
            for piece in np.array_split(block, 3):
                writer.write(original_rows(piece))
        else:  # an actor staged it; the group commit waits (commit_seconds) until close or a full group
            batch = part_record_batch(original_rows(block), 0, len(block), schema, 2, 8, True)
            path, size, crc = write_staged_part(shard, pa.Table.from_batches([batch]))
            writer.commit([StagedPart(path, len(block), size, crc, block.astype(np.int64), 0)])
        request(order[150 + start : 150 + start + 40])
        copies.flush()
        if start == 0:  # the first originals are in a staged part queued for its group commit: no copy yet
            assert copies.waiting == 190 and not writer.parts
    request(order[550:])
    request(order[550:560])  # a retried block: delivered twice
    copies.finish()
    assert copies.duplicates_dropped == 10
    assert copies.counts.copies_written == len(repeat_ordinals)

    table = read_parts(tmp_path)
    ordinals = table.column("ordinal").to_pylist()
    assert sorted(ordinals) == list(range(1000))  # every ordinal exactly once
    by_ordinal = part_rows_of(table)
    for copy, original in zip(repeat_ordinals.tolist(), rep_of.tolist(), strict=True):
        row, orig = dict(by_ordinal[copy]), dict(by_ordinal[original])
        assert (row.pop("id"), row.pop("ordinal")) == (f"s{copy}", copy)
        orig.pop("id"), orig.pop("ordinal")
        assert row == orig  # vectors bit for bit (Python floats of the float32s), per-token pointer and the rest
    parts = sorted((tmp_path / "embeddings").glob("part-*.arrow"))
    records = read_records(tmp_path)
    copy_parts = [p for p in parts if pa.ipc.open_file(p).read_all().column("ordinal").to_numpy().min() >= 400]
    assert len(copy_parts) >= len(repeat_ordinals) // 64
    for p in parts:
        assert check_file(p, records.get(f"embeddings/{p.name}")) is None, p.name
    assert not list(staged_dir(tmp_path).rglob("*.arrow")), "every staged part was committed"


def test_copy_writer_close_commits_copy_parts_in_flight_and_a_rerun_finishes(tmp_path: Path) -> None:
    """A stop with copy parts being written: close() hands them to the writer's final commit; the copies not yet
    written are left to the next run, which writes each remaining one once."""
    writer = PartWriter(tmp_path, 4, rows_per_part=10)
    written = OrdinalSet()
    copies = CopyWriter(writer, written, [], threads=2, part_rows=5, max_wait=3600)
    written.add(np.arange(20))
    writer.write(rows(list(range(20))))
    copies.request([f"s{o}" for o in range(20, 30)], np.arange(20, 30), ["f"] * 10, np.arange(10))
    copies.flush()  # 10 ready: two copy parts handed to the threads
    copies.request(["s30", "s31"], np.array([30, 31]), ["f"] * 2, np.array([10, 11]))
    copies.flush()  # 2 ready: they wait for a part's worth (or max_wait)
    copies.close(commit=True)
    writer.close()
    done = sorted(read_parts(tmp_path).column("ordinal").to_pylist())
    assert done == list(range(20)) + list(range(20, 30))

    resumed = OrdinalSet()
    resumed.add(np.array(done))
    rerun = PartWriter(tmp_path, 4, rows_per_part=10, first_part=writer.next_part)
    again = CopyWriter(rerun, resumed, writer.parts, threads=2)
    again.request([f"s{o}" for o in range(20, 32)], np.arange(20, 32), ["f"] * 12, np.arange(12))  # all requested again
    again.finish()
    rerun.close()
    table = read_parts(tmp_path)
    assert sorted(table.column("ordinal").to_pylist()) == list(range(32))
    got = part_rows_of(table)
    assert [got[o]["embedding"][0] for o in range(20, 32)] == [float(o - 20) for o in range(20, 32)]
    assert again.counts.copies_written == 2 and again.duplicates_dropped == 10


def test_copy_writer_rejects_repeats_of_a_sequence_that_failed(tmp_path: Path) -> None:
    writer = PartWriter(tmp_path, 4, rows_per_part=4)
    copies = CopyWriter(writer, OrdinalSet(), [], threads=0)
    copies.request(["s5"], np.array([5]), ["f"], np.array([2]))
    failed = copies.rejected([Reject("s2", "f", "embedding failed: RuntimeError: boom", 2)])
    assert [(r.id, r.ordinal) for r in failed] == [("s5", 5)]
    assert "the same sequence as s2" in failed[0].reason
    later = copies.request(["s6"], np.array([6]), ["g"], np.array([2]))
    assert [(r.id, r.source) for r in later] == [("s6", "g")]
    assert copies.finish() == 0


def test_copy_writer_finish_refuses_repeats_whose_original_never_came(tmp_path: Path) -> None:
    from runner.errors import RunnerError

    copies = CopyWriter(PartWriter(tmp_path, 4, rows_per_part=4), OrdinalSet(), [], threads=0)
    copies.request(["s5"], np.array([5]), ["f"], np.array([2]))
    with pytest.raises(RunnerError, match="internal error: 1 repeated"):
        copies.finish()


# --- end to end -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_esm2_path: Path) -> dict:
    """Two FASTA files drawing 400 records from 120 distinct sequences (some lower-case, some long enough to
    be chunked), small blocks and parts so that repeats span files, blocks and parts."""
    base = tmp_path_factory.mktemp("dedup")
    rng = np.random.default_rng(11)
    distinct = ["".join(rng.choice(AMINO, size=int(rng.integers(20, 60)))) for _ in range(110)]
    distinct += ["".join(rng.choice(AMINO, size=int(rng.integers(90, 140)))) for _ in range(10)]  # chunked
    files, sequence_of = [], {}
    for f in range(2):
        entries = []
        for i in range(200):
            sid = f"f{f}_{i}"
            seq = distinct[int(rng.integers(0, len(distinct)))]
            sequence_of[sid] = seq
            entries.append((sid, seq.lower() if i % 5 == 0 else seq))
        files.append(records_fasta(base / f"in{f}.fasta", entries))
    config = base / "job.yaml"
    config.write_text(f"model: {tiny_esm2_path}\ngpus: 0\nrecords_per_block: 40\nrows_per_part: 40\n"
                      "max_residues: 64\nlong: chunk\nchunk_overlap: 8\nshadow_rate: 0\nprogress: false\n")
    return {"files": files, "config": config, "base": base, "sequence_of": sequence_of}


def embed_args(job: dict, out: Path, *extra: str) -> list[str]:
    return ["embed", *map(str, job["files"]), "--config", str(job["config"]), "--out", str(out), *extra]


def vectors_by_id(out: Path) -> dict[str, np.ndarray]:
    table = read_parts(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id was written twice"
    dim = table.schema.field("embedding").type.list_size
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return dict(zip(ids, vectors, strict=True))


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def plain(ray_address: str, job: dict) -> dict[str, np.ndarray]:
    """The same job without --dedup."""
    out = job["base"] / "plain"
    result = CliRunner().invoke(cli, embed_args(job, out), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return vectors_by_id(out)


def check_dedup_output(out: Path, job: dict, plain: dict[str, np.ndarray]) -> dict:
    got = vectors_by_id(out)
    assert set(got) == set(plain) == set(job["sequence_of"])
    first: dict[str, str] = {}
    for sid, seq in job["sequence_of"].items():  # dict order is input order
        rep = first.setdefault(seq, sid)
        np.testing.assert_array_equal(got[sid], got[rep], err_msg=f"{sid} differs from its original {rep}")
        np.testing.assert_allclose(got[sid], plain[sid], rtol=0, atol=1e-5, err_msg=sid)
    m = manifest(out)
    assert m["status"] == "complete"
    assert m["counts"]["rows"] == m["counts"]["records_read"] == 400
    d = m["dedup"]
    assert d["records"] == 400
    assert d["distinct_sequences"] == len(first)
    assert d["repeats"] == 400 - len(first)
    return m


@pytest.mark.slow
def test_dedup_embeds_each_sequence_once_and_matches_a_plain_run(ray_address: str, job: dict,
                                                                  plain: dict[str, np.ndarray]) -> None:
    out = job["base"] / "dedup"
    result = CliRunner().invoke(cli, embed_args(job, out, "--dedup"), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    m = check_dedup_output(out, job, plain)
    assert m["dedup"]["copies_written"] == m["dedup"]["repeats"]
    plain_tokens = manifest(job["base"] / "plain")["throughput"]["tokens"]
    assert m["throughput"]["tokens"] == plain_tokens - m["dedup"]["tokens_saved"]  # exactly the repeats' tokens
    assert m["counts"]["chunked"] < manifest(job["base"] / "plain")["counts"]["chunked"]


def check_copies_share_token_rows(out: Path, job: dict) -> None:
    """--per-token: every repeat's pooled row points at its first record's per-token row."""
    by_id = {r["id"]: r for r in read_parts(out).select(["id", "tokens_file", "tokens_row"]).to_pylist()}
    first: dict[str, str] = {}
    for sid, seq in job["sequence_of"].items():
        rep = first.setdefault(seq, sid)
        assert (by_id[sid]["tokens_file"], by_id[sid]["tokens_row"]) == (by_id[rep]["tokens_file"],
                                                                         by_id[rep]["tokens_row"]), sid


ACTOR_PARTS = ("--part-writer", "actors", "--per-token")  # the actors stage the parts; copies point at token rows


@pytest.mark.slow
def test_dedup_with_actor_parts_and_per_token(ray_address: str, job: dict, plain: dict[str, np.ndarray]) -> None:
    """Embedded rows staged by the actors, repeats written as copy parts: the same rows as a plain run, every
    repeat pointing at its first record's per-token row, every file journaled (runner verify)."""
    out = job["base"] / "dedup-actors"
    result = CliRunner().invoke(cli, embed_args(job, out, "--dedup", *ACTOR_PARTS), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    m = check_dedup_output(out, job, plain)
    assert m["part_writer"] == "actors" and m["dedup"]["copies_written"] == m["dedup"]["repeats"]
    check_copies_share_token_rows(out, job)
    assert not list((out / "embeddings" / ".staged").rglob("*.arrow"))
    verified = CliRunner().invoke(cli, ["verify", str(out)], catch_exceptions=False)
    assert verified.exit_code == 0, verified.output


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ACTOR_PARTS], ids=["driver-parts", "actor-parts"])
def test_dedup_sigkill_mid_job_then_rerun(ray_address: str, job: dict, plain: dict[str, np.ndarray],
                                          extra: tuple[str, ...]) -> None:
    """A driver SIGKILLed after some parts are complete; the rerun finishes: every id once, copies intact."""
    out = job["base"] / f"killed{len(extra)}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # slow batches: the job must still be running once a copy part is on disk (copies wait up to a second)
    env.update(PYTHONPATH=pythonpath_with(REPO), RUNNER_TEST_BATCH_DELAY="0.5")
    proc = subprocess.Popen([sys.executable, "-m", "runner", *embed_args(job, out, "--dedup", *extra, "--address",
                                                                         ray_address)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first: dict[str, str] = {}
    repeats = {sid for sid, seq in job["sequence_of"].items() if first.setdefault(seq, sid) != sid}
    deadline = time.monotonic() + 600  # generous: a busy 2-core machine starts the driver slowly
    while not (len(parts := sorted(out.glob("embeddings/part-*.arrow"))) >= 3  # some copies written too
               and repeats & {i for p in parts for i in pa.ipc.open_file(p).read_all().column("id").to_pylist()}):
        if proc.poll() is not None:
            pytest.fail(f"driver exited ({proc.returncode}) early:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no parts appeared in time")
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=60)
    done = len(vectors_by_id(out))
    assert 0 < done < 400, "the run finished before SIGKILL: nothing was tested"
    result = CliRunner().invoke(cli, embed_args(job, out, "--dedup", *extra), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    m = check_dedup_output(out, job, plain)
    if extra:
        check_copies_share_token_rows(out, job)
    assert m["counts"]["resumed_rows"] == done
    assert m["dedup"]["copies_written"] < m["dedup"]["repeats"]  # some copies were done by the killed run
