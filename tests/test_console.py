"""What the terminal shows: the job log's routing of Ray's logs, the progress display, the quiet CLI quickstart."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA, REPO, pythonpath_with, read_fasta

from runner.driver.console import JobLog
from runner.driver.progress import InputCount, Progress, count_inputs
from runner.driver.startup import BESIDE_RAY, STREAM_SETUP_STEPS

# --- the progress display -------------------------------------------------------------------------------


def test_count_inputs_fasta_residues(tmp_path: Path) -> None:
    """Records and residues of a FASTA file (plain and gzipped), exactly those of its sequences."""
    records = read_fasta(DATA / "some_proteins.fasta")
    counted = count_inputs([DATA / "some_proteins.fasta"])
    assert counted.records == len(records)
    assert counted.residues == sum(len(seq) for _, seq in records)
    gz = tmp_path / "p.fasta.gz"
    gz.write_bytes(gzip.compress((DATA / "some_proteins.fasta").read_bytes()))
    both = count_inputs([DATA / "some_proteins.fasta", gz])
    assert (both.records, both.residues) == (2 * counted.records, 2 * counted.residues)
    csv = tmp_path / "p.csv"
    csv.write_text("id,sequence\na,MKV\nb,MKL")
    mixed = count_inputs([DATA / "some_proteins.fasta", csv])
    assert (mixed.records, mixed.residues) == (counted.records + 2, None)  # a table's residues are not counted


def wait_for_count(progress: Progress) -> None:
    deadline = time.monotonic() + 10
    while progress.count is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert progress.count is not None


def test_progress_plain_lines_when_not_a_terminal() -> None:
    """Not a terminal: one plain line per interval (not per update), with every figure, the last one once."""
    stream = io.StringIO()
    progress = Progress([DATA / "some_proteins.fasta"], True, actors=2, unit="GPU", tokens_per_residue=1.0,
                        stream=stream, interval=3600)
    wait_for_count(progress)
    total_tokens = progress.count.residues + 2 * 15
    progress.update(0, 0, busy_seconds=0.0, shadow=(0, 0))
    time.sleep(0.05)
    progress.update(5, 1000, busy_seconds=0.05, shadow=(1, 0))  # within the interval: no new line
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "0/15 seqs" in lines[0]
    progress.update(15, total_tokens, busy_seconds=0.1, shadow=(3, 1), force=True)
    progress.finish()  # the last line was written already: not again
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    last = lines[-1]
    assert re.match(r"^\[\d+m\d\ds\] 15/15 seqs · ", last)
    assert f"/~{total_tokens / 1000:.1f}k tokens" in last
    rate = re.search(r"([\d,]+) tok/s", last)
    assert rate is not None and int(rate.group(1).replace(",", "")) > 0
    assert "ETA 0m00s" in last
    assert re.search(r"\d\.\d/2 GPUs busy", last)
    assert "shadow 3 compared, 1 violations" in last


def test_progress_takes_a_count_the_job_made_and_does_not_count_again(monkeypatch: pytest.MonkeyPatch) -> None:
    counted: list[object] = []
    monkeypatch.setattr("runner.driver.progress.count_inputs", counted.append)
    stream = io.StringIO()
    progress = Progress([DATA / "some_proteins.fasta"], True, actors=1, tokens_per_residue=1.0, stream=stream,
                        count=InputCount(records=15, residues=5000))
    progress.update(3, 1000, force=True)
    time.sleep(0.1)  # a counting thread, had one started, would have counted by now
    assert counted == [] and "3/15 seqs · 1.0k/~5.0k tokens" in stream.getvalue()


def test_progress_busy_and_rate_over_the_window() -> None:
    """tok/s and busy actors are deltas over the recent window: start-up before the first batch does not count."""
    progress = Progress([DATA / "some_proteins.fasta"], True, actors=4, stream=io.StringIO())
    progress.update(0, 0, busy_seconds=0.0)
    time.sleep(0.2)
    progress.update(10, 1000, busy_seconds=0.6)
    tokens_per_second, records_per_second, busy = progress.rates()
    assert 1000 / 0.4 < tokens_per_second <= 1000 / 0.2
    assert 10 / 0.4 < records_per_second <= 10 / 0.2
    assert 0.6 / 0.4 < busy <= 3.0
    # A short job's outputs may all arrive at once: the first batch's start is the rates' origin.
    burst = Progress([DATA / "some_proteins.fasta"], True, actors=1, stream=io.StringIO())
    burst.update(15, 1000, busy_seconds=0.5, first_batch_start=time.time() - 1.0)
    tokens_per_second, _, busy = burst.rates()
    assert 900 < tokens_per_second < 1001 and 0.45 < busy <= 0.5


def test_no_progress_writes_nothing() -> None:
    stream = io.StringIO()
    progress = Progress([DATA / "some_proteins.fasta"], False, stream=stream)
    progress.update(15, 100, force=True)
    progress.finish()
    assert stream.getvalue() == ""


# --- the job log --------------------------------------------------------------------------------------


def test_job_log_routes_ray_to_the_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Ray's and Ray Data's records and native stderr go to DIR/runner.log; runner's own lines, Ray core's errors and
    other libraries' warnings still reach the terminal."""
    import ray.data  # noqa: F401  (sets up Ray Data's logger, as in a job)

    with JobLog(tmp_path, verbose=0) as job_log:
        logging.getLogger("ray.data._internal.execution").info("Execution plan of Dataset x")
        logging.getLogger("ray._private.worker").warning("Token authentication is enabled")
        os.write(2, b"[E core_worker.cc:2465] native line\n")
        print("runner's own stderr", file=sys.stderr)
        logging.getLogger("ray.data").error("a real Ray Data error")
        logging.getLogger("some.library").warning("a library's warning")
    captured = capfd.readouterr()
    text = job_log.path.read_text()
    for line in ("Execution plan of Dataset x", "Token authentication is enabled", "native line",
                 "a real Ray Data error"):
        assert line in text
    assert "Execution plan" not in captured.err and "Token authentication" not in captured.err
    assert "native line" not in captured.err
    assert "runner's own stderr" in captured.err
    # Ray Data logs a failed task at ERROR with its whole traceback before the driver reports the failure as one
    # line (runner.driver.collect.stream_failure): its records stay in the file; a Ray core ERROR still shows.
    assert "a real Ray Data error" not in captured.err
    assert "a library's warning" in captured.err and "a library's warning" in text
    # Put back on exit: native stderr and Ray's loggers as they were.
    os.write(2, b"after the job\n")
    assert "after the job" in capfd.readouterr().err
    assert not logging.getLogger("ray.data").propagate


