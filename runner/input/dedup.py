"""`--dedup`: embed each distinct cleaned sequence once and give every id its row, in one pass.

Two halves, one on each end of the stream:

- `SequenceTable` (in the single read task, which sees every record in input order): a 128-bit BLAKE2b hash of
  each embeddable cleaned sequence -> the ordinal of its first record (the *representative*). A later record
  of the same sequence becomes a *copy request* ("ordinal i is a copy of ordinal r"): it is never tokenized,
  packed or embedded, and travels to the driver on its block's summary row, like a reject.
- `CopyWriter` (on the driver): writes each copy as the representative's row with the copy's id and ordinal
  (the same vector, length, per-token reference...), once the representative's row is in a *complete* part.
  The row is read back from that part (memory-mapped Arrow file), so the driver never holds vectors: only the
  copy requests whose representative is not in a complete part yet (at most the rows in flight plus one
  part's worth), a bitmap of ordinals in complete parts and each part's ordinal range.

Exactly once across restarts: a copy is written only after its representative's part is complete, so a
complete copy always has a complete representative (a crash between the two leaves the copy undone, and the
next run requests it again). A rerun rebuilds the same table (the read task still hashes finished records),
so a copy points at the same representative, which may already be in a part of an earlier run.

Memory of the table: 24 bytes a slot (16-byte hash + 8-byte ordinal), at most 70 % full and doubled when
needed: 34-69 bytes per distinct sequence; 100 M distinct sequences use 2^28 slots = 6 GiB in the read task
(9 GiB for a moment while doubling). Collisions: two different sequences with the same 128-bit hash would
give the second the first one's vector; with n distinct sequences the chance of any collision is about
n^2 / 2^129: 1.5e-23 at 100 M, 1.5e-15 at 10^12. Nothing else is stored per sequence.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from runner.errors import RunnerError
from runner.input.batch import Reject
from runner.output.resume import OrdinalSet

log = logging.getLogger("runner")


def sequence_hashes(sequences: Sequence[str]) -> np.ndarray:
    """128-bit BLAKE2b of each cleaned sequence as uint64 [n, 2]."""
    b2 = hashlib.blake2b
    digests = b"".join([b2(s.encode("utf-8", "surrogatepass"), digest_size=16).digest() for s in sequences])
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64).reshape(-1, 2)  # [n, 2], a writable copy


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
        keys = np.ascontiguousarray(hashes, dtype=np.uint64).view([("hi", "<u8"), ("lo", "<u8")]).ravel()
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        self._grow(self._count + len(uniq))
        reps = self._probe_insert(uniq["hi"].astype(np.uint64), uniq["lo"].astype(np.uint64), ordinals[first])
        return reps[inverse.ravel()]

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
        pos = (lo & np.uint64(mask)).astype(np.int64)  # BLAKE2b bits are uniform: the low bits index well
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


@dataclass
class _Copy:
    id: str
    ordinal: int
    source: str


class CopyWriter:
    """The driver's half: turns copy requests into rows once their representative's part is complete.

    `writer` is the job's PartWriter (copies go into the same parts as embedded rows); `written` the job's set
    of ordinals written (each ordinal is written once, copies included); `resumed_parts` the complete parts of
    earlier runs, whose ordinals are all in `written` already.
    """

    CACHED_PARTS = 8  # memory-mapped parts kept open (the representatives of nearby copies share parts)

    def __init__(self, writer, written: OrdinalSet, resumed_parts: Sequence[str]) -> None:
        self.writer = writer
        self.written = written
        self.in_parts = OrdinalSet(written.bits)  # ordinals in complete parts (earlier runs' and this run's)
        self.dir: Path = writer.dir
        self._names: list[str] = []
        self._min = np.zeros(0, dtype=np.int64)  # ordinal range of each complete part
        self._max = np.zeros(0, dtype=np.int64)
        self._cache: OrderedDict[str, tuple[pa.Table, np.ndarray, np.ndarray]] = OrderedDict()
        for name in resumed_parts:
            self._index(name)
        self._seen_parts = len(writer.parts)
        self.pending: dict[int, list[_Copy]] = {}  # representative ordinal -> copies waiting for its part
        self._ready: list[tuple[_Copy, int]] = []  # (copy, representative) whose representative is in a part
        self.failed: dict[int, tuple[str, str]] = {}  # representative -> (its id, why it could not be embedded)
        self.counts = DedupCounts()
        self.duplicates_dropped = 0  # copy requests delivered twice (a retried block) and not written again

    @property
    def waiting(self) -> int:
        """Copies whose representative is not in a complete part yet."""
        return sum(len(v) for v in self.pending.values())

    def request(self, ids: list[str], ordinals: np.ndarray, sources: list[str], reps: np.ndarray) -> list[Reject]:
        """Take copy requests; returns the copies of a representative that could not be embedded (rejects)."""
        rejects = []
        ready = self.in_parts.contains(reps)
        for sid, o, src, r, now in zip(ids, ordinals.tolist(), sources, reps.tolist(), ready.tolist(), strict=True):
            copy = _Copy(sid, o, src or "")
            if now:
                self._ready.append((copy, r))
            elif r in self.failed:
                rejects.append(self._reject(copy, r))
            else:
                self.pending.setdefault(r, []).append(copy)
        return rejects

    def rejected(self, rejects: Sequence[Reject]) -> list[Reject]:
        """Rejects of this table: a rejected representative rejects its copies too (returned)."""
        out = []
        for r in rejects:
            if r.ordinal < 0 or not r.reason.startswith("embedding failed"):
                continue  # other rejects are decided in the read task before a sequence is registered
            self.failed[r.ordinal] = (r.id, r.reason)
            out.extend(self._reject(c, r.ordinal) for c in self.pending.pop(r.ordinal, []))
        return out

    def _reject(self, copy: _Copy, rep: int) -> Reject:
        rep_id, reason = self.failed[rep]
        return Reject(copy.id, copy.source, f"{reason} (the same sequence as {rep_id})", copy.ordinal)

    def flush(self) -> int:
        """Write every copy whose representative is in a complete part; returns the rows written."""
        total = 0
        while True:
            self._take_new_parts()
            if not self._ready:
                return total
            ready, self._ready = self._ready, []
            total += self._write(ready)

    def finish(self) -> int:
        """End of the stream: complete the open part, write every copy; all representatives must be in parts."""
        self.writer.close()
        total = self.flush()
        if self.pending:
            raise RunnerError(f"internal error: {self.waiting} repeated sequence(s) never got their first "
                              "record's row; please report this with manifest.json")
        return total

    def _take_new_parts(self) -> None:
        """Index the parts the writer completed since the last call; their copies become ready."""
        names = self.writer.parts
        if len(names) == self._seen_parts:
            return
        for name in names[self._seen_parts :]:
            ordinals = self._index(name)
            self.in_parts.add(ordinals)
            if self.pending:
                waiting = np.fromiter(self.pending, dtype=np.int64, count=len(self.pending))
                for r in waiting[np.isin(waiting, ordinals)].tolist():
                    self._ready.extend((copy, r) for copy in self.pending.pop(r))
        self._seen_parts = len(names)

    def _index(self, name: str) -> np.ndarray:
        table = self._open(name)[0]
        ordinals = table.column("ordinal").to_numpy()
        self._names.append(name)
        self._min = np.append(self._min, ordinals.min() if len(ordinals) else 0)
        self._max = np.append(self._max, ordinals.max() if len(ordinals) else -1)
        return ordinals

    def _open(self, name: str) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """A part as a memory-mapped table, with its ordinals sorted and the rows in that order (LRU-cached)."""
        hit = self._cache.get(name)
        if hit is not None:
            self._cache.move_to_end(name)
            return hit
        with pa.memory_map(str(self.dir / name)) as source:
            table = pa.ipc.open_file(source).read_all()  # zero-copy: pages are read on demand
        ordinals = table.column("ordinal").to_numpy()
        order = np.argsort(ordinals, kind="stable")
        entry = (table, ordinals[order], order)
        self._cache[name] = entry
        if len(self._cache) > self.CACHED_PARTS:
            self._cache.popitem(last=False)
        return entry

    def _write(self, ready: list[tuple[_Copy, int]]) -> int:
        ordinals = np.array([c.ordinal for c, _ in ready], dtype=np.int64)
        fresh = ~self.written.contains(ordinals)
        _, first = np.unique(ordinals, return_index=True)
        once = np.zeros(len(ready), dtype=bool)
        once[first] = True
        keep = fresh & once
        self.duplicates_dropped += int((~keep).sum())
        ready = [item for item, k in zip(ready, keep.tolist(), strict=True) if k]
        if not ready:
            return 0
        reps = np.array([r for _, r in ready], dtype=np.int64)
        found = np.full(len(ready), -1, dtype=np.int64)  # part number of each representative
        rows = np.zeros(len(ready), dtype=np.int64)  # its row in that part
        order = np.argsort(reps, kind="stable")
        sorted_reps = reps[order]
        # Parts whose ordinal range holds any representative, newest first (copies mostly follow their originals).
        lo = np.searchsorted(sorted_reps, self._min, side="left")
        hi = np.searchsorted(sorted_reps, self._max, side="right")
        for p in np.flatnonzero(hi > lo)[::-1]:
            todo = order[lo[p] : hi[p]]
            todo = todo[found[todo] < 0]
            if not len(todo):
                continue
            _, part_ordinals, part_order = self._open(self._names[p])
            at = np.searchsorted(part_ordinals, reps[todo])
            inside = at < len(part_ordinals)
            match = np.zeros(len(todo), dtype=bool)
            match[inside] = part_ordinals[at[inside]] == reps[todo][inside]
            found[todo[match]] = p
            rows[todo[match]] = part_order[at[match]]
        if (found < 0).any():
            missing = int(reps[found < 0][0])
            raise RunnerError(f"internal error: the row of record {missing} is in no complete part although its "
                              "ordinal is marked written; please report this with manifest.json")
        written = 0
        for p in np.unique(found):
            sel = np.flatnonzero(found == p)
            sel = sel[np.argsort(rows[sel], kind="stable")]  # the part's rows in file order: sequential reads
            table = self._open(self._names[p])[0].take(pa.array(rows[sel]))
            table = table.set_column(table.schema.get_field_index("id"), "id",
                                     pa.array([ready[i][0].id for i in sel], pa.string()))
            table = table.set_column(table.schema.get_field_index("ordinal"), "ordinal",
                                     pa.array(ordinals[keep][sel], pa.int64()))
            self.writer.write_table(table)
            self.written.add(ordinals[keep][sel])
            written += len(sel)
        self.counts.copies_written += written
        return written


@dataclass
class BlockDedup:
    """What the read task's dedup decided for one block (see `runner.input.stream`)."""

    copy_of: list[int | None] = field(default_factory=list)  # per record: the representative's ordinal, or None
    counts: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # DedupCounts.add order
