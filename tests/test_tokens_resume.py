"""Per-token files stay exactly-once through SIGKILL, resume, an actor death, leftover files and corruption (issues
15, 19).

A driver is SIGKILLed mid-job (a subprocess joining this module's Ray). In one copy of what it left, a half-written
and an orphan token file are planted, and the rerun (during which an embedding actor also dies once,
RUNNER_TEST_CRASH_AFTER_BATCHES) must leave every id's per-token row on disk exactly once, equal to an
uninterrupted run's. In another copy, bytes inside a committed token file are flipped: `runner verify` names it,
and the rerun redoes exactly the rows of the parts pointing at it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from conftest import pythonpath_with

from runner.cli import cli
from runner.output.checksums import file_crc, read_records

REPO = Path(__file__).resolve().parents[1]
COUNT = 240
AMINO = list("ACDEFGHIKLMNPQRSTVWY")


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_esm2_path: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tokens_resume")
    rng = np.random.default_rng(11)
    fasta = base / "in.fasta"
    fasta.write_text("".join(f">s{i}\n{''.join(rng.choice(AMINO, size=int(rng.integers(20, 60))))}\n"
                             for i in range(COUNT)))
    config = base / "job.yaml"
    # Parts of 20 rows from blocks of 30 records: a batch's token file often feeds two parts, so a killed run
    # leaves token files its complete parts point into only in part.
    config.write_text(f"model: {tiny_esm2_path}\ngpus: 0\nrecords_per_block: 30\nrows_per_part: 20\n"
                      "shadow_rate: 0\nprogress: false\nper_token: true\nlayers: [1, 2]\npooling: [mean, max]\n")
    return {"fasta": fasta, "config": config, "base": base}


def embed_args(job: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["embed", str(job["fasta"]), "--config", str(job["config"]), "--out", str(out), *extra]


def per_token(out: Path) -> dict[str, np.ndarray]:
    """id -> layer2 per-token array, via the pooled parts; each id's row exactly once across all token files."""
    parts = sorted((out / "embeddings").glob("part-*.arrow"))
    pooled = pa.concat_tables([pa.ipc.open_file(p).read_all() for p in parts])
    ids = pooled.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == COUNT
    tables = {p: pa.ipc.open_file(p).read_all() for p in (out / "tokens").glob("*/tok-*.arrow")}
    on_disk = [i for t in tables.values() for i in t.column("id").to_pylist()]
    assert sorted(on_disk) == sorted(ids), "a per-token row is missing, duplicated or unreferenced"
    assert not list((out / "tokens").glob("*/.*")), "a half-written token file is visible"
    found = {}
    for sid, name, row in zip(ids, pooled.column("tokens_file").to_pylist(), pooled.column("tokens_row").to_pylist(),
                              strict=True):
        table = tables[out / "tokens" / name]
        assert table.column("id")[row].as_py() == sid
        found[sid] = table.column("layer2")[row].values.flatten().to_numpy().reshape(table.column("length")[row].as_py(), -1)
    return found


def part_names(out: Path) -> set[str]:
    emb = out / "embeddings"
    return {p.name for p in emb.glob("part-*.arrow")} if emb.is_dir() else set()


