"""`run_embed`: the library API behind `runner embed`. The CLI is a thin layer over it.

Top to bottom: check the settings and inputs, lock --out, connect to Ray, decide fresh/resume (fingerprint),
build the stream (read -> tokenize/pack -> embed actors), drain it into Arrow parts on the driver, write
the manifest. Fault tolerance is described in docs/fault-tolerance.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import pydoc
import re
import signal
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from runner.batch import Reject
from runner.budget import CPU_TOKEN_BUDGET, auto_token_budget, probe_free_gpu_memory
from runner.config import EmbedConfig, resolve_precision
from runner.embed_stage import EmbedStage, StageSettings
from runner.errors import NonFiniteEmbedding, RunnerError
from runner.manifest import Manifest, job_fingerprint
from runner.metrics import DriverMetrics
from runner.models.base import ModelInfo, SequenceCodec
from runner.models.registry import load_codec, model_info
from runner.prepare import DuplicateFilter, Preparer, prepare_block
from runner.progress import Progress
from runner.resume import OrdinalSet, OutLock, prepare_resume
from runner.shadow import ShadowMonitor, ShadowSettings
from runner.sink import ChunkMerger, EmbeddedRows, OutputWriteError, PartWriter, RejectWriter
from runner.sources import expand_inputs, read_records, sniff_input
from runner.stream import PackSettings, ReadSettings, pack_records, read_blocks

log = logging.getLogger("runner")

ACTOR_TASK_RETRIES = 3  # retries of one batch whose actor died (each on a restarted/other actor)


@dataclass
class JobReport:
    """What a finished (or aborted) job did; also written to manifest.json."""

    out_dir: Path
    status: str = "running"  # running | complete | aborted | interrupted | failed (unexpected error)
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
    first_output_seconds: float | None = None  # job start -> first embeddings back (Ray start, model load)
    tokens_at_first_output: int = 0  # tokens of that first output (excluded from the steady rate)

    @property
    def steady_tokens_per_second(self) -> float:
        """Tokens/s from the first embeddings back to the end: the rate once actors are loaded."""
        if self.first_output_seconds is None or self.wall_seconds <= self.first_output_seconds:
            return 0.0
        return (self.tokens - self.tokens_at_first_output) / (self.wall_seconds - self.first_output_seconds)
    parts: list[str] = field(default_factory=list)
    resumed_rows: int = 0  # rows found in complete parts of earlier runs (included in rows_written)
    failed_records: int = 0  # sequences rejected because their window raised inside the model
    oom_splits: int = 0  # batches split after CUDA out-of-memory
    actor_restarts: int = 0  # embedding actors Ray restarted after their process died
    duplicates_dropped: int = 0  # rows delivered twice by a retried batch and not written again

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def packing_efficiency(self) -> float:
        return self.tokens / self.budget_tokens if self.budget_tokens else 0.0


def run_embed(config: EmbedConfig) -> JobReport:
    """Embed every input sequence; raise RunnerError (one clear line) on expected failures.

    Rerunning the same job on the same --out resumes it (see `runner.resume`); SIGINT/SIGTERM stop it
    cleanly with JobInterrupted (exit 130/143), a second signal stops it at once.
    """
    config.validate()
    paths = expand_inputs(config.inputs)
    for path in paths:
        sniff_input(path, config.id_column, config.seq_column)
    out_dir = prepare_out_dir(Path(config.out))
    with OutLock(out_dir):  # two jobs writing one --out would interleave parts
        return _run_locked(config, paths, out_dir)


def _run_locked(config: EmbedConfig, paths: list[Path], out_dir: Path) -> JobReport:
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
    fingerprint = job_fingerprint(paths, info, config, precision, pooling, config.max_residues or codec.max_residues)
    resume = prepare_resume(out_dir, fingerprint, info.embed_dim, config.overwrite)
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
        **test_hooks_from_env(out_dir),
    )
    # The read task gets its own copy of the bitmap: the driver keeps adding to `resume.done` as it writes.
    dataset = build_dataset(ray, paths, codec, config, budget, stage, gpus, shadow_share, resume.done.bits.copy())

    manifest = Manifest(out_dir, config, info, precision, pooling, budget, [str(p) for p in paths], fingerprint)
    manifest.dashboard_url = f"http://{dashboard}" if dashboard else None
    manifest.resume = resume.summary()
    report = JobReport(out_dir=out_dir, resumed_rows=resume.rows, records_done=resume.rows,
                       rows_written=resume.rows, parts=list(resume.parts))
    manifest.write(report)
    metrics = DriverMetrics(config.model, precision)
    started = time.monotonic()
    signals = StopSignals()
    signals.install()
    try:
        shadow = start_shadow(ray, config, stage, gpus, shadow_share, out_dir, precision, metrics)
        writer = PartWriter(out_dir, info.embed_dim, config.rows_per_part, first_part=resume.next_part)
        rejects = RejectWriter(out_dir)
        progress = Progress(paths, config.progress)
        hard_stop = False
        try:
            drain(dataset, writer, rejects, report, progress, config, precision, shadow, metrics, resume.done,
                  signals)
            if signals.signum is None:
                if shadow is not None:
                    shadow.close()  # waits for the comparisons still running
                    report.shadow = shadow.summary()
                    shadow = None
                report.status = "complete"
            else:
                report.status = "interrupted"
        except _StopNow as stop:  # a signal while waiting on the stream, or a second signal
            report.status = "interrupted"
            hard_stop = stop.hard
        except KeyboardInterrupt:  # no handler installed (not the main thread): stop hard
            report.status = "interrupted"
            hard_stop = True
            raise
        except RunnerError:  # NaN/Inf, drift abort, disk full, a failed stream
            report.status = "aborted"
            raise
        finally:
            finish_outputs(writer, rejects, shadow, progress, report, manifest, resume.parts, resume.rows,
                           started, hard_stop)
    except _StopNow as stop:  # a second signal while the outputs were being closed
        report.status = "interrupted"
        raise JobInterrupted.after(stop.signum, out_dir, len(report.parts), hard=True) from None
    finally:
        signals.restore()
    if report.status == "interrupted":
        raise JobInterrupted.after(signals.signum or signal.SIGINT, out_dir, len(report.parts), hard=hard_stop)
    if report.rows_written + report.rejects != report.records_read:
        raise RunnerError(
            f"internal accounting error: {report.rows_written} rows + {report.rejects} rejects != "
            f"{report.records_read} records read; please report this with manifest.json"
        )
    return report


def finish_outputs(writer: PartWriter, rejects: RejectWriter, shadow: ShadowMonitor | None, progress: Progress,
                   report: JobReport, manifest: Manifest, resumed_parts: list[str], resumed_rows: int,
                   started: float, hard_stop: bool) -> None:
    """Close every output and write the manifest, even on failure; raise the first write error at the end.

    A graceful end finishes the open part (it holds only complete rows); a hard stop deletes it, so
    either way only complete parts are visible.
    """
    error: OutputWriteError | None = None
    if shadow is not None:
        try:
            shadow.abandon()
        except OSError as e:
            log.warning("could not write drift.arrow (%s)", e)
        report.shadow = shadow.summary()
    if hard_stop:
        writer.discard_open_part()
    else:
        try:
            writer.close()
        except OutputWriteError as e:
            error = e
    try:
        rejects.close()
    except OutputWriteError as e:
        error = error or e
    progress.finish()
    report.parts = list(resumed_parts) + writer.parts
    report.rows_written = resumed_rows + writer.rows_written
    report.rejects = rejects.count
    report.wall_seconds = time.monotonic() - started
    if error is not None:
        report.status = "aborted"
    elif report.status == "running":  # an unexpected exception is on its way out
        report.status = "failed"
    manifest.reject_reasons = rejects.reasons
    manifest.extra["shadow"] = report.shadow
    try:
        manifest.write(report)
    except OSError as e:
        log.error("could not write %s (%s)", manifest.path, e.strerror or e)
        error = error or OutputWriteError(
            f"cannot write {manifest.path} ({e.strerror or e}): free disk space or make --out writable, then "
            "rerun the same command to resume (finished parts are kept)"
        )
    if error is not None:
        raise error


class JobInterrupted(RunnerError):
    """SIGINT/SIGTERM stopped the job; complete parts are kept and a rerun resumes. Exit 128 + signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    @classmethod
    def after(cls, signum: int, out_dir: Path, parts: int, hard: bool) -> JobInterrupted:
        name = signal.Signals(signum).name
        how = "stopped at once" if hard else "stopped after the finished batches"
        return cls(f"interrupted by {name} ({how}): {parts} complete part(s) in {out_dir / 'embeddings'}; "
                   "rerun the same command to resume", 128 + signum)


