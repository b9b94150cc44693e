"""Per-record preparation: clean, check, cut to windows and tokenize; plus duplicate-id detection.

`Preparer` turns one `InputRecord` into the `TokenizedRecord` windows the model embeds, or a `Reject` with
a reason a user can act on. `DuplicateFilter` remembers every id seen so far in a compact hash table so
that only the first record of an id is embedded. Both are plain Python (no Ray) and picklable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa

from runner.errors import RunnerError
from runner.input.batch import InputRecord, Reject, TokenizedRecord
from runner.models.base import SequenceCodec, string_buffers

LONG_POLICIES = ("truncate", "chunk", "skip")


def chunk_starts(length: int, window: int, overlap: int) -> list[int]:
    """Start offsets of overlapping windows of `window` residues covering `length` residues.

    Windows step by `window - overlap`; the last one is moved back so that it ends exactly at the sequence
    end (it may then overlap its neighbour by more than `overlap`). A sequence that fits is one window.
    """
    if length <= window:
        return [0]
    stride = window - overlap
    n = -(-(length - window) // stride) + 1  # ceil division: windows needed to reach the end
    return [min(i * stride, length - window) for i in range(n)]


class Preparer:
    """Clean, validate, window and tokenize records for one model's codec.

    Picklable (it only holds the codec and a few ints), so it can be shipped to CPU workers as is.
    """

    def __init__(
        self,
        codec: SequenceCodec,
        max_residues: int | None = None,
        long: str = "truncate",
        chunk_overlap: int = 128,
    ) -> None:
        if long not in LONG_POLICIES:
            raise RunnerError(f"--long must be one of {', '.join(LONG_POLICIES)}, not {long!r}")
        self.codec = codec
        self.max_residues = int(max_residues if max_residues is not None else codec.max_residues)
        if self.max_residues < 1:
            raise RunnerError("--max-residues must be at least 1")
        self.long = long
        self.chunk_overlap = int(chunk_overlap)
        if long == "chunk" and not 0 <= self.chunk_overlap < self.max_residues:
            raise RunnerError(
                f"--chunk-overlap ({self.chunk_overlap}) must be 0 or more and smaller than "
                f"--max-residues ({self.max_residues})"
            )

    def _reject(self, record: InputRecord, reason: str) -> Reject:
        return Reject(id=record.id, source=record.source, reason=reason, ordinal=record.ordinal)

    def _window(
        self, record: InputRecord, residues: str, truncated: bool, index: int, count: int, total: int
    ) -> TokenizedRecord:
        return TokenizedRecord(
            id=record.id,
            ordinal=record.ordinal,
            tokens=np.asarray(self.codec.encode(residues), dtype=np.int32),
            residues=len(residues),
            truncated=truncated,
            chunk_index=index,
            chunk_count=count,
            total_residues=total,
        )

    def check(self, record: InputRecord) -> str | Reject:
        """The cleaned sequence of an embeddable record, or why it is rejected (no tokenizing)."""
        if not record.id:
            return self._reject(record, "missing id (empty FASTA header or id column)")
        seq = self.codec.clean(record.sequence)
        if not seq:
            return self._reject(record, "empty sequence")
        bad = self.codec.invalid_characters(seq)
        if bad:
            return self._reject(record, f"invalid characters for {self.codec.kind} model: {bad}")
        if len(seq) > self.max_residues and self.long == "skip":
            return self._reject(record, f"longer than {self.max_residues} residues ({len(seq)}); use --long truncate or chunk")
        return seq

    def check_column(self, ids: pa.StringArray, sequences: pa.StringArray) -> tuple[pa.StringArray, np.ndarray, np.ndarray]:
        """`check` over columns (Arrow strings, no nulls) in numpy: the cleaned sequences, their lengths (int64 [n],
        characters where embeddable) and bool [n]: where `check` returns a sequence rather than a reject."""
        cleaned = self.codec.clean_column(sequences)
        lengths = np.diff(string_buffers(cleaned)[0])  # bytes; characters wherever the sequence is valid (ASCII)
        ok = (np.diff(string_buffers(ids)[0]) > 0) & (lengths > 0)
        if self.long == "skip":
            ok &= lengths <= self.max_residues
        ok &= self.codec.valid_column(cleaned)
        return cleaned, lengths, ok

    def window_totals(self, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`window_residues` of many lengths at once: (windows, residues in all), int64 [n] each."""
        m = self.max_residues
        lengths = np.asarray(lengths, dtype=np.int64)
        windows = np.ones(len(lengths), dtype=np.int64)
        if self.long == "chunk":
            stride = m - self.chunk_overlap
            over = lengths > m
            windows[over] = -(-(lengths[over] - m) // stride) + 1  # as chunk_starts
        residues = np.where(windows > 1, windows * m, np.minimum(lengths, m))
        return windows, residues

    def window_residues(self, length: int) -> list[int]:
        """Residues of each window a cleaned sequence of `length` residues is embedded as (`prepare`'s windows)."""
        m = self.max_residues
        if length <= m or self.long != "chunk":
            return [min(length, m)]
        return [m] * len(chunk_starts(length, m, self.chunk_overlap))

    def prepare(self, record: InputRecord) -> list[TokenizedRecord] | Reject:
        """The windows of one record (usually one), or why it is rejected."""
        seq = self.check(record)
        if isinstance(seq, Reject):
            return seq
        n, m = len(seq), self.max_residues
        if n <= m:
            return [self._window(record, seq, False, 0, 1, n)]
        if self.long == "truncate":
            return [self._window(record, seq[:m], True, 0, 1, n)]
        starts = chunk_starts(n, m, self.chunk_overlap)
        return [self._window(record, seq[s : s + m], False, i, len(starts), n) for i, s in enumerate(starts)]


# Ids up to this many UTF-8 bytes are hashed by simple tabulation (below); longer ones by BLAKE2b, one by one.
TABULATED_ID_BYTES = 128
# Simple tabulation hashing: one random 64-bit word per (byte position, byte value), XORed over an id's bytes,
# XORed with a random word for its length. For two different ids the hashes are equal with probability 2^-64
# (simple tabulation is 3-independent), the same odds as any 64-bit hash; the words come from a fixed PCG64
# stream (its raw output is stable across numpy versions), so every process and every run hashes alike.
_RAW = np.random.PCG64(0x18_2026_1130).random_raw((TABULATED_ID_BYTES + 1) * 256)
_BYTE_WORDS = _RAW[: TABULATED_ID_BYTES * 256].reshape(TABULATED_ID_BYTES, 256)  # [position, byte]
_LENGTH_WORDS = _RAW[TABULATED_ID_BYTES * 256 :]  # [length], lengths 0..TABULATED_ID_BYTES


def id_hashes(ids: Sequence[str] | pa.StringArray) -> np.ndarray:
    """64-bit hashes of ids as uint64 (a list of str or an Arrow string array without nulls); 0 is reserved for
    'empty slot' and mapped to 1. Vectorised: one numpy pass per byte position over all the ids still that
    long (about 0.25 us an Illumina read name), no Python per id."""
    if not isinstance(ids, pa.Array):
        ids = pa.array(ids, pa.string())
    n = len(ids)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int32, count=n + 1, offset=ids.offset * 4).astype(np.int64)
    data = ids.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)
    lengths = np.diff(offsets)
    h = _LENGTH_WORDS[np.minimum(lengths, TABULATED_ID_BYTES)].copy()
    rows = np.flatnonzero(lengths > 0)  # the ids at least `position + 1` bytes long
    at = offsets[:-1][rows]  # where their byte at `position` is
    for position in range(TABULATED_ID_BYTES):
        if not len(rows):
            break
        word = _BYTE_WORDS[position][raw[at]]
        if len(rows) == n:
            h ^= word
        else:
            h[rows] ^= word
        longer = lengths[rows] > position + 1
        if not longer.all():
            rows, at = rows[longer], at[longer]
        at = at + 1
    for i in np.flatnonzero(lengths > TABULATED_ID_BYTES).tolist():  # the rest of the id is not tabulated
        digest = hashlib.blake2b(raw[offsets[i] : offsets[i + 1]].tobytes(), digest_size=8).digest()
        h[i] = np.frombuffer(digest, dtype="<u8")[0]
    h[h == 0] = 1
    return h


