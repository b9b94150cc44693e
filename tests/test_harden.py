"""Hardening (issue 19): failures inside the stream end as one line, checks before start-up, honest records,
corruption detected. Unit tests run without Ray; the end-to-end ones share one local Ray for the module."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import invoke

from runner.config import EmbedConfig
from runner.driver.collect import drain, stream_failure
from runner.driver.metrics import DriverMetrics
from runner.driver.progress import Progress
from runner.errors import NonFiniteEmbedding, RunnerError
from runner.output.report import JobReport
from runner.output.resume import scan_parts
from runner.output.sink import PartWriter, RejectWriter

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


# --- checks before start-up (no Ray: each of these must fail before it starts) ------------------------


@pytest.fixture()
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the job gets as far as connecting to Ray."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the job connected to Ray: this check should have failed before start-up")

    monkeypatch.setattr("runner.driver.engine.connect_ray", refuse)


def one_line_error(*args: str) -> str:
    code, output = invoke(*args)
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


def few_proteins(tmp_path: Path) -> str:
    path = tmp_path / "p.fasta"
    path.write_text(">a\nMKVLAAGG\n>b\nMKKLLV\n")
    return str(path)


def test_layer_out_of_range_fails_before_start_up(no_ray: None, tmp_path: Path, tiny_esm2_path: Path) -> None:
    line = one_line_error("embed", few_proteins(tmp_path), "--model", str(tiny_esm2_path), "--out",
                          str(tmp_path / "o"), "--gpus", "0", "--layer", "5")
    assert "layer 5 (--layer/--layers) is out of range" in line and "to 2 (the last)" in line
    assert not (tmp_path / "o").exists()  # nothing written, so nothing can lock --out


def test_chunk_overlap_against_the_models_own_window(no_ray: None, tmp_path: Path, tiny_esm2_path: Path) -> None:
    line = one_line_error("embed", few_proteins(tmp_path), "--model", str(tiny_esm2_path), "--out",
                          str(tmp_path / "o"), "--gpus", "0", "--long", "chunk", "--chunk-overlap", "1022")
    assert "--chunk-overlap 1022 must be smaller than the model's window" in line and "1022 residues" in line
    line = one_line_error("embed", few_proteins(tmp_path), "--model", str(tiny_esm2_path), "--out",
                          str(tmp_path / "o"), "--gpus", "0", "--long", "chunk", "--max-residues", "100")
    assert "--chunk-overlap 128 must be smaller than --max-residues, 100 residues" in line


def test_checkpoint_with_wrong_missing_or_extra_weights_fails_before_start_up(
    no_ray: None, tmp_path: Path, tiny_esm2_path: Path
) -> None:
    import torch

    from runner.models.checkpoints import load_fair_esm_checkpoint

    data = load_fair_esm_checkpoint(tiny_esm2_path)
    name = next(k for k in data["model"] if k.endswith("layers.0.fc1.weight"))
    variants = {
        "shape": (lambda m: m.__setitem__(name, torch.zeros(3, 3)), r"fc1\.weight is \(3, 3\) but should be"),
        "missing": (lambda m: m.pop(name), r"lacks 1 weight\(s\).*fc1\.weight"),
        "extra": (lambda m: m.__setitem__("encoder.head.extra", torch.zeros(2)), r"has no place for: head\.extra"),
    }
    for label, (change, expected) in variants.items():
        broken = {**data, "model": dict(data["model"])}
        change(broken["model"])
        path = tmp_path / f"{label}.pt"
        torch.save(broken, path)
        line = one_line_error("embed", few_proteins(tmp_path), "--model", str(path), "--out",
                              str(tmp_path / "o"), "--gpus", "0")
        assert re.search(expected, line), line


def test_hf_directory_problems_are_named(no_ray: None, tmp_path: Path, tiny_dnabert_dir: Path) -> None:
    import shutil

    empty = tmp_path / "not_a_model"
    empty.mkdir()
    line = one_line_error("embed", few_proteins(tmp_path), "--model", str(empty), "--out", str(tmp_path / "o"),
                          "--gpus", "0")
    assert "has no config.json" in line and "not found" not in line
    no_tokenizer = tmp_path / "no_tok"
    shutil.copytree(tiny_dnabert_dir, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    line = one_line_error("embed", few_proteins(tmp_path), "--model", str(no_tokenizer), "--out",
                          str(tmp_path / "o"), "--gpus", "0")
    assert "has no tokenizer.json" in line


def _reshape_one_safetensors_weight(directory: Path, suffix: str) -> str:
    """Rewrite one weight (its name ends with `suffix`) of a directory's model.safetensors to a wrong shape."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    state = load_file(str(path))
    name = next(k for k in state if k.endswith(suffix))
    state[name] = state[name][:-1].contiguous()  # one row short
    save_file(state, str(path))
    return name


