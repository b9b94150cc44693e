"""The Ray Data stream: read -> clean/tokenize/pack (CPU tasks) -> embed (one actor per GPU).

Reading is one sequential read task, so ids get their input position and the first of two equal ids
is the one kept, whatever the number of GPUs. Cleaning, tokenizing and packing run as parallel CPU
tasks on blocks of records; each packed batch travels as one Arrow row of list columns.

On resume the read task gets a bitmap of the ordinals already written: those records still go through
the duplicate check (so "first seen" stays the same) and are still counted, but travel on as empty
`done` rows that the pack tasks skip.

With --dedup the read task also cleans and checks each record and looks its sequence up in a
`runner.input.dedup.SequenceTable` (a run of records at a time, as columns): a repeat travels as a `copy_of` row (no text) that the pack tasks hand on
to the driver, which writes it as a copy of its first record's row (see `runner.input.dedup`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.input.batch import InputRecord
from runner.input.dedup import SequenceTable, sequence_hashes
from runner.input.packing import pack_block
from runner.input.prepare import DuplicateFilter, Preparer
from runner.input.sources import RecordRun, read_runs
from runner.models.base import SequenceCodec
from runner.output.resume import bitmap_contains

if TYPE_CHECKING:
    from runner.config import EmbedConfig

RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("sequence", pa.string()),
        ("source", pa.string()),
        ("ordinal", pa.int64()),
        ("duplicate", pa.string()),  # reject reason when an earlier record has the same id, else null
        ("done", pa.bool_()),  # already written by an earlier run (resume): counted, not embedded
        ("copy_of", pa.int64()),  # --dedup: ordinal of the first record of the same sequence, else null
        # --dedup: the block's [distinct sequences, repeats, residues and tokens of the repeats] on its first
        # row, else null (runner.input.dedup.DedupCounts.add); the pack tasks sum whatever rows they get.
        ("dedup_counts", pa.list_(pa.int64())),
    ]
)
# A block of mostly finished records (resume) may hold this many times records_per_block rows: they are
# empty, and fewer, larger blocks keep the per-task overhead of skipping millions of records low.
DONE_ROWS_FACTOR = 16


def job_preparer(codec: SequenceCodec, config: EmbedConfig) -> Preparer:
    """The job's cleaning and windowing (--max-residues, --long, --chunk-overlap): --strict's check, --dedup's
    registration in the read task and the pack tasks all judge a record by it."""
    return Preparer(codec, config.max_residues, config.long, config.chunk_overlap)


def job_stream_settings(paths: Sequence[Path], codec: SequenceCodec, config: EmbedConfig, budget: int,
                        records_per_block: int, done_bits: np.ndarray) -> tuple[ReadSettings, PackSettings]:
    """The read and pack stages' settings of one job, on Ray (runner.driver.cluster) or in-process alike."""
    read = ReadSettings(tuple(str(p) for p in paths), config.id_column, config.seq_column, records_per_block,
                        done_bits, job_preparer(codec, config) if config.dedup else None)
    pack = PackSettings(codec, config.max_residues, config.long, config.chunk_overlap, budget,
                        keep_chunks_together=config.per_token)
    return read, pack


@dataclass(frozen=True)
class ReadSettings:
    """What the read task needs."""

    paths: tuple[str, ...]  # expanded input files, in order
    id_column: str  # id column of tables
    seq_column: str  # sequence column of tables
    records_per_block: int  # rows per block handed to the pack stage
    # Packed bitmap (np.packbits order) of ordinals written by earlier runs; empty on a fresh run.
    done_bits: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))
    # --dedup: the job's Preparer (cleaning and checks, so only embeddable sequences are registered); None = off.
    dedup: Preparer | None = None


