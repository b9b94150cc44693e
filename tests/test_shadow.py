"""The FP32 shadow pool, drift.arrow, the manifest's shadow section and the Ray metrics, on CPU.

On CPU the low precision is bf16 (`--precision bf16`): it drifts from FP32 for real (cosine ~0.99999 on
the tiny model), which is what the shadow measures. One local Ray serves the module, with a known
metrics export port so the test can scrape what Ray exports to Prometheus.
"""

from __future__ import annotations

import json
import random
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import invoke

from runner.stages.shadow import (
    DRIFT_SCHEMA,
    DriftViolation,
    ShadowMonitor,
    ShadowSettings,
    compare,
    shadow_sample,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
# bf16 on the tiny model stays above 0.9999 but never reaches this: every sample is a violation.
STRICT = "0.9999999"
# Every metric runner defines, as Ray's Prometheus endpoint names it (counters get _total, histograms
# _bucket/_count/_sum); configs/grafana-runner.json may only query these.
EXPORTED = {
    "ray_runner_sequences_total", "ray_runner_tokens_total", "ray_runner_batches_total", "ray_runner_nonfinite_total",
    "ray_runner_tokens_per_second", "ray_runner_packing_efficiency", "ray_runner_rejects_total",
    "ray_runner_shadow_queue_depth", "ray_runner_shadow_cosine_rolling_min", "ray_runner_drift_violations_total",
    "ray_runner_shadow_shed_total", "ray_runner_rows_written_total", "ray_runner_busy_seconds_total",
    *(f"ray_runner_{h}_{s}" for h in ("batch_latency_seconds", "shadow_cosine") for s in ("bucket", "count", "sum")),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """One local Ray for the module, exporting metrics every second on a known port."""
    import ray

    port = free_port()
    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20,
             _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 1000})
    yield port
    ray.shutdown()


def read_parts(out: Path) -> pa.Table:
    return pa.concat_tables(pa.ipc.open_file(p).read_all() for p in sorted((out / "embeddings").glob("part-*.arrow")))


def by_id(table: pa.Table) -> dict[str, np.ndarray]:
    dim = table.schema.field("embedding").type.list_size
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return dict(zip(table.column("id").to_pylist(), vectors, strict=True))


def read_drift(out: Path) -> pa.Table:
    table = pa.ipc.open_file(out / "drift.arrow").read_all()
    assert table.schema == DRIFT_SCHEMA
    return table


