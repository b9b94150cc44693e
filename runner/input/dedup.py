"""`--dedup`: embed each distinct cleaned sequence once and give every id its row, in one pass.

Two halves, one on each end of the stream:

- `SequenceTable` (in the single read task, which sees every record in input order): a 128-bit hash
  (`sequence_hashes`: simple tabulation in numpy, BLAKE2b past 1 KiB) of each embeddable cleaned sequence -> the
  ordinal of its first record (the *representative*). A later record
  of the same sequence becomes a *copy request* ("ordinal i is a copy of ordinal r"): it is never tokenized,
  packed or embedded, and travels to the driver on its block's summary row, like a reject.
- `CopyWriter` (on the driver): writes each copy as the representative's row with the copy's id and ordinal
  (the same vector, length, per-token reference...), once the representative's row is in a *complete* part.
  Copies are gathered in bulk from the memory-mapped parts holding their representatives and written as
  staged *copy parts* by a pool of threads; the driver commits them like the parts actors stage. Its own
  thread only keeps the books (vectorised, a few operations per table); it holds no vectors beyond the copy
  parts being built.

Exactly once across restarts: a copy is written only after its representative's part is complete, so a
complete copy always has a complete representative (a crash between the two leaves the copy undone, and the
next run requests it again). A rerun rebuilds the same table (the read task still hashes finished records),
so a copy points at the same representative, which may already be in a part of an earlier run.

Memory of the table: 24 bytes a slot (16-byte hash + 8-byte ordinal), at most 70 % full and doubled when
needed: 34-69 bytes per distinct sequence; 100 M distinct sequences use 2^28 slots = 6 GiB in the read task
(9 GiB for a moment while doubling). Collisions: two different sequences with the same 128-bit hash would
give the second the first one's vector; each pair collides with probability 2^-128 (see `sequence_hashes`), so
with n distinct sequences the chance of any collision is about n^2 / 2^129: 1.5e-23 at 100 M, 1.5e-15 at 10^12.
Nothing else is stored per sequence.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from runner.errors import RunnerError, first_line
from runner.input.batch import Reject
from runner.models.base import row_sums, string_buffers
from runner.output.resume import OrdinalSet
from runner.output.sink import write_error
from runner.output.staged import STAGED_DIR, StagedPart, open_staged_shard, write_staged_part

log = logging.getLogger("runner")


# Cleaned sequences up to this many bytes are hashed by simple tabulation (below), longer ones by BLAKE2b one by one.
TABULATED_SEQUENCE_BYTES = 1024
HASHED_BYTES = 1 << 18  # sequence bytes hashed in one numpy pass
# 128-bit simple tabulation: two random 64-bit words per (byte position, 7-bit byte value), XORed over a sequence's
# bytes, XORed with two random words for its length. Two different sequences differ in their length or in some
# (position, byte) pair, whose words are independent and uniform: their hashes are equal with probability 2^-128,
# the odds of a random 128-bit function. The words come from a fixed PCG64 stream (stable across numpy versions),
# so every process and every run hashes alike. 2 MiB of words.
_SEQ_RAW = np.random.PCG64(0x18_2026_1130_DED).random_raw((TABULATED_SEQUENCE_BYTES * 128 + TABULATED_SEQUENCE_BYTES + 1) * 2)
_SEQ_HI, _SEQ_LO = _SEQ_RAW[: TABULATED_SEQUENCE_BYTES * 128 * 2].reshape(2, -1)  # [position * 128 + byte] each
_LEN_HI, _LEN_LO = _SEQ_RAW[TABULATED_SEQUENCE_BYTES * 128 * 2 :].reshape(2, -1)  # [length] each


def sequence_hashes(sequences: Sequence[str] | pa.StringArray) -> np.ndarray:
    """128-bit hashes of cleaned sequences (a list of str or an Arrow string array without nulls) as uint64 [n, 2].

    Vectorised: one gather of two table words per byte and one XOR reduction per sequence (numpy, no Python per
    sequence) for ASCII sequences up to TABULATED_SEQUENCE_BYTES; longer or non-ASCII ones get a 128-bit BLAKE2b.
    """
    if not isinstance(sequences, pa.Array):
        sequences = pa.array(list(sequences), pa.string())
    n = len(sequences)
    out = np.zeros((n, 2), dtype=np.uint64)
    if n == 0:
        return out
    offsets, data = string_buffers(sequences)
    lengths = np.diff(offsets)
    tabulated = lengths <= TABULATED_SEQUENCE_BYTES
    body = data[offsets[0] : offsets[-1]]
    if len(body) and body.max() >= 0x80:
        tabulated &= row_sums(body >= 0x80, lengths) == 0
    rows = np.flatnonzero(tabulated)
    # in slices of about HASHED_BYTES: the per-byte temporaries (20 bytes a byte) stay in the CPU's cache
    cuts = np.searchsorted(offsets[rows] - offsets[0], np.arange(HASHED_BYTES, len(body), HASHED_BYTES))
    for part in np.split(rows, cuts):
        if not len(part):
            continue
        tab = sequences if len(part) == n else sequences.take(pa.array(part))
        t_offsets, t_data = string_buffers(tab)
        t_lengths = np.diff(t_offsets)
        body = t_data[t_offsets[0] : t_offsets[-1]]
        starts = (t_offsets[:-1] - t_offsets[0]).astype(np.int32)
        # each byte's row of table words: its position inside its sequence, then its value
        index = (np.arange(len(body), dtype=np.int32) - np.repeat(starts, t_lengths)) << 7
        index |= body
        filled = np.flatnonzero(t_lengths > 0)
        for half, (words, length_words) in enumerate(((_SEQ_HI, _LEN_HI), (_SEQ_LO, _LEN_LO))):
            h = np.take(length_words, t_lengths)  # [rows]
            if len(filled):
                h[filled] ^= np.bitwise_xor.reduceat(np.take(words, index), starts[filled])
            if len(part) == n:
                out[:, half] = h
            else:
                out[part, half] = h
    b2 = hashlib.blake2b
    for i in np.flatnonzero(~tabulated).tolist():
        digest = b2(data[offsets[i] : offsets[i + 1]].tobytes(), digest_size=16).digest()
        out[i] = np.frombuffer(digest, dtype="<u8")
    return out


class SequenceTable:
    """Distinct sequences seen so far: open addressing on 128-bit hashes, each with its first ordinal.

    Vectorised over a block like `runner.input.prepare.DuplicateFilter`; picklable (three numpy arrays).
    """

    MAX_LOAD = 0.7

    def __init__(self, capacity: int = 1 << 16) -> None:
        cap = 1 << max(4, int(capacity - 1).bit_length())
        self._hi = np.zeros(cap, dtype=np.uint64)
        self._lo = np.zeros(cap, dtype=np.uint64)
        self._rep = np.full(cap, -1, dtype=np.int64)  # first ordinal of the slot's sequence; -1 = empty slot
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def capacity(self) -> int:
        return len(self._rep)

    @property
    def nbytes(self) -> int:
        return self._hi.nbytes + self._lo.nbytes + self._rep.nbytes

    def assign(self, hashes: np.ndarray, ordinals: np.ndarray) -> np.ndarray:
        """Register a block of sequences (hashes [n, 2], in input order); int64 [n]: each one's representative.

        A sequence seen before (in an earlier block or earlier in this one) gets its first record's ordinal;
        a new one gets its own ordinal (it is the representative).
        """
        n = len(ordinals)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        ordinals = np.asarray(ordinals, dtype=np.int64)
        hashes = np.asarray(hashes, dtype=np.uint64)
        hi, lo = hashes[:, 0], hashes[:, 1]
        # the distinct keys of the block, each with its first record (a stable sort keeps input order in a group)
        order = np.lexsort((lo, hi))
        new_key = np.ones(n, dtype=bool)
        new_key[1:] = (hi[order[1:]] != hi[order[:-1]]) | (lo[order[1:]] != lo[order[:-1]])
        first = order[new_key]  # [distinct]: input index of each key's first record
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = np.cumsum(new_key) - 1  # [n]: each record's key, an index into `first`
        self._grow(self._count + len(first))
        reps = self._probe_insert(hi[first], lo[first], ordinals[first])
        return reps[inverse]

    def _grow(self, needed: int) -> None:
        cap = self.capacity
        while needed > cap * self.MAX_LOAD:
            cap *= 2
        if cap == self.capacity:
            return
        old = self._hi, self._lo, self._rep
        self._hi = np.zeros(cap, dtype=np.uint64)
        self._lo = np.zeros(cap, dtype=np.uint64)
        self._rep = np.full(cap, -1, dtype=np.int64)
        self._count = 0
        step = 1 << 20  # re-insert in slices: the probe temporaries of one pass over all keys cost more than the table
        for start in range(0, len(old[2]), step):
            live = old[2][start : start + step] >= 0
            self._probe_insert(old[0][start : start + step][live], old[1][start : start + step][live],
                               old[2][start : start + step][live])

    def _probe_insert(self, hi: np.ndarray, lo: np.ndarray, ordinals: np.ndarray) -> np.ndarray:
        """Look up distinct keys, inserting the absent ones with their ordinal; int64 [n]: each key's stored ordinal.

        Linear probing, every unresolved key one slot per round: a matching key resolves, an empty slot is
        claimed (the first of several claimants in one round wins, the others probe on), anything else moves on.
        """
        mask = self.capacity - 1
        n = len(ordinals)
        out = np.empty(n, dtype=np.int64)
        active = np.arange(n)
        pos = (lo & np.uint64(mask)).astype(np.int64)  # hash bits are uniform: the low bits index well
        inserted = 0
        while len(active):
            p = pos[active]
            stored = self._rep[p]
            hit = (stored >= 0) & (self._hi[p] == hi[active]) & (self._lo[p] == lo[active])
            out[active[hit]] = stored[hit]
            done = hit
            claim = np.flatnonzero(stored < 0)
            if len(claim):
                _, first = np.unique(p[claim], return_index=True)
                win = claim[first]
                slots, keys = p[win], active[win]
                self._hi[slots], self._lo[slots], self._rep[slots] = hi[keys], lo[keys], ordinals[keys]
                out[keys] = ordinals[keys]
                done = done.copy()
                done[win] = True
                inserted += len(win)
            rest = ~done
            pos[active[rest]] = (p[rest] + 1) & mask
            active = active[rest]
        self._count += inserted
        return out


@dataclass
class DedupCounts:
    """The manifest's `dedup` section, summed over the read task's blocks (the whole input, every run)."""

    distinct_sequences: int = 0  # embeddable sequences counted once (each embedded once, by its first record)
    repeats: int = 0  # records whose sequence came earlier: written as a copy of that record's row
    residues_saved: int = 0  # residues of the repeats, not embedded again
    tokens_saved: int = 0  # tokens of the repeats (residues + special tokens of each window), not embedded again
    copies_written: int = 0  # copy rows written by this run (the rest were done by earlier runs)

    def add(self, block: Sequence[int]) -> None:
        """Add one block's [distinct, repeats, residues_saved, tokens_saved]."""
        self.distinct_sequences += int(block[0])
        self.repeats += int(block[1])
        self.residues_saved += int(block[2])
        self.tokens_saved += int(block[3])

    def section(self, records: int) -> dict[str, int]:
        return {"records": records, "distinct_sequences": self.distinct_sequences, "repeats": self.repeats,
                "residues_saved": self.residues_saved, "tokens_saved": self.tokens_saved,
                "copies_written": self.copies_written}