def test_preflight_of_transformers_esm2_and_esm_c_names_a_wrong_shape(
    tmp_path: Path, tiny_hf_esm2_dir: Path, tiny_esmc: tuple[Path, Path]
) -> None:
    import shutil

    from runner.models.registry import preflight

    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_esm2_dir, hf)
    assert preflight(str(hf)).num_layers >= 1  # a sound one passes
    name = _reshape_one_safetensors_weight(hf, "intermediate.dense.weight")
    with pytest.raises(RunnerError, match="wrong shape") as info:
        preflight(str(hf))
    assert name.removeprefix("esm.") in str(info.value)
    esmc_dir = tmp_path / "esmc"
    shutil.copytree(tiny_esmc[0], esmc_dir)
    assert preflight(str(esmc_dir)).family == "esmc"
    _reshape_one_safetensors_weight(esmc_dir, "weight")
    with pytest.raises(RunnerError, match="wrongly shaped"):
        preflight(str(esmc_dir))


class NotATensor:
    """A class torch's safe loader refuses to unpickle."""


def test_safe_loader_refusals_never_suggest_weights_only_false(tmp_path: Path, tiny_dnabert_dir: Path) -> None:
    import shutil

    import torch

    from runner.models.dnabert import dnabert_preflight
    from runner.models.esm2 import esm2_preflight

    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "cfg": NotATensor()}, evil)
    with pytest.raises(RunnerError) as info:
        esm2_preflight(str(evil))
    assert "NotATensor" in str(info.value) and "weights_only" not in str(info.value)
    hf = tmp_path / "hf"
    shutil.copytree(tiny_dnabert_dir, hf)
    (hf / "model.safetensors").unlink()
    torch.save({"w": NotATensor()}, hf / "pytorch_model.bin")
    with pytest.raises(RunnerError) as info:
        dnabert_preflight(str(hf))
    assert "refused by the safe loader" in str(info.value) and "weights_only" not in str(info.value)


@pytest.mark.parametrize(
    "text, parsed",
    [("strict: 'false'\n", {"strict": False}), ("strict: 'yes'\n", {"strict": True}), ("strict: off\n", {"strict": False}),
     ("layer: '3'\n", {"layer": 3}), ("shadow-rate: '0.5'\n", {"shadow_rate": 0.5}), ("inputs: a.fa\n", {"inputs": ["a.fa"]})],
)
def test_config_values_are_parsed_like_flags(tmp_path: Path, text: str, parsed: dict) -> None:
    from runner.config import load_config_file

    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert load_config_file(path) == parsed


