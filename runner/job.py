"""`run_embed`: the library API behind `runner embed`. The CLI is a thin layer over it.

Top to bottom: check the settings and inputs, connect to Ray, build the stream
(read -> tokenize/pack -> embed actors), drain it into Arrow parts on the driver, write the manifest.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from runner.batch import Reject
from runner.budget import CPU_TOKEN_BUDGET, auto_token_budget, probe_free_gpu_memory
from runner.config import EmbedConfig, resolve_precision
from runner.embed_stage import EmbedStage, StageSettings
from runner.errors import NonFiniteEmbedding, RunnerError
from runner.manifest import Manifest
from runner.metrics import DriverMetrics
from runner.models.base import ModelInfo, SequenceCodec
from runner.models.registry import load_codec, model_info
from runner.prepare import DuplicateFilter, Preparer, prepare_block
from runner.progress import Progress
from runner.shadow import DriftViolation, ShadowMonitor, ShadowSettings
from runner.sink import ChunkMerger, EmbeddedRows, PartWriter, RejectWriter
from runner.sources import expand_inputs, read_records, sniff_input
from runner.stream import PackSettings, ReadSettings, pack_records, read_blocks

log = logging.getLogger("runner")


@dataclass
class JobReport:
    """What a finished (or aborted) job did; also written to manifest.json."""

    out_dir: Path
    status: str = "running"  # running | complete | aborted | interrupted
    records_read: int = 0
    rows_written: int = 0
    rejects: int = 0
    truncated: int = 0
    chunked: int = 0
    tokens: int = 0
    batches: int = 0
    budget_tokens: int = 0  # sum of the token budgets of all batches (for packing efficiency)
    wall_seconds: float = 0.0
    records_done: int = 0  # records finished (written or rejected) so far, for progress
    workers: dict[str, int] = field(default_factory=dict)  # windows embedded per actor
    attention: set[str] = field(default_factory=set)  # attention kernels the actors used
    shadow: dict | None = None  # the shadow's summary (manifest "shadow" section)
    parts: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def packing_efficiency(self) -> float:
        return self.tokens / self.budget_tokens if self.budget_tokens else 0.0


def run_embed(config: EmbedConfig) -> JobReport:
    """Embed every input sequence; raise RunnerError (one clear line) on expected failures."""
    config.validate()
    paths = expand_inputs(config.inputs)
    for path in paths:
        sniff_input(path, config.id_column, config.seq_column)
    out_dir = prepare_out_dir(Path(config.out))
    codec = load_codec(config.model)
    if config.strict:
        check_strict(paths, codec, config)

    import ray  # imported late: `runner --help` and input errors stay fast

    context = connect_ray(config.address)
    gpus = resolve_gpus(config.gpus, ray)
    on_gpu = gpus > 0
    precision = resolve_precision(config.precision, on_gpu)
    info = model_info(config.model, compute_sha256=True)
    budget = config.token_budget or pick_token_budget(on_gpu, info, ray)
    pooling = config.pooling or codec.default_pooling
    dashboard = getattr(context, "dashboard_url", None) if context is not None else None
    log.info("Ray dashboard: %s", f"http://{dashboard}" if dashboard else "not running")
    log.info("model %s, %s, %d %s actor(s), token budget %d", config.model, precision, max(gpus, config.cpu_actors if not on_gpu else gpus), "GPU" if on_gpu else "CPU", budget)

    shadow_share = resolve_shadow_share(config.shadow_gpus, on_gpu, config.shadow_rate)
    stage = StageSettings(
        model=config.model,
        precision=precision,
        layer=config.layer,
        pooling=pooling,
        device="cuda" if on_gpu else "cpu",
        cpu_threads=1,
        fp32_layernorm=config.fp32_layernorm,
        shadow_rate=config.shadow_rate,
    )
    dataset = build_dataset(ray, paths, codec, config, budget, stage, gpus, shadow_share)

    manifest = Manifest(out_dir, config, info, precision, pooling, budget, [str(p) for p in paths])
    manifest.dashboard_url = f"http://{dashboard}" if dashboard else None
    report = JobReport(out_dir=out_dir)
    manifest.write(report)
    metrics = DriverMetrics(config.model, precision)
    shadow = start_shadow(ray, config, stage, gpus, shadow_share, out_dir, precision, metrics)
    started = time.monotonic()
    writer = PartWriter(out_dir, info.embed_dim, config.rows_per_part)
    rejects = RejectWriter(out_dir)
    progress = Progress(paths, config.progress)
    try:
        drain(dataset, writer, rejects, report, progress, config, precision, shadow, metrics)
        if shadow is not None:
            shadow.close()
            shadow = None
        report.status = "complete"
    except (NonFiniteEmbedding, DriftViolation):
        report.status = "aborted"
        raise
    except KeyboardInterrupt:
        report.status = "interrupted"
        raise
    finally:
        if shadow is not None:
            shadow.abandon()
        writer.close()
        rejects.close()
        progress.finish()
        report.parts = writer.parts
        report.rows_written = writer.rows_written
        report.rejects = rejects.count
        report.wall_seconds = time.monotonic() - started
        manifest.reject_reasons = rejects.reasons
        manifest.extra["shadow"] = report.shadow
        manifest.write(report)
    if report.rows_written + report.rejects != report.records_read:
        raise RunnerError(
            f"internal accounting error: {report.rows_written} rows + {report.rejects} rejects != "
            f"{report.records_read} records read; please report this with manifest.json"
        )
    return report


def resolve_shadow_share(requested: float | None, on_gpu: bool, rate: float) -> float:
    """GPU share of each shadow actor: 0 (CPU) when off or on CPU runs, else the request or 0.25."""
    if rate <= 0 or not on_gpu:
        return 0.0
    return 0.25 if requested is None else requested


def start_shadow(ray, config: EmbedConfig, stage: StageSettings, gpus: int, share: float, out_dir: Path,
                 precision: str, metrics: DriverMetrics) -> ShadowMonitor | None:
    """FP32 shadow actors (the same EmbedStage, in fp32) and the driver-side monitor feeding them."""
    if config.shadow_rate <= 0:
        return None
    count = config.shadow_actors or (gpus if share > 0 else 1)
    fp32 = dataclasses.replace(stage, precision="fp32", shadow_rate=0.0, fp32_layernorm=False,
                               device="cuda" if share > 0 else "cpu")
    actor_class = ray.remote(EmbedStage)
    actors = [actor_class.options(num_gpus=share, num_cpus=1 if share == 0 else 0).remote(fp32)
              for _ in range(count)]
    turn = itertools.cycle(actors)

    def wait(futures, block):
        return ray.wait(futures, num_returns=len(futures), timeout=None if block else 0)

    settings = ShadowSettings(config.shadow_rate, config.drift_min_cosine, config.on_drift,
                              config.shadow_queue * count, precision)
    return ShadowMonitor(settings, out_dir, submit_fn=lambda packed: next(turn).embed.remote(packed),
                         wait_fn=wait, get_fn=lambda future: ray.get(future)[0], metrics=metrics)


def drain(
    dataset, writer: PartWriter, rejects: RejectWriter, report: JobReport, progress: Progress,
    config: EmbedConfig, precision: str, shadow: ShadowMonitor | None, metrics: DriverMetrics,
) -> None:
    """Pull embedded rows from the stream and write them; abort at the first non-finite embedding."""
    merger = ChunkMerger()
    for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=4):
        handle_table(table, writer, rejects, report, merger, config, precision, metrics)
        if shadow is not None:
            offer_to_shadow(table, shadow)
            metrics.shadow_queue(shadow.queue_depth)
            report.shadow = shadow.summary()
        progress.update(report.records_done, report.tokens)
    if merger.pending:
        raise RunnerError(f"internal error: {merger.pending} chunked sequence(s) never completed")
    progress.update(report.records_done, report.tokens, force=True)


def offer_to_shadow(table: pa.Table, shadow: ShadowMonitor) -> None:
    """Hand the windows the actors sampled (token ids returned) to the shadow, with their stored vectors."""
    sampled = table.column("shadow_tokens").is_valid().to_numpy(zero_copy_only=False)
    if not sampled.any():
        return
    sub = table.filter(pa.array(sampled))
    dim = sub.schema.field("embedding").type.list_size
    main = sub.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)  # [N, D]
    tokens = [np.asarray(t, dtype=np.int32) for t in sub.column("shadow_tokens").to_pylist()]
    shadow.offer(sub.column("id").to_pylist(), sub.column("residues").to_numpy(), main, tokens)


def handle_table(
    table: pa.Table, writer: PartWriter, rejects: RejectWriter, report: JobReport, merger: ChunkMerger,
    config: EmbedConfig, precision: str, metrics: DriverMetrics,
) -> None:
    """Route one table of stage output: rejects, block record counts, embeddings (merged if chunked)."""
    reason = table.column("reject_reason")
    is_reject = reason.is_valid().to_numpy(zero_copy_only=False)
    ids_valid = table.column("id").is_valid().to_numpy(zero_copy_only=False)
    is_window = ids_valid & ~is_reject
    report.records_read += int(pa.compute.sum(table.column("records_in")).as_py() or 0)
    report.tokens += int(pa.compute.sum(table.column("batch_tokens")).as_py() or 0)
    budgets = table.column("batch_budget").to_numpy()
    report.budget_tokens += int(budgets.sum())
    report.batches += int((budgets > 0).sum())

    if is_reject.any():
        sub = table.filter(pa.array(is_reject)).to_pydict()
        rejects.write([Reject(i, s or "", r, o) for i, s, r, o in zip(
            sub["id"], sub["source"], sub["reject_reason"], sub["ordinal"], strict=True)])
        report.records_done += len(sub["id"])
        metrics.rejected(len(sub["id"]))
    if not is_window.any():
        return
    win = table.filter(pa.array(is_window))
    finite = win.column("finite").to_numpy(zero_copy_only=False)
    if not finite.all():
        bad = [win.column("id")[i].as_py() for i in np.flatnonzero(~finite)]
        raise NonFiniteEmbedding(
            f"non-finite (NaN/Inf) embedding for {len(bad)} sequence(s): {', '.join(bad[:10])}"
            f"{' ...' if len(bad) > 10 else ''} (model {config.model}, precision {precision}); nothing "
            f"non-finite was written. Rerun with --precision fp32, or exclude these sequences"
        )
    for worker in win.column("worker").to_pylist():
        report.workers[worker] = report.workers.get(worker, 0) + 1
    report.attention.update(win.column("attention").unique().to_pylist())
    dim = win.schema.field("embedding").type.list_size
    vectors = win.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)  # [N, D]
    chunk_count = win.column("chunk_count").to_numpy()
    whole = chunk_count <= 1
    ids = win.column("id").to_pylist()
    residues = win.column("residues").to_numpy()
    truncated = win.column("truncated").to_numpy(zero_copy_only=False)
    ordinals = win.column("ordinal").to_numpy()
    keep = np.flatnonzero(whole)
    out_ids = [ids[i] for i in keep]
    out_len, out_trunc, out_vec, out_ord = [residues[keep]], [truncated[keep]], [vectors[keep]], [ordinals[keep]]
    if not whole.all():
        chunk_index = win.column("chunk_index").to_numpy()
        total = win.column("total_residues").to_numpy()
        for i in np.flatnonzero(~whole):
            merged = merger.add(ids[i], int(ordinals[i]), int(chunk_index[i]), int(chunk_count[i]),
                                int(residues[i]), int(total[i]), vectors[i])
            if merged is not None:
                out_ids.append(ids[i])
                out_len.append(np.array([total[i]], np.int32))
                out_trunc.append(np.array([False]))
                out_vec.append(merged[None, :])
                out_ord.append(np.array([ordinals[i]], np.int64))
                report.chunked += 1
    rows = EmbeddedRows(
        ids=out_ids,
        lengths=np.concatenate(out_len).astype(np.int32),
        truncated=np.concatenate(out_trunc).astype(bool),
        vectors=np.concatenate(out_vec).astype(np.float32),
        ordinals=np.concatenate(out_ord).astype(np.int64),
    )
    report.truncated += int(rows.truncated.sum())
    report.records_done += len(rows)
    writer.write(rows)
    metrics.written(len(rows))


def build_dataset(ray, paths: list[Path], codec: SequenceCodec, config: EmbedConfig, budget: int,
                  stage: StageSettings, gpus: int, shadow_share: float):
    """The Ray Data stream; nothing runs until the driver iterates it."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    read_settings = ReadSettings(tuple(str(p) for p in paths), config.id_column, config.seq_column,
                                 config.records_per_block)

    class InputRecords(Datasource):
        """All inputs read by one task, in order (dedup and ordinals need one reader)."""

        def estimate_inmemory_data_size(self) -> int | None:
            return sum(os.path.getsize(p) for p in read_settings.paths)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=read_settings.paths)
            return [ReadTask(lambda: read_blocks(read_settings), meta)]

    pack_settings = PackSettings(codec, config.max_residues, config.long, config.chunk_overlap, budget)
    ds = ray.data.read_datasource(InputRecords(), override_num_blocks=1)
    # A ray_remote_args_fn keeps Ray Data from fusing packing into the single read task or into the
    # embedding actors: packing must run as its own parallel tasks, spread over the cluster's CPUs.
    ds = ds.map_batches(
        pack_records,
        fn_kwargs={"settings": pack_settings},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=config.pack_cpus,
        ray_remote_args_fn=_spread,
    )
    actors = gpus if gpus > 0 else config.cpu_actors
    return ds.map_batches(
        EmbedStage,
        fn_constructor_kwargs={"settings": stage},
        batch_size=1,
        batch_format="pyarrow",
        # With a shadow beside each embedder, the embedder leaves that share of its GPU free.
        num_gpus=(1 - shadow_share) if gpus > 0 else 0,
        num_cpus=1,
        concurrency=actors,
    )