COPY_THREADS = 4  # threads writing copy parts: the driver's own thread only does the bookkeeping (docs/dedup.md)
CACHED_ROWS = 1 << 22  # rows of the memory-mapped parts kept open for reading (~13 bytes of index a row: ~52 MB)
CACHED_PARTS = 4096  # and at most this many (one memory mapping each; Linux allows 65530 a process)
COPY_PART_BYTES = 16 << 20  # vector bytes of one copy part (fewer rows if --rows-per-part is less): memory per thread
COPY_SHARD = "copies"  # the copy parts' folder under embeddings/.staged/ (actors' shards are named by actor)


@dataclass
class _Requests:
    """Copy requests as columns (no Python object per copy)."""

    ids: pa.Array  # string [n]: the repeats' ids
    ordinals: np.ndarray  # int64 [n]: the repeats' ordinals
    reps: np.ndarray  # int64 [n]: each one's representative (the first record of its sequence)
    sources: np.ndarray  # int32 [n]: each one's input file, an index into CopyWriter.sources

    def __len__(self) -> int:
        return len(self.ordinals)

    def take(self, index: np.ndarray) -> _Requests:
        return _Requests(self.ids.take(pa.array(index, pa.int64())), self.ordinals[index], self.reps[index],
                         self.sources[index])

    @staticmethod
    def concat(chunks: Sequence[_Requests]) -> _Requests:
        if len(chunks) == 1:
            return chunks[0]
        if not chunks:
            return _Requests(pa.array([], pa.string()), np.zeros(0, np.int64), np.zeros(0, np.int64),
                             np.zeros(0, np.int32))
        return _Requests(pa.concat_arrays([c.ids for c in chunks]), np.concatenate([c.ordinals for c in chunks]),
                         np.concatenate([c.reps for c in chunks]), np.concatenate([c.sources for c in chunks]))


