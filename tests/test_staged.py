"""--part-writer actors (issue 18): the embedding actors write the pooled parts, the driver only commits them.

Without Ray: a real EmbedStage (tiny ESM-2 on CPU) stages parts and the driver's handle_table commits them; the
same output delivered twice, a part whose rows are partly written already, a non-finite window, and staged parts
that a killed driver never committed (resume deletes them). With Ray (`runner embed`): the result equals the
driver-written one (pooled, per-token, the shadow's samples); a driver SIGKILLed between the actors' renames and
its commit resumes to every id exactly once; an actor killed after staging a part and before returning its batch
leaves that part uncommitted while Ray's retry is committed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from conftest import pythonpath_with

from runner.cli import cli
from runner.config import EmbedConfig
from runner.driver.collect import handle_table
from runner.driver.metrics import DriverMetrics
from runner.errors import NonFiniteEmbedding
from runner.input.batch import TokenizedRecord
from runner.input.packing import make_batch
from runner.models.esm2 import Esm2Codec
from runner.output.checksums import check_file, read_records
from runner.output.report import JobReport
from runner.output.resume import OrdinalSet, prepare_resume
from runner.output.sink import ChunkMerger, PartWriter, RejectWriter, embedding_schema
from runner.output.staged import staged_dir
from runner.stages.embed_stage import EmbedStage, StageSettings

REPO = Path(__file__).resolve().parents[1]
AMINO = list("ACDEFGHIKLMNPQRSTVWY")
DIM = 64  # tiny ESM-2's width (scripts/tiny_esm2.py)


def stage(model: Path, staged: str = "", part_rows: int = 16384, shadow_rate: float = 0.0) -> EmbedStage:
    return EmbedStage(StageSettings(model=str(model), precision="fp32", layers=(-1,), poolings=("mean",),
                                    device="cpu", staged_dir=staged, part_rows=part_rows, shadow_rate=shadow_rate))


def packed_batch(count: int, first: int = 0) -> pa.Table:
    """One packed batch of `count` tiny proteins (ordinals first..first+count-1)."""
    codec = Esm2Codec()
    rng = np.random.default_rng(first)
    windows = []
    for i in range(first, first + count):
        tokens = np.asarray(codec.encode("".join(rng.choice(AMINO, size=int(rng.integers(5, 30))))), np.int32)
        windows.append(TokenizedRecord(f"s{i}", i, tokens, len(tokens) - 2, False))
    return pa.Table.from_pylist([make_batch(windows, 10_000).to_row()])


def drive(tables: list[pa.Table], out: Path, written: OrdinalSet, rows_per_part: int = 16384) -> tuple[PartWriter, JobReport]:
    """The driver's handle_table on each table, then the writer closed (its group commit)."""
    writer = PartWriter(out, DIM, rows_per_part)
    report = JobReport(out_dir=out)
    rejects = RejectWriter(out)
    for table in tables:
        handle_table(table, writer, rejects, report, ChunkMerger(), EmbedConfig(model="tiny"), "fp32",
                     DriverMetrics("tiny", "fp32"), written)
    writer.close()
    rejects.close()
    return writer, report


def stored(out: Path) -> pa.Table:
    parts = sorted((out / "embeddings").glob("part-*.arrow"))
    return pa.concat_tables([pa.ipc.open_file(p).read_all() for p in parts])


def staged_files(out: Path) -> list[Path]:
    return sorted(staged_dir(out).glob("*/stg-*.arrow"))


