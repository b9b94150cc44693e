"""The driver's side of the stream: route each table of stage output to parts, rejects, chunk merging and the shadow."""

from __future__ import annotations

import json
import logging
import pydoc
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from runner.config import EmbedConfig
from runner.driver.metrics import DriverMetrics
from runner.driver.progress import Progress
from runner.driver.signals import StopSignals
from runner.errors import NonFiniteEmbedding, RunnerError, first_line
from runner.input.batch import Reject
from runner.input.dedup import CopyWriter
from runner.output.checksums import FileChecksum
from runner.output.report import JobReport
from runner.output.resume import OrdinalSet
from runner.output.sink import ChunkMerger, EmbeddedRows, OutputSpec, PartWriter, RejectWriter
from runner.output.staged import StagedPart, read_staged, staged_records
from runner.output.tokens import TOKENS_DIR
from runner.stages.shadow import ShadowMonitor

log = logging.getLogger("runner")


# Blocks Ray Data's iter_batches prefetches for the driver: none. With prefetch_batches=N it hands over a block only
# once N more have arrived behind it (its sliding window), so a one-GPU job of four blocks got its first rows with its
# last, and every block waited N blocks' work in memory before reaching a part. Without it the driver fetches each
# block when its turn comes: on its own node a shared-memory map, from another node one transfer (small with
# actor-written parts, which carry no vectors).
PREFETCH_BLOCKS = 0


def drain(
    dataset,
    writer: PartWriter,
    rejects: RejectWriter,
    report: JobReport,
    progress: Progress,
    config: EmbedConfig,
    precision: str,
    shadow: ShadowMonitor | None,
    metrics: DriverMetrics,
    written: OrdinalSet | None = None,
    signals: StopSignals | None = None,
    copies: CopyWriter | None = None,
    spec: OutputSpec | None = None,
) -> None:
    """Pull embedded rows from the stream and write them; abort at the first non-finite embedding.

    Returns early, with every table received written, once `signals` holds a stop request (--dedup: repeats
    whose first record's part is not complete yet are left for the next run). `spec` says how the windows of a
    chunked sequence merge (by column); None: one `mean`-like column.
    """
    merger = ChunkMerger(spec.poolings, len(spec.layers)) if spec is not None else ChunkMerger()
    written = written if written is not None else OrdinalSet()
    signals = signals if signals is not None else StopSignals()
    batches = iter(dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=PREFETCH_BLOCKS))
    stop_stream = getattr(batches, "close", None)  # ends Ray Data's executor when we stop early
    try:
        while True:
            signals.waiting = True
            try:
                if signals.signum is not None:
                    return  # stop taking new work; what arrived is written
                table = next(batches, None)
            except Exception as e:  # raised by the stream: a Ray task or actor failed (our own code below is not here)
                if signals.signum is not None:
                    # A terminal's Ctrl-C reaches Ray's own processes too (same process group): the stream
                    # failing after a stop request is part of stopping, not a job failure.
                    log.info("the stream ended after the stop request: %s", type(e).__name__)
                    return
                log.debug("the stream failed:\n%s", e)  # the remote traceback, for -vv
                raise stream_failure(e) from None
            finally:
                signals.waiting = False
            if table is None:
                break
            handle_table(table, writer, rejects, report, merger, config, precision, metrics, written, copies)
            if copies is not None:
                count_copies(copies.flush(), report, metrics)
            if report.first_output_seconds is None and report.tokens:
                report.first_output_seconds = time.monotonic() - progress.start
                report.first_output_at = time.time()
                report.tokens_at_first_output = report.tokens
            if shadow is not None:
                offer_to_shadow(table, shadow)
                metrics.shadow_queue(shadow.queue_depth)
            show_progress(progress, report, shadow)
    finally:
        if stop_stream is not None:
            stop_stream()
    if merger.pending:
        raise RunnerError(f"internal error: {merger.pending} chunked sequence(s) never completed")
    if copies is not None:
        count_copies(copies.finish(), report, metrics)
    show_progress(progress, report, shadow, force=True)


def show_progress(progress: Progress, report: JobReport, shadow: ShadowMonitor | None, force: bool = False) -> None:
    """The progress display's figures from the report (busy: the actors' own clocks) and the shadow."""
    progress.update(
        report.records_done,
        report.tokens,
        busy_seconds=sum(clock.busy_seconds for clock in report.actors.values()),
        shadow=(shadow.compared, shadow.violations) if shadow is not None else None,
        force=force,
        first_batch_start=report.first_batch_start,
    )