@dataclass
class _MappedPart:
    """A complete part, memory-mapped: a copy's row is read in place (pages of the file, not memory)."""

    sorted_ordinals: np.ndarray  # int64 [rows]: the part's ordinals, sorted
    row_of_sorted: np.ndarray  # int32 [rows]: the row of each of them
    starts: np.ndarray  # int64 [batches + 1]: the first row of each record batch, then the row count
    columns: dict[str, list[np.ndarray]]  # column -> one array per record batch (vectors [rows, D], in place)

    @property
    def rows(self) -> int:
        return len(self.sorted_ordinals)


def _map_part(path: Path, schema: pa.Schema) -> _MappedPart:
    """Memory-map a part: every column but id and ordinal as numpy arrays (the vectors and int32 columns zero-copy)."""
    with pa.memory_map(str(path)) as source:  # the buffers keep the mapping alive after the file is closed
        reader = pa.ipc.open_file(source)
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    columns: dict[str, list[np.ndarray]] = {}
    for fld in schema:
        if fld.name in ("id", "ordinal"):
            continue
        arrays = []
        for batch in batches:
            column = batch.column(fld.name)
            if pa.types.is_fixed_size_list(fld.type):
                arrays.append(column.flatten().to_numpy().reshape(-1, fld.type.list_size))  # [rows, D]
            else:
                arrays.append(column.to_numpy(zero_copy_only=False))
        columns[fld.name] = arrays
    ordinals = np.concatenate([b.column("ordinal").to_numpy() for b in batches]) if batches else np.zeros(0, np.int64)
    order = np.argsort(ordinals, kind="stable")
    starts = np.cumsum([0, *(b.num_rows for b in batches)]).astype(np.int64)
    return _MappedPart(ordinals[order], order.astype(np.int32), starts, columns)