def test_actors_stage_whole_sequences_and_the_driver_commits_each_ordinal_once(tmp_path: Path, tiny_esm2_path: Path) -> None:
    out = tmp_path / "out"
    batch = packed_batch(12)
    actor = stage(tiny_esm2_path, str(staged_dir(out)), part_rows=5)
    output = actor(batch)
    # 12 rows staged in parts of at most 5: three records, no vectors of those rows travel to the driver
    records = output.filter(pa.compute.is_valid(output.column("staged_ordinals")))
    assert records.num_rows == 3 and sorted(len(o) for o in records.column("staged_ordinals").to_pylist()) == [2, 5, 5]
    assert output.filter(pa.compute.is_valid(output.column("id"))).num_rows == 0
    assert len(staged_files(out)) == 3

    written = OrdinalSet()
    # the same output delivered twice (a retried batch): the second copy's parts are deleted, not committed
    writer, report = drive([output, output], out, written)
    table = stored(out)
    assert sorted(table.column("ordinal").to_pylist()) == list(range(12))
    assert report.records_done == 12 and report.duplicates_dropped == 12 and writer.committed == 3
    assert not staged_files(out)
    assert report.workers == {actor.worker: 12}
    # the same vectors as the driver-written path (the stage without staged parts)
    plain = stage(tiny_esm2_path)(batch)
    expected = dict(zip(plain.column("id").to_pylist(), plain.column("embedding").to_pylist(), strict=True))
    for sid, vector in zip(table.column("id").to_pylist(), table.column("embedding").to_pylist(), strict=True):
        np.testing.assert_array_equal(vector, expected[sid])
    assert table.schema.equals(embedding_schema(DIM))
    journal = read_records(out)
    for name in writer.parts:  # each committed part has its checksum line, and it matches
        assert check_file(out / "embeddings" / name, journal.get(f"embeddings/{name}")) is None


def test_a_staged_part_partly_written_already_is_rewritten_without_those_rows(tmp_path: Path, tiny_esm2_path: Path) -> None:
    out = tmp_path / "out"
    output = stage(tiny_esm2_path, str(staged_dir(out)))(packed_batch(8))
    written = OrdinalSet()
    written.add(np.array([1, 4]))  # as if an earlier delivery of a batch overlapping this one was written
    writer, report = drive([output], out, written)
    assert sorted(stored(out).column("ordinal").to_pylist()) == [0, 2, 3, 5, 6, 7]
    assert report.duplicates_dropped == 2 and report.records_done == 6 and writer.committed == 0
    assert not staged_files(out)
    assert written.count == 8