class _StopNow(BaseException):
    """Raised by the signal handler to leave a blocking wait on the stream (a BaseException, like
    KeyboardInterrupt, so that no `except Exception` inside Ray swallows it)."""

    def __init__(self, signum: int, hard: bool) -> None:
        super().__init__(signum, hard)
        self.signum = signum
        self.hard = hard


@dataclass
class StopSignals:
    """SIGINT/SIGTERM for one run: the first stops taking new work, the second stops at once.

    The first signal only sets `signum` while the driver is writing (so a table is never half-handled),
    and interrupts the driver when it is blocked waiting for the stream (nothing is half-done then).
    Handlers are installed only in the main thread and restored when the run ends.
    """

    signum: int | None = None
    waiting: bool = False  # the driver is blocked on the stream: safe to interrupt it
    _previous: dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise _StopNow(signum, hard=True)
        self.signum = signum
        # No logging here: the handler may run while the main thread holds the logging lock.
        os.write(2, f"\n{signal.Signals(signum).name}: finishing the batches already received, then stopping "
                    "(send it again to stop at once)\n".encode())
        if self.waiting:
            raise _StopNow(signum, hard=False)


def test_hooks_from_env(out_dir: Path) -> dict[str, Any]:
    """Test-only fault injection for the embedding actors, from RUNNER_TEST_* environment variables.

    RUNNER_TEST_FAIL_IDS=a,b (forwards containing these ids raise), RUNNER_TEST_OOM_ABOVE_TOKENS=N (forwards
    over N tokens raise CUDA OOM), RUNNER_TEST_CRASH_AFTER_BATCHES=N (one actor os._exit()s after N
    batches, once per --out), RUNNER_TEST_BATCH_DELAY=seconds (sleep per batch). Never set them in production.
    """
    env = os.environ
    hooks: dict[str, Any] = {}
    try:
        if env.get("RUNNER_TEST_FAIL_IDS"):
            hooks["test_fail_ids"] = tuple(i for i in env["RUNNER_TEST_FAIL_IDS"].split(",") if i)
        if env.get("RUNNER_TEST_OOM_ABOVE_TOKENS"):
            hooks["test_oom_above_tokens"] = int(env["RUNNER_TEST_OOM_ABOVE_TOKENS"])
        if env.get("RUNNER_TEST_CRASH_AFTER_BATCHES"):
            hooks["test_crash_after_batches"] = int(env["RUNNER_TEST_CRASH_AFTER_BATCHES"])
            hooks["test_crash_marker"] = str(out_dir / ".test-actor-crashed")
        if env.get("RUNNER_TEST_BATCH_DELAY"):
            hooks["test_batch_delay"] = float(env["RUNNER_TEST_BATCH_DELAY"])
    except ValueError as e:
        raise RunnerError(f"bad RUNNER_TEST_* value ({e}): these test-only variables take numbers; unset them") from None
    if hooks:
        log.warning("test-only fault injection is on: %s", hooks)
    return hooks


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
    fp32 = dataclasses.replace(stage.without_test_hooks(), precision="fp32", shadow_rate=0.0,
                               fp32_layernorm=False, device="cuda" if share > 0 else "cpu")
    actor_class = ray.remote(EmbedStage)
    # No CPU reservation: the shadow sees only the sampled fraction, and reserving a core for it on a
    # small machine would starve the reader and packers of the main stream (a hang on 2 cores).
    actors = [actor_class.options(num_gpus=share, num_cpus=0).remote(fp32)
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
    written: OrdinalSet | None = None, signals: StopSignals | None = None,
) -> None:
    """Pull embedded rows from the stream and write them; abort at the first non-finite embedding.

    Returns early, with every table received written, once `signals` holds a stop request.
    """
    from ray.exceptions import RayError

    merger = ChunkMerger()
    written = written if written is not None else OrdinalSet()
    signals = signals if signals is not None else StopSignals()
    batches = iter(dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=4))
    stop_stream = getattr(batches, "close", None)  # ends Ray Data's executor when we stop early
    try:
        while True:
            signals.waiting = True
            try:
                if signals.signum is not None:
                    return  # stop taking new work; what arrived is written
                table = next(batches, None)
            finally:
                signals.waiting = False
            if table is None:
                break
            handle_table(table, writer, rejects, report, merger, config, precision, metrics, written)
            if report.first_output_seconds is None and report.tokens:
                report.first_output_seconds = time.monotonic() - progress.start
                report.tokens_at_first_output = report.tokens
            if shadow is not None:
                offer_to_shadow(table, shadow)
                metrics.shadow_queue(shadow.queue_depth)
                report.shadow = shadow.summary()
            progress.update(report.records_done, report.tokens)
    except RunnerError:
        raise  # raised here on the driver (NaN/Inf, disk full, drift): already one clear line
    except RayError as e:
        if signals.signum is not None:
            # A terminal's Ctrl-C reaches Ray's own processes too (same process group): the stream
            # failing after a stop request is part of stopping, not a job failure.
            log.info("the stream ended after the stop request: %s", type(e).__name__)
            return
        raise stream_failure(e) from None
    finally:
        if stop_stream is not None:
            stop_stream()
    if merger.pending:
        raise RunnerError(f"internal error: {merger.pending} chunked sequence(s) never completed")
    progress.update(report.records_done, report.tokens, force=True)


