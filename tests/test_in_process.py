"""The in-process engine (runner.driver.in_process): a small job without Ray, with every guarantee of the Ray path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import DATA, REPO, fair_esm_extract, invoke, pythonpath_with, read_fasta, read_parts, vectors
from test_console import RAY_LINE

import runner
from runner.config import EmbedConfig
from runner.driver.in_process import IN_PROCESS_BELOW_WORK, choose_engine, in_process_gpus
from runner.driver.progress import InputCount
from runner.driver.startup import BESIDE_RAY
from runner.output.verify import verify_dir

SMALL = InputCount(records=15, residues=5_000)
M650 = 650_000_000  # parameters: 2M tokens is the limit for a 650M model
M15B = 15_000_000_000


@pytest.mark.parametrize(
    "settings, count, parameters, environ, expected",
    [
        ({}, SMALL, M650, {}, "in-process"),
        ({}, InputCount(records=1000, residues=2_000_000 - 2000), M650, {}, "ray"),  # 2 specials a record
        ({}, InputCount(records=1000, residues=2_000_000 - 2001), M650, {}, "in-process"),
        ({}, InputCount(records=1000, residues=100_000), M15B, {}, "ray"),  # 102k tokens: minutes of a 15B model
        ({}, InputCount(records=100, residues=50_000), M15B, {}, "in-process"),
        ({}, None, M650, {}, "ray"),  # not counted: over 64 MiB (or unreadable)
        ({}, InputCount(records=15, residues=None), M650, {}, "ray"),  # a table: its residues are not counted
        ({"address": "10.0.0.1:6379"}, SMALL, M650, {}, "ray"),  # a cluster to join
        ({}, SMALL, M650, {"RAY_ADDRESS": "auto"}, "ray"),
        ({"engine": "ray"}, SMALL, M650, {}, "ray"),
        ({"engine": "in-process"}, None, M15B, {}, "in-process"),
    ],
)
def test_the_engine_follows_the_work_and_the_cluster(settings: dict, count: InputCount | None, parameters: int,
                                                     environ: dict, expected: str) -> None:
    assert IN_PROCESS_BELOW_WORK == 2_000_000 * M650
    assert choose_engine(EmbedConfig(**settings), count, parameters, environ) == expected


@pytest.mark.parametrize("requested, visible, expected", [(None, 0, 0), (0, 4, 0), (None, 4, 1), (1, 4, 1), (8, 4, 1)])
def test_an_in_process_job_uses_one_gpu_at_most(requested: int | None, visible: int, expected: int) -> None:
    assert in_process_gpus(requested, visible) == expected


def quickstart_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": pythonpath_with(REPO)}
    for name in ("RAY_ADDRESS", "RUNNER_ENGINE"):  # the README's command as a user types it: --engine auto
        env.pop(name, None)
    return env


def test_the_quickstart_runs_in_process_quietly_without_importing_ray(tmp_path: Path, tiny_esm2_path: Path) -> None:
    """The README's CPU quickstart (15 proteins): no Ray imported, runner's own lines only, fair-esm's vectors."""
    out = tmp_path / "emb"
    # The CLI's own entry point, and then whether anything imported Ray (stdout's last line).
    program = ("import sys\nfrom runner.cli import cli\ntry:\n    cli(sys.argv[1:], prog_name='runner')\n"
               "except SystemExit as e:\n    print('ray' in sys.modules, e.code)\n")
    done = subprocess.run([sys.executable, "-c", program, "embed", "tests/data/some_proteins.fasta", "--model",
                           str(tiny_esm2_path), "--out", str(out), "--gpus", "0"],
                          cwd=REPO, env=quickstart_env(), capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["False", "0"], done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert not [line for line in lines if RAY_LINE.search(line) or "Warning" in line or "ERROR" in line], done.stderr
    assert lines[0].startswith("embedding 1 input file(s) with ") and "on 1 CPU(s) in this process" in lines[0]
    assert not [line for line in lines if "dashboard" in line or "embed actor" in line], done.stderr
    assert lines[-1].startswith("15 embeddings, 0 rejects, 0 truncated")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["engine"] == "in-process" and "cluster" not in manifest
    startup = manifest["startup"]
    assert startup["engine"] == "in-process" and startup["phases"]["ray_start"] is None
    assert startup["phases"]["actor_start"] is None  # no actor: the start-up line does not name one
    [startup_line] = [line for line in lines if line.startswith("start-up ")]
    assert "actor" not in startup_line and "weights " in startup_line and "first batch " in startup_line
    consecutive = sum(v or 0 for k, v in startup["phases"].items() if k not in BESIDE_RAY)
    assert consecutive == pytest.approx(startup["to_first_output_seconds"], abs=0.05)
    # the vectors are fair-esm's own (its loader and padded FP32 forward)
    reference = fair_esm_extract(tiny_esm2_path, DATA / "some_proteins.fasta", [2])
    results = runner.open(out)
    for sequence_id, vector in zip(results.ids, results.pooled(), strict=True):
        expected = reference[sequence_id]["mean_representations"][2].numpy()
        np.testing.assert_allclose(vector, expected, rtol=1e-4, atol=1e-5)
    assert sorted(results.ids) == sorted(i for i, _ in read_fasta(DATA / "some_proteins.fasta"))


def test_in_process_shadow_compares_the_sample_and_aborts_on_drift(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                  tiny_esm2_path: Path) -> None:
    monkeypatch.setenv("RUNNER_ENGINE", "in-process")
    fasta = DATA / "some_proteins.fasta"
    args = ["embed", str(fasta), "--model", str(tiny_esm2_path), "--gpus", "0", "--no-progress", "--shadow-rate", "1"]
    code, output = invoke(*args, "--out", str(tmp_path / "fp32"))
    assert code == 0, output
    shadow = json.loads((tmp_path / "fp32" / "manifest.json").read_text())["shadow"]
    assert shadow["sampled"] == shadow["compared"] == 15 and shadow["violations"] == 0
    drift = pa.ipc.open_file(tmp_path / "fp32" / "drift.arrow").read_all()
    assert drift.num_rows == 15 and min(drift.column("cosine").to_pylist()) > 0.99999  # FP32 against FP32
    # bf16 against the FP32 shadow drifts measurably: a threshold above it aborts the job (exit 4), naming ids
    code, output = invoke(*args, "--out", str(tmp_path / "bf16"), "--precision", "bf16", "--drift-min-cosine",
                          "0.9999999", "--on-drift", "abort")
    assert code == 4 and "drifted below --drift-min-cosine 0.9999999" in output, output
    assert "UniRef50_" in output and "Traceback" not in output
    manifest = json.loads((tmp_path / "bf16" / "manifest.json").read_text())
    assert manifest["status"] == "aborted" and manifest["shadow"]["violations"] > 0


def test_in_process_aborts_on_a_non_finite_embedding(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     overflow_esm2_path: Path) -> None:
    monkeypatch.setenv("RUNNER_ENGINE", "in-process")
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">fine1\nMKTAYIAKQR\n>boom\nMKTWAYIAK\n>fine2\nMKVLAAGIV\n")
    out = tmp_path / "emb"
    code, output = invoke("embed", str(fasta), "--model", str(overflow_esm2_path), "--out", str(out), "--gpus", "0",
                          "--rows-per-part", "1", "--no-progress")
    assert code == 3 and "boom" in output and "Traceback" not in output, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "aborted" and manifest["engine"] == "in-process"
    for part in (out / "embeddings").glob("part-*.arrow"):
        table = pa.ipc.open_file(part).read_all()
        assert np.isfinite(vectors(table)).all() and "boom" not in table.column("id").to_pylist()