def read_blocks(settings: ReadSettings) -> Iterator[pa.Table]:
    """Records of every input, in order, as Arrow blocks; later copies of an id carry a duplicate reason.

    The inputs arrive as runs of Arrow columns (`read_runs`: a FASTA chunk or a table batch each); the
    duplicate-id check, the resume bitmap and the block cuts work on whole runs with numpy, and a block is
    the runs' columns sliced and joined: no Python object per record (with --dedup too: a run is cleaned,
    checked, hashed and looked up as columns, `_find_repeats`). A block closes once it holds `records_per_block` records still to embed, or
    `records_per_block * DONE_ROWS_FACTOR` rows in all (resume).
    """
    dedup = DuplicateFilter()
    sequences = SequenceTable() if settings.dedup is not None else None
    pieces: list[_Piece] = []
    rows = to_embed = 0  # in `pieces`: rows in all, and those not done yet
    per_block, max_rows = settings.records_per_block, settings.records_per_block * DONE_ROWS_FACTOR
    resuming = len(settings.done_bits) > 0
    for run in read_runs([Path(p) for p in settings.paths], settings.id_column, settings.seq_column):
        n = len(run)
        ordinals = np.arange(run.first_ordinal, run.first_ordinal + n, dtype=np.int64)
        done = bitmap_contains(settings.done_bits, ordinals) if resuming else np.zeros(n, dtype=bool)
        duplicate = _duplicates(dedup, run)
        # --dedup: each record's representative (-1: none) and its share of the counts, for the whole run at once
        copy_of, counts = (_find_repeats(run.ids, run.sequences, ordinals, duplicate, sequences, settings.dedup)
                           if sequences is not None and settings.dedup is not None else (None, None))
        embed_through = np.cumsum(~done)  # records to embed in run[: i + 1]
        lo = 0
        while lo < n:
            # cut where the block fills: the record that brings it to `per_block` to embed, or `max_rows` rows
            before = int(embed_through[lo - 1]) if lo else 0
            hi = min(int(np.searchsorted(embed_through, before + per_block - to_embed)) + 1, lo + max_rows - rows, n)
            pieces.append(_Piece(run, lo, hi, ordinals[lo:hi], done[lo:hi], duplicate.slice(lo, hi - lo),
                                 None if copy_of is None else copy_of[lo:hi], None if counts is None else counts[lo:hi]))
            rows += hi - lo
            to_embed += int(embed_through[hi - 1]) - before
            lo = hi
            if to_embed >= per_block or rows >= max_rows:
                yield _record_block(pieces)
                pieces, rows, to_embed = [], 0, 0
    if pieces:
        yield _record_block(pieces)


@dataclass(frozen=True)
class _Piece:
    """Records lo..hi of a run, with what the read task worked out for them."""

    run: RecordRun
    lo: int
    hi: int
    ordinals: np.ndarray  # int64 [hi - lo]
    done: np.ndarray  # bool [hi - lo]: written by an earlier run
    duplicate: pa.StringArray  # reject reason where an earlier record has the same id, else null
    copy_of: np.ndarray | None = None  # --dedup: int64 [hi - lo], the representative's ordinal of a repeat, else -1
    counts: np.ndarray | None = None  # --dedup: int64 [hi - lo, 4], each record's share of DedupCounts (see _find_repeats)


def _duplicates(dedup: DuplicateFilter, run: RecordRun) -> pa.StringArray:
    """The duplicate-id reasons of a run, registering its ids. Empty ids are left out of the check: the
    preparer rejects them as "missing id"."""
    named = pc.binary_length(run.ids).to_numpy(zero_copy_only=False) > 0
    if named.all():
        return dedup.reasons(dedup.register(run.ids, run.source))
    seen_in = np.full(len(run), -1, dtype=np.int32)
    seen_in[named] = dedup.register(run.ids.filter(pa.array(named)), run.source)
    return dedup.reasons(seen_in)


def _repeated(text: str, n: int) -> pa.StringArray:
    """`text` n times as an Arrow string array (the source column), built from its buffers."""
    data = text.encode("utf-8")
    offsets = np.arange(n + 1, dtype=np.int32) * len(data)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data * n)])