def test_job_log_routes_ray_data_imported_after_it_opened(tmp_path: Path) -> None:
    """The job imports Ray Data beside Ray's start, after the log opened (JobLog.import_ray_data): Ray Data's
    records still go to the file only, and its logger is put back as Ray Data set it up when the job ends."""
    probe = f"""
import logging, sys
from pathlib import Path
from runner.driver.console import JobLog
with JobLog(Path({str(tmp_path)!r}), verbose=0) as job_log:
    assert "ray.data" not in sys.modules
    job_log.import_ray_data()
    logging.getLogger("ray.data._internal.execution").info("Execution plan of Dataset z")
    logging.getLogger("ray.data").error("a Ray Data error")
logger = logging.getLogger("ray.data")
print(logger.propagate, len(logger.handlers) > 0, file=sys.stderr)
"""
    env = {**os.environ, "PYTHONPATH": pythonpath_with(REPO)}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Execution plan" not in done.stderr and "a Ray Data error" not in done.stderr, done.stderr
    text = (tmp_path / "runner.log").read_text()
    assert "Execution plan of Dataset z" in text and "a Ray Data error" in text
    assert done.stderr.strip().splitlines()[-1] == "False True"  # Ray Data's own handler and propagate=False back


def test_job_log_verbose_shows_ray(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    import ray.data  # noqa: F401

    with JobLog(tmp_path, verbose=1) as job_log:
        logging.getLogger("ray.data._internal.execution").info("Execution plan of Dataset y")
    assert "Execution plan of Dataset y" in capfd.readouterr().err
    assert "Execution plan of Dataset y" in job_log.path.read_text()


# --- the quickstart, as a user runs it ----------------------------------------------------------------

# A line Ray or Ray Data would print: their log format, a C++ log line, or one of their known messages.
RAY_LINE = re.compile(
    r"(\t(INFO|WARNING|ERROR|DEBUG) \w+\.py:\d+ -- )|(^\[\d{4}-\d\d-\d\d [\d:,]+ [EWI] \d+ \d+\])|"
    r"core_worker|Token authentication|ray/data/|streaming_executor|MapBatches|\(ray[.)]"
)


@pytest.mark.slow
def test_quickstart_is_quiet_and_verbose_brings_ray_back(tmp_path: Path) -> None:
    """The README's CPU quickstart prints runner's lines only; with -v Ray's come back (and stay in the log)."""
    env = {**os.environ, "PYTHONPATH": pythonpath_with(REPO)}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([sys.executable, "scripts/make_tiny_checkpoints.py", str(tmp_path / "models")], cwd=REPO,
                   env=env, check=True, capture_output=True)
    command = [sys.executable, "-m", "runner", "embed", "tests/data/some_proteins.fasta", "--model",
               str(tmp_path / "models" / "esm2_tiny.pt"), "--out", str(tmp_path / "emb"), "--gpus", "0"]
    quiet = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.splitlines()
    assert not [line for line in lines if RAY_LINE.search(line)], quiet.stderr
    assert not [line for line in lines if "Warning" in line or "ERROR" in line], quiet.stderr
    log_file = tmp_path / "emb" / "runner.log"
    # What is being done, where the dashboard and the log are: the first lines.
    assert lines[0].startswith("embedding 1 input file(s) with ") and "fp32 on 1 CPU actor(s)" in lines[0]
    assert lines[1].startswith("Ray dashboard: ")
    assert lines[2] == f"log: {log_file} (Ray's and Ray Data's logs; -v shows them here)"
    assert re.search(r"^15 embeddings, 0 rejects", quiet.stderr, re.MULTILINE)
    assert re.search(r"15/15 seqs", quiet.stderr)  # the progress display, as plain lines (not a terminal)
    logged = log_file.read_text()
    assert "Execution plan of Dataset" in logged  # Ray Data's lines went to the log instead
    # The start-up breakdown: printed, and in the manifest with consecutive phases adding up to the total.
    assert re.search(r"^start-up [\d.]+ s to the first embedding: python [\d.]+ s, .*Ray [\d.]+ s, .*"
                     r"actor start [\d.]+ s, weights [\d.]+ s, compile 0.0 s, first batch", quiet.stderr, re.MULTILINE)
    startup = json.loads((tmp_path / "emb" / "manifest.json").read_text())["startup"]
    phases = startup["phases"]
    assert all(value is not None and value >= 0 for value in phases.values()), phases
    consecutive = sum(v for k, v in phases.items() if k not in BESIDE_RAY)
    assert consecutive == pytest.approx(startup["to_first_output_seconds"], abs=0.05)
    assert phases["driver_imports"] > 0  # Ray Data imported beside Ray's start, not before it
    assert set(startup["stream_setup_detail"]) == set(STREAM_SETUP_STEPS)
    assert startup["worker_preload"] == []  # a CPU job: Ray's workers import nothing ahead (ray_session.worker_preload)
    assert len(startup["actors"]) == 1 and startup["compile_cache"] is None  # CPU: eager, nothing compiled

    verbose = subprocess.run([*command[:3], "-v", *command[3:], "--overwrite"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert verbose.returncode == 0, verbose.stderr
    assert [line for line in verbose.stderr.splitlines() if RAY_LINE.search(line)], verbose.stderr
    assert "Execution plan of Dataset" in verbose.stderr
    assert "DeprecationWarning" in verbose.stderr  # Ray's own deprecations, hidden without -v


# --- start-up: the checkpoint hash cache and the manifest's breakdown -----------------------------------


def test_checkpoint_hash_cache_hits_until_the_file_changes(tmp_path: Path) -> None:
    """Hashed once, then remembered while size and mtime hold; a change of either is hashed again."""
    import hashlib

    from runner.driver.cache import cached_sha256

    cache = tmp_path / "cache" / "checkpoint-sha256.json"
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"a" * 1000)
    digest, hit = cached_sha256(weights, cache)
    assert (digest, hit) == (hashlib.sha256(b"a" * 1000).hexdigest(), False)
    assert cached_sha256(weights, cache) == (digest, True)
    # Same size, new content and mtime: a miss, and the new hash.
    weights.write_bytes(b"b" * 1000)
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert cached_sha256(weights, cache) == (hashlib.sha256(b"b" * 1000).hexdigest(), False)
    # Same mtime, new size: a miss too.
    stat = weights.stat()
    weights.write_bytes(b"b" * 1001)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cached_sha256(weights, cache) == (hashlib.sha256(b"b" * 1001).hexdigest(), False)
    # A corrupt cache file is recomputed, not trusted.
    cache.write_text("{not json")
    assert cached_sha256(weights, cache) == (hashlib.sha256(b"b" * 1001).hexdigest(), False)
    assert cached_sha256(weights, cache)[1]


def test_startup_section_and_line() -> None:
    """The breakdown on one timeline: actor phases from the first ready actor's report, durations >= 0."""
    from runner.driver.startup import StartupClock

    clock = StartupClock(command_at=100.0, job_at=101.0)
    clock.seconds.update(checkpoint_read_and_hash=1.5, input_fingerprint=0.2, driver_imports=0.9, build_stream=0.3,
                         resume_scan=0.05)
    clock.marks.update(ray_start_begin=101.1, ray_ready=103.1, stream_started=103.5, first_output=108.0)
    clock.actors = {
        "h:cpu:2": {"init_at": 106.0, "load_seconds": 0.5, "compile_seconds": 0.0, "ready_at": 106.6,
                    "first_batch_done_at": 107.9, "compile_cache": None},
        "h:cpu:1": {"init_at": 105.0, "load_seconds": 0.4, "compile_seconds": 1.0, "ready_at": 106.5,
                    "first_batch_done_at": 107.5, "compile_cache": "/c"},
    }
    section = clock.section()
    assert section["to_first_output_seconds"] == 8.0
    assert section["phases"] == {
        "python_and_imports": 1.0, "inputs_and_checks": 0.1, "ray_start": 2.0, "checkpoint_read_and_hash": 1.5,
        "input_fingerprint": 0.2, "driver_imports": 0.9, "stream_setup": 0.4, "actor_start": 1.5,
        "weights_to_device": 0.5, "compile": 1.0, "first_batch": 1.0, "delivery": 0.5,
    }
    consecutive = [v for k, v in section["phases"].items() if k not in BESIDE_RAY]
    assert sum(consecutive) == pytest.approx(section["to_first_output_seconds"])
    # the steps of stream_setup timed (the others did not run here), within it
    assert section["stream_setup_detail"] == {"resume_scan": 0.05, "build_stream": 0.3}
    assert sum(section["stream_setup_detail"].values()) <= section["phases"]["stream_setup"]
    assert section["compile_cache"] == "/c"
    line = clock.line()
    assert line.startswith("start-up 8.0 s to the first embedding: python 1.0 s, inputs 0.1 s, Ray 2.0 s, ")
    assert line.endswith("(checkpoint 1.5 s, input scan 0.2 s and imports 0.9 s beside Ray's start)")
    clock.seconds.pop("driver_imports")
    assert clock.line().endswith("(checkpoint 1.5 s and input scan 0.2 s beside Ray's start)")
    assert "gpu_memory_read" not in clock.section()["phases"]  # a CPU job, or a token budget given
    clock.seconds["gpu_memory_read"] = 0.7
    assert clock.section()["phases"]["gpu_memory_read"] == 0.7
    assert clock.line().endswith("(checkpoint 1.5 s, input scan 0.2 s and GPU memory 0.7 s beside Ray's start)")
    assert clock.section()["to_first_output_seconds"] == 8.0  # beside Ray's start: not on the critical path


def test_embed_stage_reports_its_startup_once(tiny_esm2_path: Path) -> None:
    """The actor's start-up report rides on the first row of its first embedded output, then never again."""
    import pyarrow as pa

    from runner.driver.collect import collect_startup
    from runner.input.stream import PackSettings, ReadSettings, pack_records, read_blocks
    from runner.models.registry import load_codec
    from runner.output.report import JobReport
    from runner.stages.embed_stage import EmbedStage, StageSettings

    records = next(read_blocks(ReadSettings((str(DATA / "some_proteins.fasta"),), "id", "sequence", 50)))
    packed = pack_records(records, PackSettings(load_codec(str(tiny_esm2_path)), None, "truncate", 128, 2048))
    before = time.time()
    stage = EmbedStage(StageSettings(str(tiny_esm2_path), "fp32", -1, "mean", "cpu"))
    first, second = stage(packed.slice(0, 1)), stage(packed)
    reports = first.column("startup").to_pylist()
    assert reports[0] is not None and reports[1:] == [None] * (len(reports) - 1)
    assert second.column("startup").null_count == second.num_rows
    report = JobReport(out_dir=Path("."))
    collect_startup(pa.concat_tables([first, second]), report)
    (worker, entry), = report.actor_startup.items()
    assert worker == stage.worker
    assert before <= entry["init_at"] <= entry["ready_at"] <= entry["first_batch_done_at"] <= time.time()
    assert entry["load_seconds"] > 0 and entry["compile_seconds"] == 0.0 and entry["compile_cache"] is None


def test_free_gpu_memory_from_nvidia_smi_respects_visible_devices() -> None:
    from runner.driver.budget import parse_nvidia_smi_free

    text = "0, GPU-aaa, 140000\n1, GPU-bbb, 90000\n2, GPU-ccc, 120000\n"
    assert parse_nvidia_smi_free(text, None) == 90000 << 20  # the least free of all
    assert parse_nvidia_smi_free(text, "0,2") == 120000 << 20
    assert parse_nvidia_smi_free(text, "GPU-aaa") == 140000 << 20
    assert parse_nvidia_smi_free(text, "7") is None  # nothing visible matches: probe instead
    assert parse_nvidia_smi_free("[N/A]\n", None) is None


def test_token_budget_probe_only_when_gpus_are_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """All GPUs on the driver's node: nvidia-smi, no Ray task; a GPU on another node: the Ray probe."""
    import runner.driver.cluster
    from runner.driver.budget import auto_token_budget
    from runner.models.base import ModelInfo

    class FakeRay:
        def __init__(self, gpu_nodes: list[str]) -> None:
            self.gpu_nodes, self.probed = gpu_nodes, 0

        def get_runtime_context(self):
            return type("Ctx", (), {"get_node_id": lambda _: "here"})()

        def nodes(self):
            return [{"NodeID": n, "Alive": True, "Resources": {"GPU": 1.0}} for n in self.gpu_nodes] + [
                {"NodeID": "cpu-only", "Alive": True, "Resources": {"CPU": 8.0}}]

        def remote(self, **_):
            def wrap(fn):
                return type("Remote", (), {"remote": lambda _: "ref"})()
            return wrap

        def get(self, ref):
            self.probed += 1
            return 10 << 30

    monkeypatch.setattr(runner.driver.cluster, "nvidia_smi_free_bytes", lambda: 80 << 30)
    info = ModelInfo(name="m", family="esm2", checkpoint="", checkpoint_sha256="", embed_dim=1280, num_layers=33,
                     parameters=650_000_000)
    local = FakeRay(["here"])
    assert runner.driver.cluster.pick_token_budget(True, info, local) == auto_token_budget(80 << 30, info.parameters * 2, 1280)
    assert local.probed == 0
    remote = FakeRay(["here", "other"])
    assert runner.driver.cluster.pick_token_budget(True, info, remote) == auto_token_budget(10 << 30, info.parameters * 2, 1280)
    assert remote.probed == 1
    # the reading taken beside Ray's start (runner.job) is used where every GPU is here, and only there
    read_before = lambda: 40 << 30  # noqa: E731
    assert runner.driver.cluster.pick_token_budget(True, info, local, read_before) == auto_token_budget(
        40 << 30, info.parameters * 2, 1280)
    assert runner.driver.cluster.pick_token_budget(True, info, remote, read_before) == auto_token_budget(
        10 << 30, info.parameters * 2, 1280)


def test_nvidia_gpus_here_reads_the_driver_files_and_cuda_visible_devices(monkeypatch) -> None:
    import glob

    from runner.driver.budget import nvidia_gpus_here

    monkeypatch.setattr(glob, "glob", lambda pattern: ["/proc/driver/nvidia/gpus/0000:17:00.0"]
                        if pattern.startswith("/proc/driver/nvidia") else [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert nvidia_gpus_here()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert nvidia_gpus_here()
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not nvidia_gpus_here()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(glob, "glob", lambda pattern: [])
    assert not nvidia_gpus_here()


@pytest.mark.gpu
def test_compile_cache_makes_the_second_start_faster(tmp_path: Path, tiny_esm2_path: Path) -> None:
    """On a GPU (compiled layers by default): the first run fills RUNNER_CACHE_DIR/torch-compile, the second
    loads from it and compiles faster (run on the GPU machine)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "RUNNER_CACHE_DIR": str(tmp_path / "cache"),
           "TRITON_CACHE_DIR": str(tmp_path / "cache" / "triton")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("RAY_ADDRESS", None)
    startups = []
    for run in ("cold", "warm"):
        out = tmp_path / run
        done = subprocess.run([sys.executable, "-m", "runner", "embed", "tests/data/some_proteins.fasta", "--model",
                               str(tiny_esm2_path), "--out", str(out), "--gpus", "1", "--no-progress"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        startups.append(json.loads((out / "manifest.json").read_text())["startup"])
    cold, warm = startups
    assert cold["compile_cache"] == warm["compile_cache"] == str(tmp_path / "cache" / "torch-compile")
    assert any((tmp_path / "cache" / "torch-compile").iterdir())
    assert warm["phases"]["compile"] < cold["phases"]["compile"], (cold["phases"], warm["phases"])


def test_a_local_ray_that_does_not_start_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from runner.driver.ray_session import connect_ray
    from runner.errors import RunnerError

    def too_slow(**kwargs):
        assert kwargs["address"] == "local"  # never some other cluster found on the machine
        raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", too_slow)
    with pytest.raises(RunnerError, match=r"^could not start a local Ray \(The current node timed out during "
                                          r"startup\. .*\): .*--address$"):
        connect_ray(None)