def test_in_process_per_token_dedup_and_chunks_verify(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      tiny_esm2_path: Path) -> None:
    monkeypatch.setenv("RUNNER_ENGINE", "in-process")
    proteins = read_fasta(DATA / "some_proteins.fasta")
    fasta = tmp_path / "in.fasta"  # every protein twice, under another id
    fasta.write_text("".join(f">{i}\n{s}\n>{i}-again\n{s}\n" for i, s in proteins))
    out = tmp_path / "emb"
    code, output = invoke("embed", str(fasta), "--model", str(tiny_esm2_path), "--out", str(out), "--gpus", "0",
                          "--no-progress", "--per-token", "--dedup", "--long", "chunk", "--max-residues", "300",
                          "--chunk-overlap", "50", "--rows-per-part", "7")
    assert code == 0, output
    report = verify_dir(out)
    assert report.ok, report.problems
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dedup"]["distinct_sequences"] == 15 and manifest["counts"]["records_read"] == 30
    results = runner.open(out)
    by_id = dict(zip(results.ids, results.pooled(), strict=True))
    assert len(results.ids) == 30 == len(set(results.ids))
    for sequence_id, sequence in proteins:
        np.testing.assert_array_equal(by_id[sequence_id], by_id[f"{sequence_id}-again"])
        assert results.per_token(f"{sequence_id}-again").shape == (len(sequence), 64)
    assert max(read_parts(out).column("windows").to_pylist()) > 1  # the longest proteins were chunked


