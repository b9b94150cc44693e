"""Per-token output files (`--per-token`): their layout, how actors write them, and how the driver keeps them
exactly-once.

Layout: `DIR/tokens/<actor-shard>/tok-<uuid>.arrow`, one Arrow IPC file per packed batch, written by the
embedding actor itself (the data never passes through the driver), under a hidden temporary name, fsynced and
renamed before the actor returns that batch's pooled rows. One row per sequence: `id`, `ordinal`, `length` (rows
of the arrays: residues for ESM-2, BPE tokens for DNABERT) and per layer `layer{L}`, a list of `length` vectors
(list<fixed_size_list<T>[D]>, T float32 or float16).

The pooled part is the commit record: a pooled row's `tokens_file` / `tokens_row` point at its sequence's
per-token row, and a token row counts only while a complete pooled part points at it. `reconcile` (at the end of
a run and when a run resumes) deletes token files no complete part points at, and rewrites a file that parts point
into only in part: the kept rows go to a new file, the parts pointing at the old one are rewritten to point at the
new one, then the old one is deleted (each step a rename, so a crash between steps leaves files the next
reconcile cleans up). So every sequence of the job has exactly one per-token row on disk.

Checksums: the actor computes each file's CRC-32, bytes and rows as the bytes go out (ChecksummedFile, no second
read) and returns them with the batch's rows (the `tokens_checksum` column). The driver journals them in
`DIR/checksums.jsonl` in the same fsynced append as the pooled part that commits those rows, before that part's
rename (runner.output.sink.PartWriter). So every token file a visible part points at has its record, and
the record is committed with the commit record. Actors never write the journal: on a cluster they are many
processes on several nodes, and appends from several NFS clients to one file can interleave or overwrite each
other. A sidecar file per token file would double the files and metadata round trips on the shared file system
and need its own exactly-once cleanup; a per-actor journal would get a second writer when reconcile (in the
driver) rewrites that actor's files. A token file on disk without a record was never committed: no complete part
points at it, and reconcile deletes it. Reconcile journals the file it rewrites before re-pointing any part at
it, and drops the records of files it deletes. On resume every token file is read against its record
(`check_token_files`): one that is truncated or fails its checksum is deleted with the parts pointing at it, and
their sequences are embedded again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from runner.input.prepare import chunk_starts
from runner.output.checksums import (
    FileChecksum,
    append_record,
    append_records,
    check_file,
    drop_records,
    publish_checksummed,
    write_checksummed,
)

log = logging.getLogger("runner")

TOKENS_DIR = "tokens"
TOKEN_FILE = re.compile(r"^tok-[0-9a-f]{32}\.arrow$")
TMP_TOKEN_FILE = re.compile(r"^\.tok-[0-9a-f]{32}\.arrow\.tmp$")
PER_TOKEN_DTYPES: tuple[str, ...] = ("float32", "float16")
_ARROW_TYPES = {"float32": pa.float32(), "float16": pa.float16()}
CHECK_THREADS = 4  # token files checked at once (resume, runner verify): enough to keep a parallel file system busy


@dataclass(frozen=True)
class TokenFile:
    """A per-token file just written, with what its checksum record needs (runner.output.checksums)."""

    name: str  # file name in its shard folder (`tok-<uuid>.arrow`)
    rows: int  # sequences in it
    bytes: int  # its size
    crc32: str  # CRC-32 of its bytes, 8 hex digits

    def record(self, shard: str) -> FileChecksum:
        """Its journal record, named relative to the job's --out."""
        return FileChecksum(f"{TOKENS_DIR}/{shard}/{self.name}", self.rows, self.bytes, self.crc32)


def token_schema(layers: Sequence[int], embed_dim: int, dtype: str) -> pa.Schema:
    """The schema of a per-token file: id, ordinal, length, then one list<fixed_size_list<T>[D]> per layer."""
    value = pa.list_(_ARROW_TYPES[dtype], embed_dim)
    return pa.schema(
        [
            ("id", pa.string()),
            ("ordinal", pa.int64()),  # input position of the sequence (as in the pooled parts)
            ("length", pa.int32()),  # vectors per layer: residues (ESM-2) or BPE tokens (DNABERT), specials excluded
            *[(f"layer{layer}", pa.list_(value)) for layer in layers],
        ]
    )


