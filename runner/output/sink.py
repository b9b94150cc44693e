"""Writing results: embedding parts, rejects, and merging the windows of chunked sequences.

Every file is written under a temporary name, fsynced and renamed when complete, so a reader (or a
resumed job) never sees a half-written part. Memory is bounded by one part's worth of rows. A failed
write (disk full, --out gone read-only) deletes the temporary file and raises `OutputWriteError`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from runner.errors import RunnerError
from runner.input.batch import Reject
from runner.output.checksums import ChecksummedFile, FileChecksum, append_records, crc_hex
from runner.output.staged import StagedPart

REJECT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),  # input file
        ("ordinal", pa.int64()),  # position of the record in the input, 0-based (as in the parts)
        ("code", pa.string()),  # the reason's category (runner.input.batch.REJECT_CODES): group by this
        ("reason", pa.string()),  # the detail, one line a user can act on
    ]
)


class OutputWriteError(RunnerError):
    """Writing an output file failed (disk full, permissions); complete parts stay, the job can resume."""


def os_reason(e: OSError) -> str:
    """What an OSError says, in a few words: its strerror, else its first line, else its type."""
    return e.strerror or (str(e).splitlines()[0] if str(e) else type(e).__name__)


def write_error(path: Path, e: OSError) -> OutputWriteError:
    """The one-line error for an output that could not be written (the same advice for every file)."""
    return OutputWriteError(
        f"cannot write {path} ({os_reason(e)}): free disk space or make --out writable, then rerun the same command "
        "to resume (finished parts are kept)"
    )


def unwritable_reason(directory: Path, probe_name: str) -> str | None:
    """Create `directory` (parents too) and write, then remove, a small file `probe_name` in it: None when that
    works, else why not in a few words, so that a job fails before any work where writing its outputs would."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / probe_name
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        return os_reason(e)
    return None


def vector_columns(layers: Sequence[int], poolings: Sequence[str]) -> list[str]:
    """Names of the pooled-vector columns of a part, layer-major (the order of runner.stages.pooling.pool_layers):
    `embedding` for one layer and one pooling (as ever), else `layer{L}_{pooling}` with L the resolved layer."""
    if len(layers) == 1 and len(poolings) == 1:
        return ["embedding"]
    return [f"layer{layer}_{pooling}" for layer in layers for pooling in poolings]


@dataclass(frozen=True)
class OutputSpec:
    """What a job stores per sequence: pooled vectors of `layers` x `poolings`, and per-token arrays or not."""

    layers: tuple[int, ...]  # resolved representation layers (0..num_layers), in the order asked for
    poolings: tuple[str, ...]  # runner.stages.pooling.POOLINGS, in the order asked for
    embed_dim: int  # width of one vector
    per_token: str | None = None  # per-token dtype ("float32" | "float16"), None = pooled vectors only

    @property
    def columns(self) -> list[str]:
        """Pooled-vector column names (vector_columns)."""
        return vector_columns(self.layers, self.poolings)

    def schema(self) -> pa.Schema:
        """The schema of this job's pooled parts."""
        return embedding_schema(self.embed_dim, self.columns, per_token=self.per_token is not None)


def embedding_schema(embed_dim: int, columns: Sequence[str] = ("embedding",), per_token: bool = False) -> pa.Schema:
    """The schema of `embeddings/part-NNNNN.arrow`: one fixed-size float32 list column per name in `columns`;
    with `per_token`, where each row's per-token arrays are (runner.output.tokens)."""
    return pa.schema(
        [
            ("id", pa.string()),
            ("length", pa.int32()),  # residues embedded (after truncation; all residues when chunked)
            ("truncated", pa.bool_()),
            ("windows", pa.int32()),  # windows the sequence was embedded in: 1, or more when --long chunk split it
            # stored FP32 whatever the compute dtype
            *[(name, pa.list_(pa.float32(), embed_dim)) for name in columns],
            ("ordinal", pa.int64()),  # position of the record in the input, 0-based
            *(
                [
                    ("tokens_file", pa.string()),  # per-token file, relative to DIR/tokens/ (`shard/tok-<uuid>.arrow`)
                    ("tokens_row", pa.int32()),  # this sequence's row in it
                ]
                if per_token else []
            ),
        ]
    )