def test_in_process_with_parts_written_by_the_stage_equals_driver_written_parts(monkeypatch: pytest.MonkeyPatch,
                                                                                 tmp_path: Path,
                                                                                 tiny_esm2_path: Path) -> None:
    """--part-writer actors in-process: the stage stages and the collect loop commits, as on Ray; the parts hold
    the same rows and vectors as the driver-written job's, and verify finds nothing wrong."""
    monkeypatch.setenv("RUNNER_ENGINE", "in-process")
    outs = {}
    for writer in ("driver", "actors"):
        out = tmp_path / writer
        code, output = invoke("embed", str(DATA / "some_proteins.fasta"), "--model", str(tiny_esm2_path), "--out",
                              str(out), "--gpus", "0", "--no-progress", "--per-token", "--rows-per-part", "4",
                              "--part-writer", writer)
        assert code == 0, output
        report = verify_dir(out)
        assert report.ok and report.rows == 15, report.problems
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["engine"] == "in-process" and manifest["settings"]["part_writer"] == writer
        outs[writer] = runner.open(out)
    assert not list((tmp_path / "actors" / "embeddings").glob(".staged/*/*"))  # every staged file committed
    driver, actors = outs["driver"], outs["actors"]
    assert sorted(actors.ids) == sorted(driver.ids) and len(set(actors.ids)) == 15
    by_id = dict(zip(driver.ids, driver.pooled(), strict=True))
    for sequence_id, vector in zip(actors.ids, actors.pooled(), strict=True):
        np.testing.assert_array_equal(vector, by_id[sequence_id])
        np.testing.assert_array_equal(actors.per_token(sequence_id), driver.per_token(sequence_id))


def test_a_signal_stops_an_in_process_job_after_its_batch_and_a_rerun_completes_it(tmp_path: Path,
                                                                                  tiny_esm2_path: Path) -> None:
    """SIGINT mid-job: exit 130 with the finished parts kept; the same command then writes each id exactly once."""
    proteins = read_fasta(DATA / "some_proteins.fasta")
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{i}-{n}\n{s}\n" for n in range(4) for i, s in proteins))  # 60 records
    out = tmp_path / "emb"
    command = [sys.executable, "-m", "runner", "embed", str(fasta), "--model", str(tiny_esm2_path), "--out", str(out),
               "--gpus", "0", "--no-progress", "--token-budget", "1100", "--rows-per-part", "4", "--part-seconds", "1"]
    env = {**quickstart_env(), "RUNNER_TEST_BATCH_DELAY": "0.4"}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((out / "embeddings").glob("part-*.arrow")) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and 0 < manifest["counts"]["rows"] < 60
    stopped = verify_dir(out)  # the parts written are whole and their checksums right; only the end is missing
    assert stopped.parts > 0 and [p for p in stopped.problems if "not complete (status interrupted)" not in p] == []

    env.pop("RUNNER_TEST_BATCH_DELAY")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ids = read_parts(out).column("id").to_pylist()
    assert sorted(ids) == sorted(f"{i}-{n}" for n in range(4) for i, _ in proteins)  # each once
    assert verify_dir(out).ok