def _record_block(pieces: list[_Piece]) -> pa.Table:
    """One RECORD_SCHEMA block from consecutive pieces of runs (the columns are copied, so a block never
    keeps a whole run's buffers alive)."""
    ids = pa.concat_arrays([p.run.ids.slice(p.lo, p.hi - p.lo) for p in pieces])
    seqs = pa.concat_arrays([p.run.sequences.slice(p.lo, p.hi - p.lo) for p in pieces])
    source = pa.concat_arrays([_repeated(p.run.source, p.hi - p.lo) for p in pieces])
    duplicate = pa.concat_arrays([p.duplicate for p in pieces])
    ordinal = np.concatenate([p.ordinals for p in pieces])
    done = np.concatenate([p.done for p in pieces])
    n = len(ordinal)
    copy_of = pa.nulls(n, pa.int64())
    counts = pa.nulls(n, pa.list_(pa.int64()))
    if pieces[0].copy_of is not None:
        reps = np.concatenate([p.copy_of for p in pieces])
        copy_of = pa.array(reps, pa.int64(), mask=reps < 0)
        block_counts = np.concatenate([p.counts for p in pieces]).sum(axis=0).tolist()
        counts = pa.array([block_counts] + [None] * (n - 1), pa.list_(pa.int64()))
        # repeats (--dedup) travel without their text: the driver copies their first record's row
        seqs = pc.if_else(copy_of.is_null(), seqs, pa.scalar(None, pa.string()))
    if done.any():
        # done records travel without their text: they are only counted downstream
        keep = pa.array(~done)
        ids, seqs, source, duplicate = (pc.if_else(keep, col, pa.scalar(None, pa.string()))
                                        for col in (ids, seqs, source, duplicate))
    return pa.table(
        {
            "id": ids,
            "sequence": seqs,
            "source": source,
            "ordinal": pa.array(ordinal, pa.int64()),
            "duplicate": duplicate,
            "done": pa.array(done, pa.bool_()),
            "copy_of": copy_of,
            "dedup_counts": counts,
        },
        schema=RECORD_SCHEMA,
    )


def _find_repeats(ids: pa.StringArray, seqs: pa.StringArray, ordinals: np.ndarray, duplicate: pa.StringArray,
                  sequences: SequenceTable, preparer: Preparer) -> tuple[np.ndarray, np.ndarray]:
    """--dedup over a run of records: int64 [n], each record's representative ordinal where an earlier record has
    its cleaned sequence (else -1), and int64 [n, 4], each record's share of the block counts (DedupCounts.add:
    1 for a representative; for a repeat 1, its windows' residues and tokens).

    Columnar: the run is cleaned, checked and hashed as whole columns (no Python per record). Finished records
    (resume) are registered too, so the table is the same on every run; records that will be rejected
    (duplicate id, missing id, empty, invalid, too long to keep) are not registered."""
    n = len(ordinals)
    copy_of = np.full(n, -1, dtype=np.int64)
    counts = np.zeros((n, 4), dtype=np.int64)
    cleaned, lengths, ok = preparer.check_column(ids, seqs)
    if duplicate.null_count < n:
        ok &= duplicate.is_null().to_numpy(zero_copy_only=False)
    idx = np.flatnonzero(ok)
    if not len(idx):
        return copy_of, counts
    kept = cleaned if len(idx) == n else cleaned.take(pa.array(idx))
    reps = sequences.assign(sequence_hashes(kept), ordinals[idx])
    repeat = reps != ordinals[idx]
    at = idx[repeat]
    windows, residues = preparer.window_totals(lengths[at])
    copy_of[at] = reps[repeat]
    counts[idx[~repeat], 0] = 1
    counts[at, 1] = 1
    counts[at, 2] = residues
    counts[at, 3] = residues + (preparer.codec.special_start + preparer.codec.special_end) * windows
    return copy_of, counts


@dataclass(frozen=True)
class PackSettings:
    """What the tokenize/pack tasks need."""

    codec: SequenceCodec  # the model's text side (no weights)
    max_residues: int | None  # window length; None = the codec's limit
    long: str  # "truncate" | "chunk" | "skip"
    chunk_overlap: int  # residues shared by neighbouring windows
    token_budget: int  # tokens per packed batch
    keep_chunks_together: bool = False  # --per-token: a chunked sequence's windows share one batch (to be stitched)