def stream_failure(error: BaseException) -> RunnerError:
    """One line for a failure inside the Ray stream (an actor out of retries, a broken model or device).

    Ray wraps a remote exception in layers (RayTaskError, UserCodeException); the innermost one says what
    actually went wrong. Our own RunnerErrors raised remotely keep their message and exit code.
    """
    cause = error
    seen: set[int] = set()
    while id(cause) not in seen:
        seen.add(id(cause))
        inner = getattr(cause, "cause", None) or cause.__cause__
        if not isinstance(inner, BaseException):
            break
        cause = inner
    text = str(cause).strip().splitlines()
    first = text[0] if text else "no message"
    if isinstance(cause, RunnerError):
        wrapped = RunnerError(first)
        wrapped.exit_code = cause.exit_code
        return wrapped
    detail = f"{type(cause).__name__}: {first}"
    # The exception objects do not carry the remote chain, but the text does: the first "pkg.Type: message"
    # line that is not Ray's own is the exception the remote code raised.
    remote = next((m for m in map(_EXCEPTION_LINE.match, str(error).splitlines()) if m), None)
    if remote is not None:
        # Only our own module names are looked up (importing names from error text could run anything).
        remote_type = pydoc.locate(remote.group(1)) if remote.group(1).startswith("runner.") else None
        if isinstance(remote_type, type) and issubclass(remote_type, RunnerError):  # e.g. a bad input record
            wrapped = RunnerError(remote.group(2))
            wrapped.exit_code = remote_type.exit_code
            return wrapped
        detail = f"{remote.group(1).rsplit('.', 1)[-1]}: {remote.group(2)}"
    return RunnerError(
        f"the embedding stream failed ({detail[:400]}): finished parts are kept; fix the cause and rerun the same "
        "command to resume"
    )