def test_sigkill_mid_in_process_job_then_rerun_writes_each_id_once(tmp_path: Path, tiny_esm2_path: Path) -> None:
    """SIGKILL (no handler runs) once parts are on disk: the rerun resumes them and writes every id exactly once,
    per-token rows included, and `runner verify` finds nothing wrong."""
    proteins = read_fasta(DATA / "some_proteins.fasta")
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{i}-{n}\n{s}\n" for n in range(4) for i, s in proteins))  # 60 records
    out = tmp_path / "emb"
    command = [sys.executable, "-m", "runner", "embed", str(fasta), "--model", str(tiny_esm2_path), "--out", str(out),
               "--gpus", "0", "--no-progress", "--token-budget", "1100", "--rows-per-part", "4", "--part-seconds", "1",
               "--per-token"]
    env = {**quickstart_env(), "RUNNER_TEST_BATCH_DELAY": "0.4"}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / "embeddings").glob("part-*.arrow"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_rows = sum(pa.ipc.open_file(p).read_all().num_rows for p in (out / "embeddings").glob("part-*.arrow"))
    assert 0 < killed_rows < 60

    env.pop("RUNNER_TEST_BATCH_DELAY")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"] == "in-process" and manifest["counts"]["resumed_rows"] == killed_rows
    results = runner.open(out)
    assert sorted(results.ids) == sorted(f"{i}-{n}" for n in range(4) for i, _ in proteins)  # each once
    assert all(results.per_token(f"{i}-{n}").shape[0] == len(s) for i, s in proteins for n in range(4))
    report = verify_dir(out)
    assert report.ok, report.problems


def test_in_process_refuses_what_it_cannot_do(tmp_path: Path, tiny_esm2_path: Path) -> None:
    args = ["embed", str(DATA / "few_proteins.fasta"), "--model", str(tiny_esm2_path), "--out", str(tmp_path / "o"),
            "--engine", "in-process"]
    code, output = invoke(*args, "--address", "10.0.0.1:6379")
    assert code == 1 and "cannot join --address" in output and len(output.strip().splitlines()) == 1, output
    if not __import__("torch").cuda.device_count():
        code, output = invoke(*args, "--gpus", "2")
        assert code == 1 and "torch sees none here: pass --gpus 0" in output, output


@pytest.mark.gpu
def test_in_process_on_a_gpu_is_fp16_checked_by_its_fp32_shadow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               esm2_150m: Path) -> None:
    """One GPU without Ray: FP16 packed forward, the FP32 shadow on a thread comparing every sequence, vectors as
    the CPU's FP32 in-process run's."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("RUNNER_ENGINE")  # auto: a small job on this machine's GPU runs in-process
    args = ["embed", str(DATA / "some_proteins.fasta"), "--model", str(esm2_150m), "--no-progress"]
    code, output = invoke(*args, "--out", str(tmp_path / "gpu"), "--shadow-rate", "1")
    assert code == 0, output
    manifest = json.loads((tmp_path / "gpu" / "manifest.json").read_text())
    assert manifest["engine"] == "in-process" and manifest["precision"] == "fp16"
    assert manifest["shadow"]["compared"] == 15 and manifest["shadow"]["cosine_min"] > 0.999, manifest["shadow"]
    code, output = invoke(*args, "--out", str(tmp_path / "cpu"), "--gpus", "0", "--shadow-rate", "0")
    assert code == 0, output
    gpu, cpu = runner.open(tmp_path / "gpu"), runner.open(tmp_path / "cpu")
    assert gpu.ids == cpu.ids
    a, b = gpu.pooled().astype(np.float64), cpu.pooled().astype(np.float64)
    cosines = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    print(f"\nin-process FP16 on a GPU vs FP32 on CPU (150M shape): min cosine {cosines.min():.6f}; "
          f"start-up {manifest['startup']['to_first_output_seconds']} s")
    assert cosines.min() > 0.999