@dataclass
class EmbeddedRows:
    """Finished sequences ready to write (column arrays of equal length)."""

    ids: list[str]
    lengths: np.ndarray  # int32 [N]
    truncated: np.ndarray  # bool [N]
    vectors: np.ndarray  # float32 [N, C*D]: the C pooled vectors of each row back to back (vector_columns order)
    ordinals: np.ndarray  # int64 [N]
    windows: np.ndarray | None = None  # int32 [N]: windows each sequence was embedded in (None: 1 each)
    tokens_file: list[str | None] | None = None  # per-token file of each row (--per-token), else None
    tokens_row: np.ndarray | None = None  # int32 [N]: the row in that file

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: np.ndarray) -> EmbeddedRows:
        """The rows at `index` (int array), in that order."""
        return EmbeddedRows(
            [self.ids[i] for i in index], self.lengths[index], self.truncated[index], self.vectors[index],
            self.ordinals[index],
            windows=None if self.windows is None else self.windows[index],
            tokens_file=None if self.tokens_file is None else [self.tokens_file[i] for i in index],
            tokens_row=None if self.tokens_row is None else self.tokens_row[index],
        )


class PartWriter:
    """Appends rows to `embeddings/part-NNNNN.arrow`, starting a new part every `rows_per_part` rows.

    With `part_seconds`, a part is also closed (renamed into place) once its first row has waited that long,
    even if it is not full, by a clock thread that checks every second: a finished embedding is on disk at
    most `part_seconds` + 1 s after the driver received it, so a kill loses seconds of work, not a slow
    job's last hour. Writes and the clock take one lock, so a part is never closed half-written.

    Parts the actors wrote (`--part-writer actors`, runner.output.staged) are committed here too: `commit` queues
    them and a group is committed (one journal fsync, then a rename each) once it holds `rows_per_part` rows or
    its first part waited `commit_seconds` (the clock checks that too), and at close. A part number is taken
    when a part opens or commits, so the driver's own parts and committed ones share one numbering.
    """

    def __init__(
        self, out_dir: Path, embed_dim: int, rows_per_part: int, first_part: int = 0,
        part_seconds: float | None = None, columns: Sequence[str] = ("embedding",), per_token: bool = False,
        commit_seconds: float = 1.0, test_kill_before_commit: int = 0,
    ) -> None:
        self.dir = out_dir / "embeddings"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.dir, e) from None
        self.columns = list(columns)
        self.per_token = per_token
        self.schema = embedding_schema(embed_dim, self.columns, per_token)
        self.embed_dim = embed_dim
        self.rows_per_part = rows_per_part
        self.next_part = first_part
        self.rows_written = 0  # rows in completed (renamed) parts
        self.parts: list[str] = []  # names of completed parts
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._tmp: Path | None = None
        self._rows_in_open_part = 0
        # --per-token: checksums of the token files whose batches arrived since the last part closed; journaled with
        # the next part (before its rename), so every token file a visible part points at has its record.
        self._token_checksums: dict[str, FileChecksum] = {}
        self.part_seconds = part_seconds
        self._opened_at = 0.0  # time.monotonic() the open part got its first row
        self._open_number = -1  # part number of the open part (taken when it opened)
        self.commit_seconds = commit_seconds  # longest a staged part waits for its group's commit
        self._staged: list[StagedPart] = []  # staged parts received, not committed yet
        self._staged_rows = 0
        self._staged_since = 0.0  # time.monotonic() the oldest of them arrived
        self.committed = 0  # staged parts committed (renamed into place)
        self._commit_groups = 0
        self._test_kill_before_commit = test_kill_before_commit  # test-only: SIGKILL this process before group N
        # --dedup (runner.input.dedup.CopyWriter): each completed part's name and ordinals, until taken; the copies
        # find their first record's part here instead of opening every new part to read its ordinals
        self.track_ordinals = False
        self._open_ordinals: list[np.ndarray] = []  # ordinals written into the open part, in file order
        self._completed: list[tuple[str, np.ndarray]] = []
        self._lock = threading.RLock()  # re-entrant: a failed write discards the part under the same lock
        self._clock_error: OutputWriteError | None = None  # a failed timed close, raised by the next call
        self._stop_clock = threading.Event()
        self._clock_started = False
        if part_seconds is not None:
            self._start_clock()

    def _start_clock(self) -> None:
        if not self._clock_started:
            self._clock_started = True
            threading.Thread(target=self._clock, name="part-clock", daemon=True).start()

    def _clock(self) -> None:
        tick = min(1.0, self.part_seconds or 1.0, self.commit_seconds)
        while not self._stop_clock.wait(tick):
            with self._lock:
                if self._clock_error is not None:
                    continue
                try:
                    if self._staged and time.monotonic() - self._staged_since >= self.commit_seconds:
                        self._commit_staged()
                    if (self._writer is not None and self.part_seconds is not None
                            and time.monotonic() - self._opened_at >= self.part_seconds):
                        self._close_part()
                except OSError as e:
                    failed = self._tmp or self.dir
                    self.discard_open_part()
                    self._clock_error = write_error(failed, e)

    def note_token_files(self, records: Sequence[FileChecksum]) -> None:
        """Checksums of per-token files the actors wrote (runner.output.tokens): call before writing rows that
        point at them. They are journaled with the next part to close, in its own fsynced append."""
        with self._lock:  # the part clock closes parts from its own thread
            for record in records:
                self._token_checksums[record.name] = record

    def write(self, rows: EmbeddedRows) -> None:
        """Append rows; raise OutputWriteError (the open part deleted) when the disk refuses them."""
        self._append(len(rows), lambda start, end: self._record_batch(rows, start, end), rows.ordinals)

    def write_table(self, table: pa.Table) -> None:
        """Append rows that already have the parts' schema (a staged part's rows not written yet)."""
        table = table.combine_chunks()
        self._append(table.num_rows, lambda start, end: table.slice(start, end - start).to_batches()[0],
                     table.column("ordinal").to_numpy())

    def take_completed(self) -> list[tuple[str, np.ndarray]]:
        """With `track_ordinals`: (name, ordinals) of each part completed since the last call, in completion order."""
        with self._lock:
            completed, self._completed = self._completed, []
            return completed

    def commit(self, parts: Sequence[StagedPart]) -> None:
        """Queue staged parts (each complete on disk, its rows not written anywhere else) for the next group commit;
        commit the group now when it is full. Raise OutputWriteError when the journal or a rename fails."""
        if not parts:
            return
        with self._lock:
            if self._clock_error is not None:
                raise self._clock_error
            if not self._staged:
                self._staged_since = time.monotonic()
            self._staged.extend(parts)
            self._staged_rows += sum(p.rows for p in parts)
            self._start_clock()  # a quiet stream still commits within commit_seconds
            if self._staged_rows >= self.rows_per_part:
                try:
                    self._commit_staged()
                except OSError as e:
                    raise write_error(self.dir / "checksums.jsonl", e) from None

    def _commit_staged(self) -> None:
        """Commit the queued staged parts: their checksum lines (one fsync), then each one renamed to a part name."""
        if not self._staged:
            return
        self._commit_groups += 1
        if self._test_kill_before_commit and self._commit_groups >= self._test_kill_before_commit:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)  # test-only: a driver killed after the actors' renames
        staged, self._staged, self._staged_rows = self._staged, [], 0
        numbers = list(range(self.next_part, self.next_part + len(staged)))
        self.next_part += len(staged)
        names = [f"part-{n:05d}.arrow" for n in numbers]
        # the checksums are on disk before the parts are visible: every visible part has its line, and so has every token file it points at (noted before its record was
        # handed over); one write, one fsync for the group
        append_records(self.dir.parent, [*self._token_checksums.values(),
                                         *(FileChecksum(f"{self.dir.name}/{name}", p.rows, p.bytes, p.crc32)
                                           for name, p in zip(names, staged, strict=True))])
        self._token_checksums.clear()
        for name, p in zip(names, staged, strict=True):
            os.replace(p.path, self.dir / name)
            self.parts.append(name)
            if self.track_ordinals:
                self._completed.append((name, p.ordinals))
            self.rows_written += p.rows
            self.committed += 1

    @property
    def rows_staged(self) -> int:
        """Rows in staged parts received and not committed yet (close() commits them)."""
        return self._staged_rows

    def _append(self, count: int, batch: Callable[[int, int], pa.RecordBatch], ordinals: np.ndarray) -> None:
        """Write rows [0, count) as `batch(start, end)` record batches, starting a new part when one is full."""
        with self._lock:  # the part clock closes parts from its own thread
            if self._clock_error is not None:
                raise self._clock_error
            self._append_locked(count, batch, ordinals)

    def _append_locked(self, count: int, batch: Callable[[int, int], pa.RecordBatch], ordinals: np.ndarray) -> None:
        try:
            start = 0
            while start < count:
                if self._writer is None:
                    self._open()
                room = self.rows_per_part - self._rows_in_open_part
                end = min(count, start + room)
                self._writer.write_batch(batch(start, end))  # type: ignore[union-attr]
                if self.track_ordinals:
                    self._open_ordinals.append(np.asarray(ordinals[start:end], dtype=np.int64))
                self._rows_in_open_part += end - start
                start = end
                if self._rows_in_open_part >= self.rows_per_part:
                    self._close_part()
        except OSError as e:
            failed = self._tmp or self.dir
            self.discard_open_part()
            raise write_error(failed, e) from None

    def close(self) -> None:
        """Finish the open part (if it holds any row), commit the staged parts received, and stop the clock."""
        self._stop_clock.set()
        with self._lock:
            if self._clock_error is not None:
                raise self._clock_error
            self._close_open_part()
            try:
                self._commit_staged()
            except OSError as e:
                raise write_error(self.dir / "checksums.jsonl", e) from None

    def _close_open_part(self) -> None:
        if self._writer is not None:
            try:
                self._close_part()
            except OSError as e:
                failed = self._tmp or self.dir
                self.discard_open_part()
                raise write_error(failed, e) from None

    def discard_open_part(self) -> None:
        """Drop the part being written (a hard stop, or a failed write) and forget the staged parts not committed:
        only complete parts stay visible (the staged files are deleted by the next run)."""
        self._stop_clock.set()
        with self._lock:
            self._staged, self._staged_rows = [], 0
            if self._writer is not None:
                with contextlib.suppress(OSError, pa.ArrowException):  # being deleted; the disk may be what failed
                    self._writer.close()
                with contextlib.suppress(OSError):
                    self._file.close()
            if self._tmp is not None:
                with contextlib.suppress(OSError):  # e.g. --out went read-only: the next (resumed) run deletes it
                    self._tmp.unlink(missing_ok=True)
                if self._open_number == self.next_part - 1:
                    self.next_part -= 1  # the number is free again: no gap in the numbering
            self._writer, self._tmp, self._rows_in_open_part = None, None, 0
            self._open_ordinals = []

    def _open(self) -> None:
        self._open_number = self.next_part  # taken now: staged parts may commit while this one is open
        self.next_part += 1
        name = f"part-{self._open_number:05d}.arrow"
        self._tmp = self.dir / f".{name}.tmp"
        self._file = ChecksummedFile(self._tmp)  # CRC-32 as the bytes go out: no second read
        self._writer = self._file.open_arrow_file(self.schema)
        self._rows_in_open_part = 0
        self._opened_at = time.monotonic()

    def _close_part(self) -> None:
        assert self._writer is not None and self._tmp is not None  # internal invariant, not user input
        self._writer.close()
        final = self.dir / f"part-{self._open_number:05d}.arrow"
        self._file.fsync()
        self._file.close()
        # the checksum is on disk before the part is visible: every visible part has one, and so has every token
        # file it points at (noted before its rows were written; one write, one fsync for all)
        part = FileChecksum(f"{self.dir.name}/{final.name}", self._rows_in_open_part, self._file.size,
                            crc_hex(self._file.crc))
        append_records(self.dir.parent, [*self._token_checksums.values(), part])
        self._token_checksums.clear()
        os.replace(self._tmp, final)
        self.parts.append(final.name)
        if self.track_ordinals:
            self._completed.append((final.name, np.concatenate(self._open_ordinals or [np.zeros(0, np.int64)])))
        self._open_ordinals = []
        self.rows_written += self._rows_in_open_part
        self._writer, self._tmp, self._rows_in_open_part = None, None, 0

    @property
    def rows_open(self) -> int:
        """Rows in the part still open: written, not yet closed and renamed into place (close() does that)."""
        return self._rows_in_open_part

    def _record_batch(self, rows: EmbeddedRows, start: int, end: int) -> pa.RecordBatch:
        return part_record_batch(rows, start, end, self.schema, len(self.columns), self.embed_dim, self.per_token)


