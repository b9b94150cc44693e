"""Hardening (issue 19): failures inside the stream end as one line, checks before start-up, honest records,
corruption detected. Unit tests run without Ray; the end-to-end ones share one local Ray for the module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from runner.cli import cli
from runner.collect import drain, stream_failure
from runner.config import EmbedConfig
from runner.errors import NonFiniteEmbedding, RunnerError
from runner.metrics import DriverMetrics
from runner.progress import Progress
from runner.report import JobReport
from runner.resume import scan_parts
from runner.sink import PartWriter, RejectWriter

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def remote_error(cause: BaseException, function_name: str = "ReadInputRecords") -> BaseException:
    """What Ray raises on the driver for an exception inside a task: a RayTaskError that is also the cause's type."""
    from ray.exceptions import RayTaskError

    text = f"ray::{function_name}() (pid=1, ip=127.0.0.1)\n  File \"x.py\", line 1\n{type(cause).__module__}." \
           f"{type(cause).__name__}: {cause}"
    return RayTaskError(function_name, text, cause).as_instanceof_cause()


class FailingStream:
    """A dataset whose stream raises `error` after yielding nothing."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def iter_batches(self, **_: object):
        raise self.error
        yield  # pragma: no cover - makes this a generator


# --- errors inside the stream ------------------------------------------------------------------------


def test_stream_failure_keeps_a_remote_runner_error_as_one_line() -> None:
    error = remote_error(RunnerError("in.csv line 3,002: 3 fields where the header has 2: fix or remove that line"))
    assert isinstance(error, RunnerError)  # Ray's dual class: this is what an `except RunnerError` used to catch
    message = str(stream_failure(error))
    assert message == "in.csv line 3,002: 3 fields where the header has 2: fix or remove that line"
    nonfinite = stream_failure(remote_error(NonFiniteEmbedding("NaN for s1"), "EmbedStage"))
    assert nonfinite.exit_code == 3 and "\n" not in str(nonfinite)


def test_stream_failure_names_the_stage_of_any_other_exception() -> None:
    message = str(stream_failure(remote_error(KeyError("tokens"), "MapBatches(pack_records)")))
    assert "\n" not in message and "tokenizing and packing" in message and "KeyError" in message
    assert "rerun the same command to resume" in message
    message = str(stream_failure(remote_error(ZeroDivisionError("division by zero"), "MapWorker(EmbedStage).__call__")))
    assert "an embedding actor" in message and "ZeroDivisionError: division by zero" in message


def test_drain_turns_a_remote_runner_error_into_one_line(tmp_path: Path) -> None:
    """The RayTaskError(RunnerError) of a task is a RunnerError too: it must not escape with Ray's traceback text."""
    error = remote_error(RunnerError("in.csv line 9: undecodable text: fix or remove that line"))
    writer, rejects = PartWriter(tmp_path, 4, 10), RejectWriter(tmp_path)
    config = EmbedConfig(inputs=["x"], model="m", out=str(tmp_path))
    with pytest.raises(RunnerError) as info:
        drain(FailingStream(error), writer, rejects, JobReport(tmp_path), Progress([], False), config, "fp32", None,
              DriverMetrics("m", "fp32"))
    assert str(info.value) == "in.csv line 9: undecodable text: fix or remove that line"
    assert "ray::" not in str(info.value)


# --- end to end through a local Ray -----------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the end-to-end tests: `runner embed` reuses a Ray this process already started."""
    import ray

    # address="local": a new Ray of our own even when other Ray instances run on this machine
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20)
    yield
    ray.shutdown()


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def proteins_csv(path: Path, count: int, seed: int = 0, bad_line_after: int | None = None) -> Path:
    rng = np.random.default_rng(seed)
    lines = ["id,sequence"]
    for i in range(count):
        if i == bad_line_after:
            lines.append("x,y,z")
        lines.append(f"s{i},{''.join(rng.choice(list(AMINO), size=int(rng.integers(20, 50))))}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_csv_row_mid_stream_is_one_line_and_aborts_with_the_reason(
    local_ray: None, tmp_path: Path, tiny_esm2_path: Path
) -> None:
    csv = proteins_csv(tmp_path / "in.csv", 3000, bad_line_after=2900)
    out = tmp_path / "out"
    code, output = invoke("embed", str(csv), "--model", str(tiny_esm2_path), "--out", str(out), "--gpus", "0",
                          "--shadow-rate", "0", "--no-progress", "--rows-per-part", "200")
    assert code == 1
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in output and "ray::" not in output, output
    assert lines[0].startswith("Error: ") and "in.csv line 2,902: 3 fields where the header has 2" in lines[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "aborted"
    assert manifest["error"] == lines[0].removeprefix("Error: ")
    state = scan_parts(out, manifest["model"]["embed_dim"])
    assert state.redone_parts == [] and state.rows == manifest["counts"]["rows"]  # what was written is whole