def stream_failure(error: BaseException) -> RunnerError:
    """One line for a failure inside the Ray stream: a bad input found part-way, an actor out of retries, a
    broken model or device, any exception a Ray task or actor raised.

    Ray wraps a remote exception in layers (RayTaskError, UserCodeException); the innermost one says what
    actually went wrong. A wrapped RunnerError (a bad input record, a broken checkpoint) already is one line
    with its fix: it keeps its message and exit code. Anything else is named with the stage it came from.
    """
    cause = error
    seen: set[int] = set()
    while id(cause) not in seen:
        seen.add(id(cause))
        inner = getattr(cause, "cause", None) or cause.__cause__
        if not isinstance(inner, BaseException):
            break
        cause = inner
    if isinstance(cause, RunnerError):
        return _same_error(first_line(cause), type(cause).exit_code)
    detail = f"{type(cause).__name__}: {first_line(cause)}"
    # The exception objects do not always carry the remote chain, but the text does: the first
    # "pkg.Type: message" line that is not Ray's own is the exception the remote code raised.
    remote = next((m for m in map(_EXCEPTION_LINE.match, str(error).splitlines()) if m), None)
    if remote is not None:
        # Only our own module names are looked up (importing names from error text could run anything).
        remote_type = pydoc.locate(remote.group(1)) if remote.group(1).startswith("runner.") else None
        if isinstance(remote_type, type) and issubclass(remote_type, RunnerError):  # e.g. a bad input record
            return _same_error(remote.group(2), remote_type.exit_code)
        detail = f"{remote.group(1).rsplit('.', 1)[-1]}: {remote.group(2)}"
    return RunnerError(
        f"the embedding stream failed in {_stage_of(error)} ({detail[:400]}): finished parts are kept; fix the "
        "cause and rerun the same command to resume (the full traceback: -vv)"
    )


def _same_error(message: str, exit_code: int) -> RunnerError:
    wrapped = RunnerError(message)
    wrapped.exit_code = exit_code
    return wrapped


# Ray task / actor names of the stream's stages (runner.driver.cluster.build_dataset) -> what a user calls them.
_STAGES = {"ReadInputRecords": "reading the inputs", "pack_records": "tokenizing and packing",
           "EmbedStage": "an embedding actor", "embed": "a shadow actor"}


def _stage_of(error: BaseException) -> str:
    """Which stage of the stream raised `error`, from the Ray task name in its text."""
    text = f"{getattr(error, 'function_name', '')} {first_line(error)}"
    return next((name for key, name in _STAGES.items() if key in text), "a Ray task")