@pytest.mark.parametrize(
    "text, message",
    [("layer: two\n", "layer: 'two' is not a whole number"), ("shadow_rate: lots\n", "shadow_rate: 'lots' is not a number"),
     ("strict: maybe\n", "strict: 'maybe' is not a boolean"), ("long: wrap\n", "long: 'wrap' is not one of truncate"),
     ("rows_per_part: 0\n", "rows_per_part, records_per_block and cpu_actors must be at least 1"),
     ("shadow_rate: 2\n", "--shadow-rate must be between 0 and 1")],
)
def test_bad_config_values_are_one_line(no_ray: None, tmp_path: Path, tiny_esm2_path: Path, text: str,
                                        message: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    line = one_line_error("embed", few_proteins(tmp_path), "--model", str(tiny_esm2_path), "--out",
                          str(tmp_path / "o"), "--gpus", "0", "--config", str(config))
    assert message in line


def test_a_run_that_wrote_no_row_does_not_lock_out(tmp_path: Path) -> None:
    from runner.output.resume import prepare_resume

    out = tmp_path / "o"
    (out / "embeddings").mkdir(parents=True)
    old = {"settings": {"layer": 5}, "model": {"family": "esm2"}, "inputs": []}
    (out / "manifest.json").write_text(json.dumps({"status": "aborted", "fingerprint": old}))
    (out / "rejects.arrow").write_bytes(b"")
    state = prepare_resume(out, {**old, "settings": {"layer": 2}}, 4, overwrite=False)
    assert state.rows == 0 and not (out / "manifest.json").exists()
    # with a part written, a different run is still refused
    (out / "manifest.json").write_text(json.dumps({"status": "aborted", "fingerprint": old}))
    (out / "embeddings").mkdir(exist_ok=True)
    (out / "embeddings" / "part-00000.arrow").write_bytes(b"x")
    with pytest.raises(RunnerError, match="layer 5 -> 2"):
        prepare_resume(out, {**old, "settings": {"layer": 2}}, 4, overwrite=False)


# --- end to end without Ray: the real stages run in-process (--engine in-process) -------------------------


@pytest.fixture()
def in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs run by runner's in-process engine (runner.driver.in_process): the real stages, no Ray at all."""
    monkeypatch.setenv("RUNNER_ENGINE", "in-process")
    monkeypatch.setattr("runner.driver.engine.connect_ray", lambda *_: (_ for _ in ()).throw(AssertionError("Ray started")))


def proteins_fasta(path: Path, count: int, seed: int = 3, longest: int = 300) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text("".join(f">p{i}\n{''.join(rng.choice(list(AMINO), size=int(rng.integers(20, longest))))}\n"
                            for i in range(count)))
    return path


def test_in_process_job_records_windows_rejects_checksums_and_a_raised_budget(
    in_process: None, tmp_path: Path, tiny_esm2_path: Path
) -> None:
    from runner.output.verify import verify_dir

    fasta = proteins_fasta(tmp_path / "in.fasta", 30, longest=190)  # one window each, but for "long"
    fasta.write_text(fasta.read_text() + ">bad\nMK1J\n>p3\nMKV\n" + ">long\n" + "M" * 450 + "\n")
    out = tmp_path / "out"
    args = ["embed", str(fasta), "--model", str(tiny_esm2_path), "--out", str(out), "--gpus", "0", "--no-progress",
            "--shadow-rate", "0", "--max-residues", "200", "--token-budget", "100", "--rows-per-part", "8",
            "--long", "chunk", "--chunk-overlap", "20"]
    code, output = invoke(*args)
    assert code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["error"] is None
    assert manifest["token_budget"] == 202 and manifest["token_budget_requested"] == 100
    assert 0 < manifest["throughput"]["packing_efficiency"] <= 1
    assert manifest["max_residues"] == 200 and manifest["layer"] == 2
    assert manifest["counts"]["reject_reasons"] == {"invalid_characters": 1, "duplicate_id": 1}
    rejects = pa.ipc.open_file(out / "rejects.arrow").read_all().to_pydict()
    assert sorted(zip(rejects["id"], rejects["ordinal"], rejects["code"], strict=True)) == [
        ("bad", 30, "invalid_characters"), ("p3", 31, "duplicate_id")]
    table = pa.concat_tables(pa.ipc.open_file(p).read_all() for p in sorted((out / "embeddings").glob("part-*")))
    windows = dict(zip(table.column("id").to_pylist(), table.column("windows").to_pylist(), strict=True))
    assert windows["long"] == 3 and {w for i, w in windows.items() if i != "long"} == {1}  # 450 = 3 windows of 200
    assert set(manifest["checksums"]) == {f"embeddings/{p}" for p in manifest["parts"]}
    assert verify_dir(out).ok, verify_dir(out).problems


def check_nothing_to_embed_is_not_success(tmp_path: Path, tiny_esm2_path: Path) -> None:
    """An empty input exits 1 naming the file; an input whose every record is rejected exits 5 naming the
    reasons, its manifest 'aborted'. The same with and without Ray: the in-process and the Ray test call it."""
    empty = tmp_path / "empty.fasta"
    empty.write_text("\n")
    code, output = invoke("embed", str(empty), "--model", str(tiny_esm2_path), "--out", str(tmp_path / "e"),
                          "--gpus", "0", "--no-progress", "--shadow-rate", "0")
    assert code == 1 and "no records read from" in output and "empty.fasta" in output, output
    bad = tmp_path / "bad.fasta"
    bad.write_text(">a\nMK1\n>b\n\n>a\nMKV\n")
    code, output = invoke("embed", str(bad), "--model", str(tiny_esm2_path), "--out", str(tmp_path / "b"),
                          "--gpus", "0", "--no-progress", "--shadow-rate", "0")
    assert code == 5, output
    assert "nothing embedded: all 3 record(s) were rejected" in output
    assert "invalid_characters" in output and "empty_sequence" in output and "duplicate_id" in output
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["status"] == "aborted"


def test_in_process_nothing_to_embed_is_not_success(in_process: None, tmp_path: Path, tiny_esm2_path: Path) -> None:
    check_nothing_to_embed_is_not_success(tmp_path, tiny_esm2_path)


def test_in_process_complete_rerun_answers_without_running(
    in_process: None, tmp_path: Path, tiny_esm2_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fasta = proteins_fasta(tmp_path / "in.fasta", 20)
    out = tmp_path / "out"
    args = ["embed", str(fasta), "--model", str(tiny_esm2_path), "--out", str(out), "--gpus", "0", "--no-progress",
            "--shadow-rate", "0", "--rows-per-part", "8"]
    assert invoke(*args)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setattr("runner.job.InProcessStream", lambda *_: (_ for _ in ()).throw(AssertionError("ran again")))
    code, output = invoke(*args)
    assert code == 0 and f"already complete: 20 embeddings in {out}" in output, output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing rewritten
    # a changed setting is a different job: refused as before (the fast path only answers the same job)
    code, output = invoke(*args, "--layer", "1")
    assert code == 1 and "layer 2 -> 1" in output, output


def test_in_process_stream_error_aborts_with_the_reason(in_process: None, tmp_path: Path,
                                                        tiny_esm2_path: Path) -> None:
    csv = tmp_path / "in.csv"
    lines = ["id,sequence"] + [f"s{i},MKVLAAGGKK" for i in range(3000)]
    lines.insert(2901, "x,y,z")  # index 2901 is line 2,902 (the header is line 1)
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code, output = invoke("embed", str(csv), "--model", str(tiny_esm2_path), "--out", str(out), "--gpus", "0",
                          "--no-progress", "--shadow-rate", "0", "--rows-per-part", "500")
    assert code == 1
    assert output.splitlines()[-1].startswith("Error: ") and "in.csv line 2,902: 3 fields" in output, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "aborted" and "in.csv line 2,902" in manifest["error"]
    assert scan_parts(out, 64).redone_parts == []


# --- end to end through a local Ray -----------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the end-to-end tests: `runner embed` reuses a Ray this process already started."""
    import ray

    # address="local": a new Ray of our own even when other Ray instances run on this machine
    for attempt in range(6):  # a loaded 2-core machine can miss Ray's fixed start-up deadlines
        try:
            ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False,
                     object_store_memory=300 * 2**20)
            break
        except Exception:  # Ray raises a bare Exception when its node times out during start-up
            ray.shutdown()
            if attempt == 5:
                raise
    yield
    ray.shutdown()


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
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line or "ray::" in line]
    # the job's own start-up lines (what runs, the log file) and then ONE error line, nothing of Ray's tracebacks
    assert errors == [lines[-1]] and len(lines) <= 5, output
    assert lines[-1].startswith("Error: ") and "in.csv line 2,902: 3 fields where the header has 2" in lines[-1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "aborted"
    assert manifest["error"] == lines[-1].removeprefix("Error: ")
    assert "Traceback" in (out / "runner.log").read_text()  # the full story is in the job's log
    state = scan_parts(out, manifest["model"]["embed_dim"])
    assert state.redone_parts == [] and state.rows == manifest["counts"]["rows"]  # what was written is whole


def test_honest_records_and_a_complete_rerun_without_ray(
    local_ray: None, tmp_path: Path, tiny_esm2_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fasta = tmp_path / "in.fasta"
    rng = np.random.default_rng(3)
    body = [f">p{i}\n{''.join(rng.choice(list(AMINO), size=int(rng.integers(20, 300))))}\n" for i in range(40)]
    body.insert(5, ">bad\nMK1J\n")
    fasta.write_text("".join(body))
    out = tmp_path / "out"
    args = ["embed", str(fasta), "--model", str(tiny_esm2_path), "--out", str(out), "--gpus", "0", "--no-progress",
            "--shadow-rate", "0.3", "--max-residues", "200", "--token-budget", "100", "--rows-per-part", "16"]
    code, output = invoke(*args)
    assert code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    # a budget below the longest window (200 residues + BOS/EOS) is raised to it, and both are recorded
    assert manifest["token_budget"] == 202 and manifest["token_budget_requested"] == 100
    assert 0 < manifest["throughput"]["packing_efficiency"] <= 1
    assert manifest["max_residues"] == 200 and manifest["layer"] == 2
    rejects = pa.ipc.open_file(out / "rejects.arrow").read_all().to_pydict()
    assert rejects["id"] == ["bad"] and rejects["ordinal"] == [5] and rejects["code"] == ["invalid_characters"]
    assert manifest["counts"]["reject_reasons"] == {"invalid_characters": 1}
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert "drift.arrow" in before

    # the same command again: answered from the manifest, without Ray, and nothing is rewritten
    monkeypatch.setattr("runner.driver.engine.connect_ray", lambda *_: (_ for _ in ()).throw(AssertionError("Ray started")))
    code, output = invoke(*args)
    assert code == 0, output
    assert f"already complete: 40 embeddings in {out}" in output
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert after == before  # manifest figures and drift files as the real run left them (no drift.run-1)

    # a part gone: the rerun is a real run again (it resumes and redoes that part)
    monkeypatch.undo()
    first = sorted((out / "embeddings").glob("part-*.arrow"))[0]
    first.unlink()
    code, output = invoke(*args)
    assert code == 0 and "already complete" not in output, output
    assert json.loads((out / "manifest.json").read_text())["counts"]["rows"] == 40


def test_nothing_to_embed_is_not_success(local_ray: None, tmp_path: Path, tiny_esm2_path: Path) -> None:
    check_nothing_to_embed_is_not_success(tmp_path, tiny_esm2_path)


# --- parts reach disk as the job goes ------------------------------------------------------------------


def test_a_part_is_closed_once_its_first_row_waited_part_seconds(tmp_path: Path) -> None:
    import time

    from runner.output.sink import EmbeddedRows

    def rows(start: int, n: int) -> EmbeddedRows:
        return EmbeddedRows([f"s{i}" for i in range(start, start + n)], np.full(n, 5, np.int32), np.zeros(n, bool),
                            np.ones((n, 4), np.float32), np.arange(start, start + n, dtype=np.int64))

    writer = PartWriter(tmp_path, 4, rows_per_part=1000, part_seconds=0.5)
    writer.write(rows(0, 3))
    parts = tmp_path / "embeddings"
    assert not list(parts.glob("part-*.arrow"))  # far from full, and young
    deadline = time.monotonic() + 5
    while not list(parts.glob("part-*.arrow")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p.name for p in parts.glob("part-*.arrow")] == ["part-00000.arrow"]
    assert writer.rows_written == 3
    writer.write(rows(3, 2))  # the next rows open the next part
    writer.close()
    assert writer.parts == ["part-00000.arrow", "part-00001.arrow"]
    assert scan_parts(tmp_path, 4).rows == 5


def test_each_embedded_block_reaches_the_driver_as_it_is_done(tmp_path: Path, tiny_esm2_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Data hands the driver an embedding task's rows when its block is done, not when more blocks are done
    behind it: iter_batches' prefetch held each block until 4 more had arrived, so a one-GPU job of four blocks got
    its first rows with its last (a 12,000-protein job on an H200: 13.5-17 s after the first batch was embedded)."""
    rng = np.random.default_rng(1)
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">p{i}\n{''.join(rng.choice(list('ACDEFGHIKLMNPQRSTVWY'), 40))}\n" for i in range(400)))
    monkeypatch.setenv("RUNNER_TEST_BATCH_DELAY", "0.4")  # each block (100 records, 3 batches) takes >= 1.2 s
    out = tmp_path / "out"
    code, output = invoke("embed", str(fasta), "--model", str(tiny_esm2_path), "--out", str(out), "--gpus", "0",
                          "--shadow-rate", "0", "--token-budget", "2048", "--engine", "ray")
    assert code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    first_output = manifest["startup"]["command_started"] + manifest["startup"]["to_first_output_seconds"]
    last_batch = manifest["ending"]["last_batch_done"]
    assert manifest["counts"]["rows"] == 400 and manifest["throughput"]["batches"] >= 12
    # Three of the four blocks (>= 3.6 s of batches) were still to come when the first one's rows arrived.
    assert last_batch - first_output >= 2.0, (first_output, last_batch)


# --- corruption detected ---------------------------------------------------------------------------------


def small_output(out: Path, rows_per_part: int = 4, count: int = 10, dup_ordinal: int | None = None) -> dict:
    """An output directory written by the real writers (parts, rejects) with a matching manifest."""
    from runner.input.batch import Reject
    from runner.output.sink import EmbeddedRows

    writer = PartWriter(out, 4, rows_per_part)
    ordinals = np.arange(count, dtype=np.int64)
    if dup_ordinal is not None:
        ordinals[-1] = dup_ordinal
    rng = np.random.default_rng(0)
    writer.write(EmbeddedRows([f"s{i}" for i in range(count)], np.full(count, 7, np.int32), np.zeros(count, bool),
                              rng.standard_normal((count, 4)).astype(np.float32), ordinals))
    writer.close()
    rejects = RejectWriter(out)
    rejects.write([Reject("bad", "x.fa", "empty sequence", count)])
    rejects.close()
    manifest = {"status": "complete", "parts": writer.parts, "fingerprint": {},
                "counts": {"rows": count, "rejects": 1, "records_read": count + 1}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_verify_passes_a_sound_output_and_names_each_problem(tmp_path: Path) -> None:
    from runner.output.verify import verify_dir

    out = tmp_path / "ok"
    small_output(out)
    report = verify_dir(out)
    assert report.ok and report.parts == 3 and report.rows == 10 and report.rejects == 1, report.problems
    code, output = invoke("verify", str(out))
    assert code == 0 and "ok: " in output and "3 parts, 10 rows, 1 rejects" in output

    # 100 bytes overwritten inside a complete part (in the vectors: the Arrow structure stays valid)
    part = out / "embeddings" / "part-00001.arrow"
    data = bytearray(part.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 100] = b"\xff" * 100
    part.write_bytes(bytes(data))
    code, output = invoke("verify", str(out))
    assert code == 6, output
    assert "problem: " in output and "part-00001.arrow: checksum mismatch" in output

    dup = tmp_path / "dup"
    small_output(dup, dup_ordinal=2)  # the last row claims an input already stored
    problems = verify_dir(dup).problems
    assert any("already in another part" in p for p in problems), problems

    gone = tmp_path / "gone"
    small_output(gone)
    (gone / "embeddings" / "part-00002.arrow").unlink()
    problems = verify_dir(gone).problems
    assert any("part-00002.arrow: listed in the manifest but missing" in p for p in problems)
    assert any("the parts hold 8 rows, the manifest says 10" in p for p in problems)


def test_resume_deletes_a_part_whose_checksum_fails(tmp_path: Path) -> None:
    from runner.output.checksums import read_records

    out = tmp_path / "o"
    small_output(out)
    part = out / "embeddings" / "part-00000.arrow"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit flipped in a stored value
    part.write_bytes(bytes(data))
    state = scan_parts(out, 4)
    assert state.redone_parts == ["part-00000.arrow"] and not part.exists()
    assert state.rows == 6 and state.parts == ["part-00001.arrow", "part-00002.arrow"]
    assert "embeddings/part-00000.arrow" not in read_records(out)  # its record goes with it


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_exits_cleanly(tmp_path: Path, tiny_esm2_path: Path, signum: int) -> None:
    """A stop while Ray starts: exit 128+signal, one honest line, no ResourceWarning, no claim about parts."""
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKVLAAGG\n>b\nMKKLLV\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-X", "dev", "-m", "runner", "embed", str(fasta), "--model", str(tiny_esm2_path), "--out",
         str(out), "--gpus", "0", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "runner.log").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the job log opens after the pre-flight checks, right before Ray starts
    time.sleep(0.5)
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's processes, if the driver left any
    assert proc.returncode == 128 + signum, err
    assert "ResourceWarning" not in err and "Traceback" not in err, err
    assert f"interrupted by {signal.Signals(signum).name}" in err, err
    manifest = out / "manifest.json"
    if "during start-up" in err:  # stopped before the manifest existed: it must not claim one
        assert "manifest" not in err.splitlines()[-1]
    else:  # Ray was up and the manifest written: it says interrupted
        assert json.loads(manifest.read_text())["status"] == "interrupted"