class DuplicateFilter:
    """Which ids were seen before, in bounded memory: an open-addressing table of 64-bit id hashes.

    Ids are hashed to 64 bits (`id_hashes`) and only the hash is kept (8 bytes per slot, plus 2 bytes for the
    index of the source file the id was first seen in). The table stays at most 70 % full and doubles when
    needed: 10 bytes a slot, 14-28 bytes an id; 100 M ids fit 2^28 slots = 2.7 GB (4 GB for a moment
    while doubling: old and new tables side by side, re-inserted in 1M-slot slices), against ~10 GB for a Python set of the strings.

    Collision risk: two different ids with the same 64-bit hash would make the second one wrongly reported
    as a duplicate. With n distinct ids the chance of any collision is about n^2 / 2^65: ~3e-4 for 100 M
    ids, ~3 % for 1 B ids, and then it costs one wrongly rejected record (reported in rejects, not lost
    silently). Picklable; state is a few numpy arrays.
    """

    MAX_LOAD = 0.7
    _NO_SOURCE = np.uint16(0xFFFF)  # source index unknown (more than 65535 distinct sources)

    def __init__(self, capacity: int = 1 << 16) -> None:
        cap = 1 << max(4, int(capacity - 1).bit_length())
        self._keys = np.zeros(cap, dtype=np.uint64)
        self._src = np.full(cap, self._NO_SOURCE, dtype=np.uint16)
        self._count = 0
        self._sources: list[str] = []
        self._source_index: dict[str, int] = {}
        self._reason_texts = pa.array([], pa.string())  # `reasons`' texts, one per source (rebuilt as they grow)

    def __len__(self) -> int:
        return self._count

    @property
    def capacity(self) -> int:
        return len(self._keys)

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._src.nbytes

    def _source_id(self, source: str) -> np.uint16:
        idx = self._source_index.get(source)
        if idx is None:
            if len(self._sources) >= int(self._NO_SOURCE):
                return self._NO_SOURCE
            idx = len(self._sources)
            self._sources.append(source)
            self._source_index[source] = idx
        return np.uint16(idx)

    def _grow(self, needed: int) -> None:
        cap = self.capacity
        while needed > cap * self.MAX_LOAD:
            cap *= 2
        if cap == self.capacity:
            return
        old_keys, old_src = self._keys, self._src
        self._keys = np.zeros(cap, dtype=np.uint64)
        self._src = np.full(cap, self._NO_SOURCE, dtype=np.uint16)
        self._count = 0  # re-counted by the re-insertion
        # Re-insert in fixed slices: one pass over all keys would allocate ~70 bytes of probe temporaries
        # per id at once (measured: +650 MiB at 6M ids), far more than the tables themselves.
        step = 1 << 20
        for start in range(0, len(old_keys), step):
            live = old_keys[start : start + step] != 0
            _, slots = self._probe_insert(old_keys[start : start + step][live])
            self._src[slots] = old_src[start : start + step][live]

    def _probe_insert(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Look up distinct `keys`, inserting the absent ones. Returns (was present, slot of each key).

        Linear probing, vectorised over the whole block: each round every unresolved key looks at its slot;
        a match resolves as present, an empty slot is claimed (when several keys claim the same empty slot
        in one round the first wins and the others probe on), anything else moves to the next slot.
        """
        mask = self.capacity - 1
        n = len(keys)
        found = np.zeros(n, dtype=bool)
        slots = np.empty(n, dtype=np.int64)
        active = np.arange(n)
        # BLAKE2b bits are uniform, so the low bits index the table well
        pos = (keys & np.uint64(mask)).astype(np.int64)
        while len(active):
            k = keys[active]
            p = pos[active]
            cur = self._keys[p]
            hit = cur == k
            found[active[hit]] = True
            slots[active[hit]] = p[hit]
            done = hit.copy()
            claim = np.flatnonzero(cur == 0)
            if len(claim):
                _, first = np.unique(p[claim], return_index=True)
                win = claim[first]
                self._keys[p[win]] = k[win]
                slots[active[win]] = p[win]
                done[win] = True
            # the rest saw another key in their slot, or lost a claim to another key: probe the next slot
            rest = ~done
            pos[active[rest]] = (p[rest] + 1) & mask
            active = active[rest]
        self._count += int((~found).sum())
        return found, slots

    def register(self, ids: Sequence[str] | pa.StringArray, sources: Sequence[str] | str | None = None) -> np.ndarray:
        """Register a block of ids (a list, or an Arrow string array without nulls); int32 [n]: -1 where the id is
        new, else the index of the source it was first seen in (`reasons` turns these into reject reasons).

        The first occurrence wins, both across blocks and inside this block. `sources` (one per id, or one
        for all) lets the reason name the file the id was first seen in.
        """
        n = len(ids)
        if n == 0:
            return np.zeros(0, dtype=np.int32)
        if sources is None or isinstance(sources, str):
            one = self._source_id(sources) if isinstance(sources, str) else self._NO_SOURCE
            src_ids = np.full(n, one, dtype=np.uint16)
        else:
            src_ids = np.fromiter((self._source_id(s) for s in sources), dtype=np.uint16, count=n)
        h = id_hashes(ids)
        uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)
        self._grow(self._count + len(uniq))
        found, slots = self._probe_insert(uniq)
        new = ~found
        self._src[slots[new]] = src_ids[first[new]]
        seen_in = self._src[slots][inverse.ravel()].astype(np.int32)  # where each record's id was first seen
        seen_in[first[new]] = -1  # the first record of each new id is the one kept
        return seen_in

    def reasons(self, seen_in: np.ndarray) -> pa.StringArray:
        """`register`'s result as reject reasons: null for new ids, else 'duplicate id (first seen in FILE)'."""
        dup = seen_in >= 0
        if not dup.any():
            return pa.nulls(len(seen_in), pa.string())
        if len(self._reason_texts) != len(self._sources) + 1:  # one text per source, then the one with none
            self._reason_texts = pa.array([f"duplicate id (first seen in {s})" for s in self._sources] + ["duplicate id"])
        which = np.where(seen_in < len(self._sources), seen_in, len(self._sources))
        return self._reason_texts.take(pa.array(which, mask=~dup))

    def check(self, ids: Sequence[str], sources: Sequence[str] | str | None = None) -> list[str | None]:
        """Register a block of ids; for each, None if it is new, else the reject reason (see `register`)."""
        return self.reasons(self.register(ids, sources)).to_pylist()

    def seen_before(self, ids: Sequence[str], sources: Sequence[str] | str | None = None) -> np.ndarray:
        """Register a block of ids; bool [n], True where the id was seen earlier (this block included)."""
        return np.array([r is not None for r in self.check(ids, sources)], dtype=bool)


def prepare_block(
    records: Iterable[InputRecord], preparer: Preparer, dedup: DuplicateFilter | None = None
) -> tuple[list[TokenizedRecord], list[Reject]]:
    """Windows and rejects of a block of records, both in input order. Duplicates are found before any
    tokenizing (a repeated id is rejected even when its first record was itself rejected for another reason)."""
    records = list(records)
    if dedup is not None:
        named = [i for i, r in enumerate(records) if r.id]  # empty ids are rejected by `prepare`
        reasons = dedup.check([records[i].id for i in named], [records[i].source for i in named])
        dup = {i: why for i, why in zip(named, reasons, strict=True) if why is not None}
    else:
        dup = {}
    windows: list[TokenizedRecord] = []
    rejects: list[Reject] = []
    for i, rec in enumerate(records):
        why = dup.get(i)
        if why is not None:
            rejects.append(Reject(id=rec.id, source=rec.source, reason=why, ordinal=rec.ordinal))
            continue
        out = preparer.prepare(rec)
        if isinstance(out, Reject):
            rejects.append(out)
        else:
            windows.extend(out)
    return windows, rejects
