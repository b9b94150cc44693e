"""Never lose or duplicate an embedding: resume, signals, actor death, failing records, OOM, disk errors.

Fault-injection tests on CPU. Every end-to-end check compares with one clean run: the same ids, each
exactly once, with the same vector (within 1e-6). Subprocess runs (needed to SIGKILL/SIGTERM a driver)
join this module's local Ray through --address: a killed driver's actors are then cleaned up by the
cluster instead of leaving a private Ray running, and no subprocess pays for starting Ray.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from conftest import pythonpath_with

from runner.cli import cli
from runner.driver.signals import JobInterrupted, StopSignals, _StopNow
from runner.errors import RunnerError
from runner.input.stream import PackSettings, ReadSettings, pack_records, read_blocks
from runner.output.checksums import ChecksummedFile
from runner.output.resume import OrdinalSet, scan_parts
from runner.output.sink import EmbeddedRows, OutputWriteError, PartWriter
from runner.stages.embed_stage import EmbedStage, StageSettings

REPO = Path(__file__).resolve().parents[1]
COUNT = 600  # sequences: 12 blocks / 12 parts of 50, small enough for a 2-core CI
AMINO = list("ACDEFGHIKLMNPQRSTVWY")


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for the module; subprocess drivers join it by address."""
    import ray

    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_esm2_path: Path) -> dict[str, Path]:
    """A generated FASTA of COUNT proteins and a config file: small blocks and parts so parts complete often."""
    base = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(7)
    fasta = base / "in.fasta"
    fasta.write_text("".join(f">s{i}\n{''.join(rng.choice(AMINO, size=int(rng.integers(20, 60))))}\n"
                             for i in range(COUNT)))
    config = base / "job.yaml"
    config.write_text(f"model: {tiny_esm2_path}\ngpus: 0\nrecords_per_block: 50\nrows_per_part: 50\n"
                      "shadow_rate: 0\nprogress: false\n")
    return {"fasta": fasta, "config": config, "base": base}