def part_record_batch(rows: EmbeddedRows, start: int, end: int, schema: pa.Schema, columns: int, embed_dim: int,
                      per_token: bool) -> pa.RecordBatch:
    """Rows [start, end) as a record batch of a pooled part (`schema`, from embedding_schema): the driver's parts
    and the actors' staged parts (runner.output.staged) are built by this one function."""
    vectors = rows.vectors[start:end].reshape(end - start, columns, embed_dim)  # [n, C, D]
    vector_arrays = []
    for c in range(columns):
        flat = pa.array(np.ascontiguousarray(vectors[:, c], dtype=np.float32).ravel(), pa.float32())
        vector_arrays.append(pa.FixedSizeListArray.from_arrays(flat, embed_dim))
    return pa.record_batch(
        [
            pa.array(rows.ids[start:end], pa.string()),
            pa.array(rows.lengths[start:end], pa.int32()),
            pa.array(rows.truncated[start:end], pa.bool_()),
            pa.array(np.ones(end - start, np.int32) if rows.windows is None else rows.windows[start:end], pa.int32()),
            *vector_arrays,
            pa.array(rows.ordinals[start:end], pa.int64()),
            *(
                [pa.array(rows.tokens_file[start:end], pa.string()), pa.array(rows.tokens_row[start:end], pa.int32())]
                if per_token and rows.tokens_file is not None and rows.tokens_row is not None else []
            ),
        ],
        schema=schema,
    )


