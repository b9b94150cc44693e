"""Compiling beside the first batches (StageSettings.compile_beside, the GPU default): the actor is ready before its
layers are compiled, batches run eager meanwhile, the compiled layers take over between batches, a failed compile
leaves the actor eager, and the manifest learns when it happened. CPU only, no Ray: torch.compile runs for real
(dynamo traces the layers on the compile thread) with a backend that records the graphs and runs them as traced,
since inductor's CPU compile takes minutes on this machine."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from runner.input.stream import PackSettings, ReadSettings, pack_records, read_blocks
from runner.models.layer_loop import LayerLoopEmbedder
from runner.models.registry import load_codec
from runner.stages.embed_stage import EmbedStage, StageSettings

DATA = Path(__file__).parent / "data"


def batch_rows(model: Path) -> list[pa.Table]:
    """The test proteins as packed-batch rows, one table per batch, as the stream hands them to an actor."""
    records = next(read_blocks(ReadSettings((str(DATA / "some_proteins.fasta"),), "id", "sequence", 20)))
    packed = pack_records(records, PackSettings(load_codec(str(model)), None, "truncate", 128, 2048,
                                                keep_chunks_together=True))
    return [packed.slice(i, 1) for i in range(packed.num_rows) if packed.column("ids")[i].as_py()]


def vectors_by_id(out: pa.Table) -> dict[str, np.ndarray]:
    embedded = out.filter(out.column("id").is_valid())
    return {sid: np.asarray(v, dtype=np.float32)
            for sid, v in zip(embedded.column("id").to_pylist(), embedded.column("embedding").to_pylist(), strict=True)}


def startup_reports(out: pa.Table) -> list[dict]:
    return [json.loads(text) for text in out.column("startup").to_pylist() if text is not None]


class GatedCompile:
    """Replaces LayerLoopEmbedder.compile_aside: waits for `gate`, then compiles for real with a recording backend
    (or raises `failure`)."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.gate = threading.Event()
        self.graphs: list[int] = []  # nodes per graph dynamo handed the backend
        self.calls = 0  # compiled graph calls (the forwards that ran through the compiled parts)
        self.threads: list[str] = []  # where compile_aside ran
        self.failure = failure
        self.original = LayerLoopEmbedder.compile_aside

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(LayerLoopEmbedder, "compile_aside",
                            lambda model, layers, backend="inductor": self(model, layers, backend))

    def backend(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(len(gm.graph.nodes))

        def run(*args: object) -> object:
            self.calls += 1
            return gm.forward(*args)

        return run

    def __call__(self, model: LayerLoopEmbedder, layers: object, backend: object = "inductor") -> object:
        self.threads.append(threading.current_thread().name)
        assert self.gate.wait(60), "the test never opened the gate"
        if self.failure is not None:
            raise self.failure
        return self.original(model, layers, backend=self.backend)


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> GatedCompile:
    torch._dynamo.reset()
    gate = GatedCompile()
    gate.install(monkeypatch)
    return gate


def test_batches_run_eager_until_the_compiled_layers_take_over(tiny_esm2_path: Path, gated: GatedCompile) -> None:
    rows = batch_rows(tiny_esm2_path)
    stage = EmbedStage(StageSettings(str(tiny_esm2_path), "fp32", -1, "mean", "cpu", compile_layers=True,
                                     compile_beside=True))
    # Ready while the compile waits at its gate: nothing on the way to the first batch waited for it.
    assert stage.compiler is not None and stage.compiler.is_alive() and not stage.model.compiling
    first = stage(rows[0])
    assert set(first.column("attention").drop_null().to_pylist()) == {"exact"}
    assert gated.calls == 0
    [early] = startup_reports(first)
    assert early["compile_beside"] is True and early["compile_seconds"] == 0.0 and "compiled_at" not in early
    assert early["kernels"] == "exact"

    gated.gate.set()
    assert stage.wait_for_compile(120)
    assert gated.threads == ["runner-compile"] and gated.graphs  # dynamo traced the layers on the compile thread
    assert stage.model.compiling and stage.kernels == "exact+compile"
    calls_after_warm_up = gated.calls

    again = stage(rows[0])
    assert set(again.column("attention").drop_null().to_pylist()) == {"exact+compile"}
    assert gated.calls > calls_after_warm_up  # this batch ran through the compiled parts
    eager, compiled = vectors_by_id(first), vectors_by_id(again)
    assert eager.keys() == compiled.keys()
    for sid in eager:
        np.testing.assert_allclose(compiled[sid], eager[sid], rtol=1e-5, atol=1e-6)
    # The changed report rides on the next output, once; the driver adds it to the first (collect_startup).
    [late] = startup_reports(again)
    assert late["kernels"] == "exact+compile" and late["batches_before_compiled"] == 1
    assert late["compile_beside_seconds"] > 0 and late["compiled_at"] > late["ready_at"]
    assert late["compile_seconds"] == 0.0  # __init__ did not wait: the manifest's compile phase stays 0
    assert startup_reports(stage(rows[1])) == []


def test_two_calls_keep_running_while_the_layers_compile(tiny_esm2_path: Path, gated: GatedCompile) -> None:
    """Ray runs two calls of a GPU actor at once: both go on eager while the compile thread is busy, and their rows
    are whole."""
    rows = batch_rows(tiny_esm2_path)
    stage = EmbedStage(StageSettings(str(tiny_esm2_path), "fp32", -1, "mean", "cpu", compile_layers=True,
                                     compile_beside=True))
    outs: list[pa.Table] = []
    threads = [threading.Thread(target=lambda t=t: outs.append(stage(t))) for t in rows[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(outs) == 2 and stage.compiler is not None and stage.compiler.is_alive()
    gated.gate.set()
    assert stage.wait_for_compile(120) and stage.model.compiling
    ids = [sid for out in outs for sid in out.column("id").drop_null().to_pylist()]
    assert len(ids) == len(set(ids)) > 0
    assert stage.startup_report()["batches_before_compiled"] == 2


def test_a_failed_compile_leaves_the_actor_eager_with_one_warning(tiny_esm2_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    failing = GatedCompile(failure=RuntimeError("inductor exploded\nsecond line"))
    failing.gate.set()
    failing.install(monkeypatch)
    rows = batch_rows(tiny_esm2_path)
    with caplog.at_level(logging.WARNING, logger="runner.stages"):
        stage = EmbedStage(StageSettings(str(tiny_esm2_path), "fp32", -1, "mean", "cpu", compile_layers=True,
                                         compile_beside=True))
        assert stage.wait_for_compile(60)
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "RuntimeError: inductor exploded" in warnings[0] and "second line" not in warnings[0]
    assert not stage.model.compiling and stage.kernels == "exact"
    out = stage(rows[0])
    assert set(out.column("attention").drop_null().to_pylist()) == {"exact"} and out.column("finite").to_pylist()
    assert stage.startup_report()["compile_beside_seconds"] >= 0 and "compiled_at" in stage.startup_report()


def test_compile_wait_compiles_before_the_first_batch(tiny_esm2_path: Path, gated: GatedCompile) -> None:
    """compile_beside off (--compile-wait, and every CPU job): __init__ returns with the layers compiled, so every
    batch runs the same kernels."""
    gated.gate.set()
    stage = EmbedStage(StageSettings(str(tiny_esm2_path), "fp32", -1, "mean", "cpu", compile_layers=True))
    assert stage.compiler is None and stage.model.compiling and gated.threads == [threading.current_thread().name]
    report = stage.startup_report()
    assert report["compile_seconds"] > 0 and "compile_beside" not in report and "compiled_at" not in report
    out = stage(batch_rows(tiny_esm2_path)[0])
    assert set(out.column("attention").drop_null().to_pylist()) == {"exact+compile"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_inductor_compiles_beside_eager_batches(esm2_150m: Path) -> None:
    """The real thing: inductor compiles the 150M-shaped layers on the compile thread while the same actor runs FP16
    batches eager on the GPU; then the compiled layers take over and agree with the eager ones."""
    rows = batch_rows(esm2_150m)
    stage = EmbedStage(StageSettings(str(esm2_150m), "fp16", -1, "mean", "cuda", compile_layers=True,
                                     compile_beside=True, compile_cache=False))
    eager = stage(rows[0])
    [eager_kernels] = set(eager.column("attention").drop_null().to_pylist())
    assert "compile" not in eager_kernels  # the first batch did not wait for the compile
    batches = 1
    while stage.compiler is not None and stage.compiler.is_alive() and batches < 100_000:
        stage(rows[batches % len(rows)])  # the GPU keeps embedding while the layers compile
        batches += 1
    assert stage.wait_for_compile(300) and stage.model.compiling
    compiled = stage(rows[0])
    [compiled_kernels] = set(compiled.column("attention").drop_null().to_pylist())
    assert "+compile" in compiled_kernels
    report = stage.startup_report()
    print(f"\ncompiled beside {report['batches_before_compiled']} eager batches in {report['compile_beside_seconds']} s")
    assert report["batches_before_compiled"] >= 1 and report["compile_seconds"] == 0.0
    a, b = vectors_by_id(eager), vectors_by_id(compiled)
    cosines = [float(a[s] @ b[s] / (np.linalg.norm(a[s]) * np.linalg.norm(b[s]))) for s in a]
    assert min(cosines) >= 0.9999, cosines