@pytest.fixture(scope="module")
def clean(ray_address: str, job: dict[str, Path]) -> tuple[Path, dict[str, np.ndarray]]:
    """An uninterrupted run: its --out and each id's layer2 per-token array."""
    out = job["base"] / "clean"
    result = CliRunner().invoke(cli, embed_args(job, out), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, per_token(out)


@pytest.fixture(scope="module")
def killed(ray_address: str, job: dict[str, Path]) -> Path:
    """What a driver SIGKILLed mid-job leaves: at least 2 complete parts, not all of them (tests work on copies)."""
    out = job["base"] / "killed"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # CPU actors run one call at a time (runner.driver.cluster), so batches reach the driver >= 0.3 s apart: the
    # poll below (every 50 ms) kills the driver within a batch or two of its second part, long before the last
    # of the 8 batches (12 parts).
    env.update(PYTHONPATH=pythonpath_with(REPO), RUNNER_TEST_BATCH_DELAY="0.3")
    proc = subprocess.Popen([sys.executable, "-m", "runner", *embed_args(job, out, "--address", ray_address)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600  # Ray's actors start slowly on a loaded machine
    while len(part_names(out)) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    ended = proc.poll() is not None
    proc.kill()
    output = proc.communicate(timeout=60)[0]
    assert not ended, f"the run ended before SIGKILL: nothing was tested\n{output}"
    assert 2 <= len(part_names(out)) < COUNT // 20, f"{len(part_names(out))} parts at SIGKILL\n{output}"
    return out


def test_sigkill_orphans_and_actor_death_keep_per_token_rows_exactly_once(
    job: dict[str, Path], clean: tuple[Path, dict[str, np.ndarray]], killed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = job["base"] / "resumed"
    shutil.copytree(killed, out)
    # The kill may itself have caught an actor mid-write (the actors of a SIGKILLed driver are stopped by Ray):
    # those half-written files are removed on resume too.
    left_by_the_kill = len(list(out.glob("tokens/*/.tok-*.arrow.tmp")))
    shard = next((out / "tokens").iterdir())
    (shard / f".tok-{uuid.uuid4().hex}.arrow.tmp").write_bytes(b"half-written")  # as a kill mid-write leaves it
    orphan = shard / f"tok-{uuid.uuid4().hex}.arrow"
    orphan.write_bytes(next(shard.glob("tok-*.arrow")).read_bytes())  # complete, but no part points at it

    monkeypatch.setenv("RUNNER_TEST_CRASH_AFTER_BATCHES", "2")  # and an actor dies once mid-rerun
    result = CliRunner().invoke(cli, embed_args(job, out), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    resumed = per_token(out)  # every id's row once across the token files, none unreferenced, none half-written
    assert not orphan.exists()
    baseline = clean[1]
    assert resumed.keys() == baseline.keys()
    for sid, array in baseline.items():
        np.testing.assert_allclose(resumed[sid], array, rtol=0, atol=1e-6, err_msg=sid)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resume"]["runs"] == 2 and 0 < manifest["resume"]["resumed_rows"] < COUNT
    assert manifest["resume"]["token_tmp_removed"] == left_by_the_kill + 1
    assert manifest["resume"]["token_files_deleted"] >= 1
    assert not list(out.glob("tokens/*/.tok-*.arrow.tmp"))
    assert manifest["counts"]["actor_restarts"] >= 1
    files = list((out / "tokens").glob("*/tok-*.arrow"))
    per = manifest["outputs"]["per_token"]
    assert per["files"] == len(files) and per["bytes"] == sum(f.stat().st_size for f in files)
    verified = CliRunner().invoke(cli, ["verify", str(out)])  # pointers, checksums and exactly-once, independently
    assert verified.exit_code == 0, verified.output


def test_a_clean_runs_token_files_are_checksummed_and_verify(clean: tuple[Path, dict[str, np.ndarray]]) -> None:
    out = clean[0]
    manifest = json.loads((out / "manifest.json").read_text())
    records = read_records(out)
    files = sorted((out / "tokens").glob("*/tok-*.arrow"))
    assert files
    for path in files:
        name = str(path.relative_to(out))
        crc, size = file_crc(path)
        assert manifest["checksums"][name] == records[name]["crc32"] == crc and records[name]["bytes"] == size
        assert records[name]["rows"] == pa.ipc.open_file(path).read_all().num_rows
    assert len([n for n in records if n.startswith("tokens/")]) == len(files)  # no record of a deleted file
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{len(files)} per-token files ({COUNT} rows)" in result.output


def test_a_corrupt_token_file_is_named_by_verify_and_its_rows_are_redone(
    job: dict[str, Path], clean: tuple[Path, dict[str, np.ndarray]], killed: Path
) -> None:
    out = job["base"] / "corrupt"
    shutil.copytree(killed, out)
    pointers: dict[str, list[str]] = {}  # token file -> complete parts pointing at it
    rows_of: dict[str, int] = {}
    for part in sorted(part_names(out)):
        table = pa.ipc.open_file(out / "embeddings" / part).read_all()
        rows_of[part] = table.num_rows
        for name in set(table["tokens_file"].to_pylist()):
            pointers.setdefault(name, []).append(part)
    bad = max(pointers, key=lambda n: len(pointers[n]))  # a committed file, pointed at by the most parts
    path = out / "tokens" / bad
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the vectors: the file is ~0.5 MB of float32 arrays
    data[middle : middle + 8] = bytes(255 - b for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))
    assert pa.ipc.open_file(path).read_all().num_rows > 0  # still reads: only its checksum tells

    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 6
    assert f"problem: {path}: checksum mismatch" in result.output
    assert f"points at per-token file {path}" in result.output

    done_before = sum(rows_of.values())
    result = CliRunner().invoke(cli, embed_args(job, out), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    # exactly the rows of the parts pointing at the corrupt file were redone, the other complete parts kept
    assert manifest["resume"]["redone_parts"] == sorted(pointers[bad])
    assert manifest["resume"]["redone_token_files"] == [bad]
    assert manifest["resume"]["resumed_rows"] == done_before - sum(rows_of[p] for p in pointers[bad])
    log = (out / "runner.log").read_text()
    lines = [line for line in log.splitlines() if f"per-token file {path} is unusable" in line]
    assert len(lines) == 1 and "checksum mismatch" in lines[0] and all(p in lines[0] for p in pointers[bad])
    assert not path.exists()
    resumed = per_token(out)
    for sid, array in clean[1].items():
        np.testing.assert_allclose(resumed[sid], array, rtol=0, atol=1e-6, err_msg=sid)
    verified = CliRunner().invoke(cli, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output


def test_a_complete_job_missing_a_token_file_is_not_already_complete(
    job: dict[str, Path], clean: tuple[Path, dict[str, np.ndarray]]
) -> None:
    """What `runner verify`'s failure line tells a user to do with a complete job: delete the corrupt file, rerun."""
    out = job["base"] / "deleted"
    shutil.copytree(clean[0], out)
    gone = next((out / "tokens").glob("*/tok-*.arrow"))
    gone.unlink()
    result = CliRunner().invoke(cli, embed_args(job, out), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "already complete" not in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resume"]["redone_token_files"] == [str(gone.relative_to(out / "tokens"))]
    assert 0 < manifest["resume"]["resumed_rows"] < COUNT
    resumed = per_token(out)
    for sid, array in clean[1].items():
        np.testing.assert_allclose(resumed[sid], array, rtol=0, atol=1e-6, err_msg=sid)
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code == 0