class RejectWriter:
    """Streams rejects into `rejects.arrow` (renamed into place on close, even after an abort)."""

    def __init__(self, out_dir: Path) -> None:
        self.final = out_dir / "rejects.arrow"
        self._tmp = out_dir / ".rejects.arrow.tmp"
        try:
            self._writer: pa.ipc.RecordBatchFileWriter | None = pa.ipc.new_file(str(self._tmp), REJECT_SCHEMA)
        except OSError as e:
            raise write_error(self._tmp, e) from None
        self.count = 0
        self.reasons: dict[str, int] = {}  # reject count per reason code (runner.input.batch.REJECT_CODES)

    def write(self, rejects: list[Reject]) -> None:
        if not rejects or self._writer is None:
            return
        try:
            self._writer.write_batch(
                pa.record_batch(
                    [
                        pa.array([r.id for r in rejects], pa.string()),
                        pa.array([r.source for r in rejects], pa.string()),
                        pa.array([r.ordinal for r in rejects], pa.int64()),
                        pa.array([r.code for r in rejects], pa.string()),
                        pa.array([r.reason for r in rejects], pa.string()),
                    ],
                    schema=REJECT_SCHEMA,
                )
            )
        except OSError as e:
            self._writer = None
            raise write_error(self._tmp, e) from None
        self.count += len(rejects)
        for r in rejects:
            self.reasons[r.code] = self.reasons.get(r.code, 0) + 1

    def close(self) -> None:
        """Put rejects.arrow in place (rejects are recomputed by every run, so each run rewrites it whole)."""
        if self._writer is None:
            return
        try:
            self._writer.close()
            _fsync(self._tmp)
            os.replace(self._tmp, self.final)
        except OSError as e:
            raise write_error(self.final, e) from None
        finally:
            self._writer = None