def fair_esm_fp32(checkpoint: Path, seqs: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Mean-pooled last layer from fair-esm's own padded FP32 forward: independent of runner's packed path."""
    import esm

    from runner.models.esm2 import load_esm2

    model = load_esm2(str(checkpoint)).esm.eval().float()
    _, _, tokens = esm.data.Alphabet.from_architecture("ESM-1b").get_batch_converter()(seqs)
    with torch.inference_mode():
        rep = model(tokens, repr_layers=[model.num_layers])["representations"][model.num_layers]
    return {sid: rep[i, 1 : len(s) + 1].double().mean(0).numpy() for i, (sid, s) in enumerate(seqs)}


@pytest.fixture(scope="module")
def no_shed_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deep shadow queue, so nothing is shed and every sampled id is compared (deterministic outputs)."""
    path = tmp_path_factory.mktemp("cfg") / "shadow.yaml"
    path.write_text("shadow_queue: 64\n")
    return path


@pytest.fixture(scope="module")
def warn_run(metrics_port: int, tiny_esm2_path: Path, no_shed_config: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bf16, every sequence shadowed, a threshold nothing meets, --on-drift warn, plus one bad record."""
    base = tmp_path_factory.mktemp("warn")
    fasta = base / "in.fasta"
    fasta.write_text((DATA / "some_proteins.fasta").read_text() + ">broken\nMKT123\n")
    out = base / "out"
    code, output = invoke("embed", str(fasta), "--model", str(tiny_esm2_path), "--out", str(out), "--gpus", "0",
                          "--precision", "bf16", "--shadow-rate", "1", "--drift-min-cosine", STRICT,
                          "--on-drift", "warn", "--config", str(no_shed_config), "--no-progress")
    assert code == 0, output
    return out


def test_bf16_drift_is_real_and_matches_an_independent_fp32(warn_run: Path, tiny_esm2_path: Path,
                                                            some_proteins: list[tuple[str, str]]) -> None:
    drift = read_drift(warn_run).to_pydict()
    stored = by_id(read_parts(warn_run))
    assert sorted(drift["id"]) == sorted(stored) == sorted(sid for sid, _ in some_proteins)
    reference = fair_esm_fp32(tiny_esm2_path, some_proteins)
    ids = drift["id"]
    main = np.stack([stored[i] for i in ids])  # the float32 vectors in the parts
    ref = np.stack([reference[i] for i in ids])
    cosine, max_abs, norm_ratio = compare(main, ref)
    np.testing.assert_allclose(drift["cosine"], cosine, rtol=0, atol=1e-6)
    np.testing.assert_allclose(drift["max_abs_diff"], max_abs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(drift["norm_ratio"], norm_ratio, rtol=0, atol=1e-5)
    # Recomputed by hand too, in float64: the recorded cosine is the true one, not a bf16 artefact.
    for k, sid in enumerate(ids):
        a, b = stored[sid].astype(np.float64), reference[sid]
        assert drift["cosine"][k] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-6)
    # bf16 really drifts: below 1, far above noise, but still a good embedding.
    cos = np.array(drift["cosine"])
    assert (cos < 1 - 1e-6).all() and (cos > 0.999).all(), cos
    assert (np.array(drift["max_abs_diff"]) > 1e-4).all()
    assert (np.abs(np.array(drift["norm_ratio"]) - 1) > 1e-7).all()
    lengths = dict(some_proteins)
    assert [lengths[i].__len__() for i in ids] == drift["length"]
    assert set(drift["precision"]) == {"bf16"}
    assert all(t is not None for t in drift["time"])


def test_warn_mode_completes_and_counts_violations(warn_run: Path) -> None:
    manifest = json.loads((warn_run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"]["rows"] == 15 and manifest["counts"]["rejects"] == 1
    shadow = manifest["shadow"]
    assert shadow["violations"] == shadow["compared"] == 15
    assert shadow["on_drift"] == "warn" and shadow["min_cosine_threshold"] == float(STRICT)
    assert shadow["fp32_math"] == "ieee"  # a CPU shadow: the tensor-core emulations only exist on GPUs
    assert shadow["batch_tokens"] == manifest["settings"]["shadow_batch_tokens"] == 32768
    # 5k tokens never fill a 32k-token shadow batch: every comparison came in close(), after the last batch, so
    # the window with the shadow running holds no batch (it is there: the shadow did compare).
    window = manifest["throughput"]["with_shadow"]
    assert shadow["compared_after_stream"] == 15 and window["from_seconds"] > 0
    assert (window["batches"], window["tokens"], window["tokens_per_second"]) == (0, 0, 0.0)
    assert manifest["settings"]["compile_layers"] is None  # the default: compile on GPUs only
    assert manifest["attention_backend"] == ["exact"]  # CPU: eager, so no "+compile"


def test_manifest_shadow_section_matches_drift_arrow(warn_run: Path) -> None:
    shadow = json.loads((warn_run / "manifest.json").read_text())["shadow"]
    cos = np.array(read_drift(warn_run).column("cosine").to_pylist())
    assert shadow["rate"] == 1.0
    assert shadow["sampled"] == 15 and shadow["shed"] == 0 and shadow["compared"] == len(cos) == 15
    assert shadow["cosine_min"] == pytest.approx(cos.min(), abs=1e-12)
    assert shadow["cosine_mean"] == pytest.approx(cos.mean(), abs=1e-12)
    assert shadow["cosine_p0_1"] == pytest.approx(np.percentile(cos, 0.1), abs=1e-12)
    assert shadow["violations"] == int((cos < float(STRICT)).sum())
    assert [w["cosine"] for w in shadow["worst"]] == pytest.approx(sorted(cos)[:5], abs=1e-12)
    # How the shadow kept up: one CPU shadow actor, loaded (not compiled on CPU), first result after start-up.
    assert [set(a) for a in shadow["actor_startup"]] == [
        {"load_seconds", "compile_seconds", "kernels", "compile_cache", "init_at", "ready_at", "cache_setup_seconds",
         "checkpoint_seconds", "cuda_seconds", "to_device_seconds", "setup_seconds", "compile_setup_seconds"}
    ]
    assert shadow["actor_startup"][0]["load_seconds"] > 0 and shadow["actor_startup"][0]["compile_seconds"] == 0
    assert shadow["actor_startup"][0]["kernels"] == "exact"  # the FP32 attention that checked the job (CPU)
    assert shadow["first_result_seconds"] > 0 and shadow["tail_seconds"] >= 0
    assert 0 <= shadow["compared_after_stream"] <= shadow["compared"]


def scrape(port: int) -> dict[str, float]:
    """Sum of each ray_runner_* series over its labels, from Ray's Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for name, labels, value in re.findall(r"^(ray_runner_\w+)\{(.*)\} (\S+)$", text, re.M):
        key = name + ('{le="1.0"}' if 'le="1.0"' in labels else "")
        values[key] = values.get(key, 0.0) + float(value)
    return values


def test_metrics_reach_prometheus(warn_run: Path, metrics_port: int) -> None:
    manifest = json.loads((warn_run / "manifest.json").read_text())
    wanted = {"ray_runner_tokens_total", "ray_runner_shadow_cosine_count", "ray_runner_rows_written_total",
              "ray_runner_drift_violations_total", "ray_runner_rejects_total"}
    deadline = time.monotonic() + 30  # the driver exports every second; actors flush when they exit
    values: dict[str, float] = {}
    while time.monotonic() < deadline:
        try:
            values = scrape(metrics_port)
        except (urllib.error.URLError, ConnectionError):
            values = {}
        if wanted <= set(values) and values["ray_runner_shadow_cosine_count"] >= 15:
            break
        time.sleep(1)
    names = {k.split("{")[0] for k in values}
    assert wanted <= names, sorted(names)
    assert names <= EXPORTED, names - EXPORTED
    assert values["ray_runner_tokens_total"] == manifest["throughput"]["tokens"]
    assert values["ray_runner_batches_total"] == manifest["throughput"]["batches"]
    assert values["ray_runner_batch_latency_seconds_count"] == manifest["throughput"]["batches"]
    assert values["ray_runner_sequences_total"] == values["ray_runner_rows_written_total"] == 15
    assert values["ray_runner_rejects_total"] == 1
    assert values["ray_runner_shadow_cosine_count"] == 15
    assert values["ray_runner_drift_violations_total"] == 15
    # bf16 cosines are above 0.9999 and at most 1: all in the top buckets, none past 1.
    assert values['ray_runner_shadow_cosine_bucket{le="1.0"}'] == 15
    assert values["ray_runner_shadow_cosine_rolling_min"] == pytest.approx(manifest["shadow"]["cosine_min"])
    assert values["ray_runner_tokens_per_second"] > 0
    assert 0 < values["ray_runner_packing_efficiency"] <= 1
    # The actors' busy seconds: the same credits as the manifest's per-actor clocks.
    busy = sum(actor["busy_seconds"] for actor in manifest["throughput"]["actors"].values())
    assert values["ray_runner_busy_seconds_total"] == pytest.approx(busy, abs=0.01)


def test_grafana_dashboard_queries_exported_names() -> None:
    dashboard = json.loads((REPO / "configs" / "grafana-runner.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"ray_runner_\w+", e)}
    assert used <= EXPORTED, used - EXPORTED
    # Every metric runner defines has a panel (histograms through their buckets).
    assert {n for n in EXPORTED if not n.endswith(("_count", "_sum"))} <= used
    assert all(p["datasource"]["type"] == "prometheus" for p in dashboard["panels"] if p["type"] != "row")


def test_abort_on_drift_exits_4_and_keeps_valid_parts(metrics_port: int, tiny_esm2_path: Path,
                                                      no_shed_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = invoke("embed", str(DATA / "some_proteins.fasta"), "--model", str(tiny_esm2_path), "--out",
                          str(out), "--gpus", "0", "--precision", "bf16", "--shadow-rate", "1",
                          "--drift-min-cosine", STRICT, "--on-drift", "abort", "--rows-per-part", "4",
                          "--config", str(no_shed_config), "--no-progress")
    assert code == 4, output
    assert "Traceback" not in output
    error = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "drifted below --drift-min-cosine" in error[0] and "bf16" in error[0]
    named = re.findall(r"(UniRef50_\w+) \(cosine (0\.\d+)\)", error[0])
    assert named and all(float(c) < float(STRICT) for _, c in named)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "aborted"
    assert manifest["shadow"]["violations"] >= 1
    drift = read_drift(out).to_pydict()
    recorded = dict(zip(drift["id"], drift["cosine"], strict=True))
    for sid, cos in named:  # the ids in the message are in drift.arrow with the cosine shown
        assert recorded[sid] == pytest.approx(float(cos), abs=1e-7)
    parts = sorted((out / "embeddings").glob("part-*.arrow"))
    assert [p.name for p in parts] == manifest["parts"]  # what the manifest lists is exactly what is there
    for part in parts:  # complete, readable parts only
        table = pa.ipc.open_file(part).read_all()
        assert table.num_rows > 0 and np.isfinite(np.stack(list(by_id(table).values()))).all()
    assert not list((out / "embeddings").glob(".*tmp"))


def test_sampling_is_deterministic_across_runs_and_batching(metrics_port: int, tiny_esm2_path: Path,
                                                            no_shed_config: Path, tmp_path: Path,
                                                            some_proteins: list[tuple[str, str]]) -> None:
    expected = {sid for (sid, _), keep in zip(some_proteins, shadow_sample([s for s, _ in some_proteins], 0.5),
                                                strict=True) if keep}
    assert 0 < len(expected) < len(some_proteins)
    selected = []
    for budget in ("4096", "1024"):  # different packing, the same sample
        out = tmp_path / budget
        code, output = invoke("embed", str(DATA / "some_proteins.fasta"), "--model", str(tiny_esm2_path), "--out",
                              str(out), "--gpus", "0", "--shadow-rate", "0.5", "--token-budget", budget,
                              "--config", str(no_shed_config), "--no-progress")
        assert code == 0, output
        shadow = json.loads((out / "manifest.json").read_text())["shadow"]
        assert shadow["shed"] == 0 and shadow["sampled"] == shadow["compared"] == len(expected)
        # fp32 main vs fp32 shadow: the same numbers up to packing (cosine 1 to ~1e-6).
        assert shadow["cosine_min"] > 1 - 1e-5
        selected.append(set(read_drift(out).column("id").to_pylist()))
    assert selected[0] == selected[1] == expected


def test_manifest_measures_the_throughput_while_the_shadow_ran(metrics_port: int, tiny_esm2_path: Path,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shadow that compares while the stream still runs: `throughput.with_shadow` is the actor clock over the
    batches done from its first comparison on, a part of the job's."""
    rng = random.Random(0)
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">p{i}\n{''.join(rng.choices('ACDEFGHIKLMNPQRSTVWY', k=rng.randint(30, 60)))}\n"
                             for i in range(128)))
    config = tmp_path / "shadow.yaml"  # small blocks and shadow batches: the shadow starts comparing early
    config.write_text("shadow_queue: 64\nshadow_batch_tokens: 1\nrecords_per_block: 4\n")
    # ~64 batches of 0.4 s: a stream that outlasts the shadow actor's start-up (~12 s here) by several batches.
    monkeypatch.setenv("RUNNER_TEST_BATCH_DELAY", "0.4")
    out = tmp_path / "out"
    code, output = invoke("embed", str(fasta), "--model", str(tiny_esm2_path), "--out", str(out), "--gpus", "0",
                          "--shadow-rate", "1", "--token-budget", "128", "--config", str(config), "--no-progress")
    assert code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    throughput, shadow = manifest["throughput"], manifest["shadow"]
    window = throughput["with_shadow"]
    assert shadow["compared"] == 128 and shadow["compared_after_stream"] < 128
    assert 2 <= window["batches"] < throughput["batches"] and 0 < window["tokens"] < throughput["tokens"]
    assert window["tokens_per_second"] > 0 and window["span_seconds"] > 0
    [actor] = throughput["actors"].values()
    assert 0 < window["from_seconds"] < actor["span_seconds"]  # the shadow's mark falls inside the stream


def test_shadow_sample_is_a_pure_function_of_the_id() -> None:
    ids = [f"seq{i}" for i in range(20000)]
    chosen = {i for i, keep in zip(ids, shadow_sample(ids, 0.1), strict=True) if keep}
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    again: set[str] = set()
    start = 0
    while start < len(shuffled):  # random batch sizes, random order
        end = start + random.Random(start).randint(1, 500)
        batch = shuffled[start:end]
        again |= {i for i, keep in zip(batch, shadow_sample(batch, 0.1), strict=True) if keep}
        start = end
    assert again == chosen
    assert abs(len(chosen) / len(ids) - 0.1) < 0.01  # binomial sd ~0.002
    assert not shadow_sample(ids[:100], 0).any() and shadow_sample(ids[:100], 1).all()
    # Nested: a higher rate keeps every id a lower rate keeps.
    assert chosen <= {i for i, keep in zip(ids, shadow_sample(ids, 0.2), strict=True) if keep}


class FakeFuture:
    """A shadow batch 'running' until released."""

    def __init__(self, reference: np.ndarray) -> None:
        self.reference = reference
        self.done = False


class FakeMetrics:
    def __init__(self) -> None:
        self.shed: list[int] = []
        self.compared: list[tuple[int, int]] = []
        self.depth: list[int] = []

    def shadow_shed(self, count: int) -> None:
        self.shed.append(count)

    def shadow_compared(self, cosines: np.ndarray, violations: int) -> None:
        self.compared.append((len(cosines), violations))

    def shadow_queue(self, depth: int) -> None:
        self.depth.append(depth)


def make_monitor(tmp_path: Path, max_in_flight: int, on_drift: str = "warn", min_cosine: float = 0.5):
    futures: list[FakeFuture] = []
    metrics = FakeMetrics()

    def submit(packed):
        # The reference is the main vector rotated a little: a known cosine per row.
        future = FakeFuture(reference=None)
        futures.append(future)
        return future

    def wait(pending, block):
        if block:
            for f in pending:
                f.done = True
        done = [f for f in pending if f.done]
        return done, [f for f in pending if not f.done]

    monitor = ShadowMonitor(ShadowSettings(0.5, min_cosine, on_drift, max_in_flight, "fp16"), tmp_path,
                            submit_fn=submit, wait_fn=wait, get_fn=lambda f: f.reference, metrics=metrics)
    return monitor, futures, metrics


def offer_batch(monitor: ShadowMonitor, futures: list[FakeFuture], names: list[str], reference: np.ndarray,
                main: np.ndarray) -> bool:
    accepted = monitor.offer(names, np.full(len(names), 3), main, [np.array([0, 5, 6, 7, 2], np.int32)] * len(names))
    if accepted:
        futures[-1].reference = reference
    return accepted


def test_full_queue_sheds_without_blocking(tmp_path: Path) -> None:
    monitor, futures, metrics = make_monitor(tmp_path, max_in_flight=2)
    main = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    reference = np.array([[1.0, 1.0], [0.0, 1.0]], np.float32)  # cosines 1/sqrt(2) and 1
    started = time.perf_counter()
    accepted = [offer_batch(monitor, futures, [f"b{k}a", f"b{k}b"], reference, main) for k in range(5)]
    assert time.perf_counter() - started < 0.5  # the 'slow' shadow never holds offer() up
    assert accepted == [True, True, False, False, False]
    assert monitor.queue_depth == 2 and monitor.shed == 6 and monitor.sampled == 10
    assert metrics.shed == [2, 2, 2]
    futures[0].done = True  # one shadow batch finishes: room again
    assert offer_batch(monitor, futures, ["c1", "c2"], reference, main)
    assert monitor.compared == 2 and monitor.queue_depth == 2
    monitor.close()  # waits for the rest
    assert monitor.queue_depth == 0 and metrics.depth[-1] == 0
    drift = read_drift(tmp_path).to_pydict()
    assert sorted(drift["id"]) == ["b0a", "b0b", "b1a", "b1b", "c1", "c2"]
    assert drift["cosine"] == pytest.approx([2**-0.5, 1.0] * 3)
    assert drift["norm_ratio"] == pytest.approx([2**-0.5, 2.0] * 3)
    assert drift["max_abs_diff"] == pytest.approx([1.0, 1.0] * 3)
    summary = monitor.summary()
    assert summary["sampled"] == 12 and summary["shed"] == 6 and summary["compared"] == 6
    assert summary["violations"] == 0 and summary["cosine_min"] == pytest.approx(2**-0.5)
    monitor.abandon()  # after close: a no-op, drift.arrow stays
    assert read_drift(tmp_path).num_rows == 6


def test_samples_are_gathered_into_batches_of_batch_tokens(tmp_path: Path) -> None:
    """A 1% sample of one main batch is a few windows: they are gathered until batch_tokens, so the FP32
    shadow runs few large batches; close() submits the rest."""
    packed_batches = []
    futures: list[FakeFuture] = []

    def submit(packed):  # the FP32 'result' equals the main vector [1, 0] of every window
        packed_batches.append(packed)
        futures.append(FakeFuture(reference=np.tile([[1.0, 0.0]], (len(packed.cu_seqlens) - 1, 1))))
        return futures[-1]

    def wait(pending, block):
        done = list(pending) if block else []
        return done, [f for f in pending if f not in done]

    settings = ShadowSettings(0.5, 0.5, "warn", 1, "fp16", batch_tokens=12)
    monitor = ShadowMonitor(settings, tmp_path, submit_fn=submit, wait_fn=wait,
                            get_fn=lambda f: f.reference)
    window = np.array([0, 5, 6, 7, 2], np.int32)  # 5 tokens
    main = np.array([[1.0, 0.0]], np.float32)
    assert monitor.offer(["a"], np.array([3]), main, [window])
    assert monitor.offer(["b"], np.array([3]), main, [window])
    assert packed_batches == []  # 10 tokens gathered, fewer than 12
    assert monitor.offer(["c"], np.array([3]), main, [window])
    assert len(packed_batches) == 1 and packed_batches[0].cu_seqlens.tolist() == [0, 5, 10, 15]
    # the queue (1 batch) is full: the next full gathering is shed whole
    assert monitor.offer(["d", "e", "f"], np.array([3, 3, 3]), np.repeat(main, 3, axis=0), [window] * 3) is False
    assert monitor.shed == 3 and len(packed_batches) == 1
    assert monitor.offer(["g"], np.array([3]), main, [window])  # gathered, below batch_tokens
    futures_before = len(futures)
    monitor.close()  # waits for the running batch, then flushes "g" as a batch of its own
    assert len(futures) == futures_before + 1 and packed_batches[-1].cu_seqlens.tolist() == [0, 5]
    assert monitor.compared == 4 and monitor.sampled == 7 and monitor.violations == 0
    assert sorted(read_drift(tmp_path).column("id").to_pylist()) == ["a", "b", "c", "g"]


def test_comparisons_after_the_stream_ended_are_counted_as_lag(tmp_path: Path) -> None:
    """What the shadow only finished in close() (the main stream was over) is recorded as lag: it cost the job
    wall time at the end, not throughput during the stream."""
    monitor, futures, _ = make_monitor(tmp_path, max_in_flight=4)
    main = np.array([[1.0, 0.0]], np.float32)
    offer_batch(monitor, futures, ["early"], main.copy(), main)
    futures[0].done = True
    assert monitor.first_result_at is None
    before = time.time()
    offer_batch(monitor, futures, ["late1"], main.copy(), main)  # polls: "early" is compared during the stream
    after = time.time()
    offer_batch(monitor, futures, ["late2"], main.copy(), main)
    assert monitor.compared == 1 and monitor.compared_after_stream == 0
    assert monitor.first_result_seconds is not None and monitor.first_result_seconds >= 0
    # The wall-clock moment of the first comparison (the actors' batch_done clock), kept by later ones.
    assert before <= monitor.first_result_at <= after
    monitor.close()
    assert monitor.first_result_at <= after
    summary = monitor.summary()
    assert summary["compared"] == 3 and summary["compared_after_stream"] == 2
    assert summary["tail_seconds"] >= 0 and summary["first_result_seconds"] == round(monitor.first_result_seconds, 3)


def test_abort_records_every_finished_batch_then_raises(tmp_path: Path) -> None:
    monitor, futures, _ = make_monitor(tmp_path, max_in_flight=4, on_drift="abort", min_cosine=0.9)
    main = np.array([[1.0, 0.0]], np.float32)
    offer_batch(monitor, futures, ["good"], main.copy(), main)
    offer_batch(monitor, futures, ["bad"], np.array([[0.0, 1.0]], np.float32), main)  # cosine 0
    for f in futures:
        f.done = True
    with pytest.raises(DriftViolation) as raised:
        monitor.poll()
    assert raised.value.exit_code == 4
    assert "bad (cosine 0.0000000)" in str(raised.value) and "good" not in str(raised.value)
    assert monitor.compared == 2 and monitor.violations == 1
    monitor.abandon()
    assert sorted(read_drift(tmp_path).column("id").to_pylist()) == ["bad", "good"]


def test_compare_clips_rounding_above_one() -> None:
    v = np.random.default_rng(0).normal(size=(50, 33)).astype(np.float32)
    cosine, max_abs, ratio = compare(v, v)
    assert (cosine <= 1).all() and cosine == pytest.approx(1.0)
    assert (max_abs == 0).all() and ratio == pytest.approx(1.0)
    nan_cos, _, _ = compare(np.full((1, 3), np.nan, np.float32), np.ones((1, 3), np.float32))
    assert np.isnan(nan_cos).all()  # NaN is kept (a violation), not clipped into range


class FakeRay:
    """Records actor creations and calls of `start_shadow`'s Ray usage, in order."""

    class exceptions:  # noqa: N801  (stands in for the ray.exceptions module)
        class RayError(Exception):
            pass

    def __init__(self) -> None:
        self.events: list[str] = []
        self.settings: list = []  # the StageSettings each actor was created with
        self.startup_answer: object = {"load_seconds": 1.5, "compile_seconds": 2.5}  # or an exception to raise

    def available_resources(self) -> dict:
        # GPU shares never taken: the embedders are never seen placed, so start_when_placed keeps waiting and the
        # first sample starts the shadow (the fallback these tests check; the placed path: tests/test_startup.py)
        return {"GPU": 2.0}

    def wait(self, futures, num_returns, timeout):  # nothing finishes: the monitor keeps them pending
        return [], list(futures)

    def get(self, refs, timeout=None):
        if isinstance(self.startup_answer, Exception):
            raise self.startup_answer
        return [self.startup_answer for _ in refs]

    def remote(self, cls):
        ray = self

        class Options:
            def __init__(self, **options) -> None:
                self.options_ = options

            def remote(self, settings):
                ray.settings.append(settings)
                ray.events.append(f"create num_gpus={self.options_['num_gpus']} precision={settings.precision}")
                handle = type("Handle", (), {})()
                handle.embed = type("Method", (), {"remote": lambda _, packed: ray.events.append("embed") or "ref"})()
                handle.startup_report = type("Method", (), {"remote": lambda _: "startup ref"})()
                return handle

        return type("ActorClass", (), {"options": lambda _, **o: Options(**o)})()


def test_gpu_shadow_actors_are_created_only_at_the_first_sample(tmp_path: Path) -> None:
    """Ray packs fractional GPUs: shadow actors created before the embedders share one GPU and leave no
    GPU with room for a second (1 - share) embedder. They must come after the embedders are placed (the
    first sample is an output of the main stream), and before the first shadow batch is full, so that
    they load and compile while it gathers."""
    from runner.config import EmbedConfig
    from runner.driver.cluster import start_shadow
    from runner.stages.embed_stage import StageSettings

    ray = FakeRay()
    config = EmbedConfig(inputs=["x"], model="m", out=str(tmp_path), shadow_rate=0.5, shadow_batch_tokens=8)
    stage = StageSettings(model="m", precision="fp16", layers=-1, poolings="mean", device="cuda")
    monitor = start_shadow(ray, config, stage, 2, 0.25, tmp_path, "fp16", metrics=None)
    assert ray.events == []  # nothing placed while the embedding actors are still being scheduled
    main = np.array([[1.0, 0.0]], np.float32)
    monitor.offer(["a"], np.array([3]), main, [np.array([0, 5, 6, 7, 2], np.int32)])
    assert ray.events == ["create num_gpus=0.25 precision=fp32"] * 2  # 5 of 8 tokens gathered: no batch yet
    monitor.offer(["b"], np.array([3]), main, [np.array([0, 5, 6, 7, 2], np.int32)])
    assert ray.events[-1] == "embed" and ray.events.count("create num_gpus=0.25 precision=fp32") == 2
    monitor.abandon()


def test_shadow_actors_start_up_times_reach_the_summary_or_are_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from runner.config import EmbedConfig
    from runner.driver.cluster import start_shadow
    from runner.stages.embed_stage import StageSettings

    ray = FakeRay()
    config = EmbedConfig(inputs=["x"], model="m", out=str(tmp_path), shadow_rate=0.5, shadow_batch_tokens=8)
    stage = StageSettings(model="m", precision="fp16", layers=-1, poolings="mean", device="cuda")
    monitor = start_shadow(ray, config, stage, 2, 0.25, tmp_path, "fp16", metrics=None)
    assert monitor.startup_fn() == []  # no actors before the first sample
    monitor.offer(["a"], np.array([3]), np.array([[1.0, 0.0]], np.float32), [np.array([0, 5, 6, 7, 2], np.int32)])
    assert monitor.startup_fn() == [{"load_seconds": 1.5, "compile_seconds": 2.5}] * 2
    ray.startup_answer = FakeRay.exceptions.RayError("actor died")
    with caplog.at_level("WARNING", logger="runner"):
        assert monitor.startup_fn() == []  # a dead actor does not fail the finished job
    assert "start-up times unavailable" in caplog.text
    monitor.abandon()


@pytest.mark.parametrize("available", [True, False])
def test_gpu_shadow_math_falls_back_to_tf32x3_without_the_half_gemm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, available: bool
) -> None:
    """FP16x3 needs torch.mm's out_dtype (torch >= 2.8): on an older torch the shadow runs 3xTF32, says
    so, and the manifest records what ran; compiled layers only for the split maths."""
    import runner.driver.cluster
    from runner.config import EmbedConfig
    from runner.driver.cluster import start_shadow
    from runner.stages.embed_stage import StageSettings, compile_workers

    monkeypatch.setattr(runner.driver.cluster, "half_gemm_available", lambda: available)
    ray = FakeRay()
    config = EmbedConfig(inputs=["x"], model="m", out=str(tmp_path), shadow_rate=0.5, shadow_batch_tokens=1)
    stage = StageSettings(model="m", precision="fp16", layers=-1, poolings="mean", device="cuda", compile_layers=True)
    with caplog.at_level("WARNING", logger="runner"):
        monitor = start_shadow(ray, config, stage, 1, 0.25, tmp_path, "fp16", metrics=None)
    monitor.offer(["a"], np.array([3]), np.array([[1.0, 0.0]], np.float32), [np.array([0, 5, 6, 7, 2], np.int32)])
    math = "fp16x3" if available else "tf32x3"
    assert monitor.settings.fp32_math == math == ray.settings[0].fp32_math
    assert ray.settings[0].compile_layers is available and ray.settings[0].compile_threads == -1  # node-sized
    # a quarter of the node's cores, 1 to 8: 2-core CI boxes keep one worker, a 16-core GPU node gets 4
    assert [compile_workers(-1, cores) for cores in (1, 2, 7, 16, 64)] == [1, 1, 1, 4, 8]
    assert compile_workers(3, 64) == 3 and compile_workers(0, 64) == 0  # explicit counts and torch's default kept
    assert ("uses tf32x3 instead" in caplog.text) is not available
    monitor.abandon()