def pack_records(block: pa.Table, settings: PackSettings) -> pa.Table:
    """One block of records -> packed-batch rows, plus the block's rejects and record count on the last row."""
    preparer = Preparer(settings.codec, settings.max_residues, settings.long, settings.chunk_overlap)
    windows = []
    reject_ids: list[str] = []
    reject_sources: list[str] = []
    reject_reasons: list[str] = []
    reject_ordinals: list[int] = []
    copies: dict[str, list] = {"copy_ids": [], "copy_ordinals": [], "copy_of": [], "copy_sources": []}
    cols = block.to_pydict()
    source_of: dict[int, str] = {}
    for rid, seq, source, ordinal, dup, done, rep in zip(
        cols["id"], cols["sequence"], cols["source"], cols["ordinal"], cols["duplicate"], cols["done"],
        cols["copy_of"], strict=True
    ):
        if done:
            continue  # written by an earlier run; counted in records_in below
        if rep is not None:  # --dedup: a repeat; the driver copies its first record's row
            for key, value in zip(copies, (rid, ordinal, rep, source), strict=True):
                copies[key].append(value)
            continue
        source_of[ordinal] = source
        if dup:
            outcome, reason = None, dup
        else:
            outcome = preparer.prepare(InputRecord(rid, seq, source, ordinal))
            reason = outcome.reason if not isinstance(outcome, list) else ""
        if isinstance(outcome, list):
            windows.extend(outcome)
        else:
            reject_ids.append(rid)
            reject_sources.append(source)
            reject_reasons.append(reason)
            reject_ordinals.append(ordinal)
    # Each batch carries its windows' input files, so a window that fails to embed is a reject with a source.
    rows = [b.to_row() | _NO_REJECTS | {"sources": [source_of[int(o)] for o in b.ordinals]}
            for b in pack_block(windows, settings.token_budget, settings.keep_chunks_together)]
    rows.append(
        _EMPTY_BATCH
        | {
            "reject_ids": reject_ids,
            "reject_sources": reject_sources,
            "reject_reasons": reject_reasons,
            "reject_ordinals": reject_ordinals,
            "records_in": block.num_rows,
            **copies,
            "dedup_counts": _sum_counts(cols["dedup_counts"]),
        }
    )
    return pa.Table.from_pylist(rows, schema=PACKED_SCHEMA)


def _sum_counts(counts: list[list[int] | None]) -> list[int] | None:
    """The --dedup counts of the rows that carry some, summed (None when dedup is off)."""
    present = [c for c in counts if c is not None]
    return np.sum(present, axis=0).tolist() if present else None


# One packed batch per row. The last row of each block carries no windows, only the block's rejects
# and how many records the block held, so the driver can check rows + rejects == records read.
PACKED_SCHEMA = pa.schema(
    [
        ("tokens", pa.list_(pa.int32())),
        ("positions", pa.list_(pa.int32())),
        ("cu_seqlens", pa.list_(pa.int32())),
        ("ids", pa.list_(pa.string())),
        ("ordinals", pa.list_(pa.int64())),
        ("residues", pa.list_(pa.int32())),
        ("truncated", pa.list_(pa.bool_())),
        ("chunk_index", pa.list_(pa.int32())),
        ("chunk_count", pa.list_(pa.int32())),
        ("total_residues", pa.list_(pa.int32())),
        ("token_budget", pa.int64()),
        ("reject_ids", pa.list_(pa.string())),
        ("reject_sources", pa.list_(pa.string())),
        ("reject_reasons", pa.list_(pa.string())),
        ("reject_ordinals", pa.list_(pa.int64())),
        ("records_in", pa.int64()),
        ("sources", pa.list_(pa.string())),  # input file of each window
        # --dedup, on a block's last row: repeats handed on to the driver (id, ordinal, representative's
        # ordinal, input file) and the block's counts (see RECORD_SCHEMA)
        ("copy_ids", pa.list_(pa.string())),
        ("copy_ordinals", pa.list_(pa.int64())),
        ("copy_of", pa.list_(pa.int64())),
        ("copy_sources", pa.list_(pa.string())),
        ("dedup_counts", pa.list_(pa.int64())),
    ]
)
_NO_REJECTS = {"reject_ids": [], "reject_sources": [], "reject_reasons": [], "reject_ordinals": [], "records_in": 0,
               "copy_ids": [], "copy_ordinals": [], "copy_of": [], "copy_sources": [], "dedup_counts": None}
_EMPTY_BATCH = {
    "tokens": [],
    "positions": [],
    "cu_seqlens": [0],
    "ids": [],
    "ordinals": [],
    "residues": [],
    "truncated": [],
    "chunk_index": [],
    "chunk_count": [],
    "total_residues": [],
    "token_budget": 0,
    "sources": [],
}