_EXCEPTION_LINE = re.compile(r"^(?!ray\.)((?:[A-Za-z_]\w*\.)*[A-Z]\w*): (.+)$")


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The fixed-size-list `embedding` column as a float32 [N, C*D] array (no per-row Python objects)."""
    dim = table.schema.field("embedding").type.list_size
    return table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)  # [N, D]


def offer_to_shadow(table: pa.Table, shadow: ShadowMonitor) -> None:
    """Hand the windows the actors sampled (token ids returned) to the shadow, with their stored vectors."""
    sampled = table.column("shadow_tokens").is_valid().to_numpy(zero_copy_only=False)
    if not sampled.any():
        return
    sub = table.filter(pa.array(sampled))
    main = embedding_matrix(sub)  # [N, C*D]
    tokens = [np.asarray(t, dtype=np.int32) for t in sub.column("shadow_tokens").to_pylist()]
    shadow.offer(sub.column("id").to_pylist(), sub.column("residues").to_numpy(), main, tokens)


def handle_table(
    table: pa.Table,
    writer: PartWriter,
    rejects: RejectWriter,
    report: JobReport,
    merger: ChunkMerger,
    config: EmbedConfig,
    precision: str,
    metrics: DriverMetrics,
    written: OrdinalSet | None = None,
    copies: CopyWriter | None = None,
) -> None:
    """Route one table of stage output: rejects, block record counts, embeddings (merged if chunked), and with
    --dedup the repeats, handed to `copies` (written by its `flush` once their first record's part is complete).

    `written` holds the ordinals already in parts: a row delivered twice (a retried batch) is dropped, so
    no id is ever written twice. With --part-writer actors most rows arrive as staged parts the actors wrote
    (runner.output.staged): they are checked against `written` and handed to the writer's commit, no vectors read.
    """
    # Per-table work is a fixed number of column operations (no Arrow compute kernels: each costs ~0.1 ms, and
    # with --part-writer actors a table is one packed batch's few record rows, so fixed costs are the driver's).
    is_reject = valid(table, "reject_reason")
    ids_valid = valid(table, "id")
    is_copy = valid(table, "copy_of")
    in_staged = valid(table, "staged_file")  # with an id: came back for the shadow only, its staged part holds it
    embedded = ids_valid & ~is_reject & ~is_copy
    is_window = embedded & ~in_staged
    report.records_read += int(numbers(table, "records_in").sum())
    report.tokens += int(numbers(table, "batch_tokens").sum())
    budgets = numbers(table, "batch_budget")
    report.budget_tokens += int(budgets.sum())
    report.batches += int((budgets > 0).sum())
    report.oom_splits += int(numbers(table, "oom_splits").sum())
    report.actor_restarts += int(numbers(table, "actor_restarts").sum())
    note_token_files(table, writer)
    token_bytes = numbers(table, "tokens_bytes")
    report.token_files_written += int((token_bytes > 0).sum())
    report.token_bytes_written += int(token_bytes.sum())
    report.token_write_seconds += float(numbers(table, "tokens_seconds").sum())
    clock_batches(table, report)
    collect_startup(table, report)

    if is_reject.any():
        sub = table.filter(pa.array(is_reject)).to_pydict()
        found = []
        for i, src, r, o, count in zip(
            sub["id"], sub["source"], sub["reject_reason"], sub["ordinal"], sub["chunk_count"], strict=True
        ):
            # A failed window of a chunked sequence rejects the whole sequence, once.
            if count > 1 and not merger.fail(o):
                continue
            found.append(Reject(i, src or "", r, o))
        if copies is not None:
            found += copies.rejected(found)  # a sequence that failed to embed fails its repeats too
        report.failed_records += sum(r.reason.startswith("embedding failed") for r in found)
        rejects.write(found)
        report.records_done += len(found)
        metrics.rejected(len(found))
    if copies is not None:
        take_copies(table, is_copy, copies, rejects, report, metrics)
    finite = table.column("finite").to_numpy() if table.column("finite").null_count == 0 else valid(table, "finite")
    if not finite[embedded].all():  # before anything of this table is written or committed
        bad = [table.column("id")[i].as_py() for i in np.flatnonzero(embedded & ~finite)]
        raise NonFiniteEmbedding(
            f"non-finite (NaN/Inf) embedding for {len(bad)} sequence(s): {', '.join(bad[:10])}"
            f"{' ...' if len(bad) > 10 else ''} (model {config.model}, precision {precision}); nothing "
            f"non-finite was written. Rerun with --precision fp32, or exclude these sequences"
        )
    staged = staged_records(table, ids_valid)
    if staged:
        is_record = ~ids_valid & in_staged
        records = table if is_record.all() else table.filter(pa.array(is_record))
        commit_staged(staged, records, writer, written, report, metrics)
    if not is_window.any():
        return
    win = table if is_window.all() else table.filter(pa.array(is_window))  # most tables are windows only: no copy
    count_workers(win, np.ones(win.num_rows, dtype=np.int64), report)
    vectors = embedding_matrix(win)  # [N, C*D]
    chunk_count = win.column("chunk_count").to_numpy()
    whole = chunk_count <= 1
    ids = win.column("id").to_pylist()
    residues = win.column("residues").to_numpy()
    truncated = win.column("truncated").to_numpy(zero_copy_only=False)
    ordinals = win.column("ordinal").to_numpy()
    per_token = writer.per_token
    # --per-token: where the actor put each window's sequence (every window of a chunked sequence points at
    # the one stitched row of its sequence).
    tok_files = win.column("tokens_file").to_pylist() if per_token else []
    tok_rows = win.column("tokens_row").fill_null(-1).to_numpy() if per_token else np.zeros(0, np.int32)
    keep = np.flatnonzero(whole)
    out_ids = [ids[i] for i in keep]
    out_len, out_trunc, out_vec, out_ord = (
        [residues[keep]],
        [truncated[keep]],
        [vectors if len(keep) == len(vectors) else vectors[keep]],  # no copy when nothing is chunked
        [ordinals[keep]],
    )
    out_windows = [np.ones(len(keep), np.int32)]
    out_tok_files = [tok_files[i] for i in keep] if per_token else []
    out_tok_rows = [tok_rows[keep]] if per_token else []
    if not whole.all():
        chunk_index = win.column("chunk_index").to_numpy()
        total = win.column("total_residues").to_numpy()
        for i in np.flatnonzero(~whole):
            merged = merger.add(
                ids[i],
                int(ordinals[i]),
                int(chunk_index[i]),
                int(chunk_count[i]),
                int(residues[i]),
                int(total[i]),
                vectors[i],
            )
            if merged is not None:
                out_ids.append(ids[i])
                out_len.append(np.array([total[i]], np.int32))
                out_trunc.append(np.array([False]))
                out_vec.append(merged[None, :])
                out_ord.append(np.array([ordinals[i]], np.int64))
                out_windows.append(np.array([chunk_count[i]], np.int32))
                if per_token:
                    out_tok_files.append(tok_files[i])
                    out_tok_rows.append(tok_rows[i : i + 1])
                report.chunked += 1
    rows = EmbeddedRows(
        ids=out_ids,
        lengths=np.concatenate(out_len).astype(np.int32),
        truncated=np.concatenate(out_trunc).astype(bool),
        vectors=(out_vec[0] if len(out_vec) == 1 else np.concatenate(out_vec)).astype(np.float32, copy=False),
        ordinals=np.concatenate(out_ord).astype(np.int64),
        windows=np.concatenate(out_windows).astype(np.int32),
        tokens_file=out_tok_files if per_token else None,
        tokens_row=np.concatenate(out_tok_rows).astype(np.int32) if per_token else None,
    )
    if per_token and (rows.tokens_row < 0).any():
        missing = [rows.ids[i] for i in np.flatnonzero(rows.tokens_row < 0)[:5]]
        raise RunnerError(f"internal error: no per-token row for {', '.join(missing)}; please report this")
    if written is not None:
        rows = drop_written(rows, written, report)
        if not len(rows):
            return
    report.truncated += int(rows.truncated.sum())
    report.records_done += len(rows)
    writer.write(rows)
    metrics.written(len(rows))


def note_token_files(table: pa.Table, writer: PartWriter) -> None:
    """--per-token: hand the checksums of the token files this table's rows point at to the part writer, which
    journals them with the part that commits those rows (runner.output.tokens says why there)."""
    if not writer.per_token:
        return
    checked = table.column("tokens_checksum").is_valid().to_numpy(zero_copy_only=False)
    if not checked.any():
        return
    sub = table.filter(pa.array(checked))
    files = sub.column("tokens_file").to_pylist()
    first: dict[str, int] = {}  # one row per file: every window pointing at a file carries the same record
    for i, name in enumerate(files):
        first.setdefault(name, i)
    records = sub.column("tokens_checksum").take(pa.array(list(first.values()))).to_pylist()
    writer.note_token_files([FileChecksum(f"{TOKENS_DIR}/{name}", r["rows"], r["bytes"], r["crc32"])
                             for name, r in zip(first, records, strict=True)])


def valid(table: pa.Table, name: str) -> np.ndarray:
    """bool [N]: which rows of column `name` are not null (all False when the table has no such column)."""
    index = table.schema.get_field_index(name)
    if index < 0:
        return np.zeros(table.num_rows, dtype=bool)
    column = table.column(index)
    if column.null_count in (0, len(column)):  # the common cases, without building a mask
        return np.full(len(column), column.null_count == 0, dtype=bool)
    return column.is_valid().to_numpy(zero_copy_only=False)


def numbers(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column without nulls as a numpy array (zero-copy for one chunk)."""
    column = table.column(name)
    return column.chunk(0).to_numpy() if column.num_chunks == 1 else column.to_numpy()


def count_workers(rows: pa.Table, counts: np.ndarray, report: JobReport) -> None:
    """Add `counts` (int64, one per row of `rows`) to the rows' workers, and their attention kernels."""
    if rows.num_rows <= 16:  # with --part-writer actors: a batch's few staged-part records
        for worker, count in zip(rows.column("worker").to_pylist(), counts.tolist(), strict=True):
            report.workers[worker] = report.workers.get(worker, 0) + int(count)
        report.attention.update(rows.column("attention").to_pylist())
        return
    workers = rows.column("worker").combine_chunks().dictionary_encode()
    per_worker = np.bincount(workers.indices.to_numpy(zero_copy_only=False), weights=counts,
                             minlength=len(workers.dictionary))
    for worker, count in zip(workers.dictionary.to_pylist(), per_worker.tolist(), strict=True):
        if count:
            report.workers[worker] = report.workers.get(worker, 0) + int(count)
    report.attention.update(rows.column("attention").unique().to_pylist())


def commit_staged(staged: list[StagedPart], records: pa.Table, writer: PartWriter, written: OrdinalSet | None,
                  report: JobReport, metrics: DriverMetrics) -> None:
    """Commit the parts the actors staged (runner.output.staged; `records`: their rows of the table, in the same
    order), keeping each ordinal once: a part whose rows are all written already (a batch delivered twice) is
    left uncommitted (runner.output.staged.remove_staged deletes it at the end of the run); one written in part is
    rewritten here without those rows (rare: retries repeat whole batches); the rest go to the writer's group
    commit."""
    fresh_rows = np.array([p.rows for p in staged], dtype=np.int64)
    commit: list[StagedPart] = []
    for i, part in enumerate(staged):
        fresh = (~written.contains(part.ordinals) if written is not None else np.ones(part.rows, dtype=bool))
        if fresh.all():
            commit.append(part)
            report.truncated += part.truncated
        else:
            dropped = int((~fresh).sum())
            report.duplicates_dropped += dropped
            log.warning("dropped %d row(s) delivered twice (a retried batch): each sequence is written once", dropped)
            if fresh.any():  # (a part all of whose rows are written stays in .staged: the end of the run
                # deletes it; it may be the very file an earlier delivery of this output queued for commit)
                rows = read_staged(part.path).filter(pa.array(fresh))
                report.truncated += int(pa.compute.sum(rows.column("truncated").cast(pa.int64())).as_py() or 0)
                writer.write_table(rows)
                Path(part.path).unlink(missing_ok=True)
            fresh_rows[i] = int(fresh.sum())
        if written is not None:
            written.add(part.ordinals[fresh])
    writer.commit(commit)
    count_workers(records, fresh_rows, report)
    report.records_done += int(fresh_rows.sum())
    metrics.written(int(fresh_rows.sum()))


def take_copies(table: pa.Table, is_copy: np.ndarray, copies: CopyWriter, rejects: RejectWriter,
                report: JobReport, metrics: DriverMetrics) -> None:
    """--dedup: add the blocks' counts and hand the repeats to `copies` (repeats of a failed sequence are rejects)."""
    for counts in table.column("dedup_counts").drop_null().to_pylist():
        copies.counts.add(counts)
    if not is_copy.any():
        return
    # only the four columns a copy needs: filtering the whole table copies its vector columns too (~9 ms a table)
    sub = table.select(["id", "ordinal", "source", "copy_of"]).filter(pa.array(is_copy))
    failed = copies.request(sub.column("id").combine_chunks(), sub.column("ordinal").to_numpy(),
                            sub.column("source").combine_chunks(), sub.column("copy_of").to_numpy())
    if failed:
        rejects.write(failed)
        report.failed_records += len(failed)
        report.records_done += len(failed)
        metrics.rejected(len(failed))


def count_copies(rows: int, report: JobReport, metrics: DriverMetrics) -> None:
    """Rows `CopyWriter` just wrote (repeats), for progress and metrics."""
    if rows:
        report.records_done += rows
        metrics.written(rows)


def clock_batches(table: pa.Table, report: JobReport) -> None:
    """Add each batch of the table to its actor's clock (a batch's figures ride on its first window)."""
    done = numbers(table, "batch_done")
    first = np.flatnonzero(done > 0)  # time.time() is never 0: a set batch_done marks a batch's first window
    if not len(first):
        return
    workers = table.column("worker").take(pa.array(first)).to_pylist()
    tokens = numbers(table, "batch_tokens")[first]
    seconds = numbers(table, "batch_seconds")[first]
    for worker, batch_tokens, batch_seconds, batch_done in zip(workers, tokens, seconds, done[first], strict=True):
        report.clock_batch(worker, int(batch_tokens), float(batch_seconds), float(batch_done))


def collect_startup(table: pa.Table, report: JobReport) -> None:
    """Each actor's start-up report, which rides on the first row of its first embedded batch."""
    if "startup" not in table.column_names or table.column("startup").null_count == table.num_rows:
        return
    for text in table.column("startup").drop_null().to_pylist():
        entry = json.loads(text)
        report.actor_startup.setdefault(entry.pop("worker", "?"), entry)


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
    return rows.take(np.flatnonzero(keep))