class CopyWriter:
    """The driver's half: turns copy requests into rows once their representative's part is complete.

    A copy is its representative's row (the same vectors, length, windows, per-token reference) with its own id
    and ordinal. Copies are written as *copy parts*: gathered from the memory-mapped parts holding their
    representatives, many at once (numpy fancy indexing per part), written to a staged part
    (runner.output.staged: CRC-32, fsync, rename) and committed by `writer` like a part an actor staged. With
    `threads` the gathering and writing run on a thread pool (Arrow, numpy, zlib and the file writes release the
    GIL), so the driver's own thread only does the bookkeeping: a few vectorised operations per table. Copies
    are collected until `part_rows` are ready (or the oldest waited `max_wait` seconds, or the stream ended),
    so copy parts are not tiny.

    `writer` is the job's PartWriter; `written` the job's set of ordinals written (each ordinal is written once,
    copies included: a copy is marked when it is handed to a thread); `resumed_parts` the complete parts of
    earlier runs, whose ordinals are all in `written` already.

    Memory: the copy requests not written yet (~20 bytes each plus the id), 4 bytes per ordinal for the part
    that holds it (400 MB per 100 M records), and the mapped parts' index (CACHED_ROWS, ~52 MB). No vectors are
    held except while a copy part is built (`part_rows` rows, COPY_PART_BYTES of vectors by default; at most
    2 x threads of them at once: 128 MB).
    """

    def __init__(self, writer, written: OrdinalSet, resumed_parts: Sequence[str], threads: int = COPY_THREADS,
                 part_rows: int | None = None, max_wait: float = 1.0) -> None:
        self.writer = writer
        self.written = written
        self.dir: Path = writer.dir
        row_bytes = 4 * writer.embed_dim * len(writer.columns)
        self.part_rows = part_rows or max(1, min(writer.rows_per_part, COPY_PART_BYTES // row_bytes))
        self.max_wait = max_wait
        self.threads = threads
        writer.track_ordinals = True
        self._names: list[str] = []  # complete parts, in the order they were indexed
        self._part_of = np.full(0, -1, dtype=np.int32)  # ordinal -> index in _names of the part holding it; -1 none
        for name in resumed_parts:
            self._add_part(name, self._read_ordinals(name))
        self.sources: list[str] = []  # input files of the copies (requests hold an index)
        self._source_index: dict[str, int] = {}
        self._new: list[_Requests] = []  # requests not yet looked up
        self._pending: list[_Requests] = []  # representative not in a complete part yet
        self._ready: list[_Requests] = []  # representative in a complete part: to be written
        self._ready_rows = 0
        self._ready_since = 0.0
        self._inflight: list[Future] = []
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="dedup-copies") if threads > 0 else None
        self._cache: OrderedDict[str, _MappedPart] = OrderedDict()
        self._cached_rows = 0
        self._lock = threading.Lock()  # the part cache and thread_seconds, shared by the threads
        self.thread_seconds = 0.0  # CPU seconds the copy threads spent (bench_driver reports the driver's thread apart)
        self.failed: dict[int, tuple[str, str]] = {}  # representative -> (its id, why it could not be embedded)
        self.counts = DedupCounts()
        self.duplicates_dropped = 0  # copy requests delivered twice (a retried block) and not written again

    @property
    def waiting(self) -> int:
        """Copies whose representative is not in a complete part yet (as of the last flush)."""
        return sum(len(r) for r in self._pending) + sum(len(r) for r in self._new)

    # --- requests ---------------------------------------------------------------------------------------------

    def request(self, ids: pa.Array | Sequence[str], ordinals: np.ndarray, sources: pa.Array | Sequence[str | None],
                reps: np.ndarray) -> list[Reject]:
        """Take copy requests; returns the copies of a representative that could not be embedded (rejects)."""
        ids = ids if isinstance(ids, pa.Array) else pa.array(list(ids), pa.string())
        req = _Requests(ids, np.asarray(ordinals, dtype=np.int64), np.asarray(reps, dtype=np.int64),
                        self._source_indices(sources))
        if not len(req):
            return []
        rejects: list[Reject] = []
        if self.failed:
            bad = np.isin(req.reps, np.fromiter(self.failed, np.int64, len(self.failed)))
            if bad.any():
                rejects = self._rejects(req.take(np.flatnonzero(bad)))
                req = req.take(np.flatnonzero(~bad))
        self._new.append(req)
        return rejects

    def _source_indices(self, sources: pa.Array | Sequence[str | None]) -> np.ndarray:
        array = sources if isinstance(sources, pa.Array) else pa.array(list(sources), pa.string())
        encoded = array.fill_null("").dictionary_encode()
        lut = np.array([self._source_index.setdefault(s, len(self._source_index))
                        for s in encoded.dictionary.to_pylist()], dtype=np.int32)
        self.sources = list(self._source_index)
        return lut[encoded.indices.to_numpy(zero_copy_only=False)] if len(lut) else np.zeros(0, np.int32)

    def rejected(self, rejects: Sequence[Reject]) -> list[Reject]:
        """Rejects of this table: a rejected representative rejects its copies too (returned)."""
        failed = [r for r in rejects if r.ordinal >= 0 and r.reason.startswith("embedding failed")]
        if not failed:
            return []  # other rejects are decided in the read task before a sequence is registered
        for r in failed:
            self.failed[r.ordinal] = (r.id, r.reason)
        self._look_up()
        if not self._pending:
            return []
        pending = _Requests.concat(self._pending)
        bad = np.isin(pending.reps, np.array([r.ordinal for r in failed], dtype=np.int64))
        if not bad.any():
            return []
        self._pending = [pending.take(np.flatnonzero(~bad))]
        return self._rejects(pending.take(np.flatnonzero(bad)))

    def _rejects(self, req: _Requests) -> list[Reject]:
        out = []
        for sid, o, src, rep in zip(req.ids.to_pylist(), req.ordinals.tolist(), req.sources.tolist(),
                                    req.reps.tolist(), strict=True):
            rep_id, reason = self.failed[rep]
            out.append(Reject(sid, self.sources[src], f"{reason} (the same sequence as {rep_id})", o))
        return out

    # --- where representatives are ----------------------------------------------------------------------------

    def _read_ordinals(self, name: str) -> np.ndarray:
        with pa.memory_map(str(self.dir / name)) as source:
            return pa.ipc.open_file(source).read_all().column("ordinal").to_numpy()

    def _add_part(self, name: str, ordinals: np.ndarray) -> None:
        index = len(self._names)
        self._names.append(name)
        if not len(ordinals):
            return
        need = int(ordinals.max()) + 1
        if need > len(self._part_of):  # grow geometrically: amortised O(1) per ordinal
            grown = np.full(max(need, 2 * len(self._part_of)), -1, dtype=np.int32)
            grown[: len(self._part_of)] = self._part_of
            self._part_of = grown
        self._part_of[ordinals] = index

    def _parts_of(self, ordinals: np.ndarray) -> np.ndarray:
        """int32 [n]: the index of the complete part holding each ordinal, -1 where none does (yet)."""
        out = np.full(len(ordinals), -1, dtype=np.int32)
        inside = ordinals < len(self._part_of)
        out[inside] = self._part_of[ordinals[inside]]
        return out

    def _look_up(self) -> None:
        """Index the parts completed since the last call and sort the requests into ready (representative in a
        complete part) and pending. New requests are looked up once; the pending ones again only when parts
        complete (pending is a list of chunks: no copying per table)."""
        completed = self.writer.take_completed()
        for name, ordinals in completed:
            self._add_part(name, ordinals)
        if completed and self._pending:
            waiting, self._pending = _Requests.concat(self._pending), []
            self._sort(waiting)
        if self._new:
            new, self._new = _Requests.concat(self._new), []
            self._sort(new)

    def _sort(self, req: _Requests) -> None:
        located = self._parts_of(req.reps) >= 0
        if not located.all():
            self._pending.append(req.take(np.flatnonzero(~located)))
            if not located.any():
                return
            req = req.take(np.flatnonzero(located))
        if not self._ready_rows:
            self._ready_since = time.monotonic()
        self._ready.append(req)
        self._ready_rows += len(req)

    # --- writing ----------------------------------------------------------------------------------------------

    def flush(self, force: bool = False) -> int:
        """Hand the ready copies to the threads when a copy part's worth is ready (or the oldest waited max_wait s,
        or `force`), and commit the copy parts the threads finished; returns the copy rows committed."""
        self._look_up()
        committed = 0
        if self._ready_rows and (force or self._ready_rows >= self.part_rows
                                 or time.monotonic() - self._ready_since >= self.max_wait):
            committed = self._dispatch()
        return committed + self._collect(wait=False)

    def finish(self) -> int:
        """End of the stream: complete the open part, write every copy; all representatives must be in parts."""
        self.writer.close()  # the open part and the queued staged parts: every representative is in a part now
        total = self.flush(force=True)
        total += self._collect(wait=True)
        if self.waiting:
            raise RunnerError(f"internal error: {self.waiting} repeated sequence(s) never got their first "
                              "record's row; please report this with manifest.json")
        self.writer.close()  # commits the copy parts
        self._shutdown()
        return total

    def close(self, commit: bool = True) -> None:
        """The stream stopped early: wait for the copy parts being written and hand them to the writer for its
        final commit (`commit`), or leave them staged (a hard stop: the next run deletes them). Copies not
        written are requested again by the next run. Never raises."""
        if self._pool is None:
            return
        if commit:
            try:
                self._collect(wait=True)
            except Exception as e:  # noqa: BLE001 - stopping anyway: these copies are redone by the next run
                log.warning("--dedup: copy parts not committed (%s): the next run writes them", first_line(e))
        self._shutdown(wait=commit)

    def _shutdown(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None

    def _dispatch(self) -> int:
        """Hand every ready copy to the threads (without threads: write them now); returns the rows committed."""
        req, self._ready, self._ready_rows = _Requests.concat(self._ready), [], 0
        fresh = ~self.written.contains(req.ordinals)
        _, first = np.unique(req.ordinals, return_index=True)
        keep = np.zeros(len(req), dtype=bool)
        keep[first] = True
        keep &= fresh
        self.duplicates_dropped += int((~keep).sum())
        if not keep.all():
            req = req.take(np.flatnonzero(keep))
        if not len(req):
            return 0
        self.written.add(req.ordinals)  # from now on they are this run's: a duplicate delivery is dropped
        parts = self._parts_of(req.reps)
        committed = 0
        for start in range(0, len(req), self.part_rows):
            index = np.arange(start, min(len(req), start + self.part_rows))
            chunk = req.take(index) if len(index) < len(req) else req
            if self._pool is None:
                committed += self._commit([self._stage(chunk, parts[index])])
                continue
            while len(self._inflight) >= 2 * self.threads:  # bounded: at most 2 x threads copy parts in memory
                committed += self._collect(wait=True, oldest_only=True)
            self._inflight.append(self._pool.submit(self._stage, chunk, parts[index]))
        return committed

    def _collect(self, wait: bool, oldest_only: bool = False) -> int:
        """Commit the copy parts the threads have written (all of them with `wait`, or the oldest one)."""
        if not self._inflight:
            return 0
        if oldest_only:
            done, self._inflight = [self._inflight[0]], self._inflight[1:]
        elif wait:
            done, self._inflight = self._inflight, []
        else:
            finished = [f.done() for f in self._inflight]
            if not any(finished):
                return 0
            done = [f for f, d in zip(self._inflight, finished, strict=True) if d]
            self._inflight = [f for f, d in zip(self._inflight, finished, strict=True) if not d]
        return self._commit([f.result() for f in done])  # a thread's OutputWriteError is raised here

    def _commit(self, staged: list[StagedPart]) -> int:
        self.writer.commit(staged)
        rows = sum(p.rows for p in staged)
        self.counts.copies_written += rows
        return rows

    def _stage(self, req: _Requests, parts: np.ndarray) -> StagedPart:
        """Build one copy part (runs on a copy thread): every copy's row gathered from its representative's
        part, then written as a staged part."""
        started = time.thread_time()
        table, truncated = self._copy_table(req, parts)
        directory = self.dir / STAGED_DIR / COPY_SHARD
        try:
            path, size, crc = write_staged_part(open_staged_shard(directory), table)
        except OSError as e:
            raise write_error(directory, e) from None
        with self._lock:
            self.thread_seconds += time.thread_time() - started
        return StagedPart(path, len(req), size, crc, req.ordinals, truncated)

    def _copy_table(self, req: _Requests, parts: np.ndarray) -> tuple[pa.Table, int]:
        schema = self.writer.schema
        n = len(req)
        out: dict[str, np.ndarray] = {}
        for fld in schema:
            if fld.name in ("id", "ordinal"):
                continue
            if pa.types.is_fixed_size_list(fld.type):
                out[fld.name] = np.empty((n, fld.type.list_size), dtype=np.float32)  # [n, D]
            elif pa.types.is_string(fld.type):
                out[fld.name] = np.empty(n, dtype=object)
            else:
                out[fld.name] = np.empty(n, dtype=fld.type.to_pandas_dtype())
        order = np.argsort(parts, kind="stable")
        bounds = np.flatnonzero(np.diff(parts[order])) + 1
        for group in np.split(order, bounds):  # one gather per part holding representatives
            part = self._mapped(self._names[int(parts[group[0]])])
            reps = req.reps[group]
            at = np.minimum(np.searchsorted(part.sorted_ordinals, reps), max(part.rows - 1, 0))
            if not part.rows or (part.sorted_ordinals[at] != reps).any():
                raise RunnerError(f"internal error: a first record's row is not in {self._names[int(parts[group[0]])]}"
                                  " although the part was committed with it; please report this with manifest.json")
            rows = part.row_of_sorted[at].astype(np.int64)
            if len(part.starts) == 2:  # one record batch (an actor's part, or a small one)
                for name, arrays in part.columns.items():
                    out[name][group] = arrays[0][rows]
                continue
            batch = np.searchsorted(part.starts, rows, side="right") - 1
            for b in np.unique(batch):
                sel = batch == b
                for name, arrays in part.columns.items():
                    out[name][group[sel]] = arrays[b][rows[sel] - part.starts[b]]
        columns = []
        for fld in schema:
            if fld.name == "id":
                columns.append(req.ids)
            elif fld.name == "ordinal":
                columns.append(pa.array(req.ordinals, pa.int64()))
            elif pa.types.is_fixed_size_list(fld.type):
                columns.append(pa.FixedSizeListArray.from_arrays(pa.array(out[fld.name].ravel()),
                                                                 fld.type.list_size))
            else:
                columns.append(pa.array(out[fld.name], fld.type))
        truncated = int(out["truncated"].sum()) if "truncated" in out else 0
        return pa.Table.from_arrays(columns, schema=schema), truncated

    def _mapped(self, name: str) -> _MappedPart:
        """A complete part, memory-mapped and indexed (LRU-cached; shared by the threads)."""
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None:
                self._cache.move_to_end(name)
                return hit
        part = _map_part(self.dir / name, self.writer.schema)  # outside the lock: other threads go on
        with self._lock:
            if name not in self._cache:
                self._cache[name] = part
                self._cached_rows += part.rows
            while len(self._cache) > 1 and (len(self._cache) > CACHED_PARTS or self._cached_rows > CACHED_ROWS):
                _, old = self._cache.popitem(last=False)
                self._cached_rows -= old.rows
        return part


@dataclass
class BlockDedup:
    """What the read task's dedup decided for one block (see `runner.input.stream`)."""

    copy_of: list[int | None] = field(default_factory=list)  # per record: the representative's ordinal, or None
    counts: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # DedupCounts.add order