_EXCEPTION_LINE = re.compile(r"^(?!ray\.)((?:[A-Za-z_]\w*\.)*[A-Z]\w*): (.+)$")


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
    config: EmbedConfig, precision: str, metrics: DriverMetrics, written: OrdinalSet | None = None,
) -> None:
    """Route one table of stage output: rejects, block record counts, embeddings (merged if chunked).

    `written` holds the ordinals already in parts: a row delivered twice (a retried batch) is dropped, so
    no id is ever written twice.
    """
    reason = table.column("reject_reason")
    is_reject = reason.is_valid().to_numpy(zero_copy_only=False)
    ids_valid = table.column("id").is_valid().to_numpy(zero_copy_only=False)
    is_window = ids_valid & ~is_reject
    report.records_read += int(pa.compute.sum(table.column("records_in")).as_py() or 0)
    report.tokens += int(pa.compute.sum(table.column("batch_tokens")).as_py() or 0)
    budgets = table.column("batch_budget").to_numpy()
    report.budget_tokens += int(budgets.sum())
    report.batches += int((budgets > 0).sum())
    report.oom_splits += int(pa.compute.sum(table.column("oom_splits")).as_py() or 0)
    report.actor_restarts += int(pa.compute.sum(table.column("actor_restarts")).as_py() or 0)

    if is_reject.any():
        sub = table.filter(pa.array(is_reject)).to_pydict()
        found = []
        for i, src, r, o, count in zip(sub["id"], sub["source"], sub["reject_reason"], sub["ordinal"],
                                       sub["chunk_count"], strict=True):
            # A failed window of a chunked sequence rejects the whole sequence, once.
            if count > 1 and not merger.fail(o):
                continue
            found.append(Reject(i, src or "", r, o))
        report.failed_records += sum(r.reason.startswith("embedding failed") for r in found)
        rejects.write(found)
        report.records_done += len(found)
        metrics.rejected(len(found))
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
    if written is not None:
        rows = drop_written(rows, written, report)
        if not len(rows):
            return
    report.truncated += int(rows.truncated.sum())
    report.records_done += len(rows)
    writer.write(rows)
    metrics.written(len(rows))


