"""The records that flow between stages, and their Arrow form for the Ray Data stream.

source -> `InputRecord` (raw text, or a reject) -> `TokenizedRecord` (one window, token ids)
-> `PackedBatch` (many windows concatenated, `cu_seqlens`) -> embed actor -> `EmbeddingRow`s -> sink.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa


@dataclass
class InputRecord:
    """One record as read from an input file, before cleaning."""

    id: str  # sequence identifier (FASTA header up to the first whitespace, or the id column)
    sequence: str  # raw sequence text as read
    source: str  # input file it came from
    ordinal: int  # position of the record in the whole input, 0-based, in reading order


@dataclass
class Reject:
    """A record that will not be embedded, and why."""

    id: str
    source: str
    reason: str  # one line a user can act on, e.g. "invalid characters: BJ"
    ordinal: int = -1  # position in the input (-1 when unknown)

    @property
    def code(self) -> str:
        """The reason's category (REJECT_CODES), for grouping: the detail text differs per record."""
        return reject_code(self.reason)


# Reject reason categories: (code, how the reason text starts). The texts are written in runner.input.prepare
# (missing id, empty, invalid characters, too long), runner.input.prepare.DuplicateFilter (duplicate id) and
# runner.stages.embed_stage.failure_reason (a window that raised inside the model, CUDA OOM alone included).
REJECT_CODES: tuple[tuple[str, str], ...] = (
    ("missing_id", "missing id"),
    ("empty_sequence", "empty sequence"),
    ("invalid_characters", "invalid characters"),
    ("too_long", "longer than"),
    ("duplicate_id", "duplicate id"),
    ("embedding_failed", "embedding failed"),
)


def reject_code(reason: str) -> str:
    """The category code of a reject reason ("other" for a reason no category names)."""
    return next((code for code, start in REJECT_CODES if reason.startswith(start)), "other")


@dataclass
class TokenizedRecord:
    """One window of one sequence, tokenized; a sequence that fits is a single window."""

    id: str
    ordinal: int  # input position of the sequence this window belongs to
    tokens: np.ndarray  # int32 [n_tokens] including special tokens
    residues: int  # residues covered by this window
    truncated: bool  # the sequence was cut to max_residues (long == "truncate")
    chunk_index: int = 0  # window number inside its sequence
    chunk_count: int = 1  # windows of its sequence (1 = not chunked)
    total_residues: int = 0  # residues of the whole sequence (for chunked sequences)


@dataclass
class PackedBatch:
    """Windows concatenated into one token stream of at most the token budget."""

    tokens: np.ndarray  # int32 [T] all token ids, back to back
    positions: np.ndarray  # int32 [T] position of each token inside its own window
    cu_seqlens: np.ndarray  # int32 [B+1] window offsets; cu_seqlens[-1] == T
    ids: list[str]  # [B] sequence id of each window
    ordinals: np.ndarray  # int64 [B] input position of each window's sequence
    residues: np.ndarray  # int32 [B] residues in each window
    truncated: np.ndarray  # bool [B]
    chunk_index: np.ndarray  # int32 [B]
    chunk_count: np.ndarray  # int32 [B]
    total_residues: np.ndarray  # int32 [B] residues of the whole sequence
    token_budget: int = 0  # the budget this batch was packed against (for packing efficiency)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # per-window extras (e.g. shadow flags)

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def max_seqlen(self) -> int:
        return int(np.diff(self.cu_seqlens).max()) if len(self.ids) else 0

    def to_row(self) -> dict:
        """One row of list columns: a packed batch travels as a single Arrow row."""
        row = {
            "tokens": self.tokens.astype(np.int32),
            "positions": self.positions.astype(np.int32),
            "cu_seqlens": self.cu_seqlens.astype(np.int32),
            "ids": list(self.ids),
            "ordinals": self.ordinals.astype(np.int64),
            "residues": self.residues.astype(np.int32),
            "truncated": self.truncated.astype(bool),
            "chunk_index": self.chunk_index.astype(np.int32),
            "chunk_count": self.chunk_count.astype(np.int32),
            "total_residues": self.total_residues.astype(np.int32),
            "token_budget": int(self.token_budget),
        }
        for k, v in self.extra.items():
            row[f"x_{k}"] = v
        return row

    @classmethod
    def from_row(cls, row: dict) -> PackedBatch:
        extra = {k[2:]: np.asarray(v) for k, v in row.items() if k.startswith("x_")}
        return cls(
            tokens=np.asarray(row["tokens"], dtype=np.int32),
            positions=np.asarray(row["positions"], dtype=np.int32),
            cu_seqlens=np.asarray(row["cu_seqlens"], dtype=np.int32),
            ids=[str(i) for i in row["ids"]],
            ordinals=np.asarray(row["ordinals"], dtype=np.int64),
            residues=np.asarray(row["residues"], dtype=np.int32),
            truncated=np.asarray(row["truncated"], dtype=bool),
            chunk_index=np.asarray(row["chunk_index"], dtype=np.int32),
            chunk_count=np.asarray(row["chunk_count"], dtype=np.int32),
            total_residues=np.asarray(row["total_residues"], dtype=np.int32),
            token_budget=int(row.get("token_budget", 0)),
            extra=extra,
        )


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Packed-batch rows as an Arrow table of list columns (one row per batch)."""
    if not rows:
        return pa.table({})
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    return pa.table({k: pa.array(v) for k, v in cols.items()})
