"""The Ray Data stream: read -> clean/tokenize/pack (CPU tasks) -> embed (one actor per GPU).

Reading is one sequential read task, so ids get their input position and the first of two equal ids
is the one kept, whatever the number of GPUs. Cleaning, tokenizing and packing run as parallel CPU
tasks on blocks of records; each packed batch travels as one Arrow row of list columns.

On resume the read task gets a bitmap of the ordinals already written: those records still go through
the duplicate check (so "first seen" stays the same) and are still counted, but travel on as empty
`done` rows that the pack tasks skip.

With --dedup the read task also cleans and checks each record and looks its sequence up in a
`runner.input.dedup.SequenceTable`: a repeat travels as a `copy_of` row (no text) that the pack tasks hand on
to the driver, which writes it as a copy of its first record's row (see `runner.input.dedup`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from runner.input.batch import InputRecord
from runner.input.dedup import SequenceTable, sequence_hashes
from runner.input.packing import pack_block
from runner.input.prepare import DuplicateFilter, Preparer
from runner.input.sources import read_records
from runner.models.base import SequenceCodec
from runner.output.resume import bitmap_contains

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
    """Records of every input, in order, as Arrow blocks; later copies of an id carry a duplicate reason."""
    dedup = DuplicateFilter()
    sequences = SequenceTable() if settings.dedup is not None else None
    pending: list[InputRecord] = []
    to_embed = 0  # records of `pending` not done yet
    max_rows = settings.records_per_block * DONE_ROWS_FACTOR
    resuming = len(settings.done_bits) > 0
    records = read_records([Path(p) for p in settings.paths], settings.id_column, settings.seq_column)
    for record in records:
        pending.append(record)
        to_embed += 1
        if resuming and len(pending) % 256 == 0:  # vectorised bitmap look-ups, not one per record
            to_embed -= int(bitmap_contains(settings.done_bits, np.array([r.ordinal for r in pending[-256:]])).sum())
        if to_embed >= settings.records_per_block or len(pending) >= max_rows:
            yield _record_block(pending, dedup, settings.done_bits, sequences, settings.dedup)
            pending, to_embed = [], 0
    if pending:
        yield _record_block(pending, dedup, settings.done_bits, sequences, settings.dedup)


def _record_block(records: list[InputRecord], dedup: DuplicateFilter, done_bits: np.ndarray,
                  sequences: SequenceTable | None = None, preparer: Preparer | None = None) -> pa.Table:
    # Empty ids are left out of the duplicate check: the preparer rejects them as "missing id".
    named = [r for r in records if r.id]
    reasons = iter(dedup.check([r.id for r in named], [r.source for r in named]))
    duplicate = [next(reasons) if r.id else None for r in records]
    done = bitmap_contains(done_bits, np.array([r.ordinal for r in records], dtype=np.int64))
    copy_of: list[int | None] = [None] * len(records)
    counts: list[list[int] | None] = [None] * len(records)
    if sequences is not None and preparer is not None:
        copy_of, counts[0] = _find_repeats(records, duplicate, sequences, preparer)
    # Done records travel without their text: they are only counted downstream; repeats (--dedup) need none.
    return pa.table(
        {
            "id": [None if d else r.id for r, d in zip(records, done, strict=True)],
            "sequence": [None if d or c is not None else r.sequence
                         for r, d, c in zip(records, done, copy_of, strict=True)],
            "source": [None if d else r.source for r, d in zip(records, done, strict=True)],
            "ordinal": pa.array([r.ordinal for r in records], pa.int64()),
            "duplicate": pa.array([None if d else x for x, d in zip(duplicate, done, strict=True)], pa.string()),
            "done": pa.array(done, pa.bool_()),
            "copy_of": pa.array(copy_of, pa.int64()),
            "dedup_counts": pa.array(counts, pa.list_(pa.int64())),
        },
        schema=RECORD_SCHEMA,
    )


def _find_repeats(records: list[InputRecord], duplicate: list[str | None], sequences: SequenceTable,
                  preparer: Preparer) -> tuple[list[int | None], list[int]]:
    """--dedup: each record's representative ordinal when an earlier record has its cleaned sequence, and the
    block's counts. Finished records (resume) are registered too, so the table is the same on every run;
    records that will be rejected (duplicate id, empty, invalid, too long to keep) are not registered."""
    idx: list[int] = []
    cleaned: list[str] = []
    for i, (r, dup) in enumerate(zip(records, duplicate, strict=True)):
        if dup or not r.id:
            continue
        seq = preparer.check(r)
        if isinstance(seq, str):
            idx.append(i)
            cleaned.append(seq)
    copy_of: list[int | None] = [None] * len(records)
    counts = [0, 0, 0, 0]
    if not idx:
        return copy_of, counts
    ordinals = np.array([records[i].ordinal for i in idx], dtype=np.int64)
    reps = sequences.assign(sequence_hashes(cleaned), ordinals)
    specials = preparer.codec.special_start + preparer.codec.special_end
    for i, seq, o, r in zip(idx, cleaned, ordinals.tolist(), reps.tolist(), strict=True):
        if r == o:
            counts[0] += 1
            continue
        copy_of[i] = r
        windows = preparer.window_residues(len(seq))
        counts[1] += 1
        counts[2] += sum(windows)
        counts[3] += sum(windows) + specials * len(windows)
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