def test_a_non_finite_window_aborts_naming_it_and_nothing_is_committed(
    tmp_path: Path, tiny_esm2_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    actor = stage(tiny_esm2_path, str(staged_dir(out)))
    real = actor.embed_guarded

    def with_nan(batch, pieces=None):
        vectors, finite, errors = real(batch, pieces)
        bad = batch.ids.index("s3")
        vectors[bad, 0] = np.nan
        finite[bad] = False
        return vectors, finite, errors

    monkeypatch.setattr(actor, "embed_guarded", with_nan)
    output = actor(packed_batch(6))
    (staged,) = staged_files(out)
    assert "s3" not in pa.ipc.open_file(staged).read_all().column("id").to_pylist()  # never staged
    writer = PartWriter(out, DIM, 100)
    with pytest.raises(NonFiniteEmbedding, match="s3"):
        handle_table(output, writer, RejectWriter(out), JobReport(out_dir=out), ChunkMerger(),
                     EmbedConfig(model="tiny"), "fp32", DriverMetrics("tiny", "fp32"), OrdinalSet())
    writer.close()
    assert writer.parts == [] and not list((out / "embeddings").glob("part-*.arrow"))


def test_resume_deletes_staged_parts_no_driver_committed(tmp_path: Path, tiny_esm2_path: Path) -> None:
    """A driver killed between the actors' renames and its commit: the staged parts are not output."""
    out = tmp_path / "out"
    first = stage(tiny_esm2_path, str(staged_dir(out)))(packed_batch(4))
    drive([first], out, OrdinalSet())  # ordinals 0-3 committed
    stage(tiny_esm2_path, str(staged_dir(out)))(packed_batch(4, first=4))  # staged, never delivered
    assert len(staged_files(out)) == 1
    (out / "manifest.json").write_text(json.dumps({"fingerprint": {"settings": {}}, "resume": {"runs": 1}}))
    state = prepare_resume(out, {"settings": {}}, DIM, overwrite=False)
    assert not staged_files(out) and state.staged_removed == 1
    assert state.rows == 4 and state.done.contains(np.arange(8)).tolist() == [True] * 4 + [False] * 4
    assert state.summary()["staged_removed"] == 1


# --- runner embed --part-writer actors (Ray) ---------------------------------------------------------------------

COUNT = 120
LAYERS = ("--layers", "1,2", "--pooling", "mean,max")  # several vector columns, per-token arrays of two layers


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_esm2_path: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("staged")
    rng = np.random.default_rng(5)
    fasta = base / "in.fasta"
    fasta.write_text("".join(f">s{i}\n{''.join(rng.choice(AMINO, size=int(rng.integers(20, 60))))}\n"
                             for i in range(COUNT)))
    config = base / "job.yaml"
    # 2 CPU actors, staged parts of at most 10 rows (blocks of 20 records): many parts, many commits
    config.write_text(f"model: {tiny_esm2_path}\ngpus: 0\ncpu_actors: 2\nrecords_per_block: 20\nrows_per_part: 10\n"
                      "progress: false\nper_token: true\n")
    return {"fasta": fasta, "config": config, "base": base}


def embed(job: dict[str, Path], out: Path, *extra: str) -> None:
    result = CliRunner().invoke(cli, ["embed", str(job["fasta"]), *LAYERS, "--config", str(job["config"]),
                                      "--out", str(out), *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def by_id(out: Path) -> dict[str, tuple[list[float], np.ndarray]]:
    """id -> (its layer2_max vector, its layer2 per-token array); every id exactly once; `runner verify` passes."""
    import runner

    results = runner.open(out)
    ids = results.ids
    assert len(ids) == len(set(ids)) == COUNT
    vectors = results.pooled(layer=2, pooling="max")
    verify = CliRunner().invoke(cli, ["verify", str(out)])
    assert verify.exit_code == 0, verify.output
    assert not staged_files(out), "an uncommitted staged part was left behind"
    return {sid: (vectors[i], results.per_token(sid, layer=2)) for i, sid in enumerate(ids)}


def same_rows(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for sid, (vector, tokens) in want.items():
        np.testing.assert_allclose(got[sid][0], vector, rtol=0, atol=1e-6, err_msg=sid)
        np.testing.assert_allclose(got[sid][1], tokens, rtol=0, atol=1e-6, err_msg=sid)


@pytest.fixture(scope="module")
def baseline(ray_address: str, job: dict[str, Path]) -> dict:
    out = job["base"] / "driver"
    embed(job, out, "--part-writer", "driver", "--shadow-rate", "0")
    return by_id(out)


@pytest.mark.slow
def test_actor_written_parts_equal_driver_written_ones(ray_address: str, job: dict[str, Path], baseline: dict) -> None:
    out = job["base"] / "actors"
    embed(job, out, "--part-writer", "actors", "--shadow-rate", "0.5")  # the shadow gets its rows' vectors
    same_rows(by_id(out), baseline)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["part_writer"] == "actors" and manifest["counts"]["rows"] == COUNT
    assert len(manifest["parts"]) >= COUNT // 10  # staged parts of at most 10 rows, each committed as a part
    assert manifest["shadow"]["compared"] > 0 and manifest["shadow"]["violations"] == 0
    assert sum(manifest["throughput"]["windows_per_worker"].values()) == COUNT


@pytest.mark.slow
def test_driver_killed_between_the_actors_renames_and_its_commit_resumes_exactly_once(
    ray_address: str, job: dict[str, Path], baseline: dict
) -> None:
    out = job["base"] / "killed"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=pythonpath_with(REPO), RUNNER_TEST_KILL_BEFORE_COMMIT="3")  # SIGKILL before the 3rd group commit
    proc = subprocess.run([sys.executable, "-m", "runner", "embed", str(job["fasta"]), *LAYERS, "--config", str(job["config"]),
                           "--out", str(out), "--address", ray_address, "--part-writer", "actors"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    committed = len(list((out / "embeddings").glob("part-*.arrow")))
    assert 1 <= committed < COUNT // 10 and staged_files(out), "nothing was staged and left uncommitted"
    embed(job, out, "--part-writer", "actors", "--shadow-rate", "0")
    same_rows(by_id(out), baseline)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resume"]["runs"] == 2 and manifest["resume"]["staged_removed"] >= 1
    assert manifest["resume"]["resumed_parts"] == committed


@pytest.mark.slow
def test_an_actor_killed_after_staging_leaves_that_part_uncommitted_and_ray_retries_the_batch(
    ray_address: str, job: dict[str, Path], baseline: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = job["base"] / "actor-death"
    monkeypatch.setenv("RUNNER_TEST_CRASH_AFTER_STAGING", "2")
    embed(job, out, "--part-writer", "actors", "--shadow-rate", "0")
    assert (out / ".test-actor-crashed-staged").exists(), "no actor died: nothing was tested"
    same_rows(by_id(out), baseline)  # the dead actor's staged part is not in the output; the retry's is, once
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["actor_restarts"] >= 1