class ChunkMerger:
    """Combines the pooled vectors of a chunked sequence's windows into one per column.

    `max` columns: the per-channel max over the windows (= the max over every residue of the windows' own
    forwards). Every other column (`mean`, `mean_all`, `cls`): the mean of the windows' vectors weighted by their
    residues (for `cls`: a residue-weighted mean of each window's BOS vector, since no single BOS saw the whole
    sequence). Windows of one sequence may come back from different actors in any order; only sequences with
    windows still missing are held, so memory is bounded by the long sequences in flight.
    """

    def __init__(self, poolings: Sequence[str] = ("mean",), layers: int = 1) -> None:
        # Per column (layer-major, as vector_columns): whether it merges by max (else by weighted mean).
        self._is_max = np.array([p == "max" for _ in range(layers) for p in poolings], dtype=bool)  # [C]
        self._pending: dict[int, _PartialSequence] = {}  # by input ordinal
        self._failed: set[int] = set()  # ordinals with a window that failed: the sequence is a reject

    @property
    def pending(self) -> int:
        return len(self._pending)

    def fail(self, ordinal: int) -> bool:
        """A window of this sequence could not be embedded: drop it; True only the first time (one reject)."""
        self._pending.pop(ordinal, None)
        if ordinal in self._failed:
            return False
        self._failed.add(ordinal)
        return True

    def add(
        self, sequence_id: str, ordinal: int, window_index: int, window_count: int, residues: int, total: int,
        vector: np.ndarray,
    ) -> np.ndarray | None:
        """Add one window; return the merged vector once every window of the sequence has arrived."""
        if ordinal in self._failed:
            return None  # another window of this sequence failed: it is a reject, not a row
        part = self._pending.get(ordinal)
        columns = len(self._is_max)
        if part is None:
            part = self._pending[ordinal] = _PartialSequence(sequence_id, window_count, total, vector.shape[0])
        if window_index in part.seen:
            return None  # a retried batch delivered this window twice: keep the first
        part.seen.add(window_index)
        v = vector.astype(np.float64).reshape(columns, -1)  # [C, D]
        part.weighted_sum += (v * residues).ravel()
        part.maximum = np.maximum(part.maximum, v.ravel())  # NaN propagates (the actor flags it anyway)
        part.weight += residues
        if len(part.seen) < part.window_count:
            return None
        del self._pending[ordinal]
        mean = (part.weighted_sum / max(part.weight, 1)).reshape(columns, -1)  # [C, D]
        merged = np.where(self._is_max[:, None], part.maximum.reshape(columns, -1), mean)  # [C, D]
        return merged.astype(np.float32).ravel()


@dataclass
class _PartialSequence:
    id: str
    window_count: int
    total_residues: int
    dim: int

    def __post_init__(self) -> None:
        self.seen: set[int] = set()
        self.weighted_sum = np.zeros(self.dim, dtype=np.float64)  # [C*D]
        self.maximum = np.full(self.dim, -np.inf, dtype=np.float64)  # [C*D]
        self.weight = 0


def _fsync(path: Path) -> None:
    """Flush a finished file to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