def _spread() -> dict:
    return {"scheduling_strategy": "SPREAD"}


def connect_ray(address: str | None):
    """Join `address` / RAY_ADDRESS when given, else start a local Ray (or reuse this process's)."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context() and _existing_context()
    target = address or os.environ.get("RAY_ADDRESS") or None
    try:
        return ray.init(address=target, log_to_driver=False, logging_level=logging.WARNING,
                        configure_logging=False)
    except ConnectionError as e:
        raise RunnerError(f"cannot reach the Ray cluster at {target} ({e}): check --address / RAY_ADDRESS") from None


def _existing_context():
    """Context-like object for a Ray that this process started earlier (tests, notebooks)."""
    import ray

    class _Ctx:
        dashboard_url = ray.worker.get_dashboard_url() if hasattr(ray, "worker") else None

    return _Ctx()


def resolve_gpus(requested: int | None, ray) -> int:
    """The embedding actor count on GPUs: the request, checked against the cluster, or all of them."""
    available = int(ray.cluster_resources().get("GPU", 0))
    if requested is None:
        return available
    if requested > available:
        raise RunnerError(
            f"asked for {requested} GPU(s) but the Ray cluster has {available}: "
            f"pass --gpus {available} or fewer (--gpus 0 runs on CPU)"
        )
    return requested


def pick_token_budget(on_gpu: bool, info: ModelInfo, ray) -> int:
    """CPU: a small fixed budget. GPU: sized from the free memory of one GPU, probed by a Ray task."""
    if not on_gpu:
        return CPU_TOKEN_BUDGET
    free = ray.get(ray.remote(num_gpus=1)(probe_free_gpu_memory).remote())
    return auto_token_budget(free, weight_bytes=info.parameters * 2, embed_dim=info.embed_dim)


def prepare_out_dir(out: Path) -> Path:
    """Create --out and prove it is writable before any work starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RunnerError(f"cannot write to --out {out} ({e.strerror}): choose a writable directory") from None
    return out


def check_strict(paths: list[Path], codec: SequenceCodec, config: EmbedConfig) -> None:
    """--strict: read everything once on the driver; any reject fails the job before GPU work."""
    preparer = Preparer(codec, config.max_residues, config.long, config.chunk_overlap)
    dedup = DuplicateFilter()
    found: list[str] = []
    count = 0
    block: list = []

    def check_block() -> None:
        nonlocal count
        _, rejected = prepare_block(block, preparer, dedup)
        count += len(rejected)
        found.extend(f"{r.id} ({r.reason})" for r in rejected[: 5 - len(found)])
        block.clear()

    for record in read_records(paths, config.id_column, config.seq_column):
        block.append(record)
        if len(block) >= config.records_per_block:
            check_block()
    check_block()
    if count:
        raise RunnerError(
            f"--strict: {count} record(s) would be rejected, e.g. {'; '.join(found)}: fix the input "
            f"or drop --strict to write them to rejects.arrow"
        )