def shard_name(worker: str) -> str:
    """The folder of one actor's token files: its worker name made path-safe (host, device, pid)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", worker).strip("-") or "actor"


def token_table(
    ids: list[str],
    ordinals: np.ndarray,  # int64 [S]
    arrays: list[np.ndarray],  # per layer [R, D]: the sequences' vectors back to back
    lengths: np.ndarray,  # int32 [S]: vectors of each sequence (sum = R)
    schema: pa.Schema,
) -> pa.Table:
    """One row per sequence, from the vectors of all sequences back to back (zero-copy where Arrow allows)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    columns: list[pa.Array] = [pa.array(ids, pa.string()), pa.array(ordinals, pa.int64()), pa.array(lengths, pa.int32())]
    for array, f in zip(arrays, list(schema)[3:], strict=True):
        value_type = f.type.value_type
        flat = pa.array(np.ascontiguousarray(array).reshape(-1), value_type.value_type)
        vectors = pa.FixedSizeListArray.from_arrays(flat, value_type.list_size)
        columns.append(pa.ListArray.from_arrays(pa.array(offsets), vectors))
    return pa.Table.from_arrays(columns, schema=schema)


def stitch_cuts(total: int, window: int, overlap: int) -> list[int]:
    """Where a chunked sequence's windows hand over: window i supplies residues [cuts[i], cuts[i + 1]).

    The windows are runner.input.prepare.chunk_starts(total, window, overlap). The overlap of neighbouring windows is
    split at its midpoint (the later window takes the middle residue of an odd overlap): every residue comes
    from the window where it is farther from a cut edge, i.e. where it saw the most context on both sides.
    """
    starts = chunk_starts(total, window, overlap)
    middle = [(starts[i + 1] + starts[i] + window) // 2 for i in range(len(starts) - 1)]
    return [0, *middle, total]


def stitch_windows(windows: Sequence[np.ndarray], total: int, window: int, overlap: int) -> np.ndarray:
    """One [total, D] array from the per-residue vectors of a chunked sequence's windows ([window, D] each, in
    order), each residue taken from one window by the midpoint rule of `stitch_cuts`."""
    starts = chunk_starts(total, window, overlap)
    if len(starts) != len(windows):
        raise ValueError(f"{len(windows)} windows given for a sequence of {total} residues cut into {len(starts)}")
    cuts = stitch_cuts(total, window, overlap)
    pieces = [w[cuts[i] - s : cuts[i + 1] - s] for i, (w, s) in enumerate(zip(windows, starts, strict=True))]
    return np.concatenate(pieces)  # [total, D]


def write_token_file(directory: Path, table: pa.Table, summed: bool = True) -> TokenFile:
    """Write `table` as `directory/tok-<uuid>.arrow` (hidden temp name, fsync, rename); its CRC-32 is computed
    as the bytes go out, on the writing thread (runner.output.checksums.ChecksummedFile: no second read).
    `summed=False` (the checksum's A/B benchmark only) records CRC 00000000."""
    name = f"tok-{uuid.uuid4().hex}.arrow"
    size, crc = publish_checksummed(directory, name, table, summed)
    return TokenFile(name, table.num_rows, size, crc)


def count_rows(path: Path) -> int | None:
    """Rows of a token file from its footer and batch headers (no vectors read); None when it is unreadable."""
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (pa.ArrowException, OSError, ValueError):
        return None


@dataclass(frozen=True)
class TokenFileCheck:
    """What `check_token_files` found in one token file."""

    rows: int | None  # rows, from its footer; None when the file is unusable
    problem: str | None  # what is wrong (bytes against its checksum, an unreadable footer), None when sound
    summed: bool  # its checksum was recorded (False: written by a runner before per-token checksums)


def check_token_files(out_dir: Path, names: Sequence[str], records: dict[str, dict]) -> dict[str, TokenFileCheck]:
    """Check token files `names` (relative to DIR/tokens) against their checksum `records` (checksums.jsonl,
    keyed relative to DIR): size and CRC-32, then the footer, and the rows against the record.

    Every byte is read, several files at a time (file reads and the CRC-32 release the GIL, so threads overlap
    on a parallel file system); memory stays at a few read buffers.
    """
    def check(name: str) -> TokenFileCheck:
        path = out_dir / TOKENS_DIR / name
        if not path.is_file():
            return TokenFileCheck(None, "missing", False)
        record = records.get(f"{TOKENS_DIR}/{name}")
        problem = check_file(path, record)
        if problem == "no checksum recorded":
            problem = None
        if problem is not None:
            return TokenFileCheck(None, problem, True)
        rows = count_rows(path)
        if rows is None:
            return TokenFileCheck(None, "not a readable Arrow file", record is not None)
        if record is not None and rows != record["rows"]:
            return TokenFileCheck(None, f"{rows} rows where {record['rows']} were written", True)
        return TokenFileCheck(rows, None, record is not None)

    unique = list(dict.fromkeys(names))
    if len(unique) <= 1:
        return {name: check(name) for name in unique}
    with ThreadPoolExecutor(max_workers=min(CHECK_THREADS, len(unique))) as pool:
        return dict(zip(unique, pool.map(check, unique), strict=True))


def token_files(out_dir: Path) -> dict[str, Path]:
    """Every complete token file under DIR/tokens, by its name relative to DIR/tokens (`shard/tok-....arrow`)."""
    root = out_dir / TOKENS_DIR
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for shard in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in shard.iterdir():
            if TOKEN_FILE.match(path.name):
                found[f"{shard.name}/{path.name}"] = path
    return found


def remove_temporaries(out_dir: Path) -> int:
    """Delete half-written token files (hidden temp names) and empty shard folders; returns how many files."""
    root = out_dir / TOKENS_DIR
    removed = 0
    if not root.is_dir():
        return 0
    for shard in [p for p in root.iterdir() if p.is_dir()]:
        for path in shard.iterdir():
            if TMP_TOKEN_FILE.match(path.name):
                path.unlink(missing_ok=True)
                removed += 1
        with contextlib.suppress(OSError):
            shard.rmdir()  # only when empty
    return removed


def clear_token_files(out_dir: Path) -> None:
    """--overwrite: delete every token file (complete or temporary) and the folders they were in."""
    root = out_dir / TOKENS_DIR
    if not root.is_dir():
        return
    for shard in [p for p in root.iterdir() if p.is_dir()]:
        for path in shard.iterdir():
            if TOKEN_FILE.match(path.name) or TMP_TOKEN_FILE.match(path.name):
                path.unlink()
        with contextlib.suppress(OSError):
            shard.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def part_pointers(path: Path) -> tuple[list[str | None], np.ndarray]:
    """A pooled part's `tokens_file` (per row, None where absent) and `tokens_row` (int32 [N], -1 where absent)."""
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_file(source).read_all()
        files = table.column("tokens_file").to_pylist()
        rows = np.array(table.column("tokens_row").fill_null(-1).to_numpy(), dtype=np.int64)  # a copy: the map closes
    return files, rows


@dataclass
class ReconcileReport:
    """What `reconcile` found and did."""

    files: int = 0  # token files kept (every row pointed at once)
    bytes: int = 0  # their size on disk
    deleted: int = 0  # token files no complete part pointed at, deleted
    rewritten: int = 0  # token files pointed at in part, rewritten keeping only those rows
    broken_parts: list[str] = field(default_factory=list)  # parts pointing at missing files or rows (resume redoes them)


def reconcile(out_dir: Path, parts: Sequence[str], fix_broken: bool = False) -> ReconcileReport:
    """Make DIR/tokens hold exactly the per-token rows that the complete pooled `parts` point at.

    A part pointing at a token file that is missing, unreadable or too short is reported in `broken_parts`
    (with `fix_broken`, as on resume, the caller deletes it and its sequences are embedded again; the token
    files only it pointed at are deleted here).
    """
    report = ReconcileReport()
    emb = out_dir / "embeddings"
    on_disk = token_files(out_dir)
    codes: dict[str, int] = {}  # token file -> a number, so the pointers of every part fit two int64 arrays
    pointing: dict[str, list[str]] = defaultdict(list)  # token file -> parts pointing into it
    file_codes: list[np.ndarray] = []
    row_numbers: list[np.ndarray] = []
    for part in parts:
        files, rows = part_pointers(emb / part)
        present = np.array([f is not None for f in files], dtype=bool)
        part_codes = np.array([codes.setdefault(f, len(codes)) for f in files if f is not None], dtype=np.int64)
        for name in dict.fromkeys(f for f in files if f is not None):
            pointing[name].append(part)
        file_codes.append(part_codes)
        row_numbers.append(rows[present])
    names = list(codes)  # by code
    # Distinct (file, row) pairs: with --dedup a repeated sequence's rows all point at its first record's row.
    pairs = np.unique(np.concatenate(file_codes + [np.zeros(0, np.int64)]) << 32
                      | np.concatenate(row_numbers + [np.zeros(0, np.int64)]))
    pair_codes, pair_rows = pairs >> 32, pairs & 0xFFFFFFFF
    distinct = np.bincount(pair_codes, minlength=len(names))  # rows pointed at, per file
    highest = np.full(len(names), -1, dtype=np.int64)
    np.maximum.at(highest, pair_codes, pair_rows)
    counts = {name: int(distinct[i]) for i, name in enumerate(names)}
    highest_of = {name: int(highest[i]) for i, name in enumerate(names)}
    rows_in: dict[str, int | None] = {name: count_rows(on_disk[name]) if name in on_disk else None for name in counts}
    broken = {name for name, n in rows_in.items() if n is None or highest_of[name] >= n}
    report.broken_parts = sorted({p for name in broken for p in pointing[name]})
    if report.broken_parts and not fix_broken:
        raise RuntimeError(f"pooled parts point at missing or short token files: {', '.join(report.broken_parts[:5])}")
    broken_parts = set(report.broken_parts)
    # A file kept only by broken parts is as good as unreferenced.
    live = {name for name in counts if not set(pointing[name]) <= broken_parts}
    partial = sorted(name for name in live if name not in broken and counts[name] < (rows_in[name] or 0))
    gone: set[str] = set()  # token files deleted here: their checksum records go too
    for name, path in on_disk.items():
        if name not in live:
            path.unlink(missing_ok=True)
            gone.add(name)
            report.deleted += 1
    for name in partial:
        _rewrite_partial(out_dir, name, on_disk[name], pointing[name])
        gone.add(name)
        report.rewritten += 1
    drop_records(out_dir, {f"{TOKENS_DIR}/{name}" for name in gone})
    for path in token_files(out_dir).values():
        report.files += 1
        report.bytes += path.stat().st_size
    if report.deleted or report.rewritten:
        log.info("per-token files: %d unreferenced deleted, %d rewritten to their referenced rows",
                 report.deleted, report.rewritten)
    return report


def _rewrite_partial(out_dir: Path, name: str, path: Path, parts: list[str]) -> None:
    """Keep only the rows of token file `name` that `parts` point at: new file, parts re-pointed, old deleted."""
    emb = out_dir / "embeddings"
    wanted: set[int] = set()
    for part in parts:
        files, rows = part_pointers(emb / part)
        wanted.update(int(r) for f, r in zip(files, rows.tolist(), strict=True) if f == name)
    keep = np.array(sorted(wanted), dtype=np.int64)
    shard = name.rsplit("/", 1)[0]
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_file(source).read_all().take(pa.array(keep))
        written = write_token_file(path.parent, table)
    # The new file's checksum is journaled before any part points at it (a crash before the parts are
    # re-pointed leaves it unreferenced: the next reconcile deletes it).
    append_records(out_dir, [written.record(shard)])
    new_ref = f"{shard}/{written.name}"
    new_row = {int(old): new for new, old in enumerate(keep.tolist())}
    for part in parts:
        part_path = emb / part
        tmp = part_path.with_name(f".{part_path.name}.tmp")  # a crash leaves it for resume to delete
        with pa.memory_map(str(part_path)) as source:
            table = pa.ipc.open_file(source).read_all()
            files = table.column("tokens_file").to_pylist()
            rows = table.column("tokens_row").to_pylist()
            moved = [f == name for f in files]
            files = [new_ref if m else f for f, m in zip(files, moved, strict=True)]
            rows = [new_row[r] if m else r for r, m in zip(rows, moved, strict=True)]
            table = table.set_column(table.schema.get_field_index("tokens_file"), "tokens_file",
                                     pa.array(files, pa.string()))
            table = table.set_column(table.schema.get_field_index("tokens_row"), "tokens_row", pa.array(rows, pa.int32()))
            size, crc = write_checksummed(tmp, table)
        # The part's new checksum goes to the journal before the part is replaced (the last record of a name
        # wins): a crash in between leaves a mismatch, and resume redoes that part.
        append_record(out_dir, f"embeddings/{part}", table.num_rows, size, crc)
        os.replace(tmp, part_path)
    path.unlink()
    log.info("per-token file %s was referenced in part: rewritten as %s with its %d referenced row(s)",
             name, new_ref, len(keep))
