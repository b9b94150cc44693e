"""`run_embed`: the library API behind `runner embed`. The CLI is a thin layer over it.

Top to bottom: check the settings and inputs, lock --out, start the engine (connect to Ray, or run in-process:
runner.driver.engine), decide fresh/resume (fingerprint), build the stream (read -> tokenize/pack -> embed actors),
drain it into Arrow parts on the driver, write the manifest. Fault tolerance: docs/fault-tolerance.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from runner.config import EmbedConfig, resolve_precision
from runner.driver.cache import chosen_compile_cache_dir
from runner.driver.cluster import (
    build_dataset,
    compile_by_default,
    count_small_input,
    pick_token_budget,
    resolve_shadow_share,
    start_shadow,
)
from runner.driver.collect import drain
from runner.driver.console import JobLog
from runner.driver.engine import start_in_process, start_ray
from runner.driver.in_process import InProcessStream, choose_engine, start_in_process_shadow
from runner.driver.metrics import DriverMetrics
from runner.driver.nodes import (
    actor_model_spec,
    cluster_section,
)
from runner.driver.progress import Progress
from runner.driver.signals import JobInterrupted, StopSignals, _StopNow
from runner.driver.startup import StartupClock
from runner.errors import NothingEmbedded, RunnerError, first_line
from runner.input.dedup import CopyWriter
from runner.input.prepare import DuplicateFilter, prepare_block
from runner.input.sources import expand_inputs, read_records, sniff_input
from runner.input.stream import job_preparer
from runner.models.base import ModelInfo, SequenceCodec, resolve_layers
from runner.models.registry import load_codec, preflight
from runner.output.manifest import Manifest, job_fingerprint
from runner.output.report import JobReport
from runner.output.rerun import already_complete, output_spec
from runner.output.resume import OutLock, prepare_resume
from runner.output.sink import (
    OutputSpec,
    OutputWriteError,
    PartWriter,
    RejectWriter,
    unwritable_reason,
    write_error,
)
from runner.output.staged import remove_staged, staged_dir
from runner.output.tokens import TOKENS_DIR, ReconcileReport, reconcile
from runner.stages.embed_stage import StageSettings
from runner.stages.shadow import ShadowMonitor

log = logging.getLogger("runner")

def run_embed(config: EmbedConfig) -> JobReport:
    """Embed every input sequence; raise RunnerError (one clear line) on expected failures.

    Rerunning the same job on the same --out resumes it (see `runner.output.resume`); SIGINT/SIGTERM stop it
    cleanly with JobInterrupted (exit 130/143), a second signal stops it at once.
    """
    clock = StartupClock()
    # Until the stream runs there is nothing to finish: a signal stops start-up at once (exit 130/143).
    signals = StopSignals(waiting=True)
    signals.install()
    try:
        config.validate()
        paths = expand_inputs(config.inputs)
        for path in paths:
            sniff_input(path, config.id_column, config.seq_column)
        # Everything that can fail before start-up fails here, in about a second, before Ray starts: the model's
        # config and weight shapes (no weights loaded), and the settings that depend on the model.
        info = preflight(config.model)
        codec = load_codec(config.model)
        check_settings_against_model(config, info, codec)
        done = already_complete(config, paths, info, codec)
        if done is not None:  # the same job, complete: nothing runs, nothing is rewritten
            return done
        out_dir = prepare_out_dir(Path(config.out))
        # two jobs writing one --out would interleave parts
        with OutLock(out_dir), JobLog(out_dir, config.verbose) as job_log:
            return _run_locked(config, paths, out_dir, codec, info.parameters, signals, clock, job_log)
    except _StopNow as stop:  # during start-up, before any embedding came back
        raise JobInterrupted.during_startup(stop.signum) from None
    finally:
        signals.restore()


def budget_fits_longest_window(budget: int, config: EmbedConfig, codec: SequenceCodec) -> int:
    """The token budget, raised (with a warning) to the longest window a batch can hold: a window over the
    budget is packed alone into a batch of its own size, so the budget would not bound the batches and the
    packing efficiency (tokens / budgeted tokens) would exceed 1."""
    longest = (config.max_residues or codec.max_residues) + codec.special_start + codec.special_end
    longest = min(longest, getattr(codec, "max_tokens", longest))  # BPE codecs cap a window in tokens
    if budget >= longest:
        return budget
    log.warning(
        "--token-budget %d is below the longest window (%d tokens: --max-residues plus the special tokens): "
        "raised to %d (the manifest records both)", budget, longest, longest,
    )
    return longest


def check_something_embedded(report: JobReport, paths: list[Path], rejects: RejectWriter, rows: int) -> None:
    """Nothing to embed is not success: no record read is an error (exit 1), every record rejected is
    NothingEmbedded (exit 5) with the reject summary."""
    if report.records_read == 0:
        names = ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        raise RunnerError(
            f"no records read from {names}: the input is empty (FASTA without '>' records, a table without "
            "rows); check the input files"
        )
    if rows == 0 and rejects.count:
        summary = ", ".join(f"{count:,} {code}" for code, count in sorted(rejects.reasons.items(), key=lambda x: -x[1]))
        raise NothingEmbedded(
            f"nothing embedded: all {rejects.count:,} record(s) were rejected ({summary}); see "
            f"{rejects.final} (columns code and reason) and fix the input or the settings"
        )


def check_settings_against_model(config: EmbedConfig, info: ModelInfo, codec: SequenceCodec) -> None:
    """The settings whose valid range depends on the model: --layer/--layers, --per-token with --long chunk
    (one token per residue), and --chunk-overlap against the
    resolved --max-residues (the model's limit when not given)."""
    resolve_layers(config.layer_list(), info.num_layers, info.name)  # one RunnerError naming the valid range
    if config.per_token and config.long == "chunk" and not codec.one_token_per_residue:
        raise RunnerError(
            f"--per-token with --long chunk needs one token per residue to stitch overlapping windows; {config.model} "
            "tokenizes by BPE, so windows do not line up: use --long truncate or skip, or drop --per-token"
        )
    max_residues = config.max_residues or codec.max_residues
    if config.long == "chunk" and config.chunk_overlap >= max_residues:
        given = "--max-residues" if config.max_residues else f"the model's window ({info.name})"
        raise RunnerError(
            f"--chunk-overlap {config.chunk_overlap} must be smaller than {given}, {max_residues} residues: "
            f"lower --chunk-overlap (default 128)"
        )


def _run_locked(
    config: EmbedConfig, paths: list[Path], out_dir: Path, codec: SequenceCodec, parameters: int,
    signals: StopSignals, clock: StartupClock, job_log: JobLog,
) -> JobReport:
    if config.strict:
        check_strict(paths, codec, config)
    # A small input is counted once: the engine's choice, the stream's block sizes and the compile default.
    input_count = count_small_input(paths)
    if choose_engine(config, input_count, parameters) == "in-process":
        engine = start_in_process(config, paths, clock)
    else:
        engine = start_ray(config, paths, out_dir, clock, job_log)
    ray, gpus, info, actor_parts = engine.ray, engine.gpus, engine.info, engine.actor_parts
    on_gpu = gpus > 0
    precision = resolve_precision(config.precision, on_gpu)
    with clock.phase("token_budget"):
        budget = config.token_budget or pick_token_budget(on_gpu, info, ray, engine.free_gpu_bytes)
    requested_budget = budget
    budget = budget_fits_longest_window(budget, config, codec)
    spec = output_spec(config, info, codec)  # its layers were checked before Ray already
    fingerprint = job_fingerprint(
        paths, info, config, precision, spec, config.max_residues or codec.max_residues, inputs=engine.input_prints
    )
    with clock.phase("resume_scan"):
        resume = prepare_resume(out_dir, fingerprint, info.embed_dim, config.overwrite, spec.schema(),
                                per_token=spec.per_token is not None)
    dashboard = engine.dashboard
    actors = gpus if on_gpu else config.cpu_actors if ray is not None else 1  # in-process: one device
    unit = "GPU" if on_gpu else "CPU actor" if ray is not None else "CPU"  # what `actors` counts
    log.info(
        "embedding %d input file(s) with %s (%s, %d layers, dim %d) in %s on %d %s(s)%s, token budget %d%s",
        len(paths),
        config.model,
        info.family,
        info.num_layers,
        info.embed_dim,
        precision,
        actors,
        unit,
        "" if ray is not None else " in this process (a small job: no Ray; --engine ray uses Ray)",
        budget,
        f", FP32 shadow {config.shadow_rate * 100:g}%" if config.shadow_rate > 0 else "",
    )
    if ray is not None:
        log.info("Ray dashboard: %s", f"http://{dashboard}" if dashboard else
                 "not running" if config.dashboard else "off (--no-dashboard)")
        log.info("log: %s (Ray's and Ray Data's logs%s)", job_log.path,
                 "" if config.verbose else "; -v shows them here")

    shadow_share = resolve_shadow_share(config.shadow_gpus, on_gpu, config.shadow_rate) if ray is not None else 0.0
    compile_layers = compile_by_default(gpus, input_count) if config.compile_layers is None else config.compile_layers
    if on_gpu and config.compile_layers is None and not compile_layers:
        log.info("layers run eager: a job this small ends sooner than compiling them takes (10-17 s an actor); "
                 "--compile compiles them anyway")
    stage = StageSettings(
        model=actor_model_spec(config.model),
        precision=precision,
        layers=spec.layers,
        poolings=spec.poolings,
        device="cuda" if on_gpu else "cpu",
        # One torch thread per CPU actor on Ray; in-process the one forward gets as many threads as the Ray path
        # would run actors (default 1): on the 2-core machine 2 threads made the quickstart's forward 6x slower
        # (2.7 s against 0.45 s, a tiny model's small kernels spinning on a busy core).
        cpu_threads=1 if ray is not None else config.cpu_actors,
        fp32_layernorm=config.fp32_layernorm,
        fused_gelu=not config.exact_gelu,
        compile_layers=compile_layers,
        compile_cache=config.compile_cache,
        compile_cache_dir=chosen_compile_cache_dir() or "",
        shadow_rate=config.shadow_rate,
        per_token=spec.per_token,
        tokens_dir=str((out_dir / TOKENS_DIR).resolve()),
        chunk_overlap=config.chunk_overlap,
        staged_dir=str(staged_dir(out_dir).resolve()) if actor_parts else "",
        part_rows=config.rows_per_part,
        **test_hooks_from_env(out_dir),
    )
    # The read task gets its own copy of the bitmap: the driver keeps adding to `resume.done` as it writes.
    with clock.phase("build_stream"):
        if ray is None:
            dataset = InProcessStream(paths, codec, config, budget, stage, resume.done.bits.copy(), signals)
        else:
            dataset = build_dataset(
                ray, paths, codec, config, budget, stage, gpus, shadow_share, resume.done.bits.copy(), input_count
            )

    manifest = Manifest(out_dir, config, info, precision, spec, budget, [str(p) for p in paths], fingerprint)
    manifest.dashboard_url = f"http://{dashboard}" if dashboard else None
    manifest.token_budget_requested = requested_budget if requested_budget != budget else None
    manifest.resume = resume.summary()
    manifest.extra["part_writer"] = "actors" if actor_parts else "driver"
    if spec.per_token is not None:
        manifest.per_token = per_token_section(spec, resume.tokens, None)
    report = JobReport(
        out_dir=out_dir,
        resumed_rows=resume.rows,
        records_done=resume.rows,
        rows_written=resume.rows,
        parts=list(resume.parts),
    )
    metrics = DriverMetrics(stage.model, precision)  # the label the actors use (a local path made absolute)
    started = time.monotonic()
    manifest.write(report)
    try:
        with clock.phase("shadow_start"):
            shadow = (start_shadow(ray, config, stage, gpus, shadow_share, out_dir, precision, metrics, spec.columns)
                      if ray is not None else
                      start_in_process_shadow(config, stage, out_dir, precision, metrics, spec.columns))
        writer = PartWriter(out_dir, info.embed_dim, config.rows_per_part, first_part=resume.next_part,
                            part_seconds=config.part_seconds, columns=spec.columns,
                            per_token=spec.per_token is not None,
                            commit_seconds=min(1.0, config.part_seconds),
                            test_kill_before_commit=int(os.environ.get("RUNNER_TEST_KILL_BEFORE_COMMIT") or 0))
        rejects = RejectWriter(out_dir)
        progress = Progress(
            paths,
            config.progress,
            actors=actors,
            unit=unit,
            tokens_per_residue=1.0 if info.family == "esm2" else None,
            count=input_count,  # counted once already for a small input; else Progress counts on a thread
        )
        copies = CopyWriter(writer, resume.done, resume.parts) if config.dedup else None
        hard_stop = False
        clock.mark("stream_started")
        try:
            drain(
                dataset,
                writer,
                rejects,
                report,
                progress,
                config,
                precision,
                shadow,
                metrics,
                resume.done,
                signals,
                copies,
                spec,
            )
            clock.mark("stream_ended")
            if signals.signum is None:
                if shadow is not None:
                    shadow.close()  # waits for the comparisons still running
                    record_shadow(report, shadow)
                    shadow = None
                    clock.mark("shadow_drained")
                # the open part's rows count too: a small job's only part closes after this check
                check_something_embedded(report, paths, rejects,
                                         resume.rows + writer.rows_written + writer.rows_open + writer.rows_staged)
                report.status = "complete"
                record_startup(manifest, report, clock)
                log.info("%s", clock.line())
            else:
                report.status = "interrupted"
        except _StopNow as stop:  # a signal while waiting on the stream, or a second signal
            report.status = "interrupted"
            hard_stop = stop.hard
        except KeyboardInterrupt:  # no handler installed (not the main thread): stop hard
            report.status = "interrupted"
            hard_stop = True
            raise
        except RunnerError as e:  # NaN/Inf, drift abort, disk full, a bad input or any failure in the stream
            report.status = "aborted"
            report.error = str(e)
            raise
        except Exception as e:  # a bug of ours on the driver: the manifest says so, the traceback is shown
            report.error = f"{type(e).__name__}: {first_line(e)}"
            raise
        finally:
            manifest.extra["engine"] = engine.name
            if ray is not None:
                manifest.extra["cluster"] = cluster_section(ray, engine.nodes_at_start, engine.checked,
                                                            since=clock.job_at)
            record_startup(manifest, report, clock)
            if copies is not None:
                copies.close(commit=not hard_stop)  # copy parts being written: committed with the writer's close
                manifest.extra["dedup"] = copies.counts.section(report.records_read)
                report.duplicates_dropped += copies.duplicates_dropped
            finish_outputs(
                writer,
                rejects,
                shadow,
                progress,
                report,
                manifest,
                resume.parts,
                resume.rows,
                started,
                hard_stop,
                clock,
            )
    except _StopNow as stop:  # a signal before the stream ran, or a second one while the outputs were closed
        if report.status == "running":  # the outputs were not closed: say so in the manifest
            report.status = "interrupted"
            with contextlib.suppress(OSError):
                manifest.write(report)
        report.status = "interrupted"
        raise JobInterrupted.after(stop.signum, out_dir, len(report.parts), hard=True) from None
    if report.status == "interrupted":
        raise JobInterrupted.after(
            signals.signum or signal.SIGINT, out_dir, len(report.parts), hard=hard_stop
        )
    if report.rows_written + report.rejects != report.records_read:
        raise RunnerError(
            f"internal accounting error: {report.rows_written} rows + {report.rejects} rejects != "
            f"{report.records_read} records read; please report this with manifest.json"
        )
    return report


def finish_outputs(
    writer: PartWriter,
    rejects: RejectWriter,
    shadow: ShadowMonitor | None,
    progress: Progress,
    report: JobReport,
    manifest: Manifest,
    resumed_parts: list[str],
    resumed_rows: int,
    started: float,
    hard_stop: bool,
    clock: StartupClock | None = None,
) -> None:
    """Close every output and write the manifest, even on failure; raise the first write error at the end.
    With `clock`, the manifest's `ending` section times the job's end (StartupClock.ending).

    A graceful end finishes the open part (it holds only complete rows); a hard stop deletes it, so
    either way only complete parts are visible.
    """
    error: OutputWriteError | None = None
    if shadow is not None:
        try:
            shadow.abandon()
        except OSError as e:
            log.warning("could not write drift.arrow (%s)", e)
        record_shadow(report, shadow)
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
    if not hard_stop:
        # staged parts never committed (an actor killed after writing one, a batch delivered twice); after a
        # hard stop actors may still be writing: the next run deletes them
        with contextlib.suppress(OSError):
            remove_staged(manifest.path.parent)
    # in number order: with --part-writer actors the driver's own open part can close after later commits
    report.parts = list(resumed_parts) + sorted(writer.parts, key=lambda name: (len(name), name))
    if writer.per_token and not hard_stop:
        # Token files no complete part points at (duplicates of retried batches, rows of a discarded part) go;
        # after a hard stop the next run does this (actors may still be writing now).
        try:
            manifest.per_token = per_token_section(manifest.spec, reconcile(manifest.path.parent, report.parts), report)
        except (OSError, RuntimeError) as e:
            log.error("could not reconcile the per-token files (%s): the next run of this job does it", e)
    report.rows_written = resumed_rows + writer.rows_written
    report.rejects = rejects.count
    report.wall_seconds = time.monotonic() - started
    if error is not None:
        report.status = "aborted"
    elif report.status == "running":  # an unexpected exception is on its way out
        report.status = "failed"
    manifest.reject_reasons = rejects.reasons
    manifest.extra["shadow"] = report.shadow
    if clock is not None:
        clock.mark("outputs_closed")
        last_batch_done = max((actor.last_done for actor in report.actors.values()), default=0.0)
        manifest.extra["ending"] = clock.ending(last_batch_done or None)
    try:
        manifest.write(report)
    except OSError as e:
        log.error("could not write %s (%s)", manifest.path, e.strerror or e)
        error = error or write_error(manifest.path, e)
    if error is not None:
        raise error


def record_startup(manifest: Manifest, report: JobReport, clock: StartupClock) -> None:
    """The manifest's `startup` section, from the driver's clock and the actors' reports."""
    if report.first_output_at is not None:
        clock.mark("first_output", report.first_output_at)
    clock.actors.update(report.actor_startup)
    manifest.extra["startup"] = clock.section()


def per_token_section(spec: OutputSpec, files: ReconcileReport | None, report: JobReport | None) -> dict[str, Any]:
    """The manifest's `outputs.per_token`: what is on disk (after reconciling) and what this run wrote."""
    section: dict[str, Any] = {
        "dtype": spec.per_token,
        "layers": list(spec.layers),
        "files": files.files if files is not None else None,  # token files kept, each row pointed at once
        "bytes": files.bytes if files is not None else None,
    }
    if report is not None:
        section.update(
            written_files=report.token_files_written,  # this run, duplicates of retried batches included
            written_bytes=report.token_bytes_written,
            write_seconds=round(report.token_write_seconds, 3),  # actors' seconds building and writing them
            deleted_files=files.deleted if files is not None else None,
            rewritten_files=files.rewritten if files is not None else None,
        )
    return section


def record_shadow(report: JobReport, shadow: ShadowMonitor) -> None:
    """The shadow's summary (the manifest's `shadow` section) and when it first compared, which starts the
    actor clock's window with the shadow running (`throughput.with_shadow`)."""
    report.shadow = shadow.summary()
    report.shadow_started_at = shadow.first_result_at


def test_hooks_from_env(out_dir: Path) -> dict[str, Any]:
    """Test-only fault injection for the embedding actors, from RUNNER_TEST_* environment variables.

    RUNNER_TEST_FAIL_IDS=a,b (forwards containing these ids raise), RUNNER_TEST_OOM_ABOVE_TOKENS=N (forwards
    over N tokens raise CUDA OOM), RUNNER_TEST_CRASH_AFTER_BATCHES=N (one actor os._exit()s after N
    batches, once per --out), RUNNER_TEST_CRASH_IDS=a,b (the actor os._exit()s on every batch holding these ids),
    RUNNER_TEST_BATCH_DELAY=seconds (sleep per batch), RUNNER_TEST_CRASH_AFTER_STAGING=N (--part-writer actors:
    one actor os._exit()s once it staged N parts, before its batch returns). The driver's own hook is
    RUNNER_TEST_KILL_BEFORE_COMMIT=N (it SIGKILLs itself before its Nth group commit of staged parts).
    RUNNER_BENCH_NO_TOKEN_CRC=1 writes per-token files without their CRC-32 (the checksum's A/B benchmark; such a
    job cannot be resumed). Never set them in production.
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
        if env.get("RUNNER_TEST_CRASH_AFTER_STAGING"):
            hooks["test_crash_after_staging"] = int(env["RUNNER_TEST_CRASH_AFTER_STAGING"])
            hooks["test_crash_marker"] = str(out_dir / ".test-actor-crashed")
        if env.get("RUNNER_TEST_CRASH_IDS"):
            hooks["test_crash_ids"] = tuple(i for i in env["RUNNER_TEST_CRASH_IDS"].split(",") if i)
        if env.get("RUNNER_TEST_BATCH_DELAY"):
            hooks["test_batch_delay"] = float(env["RUNNER_TEST_BATCH_DELAY"])
        if env.get("RUNNER_BENCH_NO_TOKEN_CRC") == "1":
            hooks["bench_no_token_crc"] = True
    except ValueError as e:
        raise RunnerError(
            f"bad RUNNER_TEST_* value ({e}): these test-only variables take numbers; unset them"
        ) from None
    if hooks:
        log.warning("test-only fault injection is on: %s", hooks)
    return hooks


def prepare_out_dir(out: Path) -> Path:
    """Create --out and prove it is writable before any work starts."""
    reason = unwritable_reason(out, f".write-test-{uuid.uuid4().hex}")
    if reason is not None:
        raise RunnerError(f"cannot write to --out {out} ({reason}): choose a writable directory")
    return out


def check_strict(paths: list[Path], codec: SequenceCodec, config: EmbedConfig) -> None:
    """--strict: read everything once on the driver; any reject fails the job before GPU work."""
    preparer = job_preparer(codec, config)
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