def drop_written(rows: EmbeddedRows, written: OrdinalSet, report: JobReport) -> EmbeddedRows:
    """Rows whose ordinal is not written yet (each kept once), and mark them written."""
    fresh = ~written.contains(rows.ordinals)
    _, first = np.unique(rows.ordinals, return_index=True)
    once = np.zeros(len(rows), dtype=bool)
    once[first] = True
    keep = fresh & once
    written.add(rows.ordinals[keep])
    if keep.all():
        return rows
    dropped = int((~keep).sum())
    report.duplicates_dropped += dropped
    log.warning("dropped %d row(s) delivered twice (a retried batch): each sequence is written once", dropped)
    idx = np.flatnonzero(keep)
    return EmbeddedRows([rows.ids[i] for i in idx], rows.lengths[idx], rows.truncated[idx], rows.vectors[idx],
                        rows.ordinals[idx])


def build_dataset(ray, paths: list[Path], codec: SequenceCodec, config: EmbedConfig, budget: int,
                  stage: StageSettings, gpus: int, shadow_share: float, done_bits: np.ndarray | None = None):
    """The Ray Data stream; nothing runs until the driver iterates it.

    `done_bits` (packed bitmap of ordinals already written, on resume) travels with the read task,
    which skips those records.
    """
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    read_settings = ReadSettings(tuple(str(p) for p in paths), config.id_column, config.seq_column,
                                 config.records_per_block,
                                 done_bits if done_bits is not None else np.zeros(0, dtype=np.uint8))

    class InputRecords(Datasource):
        """All inputs read by one task, in order (dedup and ordinals need one reader)."""

        def estimate_inmemory_data_size(self) -> int | None:
            return sum(os.path.getsize(p) for p in read_settings.paths)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=read_settings.paths)
            return [ReadTask(lambda: read_blocks(read_settings), meta)]

    pack_settings = PackSettings(codec, config.max_residues, config.long, config.chunk_overlap, budget)
    # The reader is mostly I/O: a quarter CPU leaves room for packing and a CPU actor on a 2-core machine
    # (with a whole CPU each, read + actor took both cores and the pack tasks never ran).
    ds = ray.data.read_datasource(InputRecords(), override_num_blocks=1, num_cpus=READ_CPUS)
    # Ray Data coalesces what a read task yields into blocks of up to target_max_block_size (128 MiB):
    # cut them back to records_per_block records, so that each embedding task (and so each delivery to
    # the driver, each retry after an actor death and each stop on Ctrl-C) covers one such block.
    ds = ds.repartition(target_num_rows_per_block=config.records_per_block)
    # Ray 2.60 has no named parameter for the two remote-args settings below (the replacements arrive
    # with the removal in 2.64), so its deprecation notices are silenced here rather than shown to users.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
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
        ds = ds.map_batches(
            EmbedStage,
            fn_constructor_kwargs={"settings": stage},
            batch_size=1,
            batch_format="pyarrow",
            # With a shadow beside each embedder, the embedder leaves that share of its GPU free.
            num_gpus=(1 - shadow_share) if gpus > 0 else 0,
            num_cpus=1,
            # Two calls in flight per GPU actor: one batch's host work (Arrow in/out, copies) overlaps the
            # other's kernels, so the GPU does not idle between batches.
            compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=2 if gpus > 0 else 1),
            # An actor that dies (killed process, lost node, unusable GPU) is restarted by Ray without limit,
            # and the batches it held are retried on a live actor up to ACTOR_TASK_RETRIES times: a batch
            # that kills its actor every time ends the job instead of looping forever.
            max_restarts=-1,
            max_task_retries=ACTOR_TASK_RETRIES,
        )
    return ds


READ_CPUS = 0.25  # CPU reserved by the single read task


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