def embed_args(job: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["embed", str(job["fasta"]), "--config", str(job["config"]), "--out", str(out), *extra]


def invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.output


def read_out(out: Path) -> tuple[list[str], np.ndarray, list[int]]:
    """ids, vectors [N, D] and ordinals of every complete part, in part order."""
    parts = sorted((out / "embeddings").glob("part-*.arrow"))
    table = pa.concat_tables([pa.ipc.open_file(p).read_all() for p in parts])
    dim = table.schema.field("embedding").type.list_size
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return table.column("id").to_pylist(), vectors, table.column("ordinal").to_pylist()


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def baseline(ray_address: str, job: dict[str, Path]) -> dict[str, np.ndarray]:
    """id -> vector of one clean, uninterrupted run."""
    out = job["base"] / "clean"
    code, output = invoke(embed_args(job, out))
    assert code == 0, output
    ids, vectors, _ = read_out(out)
    assert len(ids) == len(set(ids)) == COUNT
    return dict(zip(ids, vectors, strict=True))


def assert_same_as_baseline(out: Path, baseline: dict[str, np.ndarray], missing: set[str] = frozenset()) -> None:
    """Every id exactly once (except `missing`), each with its own clean-run vector; no hidden leftovers."""
    ids, vectors, ordinals = read_out(out)
    assert len(ids) == len(set(ids)), "an id was written twice"
    assert len(ordinals) == len(set(ordinals))
    assert set(ids) == set(baseline) - set(missing)
    for sid, vector, ordinal in zip(ids, vectors, ordinals, strict=True):
        assert int(sid[1:]) == ordinal  # s{i} is record i: the row's ordinal belongs to its id
        np.testing.assert_allclose(vector, baseline[sid], rtol=0, atol=1e-6, err_msg=sid)
    assert not list((out / "embeddings").glob(".*"))
    counts = manifest(out)["counts"]
    assert manifest(out)["status"] == "complete"
    assert counts["rows"] == len(ids)
    assert counts["rows"] + counts["rejects"] == counts["records_read"] == COUNT


def part_names(out: Path) -> set[str]:
    emb = out / "embeddings"
    return {p.name for p in emb.glob("part-*.arrow")} if emb.is_dir() else set()


def start_driver(job: dict[str, Path], out: Path, address: str, delay: float) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=pythonpath_with(REPO), RUNNER_TEST_BATCH_DELAY=str(delay))
    return subprocess.Popen([sys.executable, "-m", "runner", "embed", *embed_args(job, out, "--address", address)[1:]],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_new_part(proc: subprocess.Popen, out: Path, before: set[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if part_names(out) - before:
            return
        if proc.poll() is not None:
            pytest.fail(f"driver exited ({proc.returncode}) before writing a new part:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no new part appeared in time")


# --- end to end ----------------------------------------------------------------------------------------


def test_sigterm_and_sigkill_then_resume(ray_address: str, job: dict[str, Path], baseline: dict,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM -> exit 143 (manifest interrupted, only complete parts), then SIGKILL mid-run, then resume.

    The SIGTERM run is in-process (a thread signals this process once a part is written); SIGINT takes
    the same path with exit 130 (see test_second_signal_stops_at_once). The SIGKILL run is a subprocess.
    """
    out = job["base"] / "interrupted"
    monkeypatch.setenv("RUNNER_TEST_BATCH_DELAY", "0.3")
    # If the run ended before the signal landed, this handler (restored by the run) absorbs it.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        watcher = threading.Thread(target=signal_when_new_part, args=(out, set(), signal.SIGTERM), daemon=True)
        watcher.start()
        code, output = invoke(embed_args(job, out))
        watcher.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143, output
    assert "interrupted by SIGTERM" in output and "rerun the same command to resume" in output
    assert manifest(out)["status"] == "interrupted"
    assert manifest(out)["parts"] == sorted(part_names(out))
    assert not list((out / "embeddings").glob(".*")), "a hidden part was left behind"
    assert 0 < len(part_names(out)) < COUNT // 50, "the run finished before the signal: nothing was tested"

    before = part_names(out)
    proc = start_driver(job, out, ray_address, delay=0.3)
    wait_for_new_part(proc, out, before)
    proc.kill()
    proc.communicate(timeout=60)
    assert manifest(out)["status"] == "running"  # killed: nothing could mark it
    assert len(part_names(out)) < COUNT // 50, "the run finished before SIGKILL: nothing was tested"

    done_before = len(read_out(out)[0])
    monkeypatch.delenv("RUNNER_TEST_BATCH_DELAY")
    code, output = invoke(embed_args(job, out))
    assert code == 0, output
    assert_same_as_baseline(out, baseline)
    m = manifest(out)
    assert m["resume"]["runs"] == 3
    assert m["resume"]["resumed_rows"] == m["counts"]["resumed_rows"] == done_before > 0
    assert m["parts"] == sorted(part_names(out))


def signal_when_new_part(out: Path, before: set[str], sig: signal.Signals, timeout: float = 120) -> None:
    """Send `sig` to this process once a part not in `before` appears (run in a thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not part_names(out) - before:
        time.sleep(0.05)
    os.kill(os.getpid(), sig)


def test_actor_death_failing_records_and_oom(ray_address: str, job: dict[str, Path], baseline: dict,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """One actor process dies mid-run, two records raise in the model, batches over 600 tokens 'OOM'."""
    out = job["base"] / "faults"
    monkeypatch.setenv("RUNNER_TEST_CRASH_AFTER_BATCHES", "3")
    monkeypatch.setenv("RUNNER_TEST_FAIL_IDS", "s5,s321")
    monkeypatch.setenv("RUNNER_TEST_OOM_ABOVE_TOKENS", "600")
    code, output = invoke(embed_args(job, out))
    assert code == 0, output
    assert (out / ".test-actor-crashed").exists()  # the crash really happened
    assert_same_as_baseline(out, baseline, missing={"s5", "s321"})
    rejects = pa.ipc.open_file(out / "rejects.arrow").read_all().to_pydict()
    reasons = dict(zip(rejects["id"], rejects["reason"], strict=True))
    assert set(reasons) == {"s5", "s321"}
    assert all(r.startswith("embedding failed: RuntimeError: test hook") for r in reasons.values())
    assert rejects["source"] == [str(job["fasta"])] * 2
    counts = manifest(out)["counts"]
    assert counts["failed_records"] == 2
    assert counts["oom_splits"] >= 1
    assert counts["actor_restarts"] >= 1
    assert counts["reject_reasons"] == {"embedding_failed": 2}


def test_corrupt_part_and_leftover_tmp_are_redone(ray_address: str, job: dict[str, Path], baseline: dict) -> None:
    out = job["base"] / "corrupt"
    shutil.copytree(job["base"] / "clean", out)
    victim = out / "embeddings" / "part-00003.arrow"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated: no footer
    (out / "embeddings" / ".part-00042.arrow.tmp").write_bytes(b"half a part")
    code, output = invoke(embed_args(job, out))
    assert code == 0, output
    assert_same_as_baseline(out, baseline)
    m = manifest(out)
    assert m["resume"]["redone_parts"] == ["part-00003.arrow"]
    assert m["resume"]["removed_tmp_parts"] == 1
    assert m["counts"]["resumed_rows"] == COUNT - 50
    assert "part-00043.arrow" in m["parts"]  # numbering continues after the highest part seen


def test_complete_rerun_changed_settings_and_overwrite(ray_address: str, job: dict[str, Path], baseline: dict,
                                                       overflow_esm2_path: Path) -> None:
    """A finished job rerun is a no-op; other settings or another model are refused; --overwrite starts over."""
    out = job["base"] / "rerun"
    shutil.copytree(job["base"] / "clean", out)
    parts = part_names(out)
    before = (out / "manifest.json").read_bytes()
    code, output = invoke(embed_args(job, out))  # the same job again: answered from the manifest, nothing runs
    assert code == 0, output
    assert f"already complete: {COUNT:,} embeddings in {out}" in output
    assert part_names(out) == parts
    assert_same_as_baseline(out, baseline)
    assert (out / "manifest.json").read_bytes() == before  # the real run's figures stay
    code, output = invoke(embed_args(job, out, "--layer", "1"))
    assert code == 1
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and "layer 2 -> 1" in lines[0] and "--overwrite" in lines[0], output
    code, output = invoke(embed_args(job, out, "--exact-gelu"))  # another GELU gives other embeddings on GPUs
    assert code == 1 and "exact_gelu False -> True" in output and "--overwrite" in output, output
    code, output = invoke(embed_args(job, out, "--model", str(overflow_esm2_path)))
    assert code == 1 and "a different model checkpoint" in output and "--overwrite" in output, output
    assert part_names(out) == parts
    code, output = invoke(embed_args(job, out, "--layer", "1", "--overwrite"))
    assert code == 0, output
    m = manifest(out)
    assert m["layer"] == 1 and m["resume"]["runs"] == 1 and m["counts"]["resumed_rows"] == 0
    ids, vectors, _ = read_out(out)
    assert sorted(ids) == sorted(baseline)
    assert not np.allclose(vectors[0], baseline[ids[0]])  # really re-embedded at layer 1


def test_broken_model_fails_the_job_instead_of_rejecting_everything(
    ray_address: str, job: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When every window of a batch fails on its own, it is the model/device, not the data: stop, one line."""
    fasta = job["base"] / "three.fasta"
    fasta.write_text(">a\nMKTAYIAKQR\n>b\nMKVLAAGIVG\n>c\nMSTNPKPQRK\n")
    monkeypatch.setenv("RUNNER_TEST_FAIL_IDS", "a,b,c")
    out = job["base"] / "broken"
    code, output = invoke(["embed", str(fasta), "--config", str(job["config"]), "--out", str(out)])
    assert code == 1
    errors = [line for line in output.splitlines() if line.startswith("Error:")]  # Ray logs the remote error too
    assert len(errors) == 1 and "every one of the 3 windows" in errors[0] and "rerun" in errors[0], output
    assert manifest(out)["status"] == "aborted"
    assert not (out / "embeddings").exists() or not part_names(out)


def test_disk_full_mid_job_then_resume(ray_address: str, job: dict[str, Path], baseline: dict,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The 4th part hits ENOSPC: one-line error, no half part visible, status aborted; the rerun completes."""
    out = job["base"] / "diskfull"
    real_init = ChecksummedFile.__init__
    opened = []

    def init(self: ChecksummedFile, path: Path) -> None:  # every part file is written through a ChecksummedFile
        real_init(self, path)
        if "part-" in str(path):
            opened.append(path)
            if len(opened) == 4:
                self._file.close()
                self._file = FullDisk(str(path), limit=2000)

    with monkeypatch.context() as patch:
        patch.setattr(ChecksummedFile, "__init__", init)
        code, output = invoke(embed_args(job, out))
    assert code == 1
    errors = [line for line in output.splitlines() if line.startswith("Error:")]  # Ray may log actor shutdown
    assert len(errors) == 1 and "No space left on device" in errors[0] and "resume" in errors[0], output
    assert "Traceback" not in output
    assert part_names(out) == {f"part-0000{i}.arrow" for i in range(3)}
    assert not list((out / "embeddings").glob(".*"))
    assert manifest(out)["status"] == "aborted"
    code, output = invoke(embed_args(job, out))
    assert code == 0, output
    assert_same_as_baseline(out, baseline)


class FullDisk(io.RawIOBase):
    """A file that raises ENOSPC once `limit` bytes are written."""

    def __init__(self, path: str, limit: int) -> None:
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._left = limit

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self._left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._fh.write(data)

    def fileno(self) -> int:
        return self._fh.fileno()

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        super().close()  # flushes first
        self._fh.close()


# --- units (no Ray) ------------------------------------------------------------------------------------


def test_ordinal_set_and_read_task_skip_done(job: dict[str, Path]) -> None:
    done = OrdinalSet()
    done.add(np.array([3, 0, 17, 3, 599]))
    assert done.count == 4 and done.nbytes >= 75
    assert done.contains(np.array([0, 1, 3, 17, 599, 600, 10**9])).tolist() == [True, False, True, True, True,
                                                                                False, False]
    assert OrdinalSet(done.bits).count == 4
    settings = ReadSettings((str(job["fasta"]),), "id", "sequence", 50, done.bits)
    blocks = list(read_blocks(settings))
    table = pa.concat_tables(blocks)
    assert table.num_rows == COUNT  # done records are still read and counted
    flags = dict(zip(table.column("ordinal").to_pylist(), table.column("done").to_pylist(), strict=True))
    assert {o for o, d in flags.items() if d} == {0, 3, 17, 599}
    assert table.filter(table.column("done")).column("sequence").null_count == 4  # their text is not shipped


def test_embed_stage_isolates_failing_window_and_survives_oom(tiny_esm2_path: Path, job: dict[str, Path]) -> None:
    from runner.models.registry import load_codec

    records = next(read_blocks(ReadSettings((str(job["fasta"]),), "id", "sequence", 50)))
    packed = pack_records(records, PackSettings(load_codec(str(tiny_esm2_path)), None, "truncate", 128, 4096))
    clean = StageSettings(str(tiny_esm2_path), "fp32", -1, "mean", "cpu")
    expected = EmbedStage(clean)(packed)
    expected = expected.filter(expected.column("id").is_valid())  # drop the block's record-count row
    stage = EmbedStage(StageSettings(str(tiny_esm2_path), "fp32", -1, "mean", "cpu", test_fail_ids=("s7",),
                                     test_oom_above_tokens=700))
    got = stage(packed)
    assert stage.oom_splits >= 1 and 0 < stage.max_tokens <= 700
    assert int(pa.compute.sum(got.column("oom_splits")).as_py()) == stage.oom_splits
    windows = got.filter(got.column("id").is_valid())
    reasons = dict(zip(windows.column("id").to_pylist(), windows.column("reject_reason").to_pylist(), strict=True))
    assert reasons.pop("s7").startswith("embedding failed: RuntimeError: test hook: injected failure for s7")
    assert set(reasons.values()) == {None}
    dim = expected.schema.field("embedding").type.list_size
    want = dict(zip(expected.column("id").to_pylist(),
                    expected.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim), strict=True))
    ok = windows.filter(windows.column("reject_reason").is_null())
    vectors = ok.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    for sid, vector in zip(ok.column("id").to_pylist(), vectors, strict=True):
        np.testing.assert_allclose(vector, want[sid], rtol=0, atol=1e-6)
    # A batch whose every window fails is a broken model/device, not bad data: it raises.
    broken = EmbedStage(StageSettings(str(tiny_esm2_path), "fp32", -1, "mean", "cpu",
                                      test_fail_ids=tuple(f"s{i}" for i in range(COUNT))))
    with pytest.raises(RuntimeError, match="every one of the"):
        broken(packed)


def test_part_writer_disk_full_leaves_no_visible_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = PartWriter(tmp_path, embed_dim=4, rows_per_part=5)

    def rows(start: int, end: int) -> EmbeddedRows:
        n = end - start
        return EmbeddedRows([f"s{i}" for i in range(start, end)], np.full(n, 3, np.int32), np.zeros(n, bool),
                            np.ones((n, 4), np.float32), np.arange(start, end, dtype=np.int64))

    writer.write(rows(0, 5))
    real_init = ChecksummedFile.__init__

    def init(self: ChecksummedFile, path: Path) -> None:
        real_init(self, path)
        self._file.close()
        self._file = FullDisk(str(path), 600)

    monkeypatch.setattr(ChecksummedFile, "__init__", init)
    with pytest.raises(OutputWriteError, match="No space left on device.*rerun the same command") as err:
        writer.write(rows(5, 12))
    assert "\n" not in str(err.value) and isinstance(err.value, RunnerError)
    assert sorted(p.name for p in (tmp_path / "embeddings").iterdir()) == ["part-00000.arrow"]
    state = scan_parts(tmp_path, embed_dim=4)
    assert state.rows == 5 and state.parts == ["part-00000.arrow"] and state.next_part == 1


def test_second_signal_stops_at_once(tmp_path: Path) -> None:
    assert JobInterrupted.after(signal.SIGINT, tmp_path, 2, hard=False).exit_code == 130
    assert JobInterrupted.after(signal.SIGTERM, tmp_path, 2, hard=True).exit_code == 143
    signals = StopSignals()
    signals._handle(signal.SIGINT, None)  # first: only a request, the driver finishes what it holds
    assert signals.signum == signal.SIGINT
    with pytest.raises(_StopNow) as stop:
        signals._handle(signal.SIGINT, None)
    assert stop.value.hard
    waiting = StopSignals(waiting=True)
    with pytest.raises(_StopNow) as stop:  # blocked on the stream: leave the wait, gracefully
        waiting._handle(signal.SIGTERM, None)
    assert not stop.value.hard and waiting.signum == signal.SIGTERM
