"""Continuing a job in an existing `--out`: which input records are already done, and may we continue?

Completion is tracked by input ordinal (a record's position in the whole input), never by id: every
complete part stores the `ordinal` of each of its rows, so on resume the parts' ordinal columns are
scanned into a bitmap (`OrdinalSet`, one bit per ordinal: 100M records = 12.5 MB) that the read task
consults to skip finished records. Nothing here holds ids, so driver memory stays bounded at any scale.

A part is trusted only if it opens as an Arrow IPC file with a footer (a truncated file has none), has
the expected schema, and its id/ordinal columns validate; anything else is deleted and its ordinals
are embedded again; so is a part whose CRC-32 differs from the one its writer recorded (runner.output.checksums),
and with --per-token every part pointing at a token file that is missing, truncated or fails its own CRC-32.
Parts are renamed into place only when complete, so a crash leaves at most a
hidden `.part-NNNNN.arrow.tmp`, which is deleted here too.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from runner.errors import RunnerError
from runner.output.checksums import JOURNAL_NAME, check_file, drop_records, read_records
from runner.output.sink import embedding_schema
from runner.output.staged import remove_staged
from runner.output.tokens import (
    TOKENS_DIR,
    ReconcileReport,
    TokenFileCheck,
    check_token_files,
    clear_token_files,
    part_pointers,
    reconcile,
    remove_temporaries,
    token_files,
)

log = logging.getLogger("runner")

PART_NAME = re.compile(r"^part-(\d+)\.arrow$")
TMP_PART_NAME = re.compile(r"^\.part-(\d+)\.arrow\.tmp$")
LOCK_NAME = ".runner.lock"


def bitmap_contains(bits: np.ndarray, ordinals: np.ndarray) -> np.ndarray:
    """bool [N]: which ordinals are set in a packed bitmap (np.packbits order; ordinals past its end are not)."""
    o = np.asarray(ordinals, dtype=np.int64)
    out = np.zeros(len(o), dtype=bool)
    inside = (o >= 0) & (o < len(bits) * 8)
    if inside.any():
        oi = o[inside]
        out[inside] = ((bits[oi >> 3] >> (7 - (oi & 7)).astype(np.uint8)) & 1) == 1
    return out


class OrdinalSet:
    """A growable bitmap of non-negative input ordinals (1 bit each, big-endian within a byte, as np.packbits)."""

    def __init__(self, bits: np.ndarray | None = None) -> None:
        self._bits = np.zeros(0, dtype=np.uint8) if bits is None else np.asarray(bits, dtype=np.uint8).copy()
        self.count = int(np.unpackbits(self._bits).sum()) if len(self._bits) else 0

    @property
    def bits(self) -> np.ndarray:
        """The packed bitmap (uint8), e.g. to hand to the read task."""
        return self._bits

    @property
    def nbytes(self) -> int:
        return int(self._bits.nbytes)

    def contains(self, ordinals: np.ndarray) -> np.ndarray:
        """bool [N]: which of `ordinals` are in the set."""
        return bitmap_contains(self._bits, ordinals)

    def add(self, ordinals: np.ndarray) -> None:
        """Add ordinals (>= 0); adding one twice is harmless."""
        o = np.asarray(ordinals, dtype=np.int64)
        if not len(o):
            return
        new = np.unique(o[~self.contains(o)])
        if not len(new):
            return
        need = int(new.max() >> 3) + 1
        if need > len(self._bits):  # grow geometrically: amortised O(1) per ordinal
            grown = np.zeros(max(need, 2 * len(self._bits)), dtype=np.uint8)
            grown[: len(self._bits)] = self._bits
            self._bits = grown
        np.bitwise_or.at(self._bits, new >> 3, (128 >> (new & 7)).astype(np.uint8))
        self.count += len(new)


@dataclass
class ResumeState:
    """What an `--out` already holds, for the run that continues it."""

    done: OrdinalSet = field(default_factory=OrdinalSet)  # ordinals written in complete parts
    rows: int = 0  # rows in the complete parts kept
    parts: list[str] = field(default_factory=list)  # complete parts kept, in name order
    next_part: int = 0  # number of the first part this run writes
    redone_parts: list[str] = field(default_factory=list)  # corrupt/inconsistent parts deleted
    removed_tmp: int = 0  # hidden half-written parts deleted
    runs: int = 1  # how many runs wrote into this --out, this one included
    previous_drift: list[str] = field(default_factory=list)  # drift files of earlier runs, renamed
    tokens: ReconcileReport | None = None  # --per-token: the token files after cleaning up (None: not per-token)
    tokens_tmp_removed: int = 0  # half-written token files deleted
    bad_token_files: list[str] = field(default_factory=list)  # token files deleted as corrupt (their parts redone)
    staged_removed: int = 0  # pooled parts actors staged that no run committed (runner.output.staged), deleted

    def summary(self) -> dict[str, Any]:
        """The manifest's `resume` section."""
        return {
            "runs": self.runs,
            "resumed_rows": self.rows,
            "resumed_parts": len(self.parts),
            "redone_parts": self.redone_parts,
            "removed_tmp_parts": self.removed_tmp,
            "previous_drift": self.previous_drift,
            "bitmap_bytes": self.done.nbytes,
            "staged_removed": self.staged_removed,
            **(
                {"token_files_deleted": self.tokens.deleted, "token_files_rewritten": self.tokens.rewritten,
                 "token_tmp_removed": self.tokens_tmp_removed, "redone_token_files": self.bad_token_files}
                if self.tokens is not None else {}
            ),
        }


class OutLock:
    """An exclusive lock on `--out` for the job's lifetime: two jobs writing one --out would mix parts.

    flock is released by the kernel when the process dies (SIGKILL included), so a crash never leaves
    a stale lock behind.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> OutLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunnerError(
                f"another runner job is writing to --out {self.path.parent}: wait for it to finish or choose another --out"
            ) from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The previous run's manifest, or None when there is none or it cannot be parsed."""
    path = out_dir / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def has_outputs(out_dir: Path) -> bool:
    """Whether `--out` holds anything a run of ours writes."""
    emb = out_dir / "embeddings"
    if emb.is_dir() and any(PART_NAME.match(p.name) or TMP_PART_NAME.match(p.name) for p in emb.iterdir()):
        return True
    if (out_dir / TOKENS_DIR).is_dir() and any(shard.is_dir() for shard in (out_dir / TOKENS_DIR).iterdir()):
        return True
    return any((out_dir / name).exists() for name in ("manifest.json", "rejects.arrow", "drift.arrow"))


def has_parts(out_dir: Path) -> bool:
    """Whether `--out` holds a complete part (a row written by an earlier run)."""
    emb = out_dir / "embeddings"
    return emb.is_dir() and any(PART_NAME.match(p.name) for p in emb.iterdir())


def is_ours(manifest: dict[str, Any] | None) -> bool:
    """Whether a manifest was written by runner (it has our fingerprint), so its files are ours to replace."""
    return manifest is not None and isinstance(manifest.get("fingerprint"), dict)


def clear_outputs(out_dir: Path) -> None:
    """--overwrite: delete what earlier runs wrote (only our own file names; nothing else in --out)."""
    emb = out_dir / "embeddings"
    if emb.is_dir():
        for p in emb.iterdir():
            if PART_NAME.match(p.name) or TMP_PART_NAME.match(p.name):
                p.unlink()
        remove_staged(out_dir)
        if not any(emb.iterdir()):
            emb.rmdir()
    clear_token_files(out_dir)
    ours = {"manifest.json", "rejects.arrow", "drift.arrow", ".manifest.json.tmp", ".rejects.arrow.tmp",
            ".drift.arrow.tmp", ".test-actor-crashed", ".test-actor-crashed-staged", JOURNAL_NAME, f".{JOURNAL_NAME}.tmp"}
    for p in out_dir.iterdir():
        if p.name in ours or re.match(r"^drift\.run-\d+\.arrow$", p.name):
            p.unlink()


def fingerprint_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of what changed between two fingerprints (empty when they match)."""
    diffs: list[str] = []
    old_settings, new_settings = old.get("settings", {}), new.get("settings", {})
    for key in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(key) != new_settings.get(key):
            diffs.append(f"{key} {old_settings.get(key)!r} -> {new_settings.get(key)!r}")
    if old.get("model") != new.get("model"):
        diffs.append("a different model checkpoint")
    if old.get("inputs") != new.get("inputs"):
        old_paths = [i.get("path") for i in old.get("inputs", [])]
        new_paths = [i.get("path") for i in new.get("inputs", [])]
        diffs.append("input files changed" if old_paths == new_paths else "a different list of input files")
    for key in sorted((set(old) | set(new)) - {"settings", "model", "inputs"}):
        if old.get(key) != new.get(key):
            diffs.append(f"{key} changed")
    return diffs


def prepare_resume(out_dir: Path, fingerprint: dict[str, Any], embed_dim: int, overwrite: bool,
                   schema: pa.Schema | None = None, per_token: bool = False) -> ResumeState:
    """Decide fresh / resume / refuse for `--out`, clean up leftovers and scan the complete parts (which must
    have `schema`; default: the one-`embedding`-column schema of `embed_dim`).

    With `per_token`, a part pointing at a missing or short token file is redone like a corrupt one, and
    token files no complete part points at (or only in part) are deleted (rewritten): runner.output.tokens.reconcile."""
    if overwrite and has_outputs(out_dir):
        log.warning("--overwrite: deleting the previous outputs in %s", out_dir)
        clear_outputs(out_dir)
    if not has_outputs(out_dir):
        remove_staged(out_dir)  # a run stopped before its first commit may have left staged parts
        return ResumeState()
    if not has_parts(out_dir) and is_ours(read_manifest(out_dir)):
        # A run that stopped before writing a single row (a bad setting found after start-up, a failed stream,
        # a stop during start-up) holds nothing to resume: it must not lock --out against the corrected command.
        log.info("--out %s holds no embeddings from the earlier run (status %s): starting over", out_dir,
                 (read_manifest(out_dir) or {}).get("status"))
        clear_outputs(out_dir)
        return ResumeState()
    previous = read_manifest(out_dir)
    if previous is None or not isinstance(previous.get("fingerprint"), dict):
        raise RunnerError(
            f"--out {out_dir} holds outputs without a readable manifest fingerprint (another tool or an older "
            "runner): pass --overwrite to replace them, or choose another --out"
        )
    diffs = fingerprint_differences(previous["fingerprint"], fingerprint)
    if diffs:
        raise RunnerError(
            f"--out {out_dir} holds a run with different inputs, model or settings ({'; '.join(diffs[:4])}): "
            "rerun with the same ones to resume, pass --overwrite to replace it, or choose another --out"
        )
    # Staged parts are uncommitted until renamed to a part name: their rows are embedded again (no actor of this
    # --out runs now: the lock is ours). Before the token files are reconciled: only parts keep token rows.
    staged_removed = remove_staged(out_dir)
    state = scan_parts(out_dir, embed_dim, schema, per_token)
    state.staged_removed = staged_removed
    if per_token:
        state.tokens_tmp_removed = remove_temporaries(out_dir)
        state.tokens = reconcile(out_dir, state.parts)
    state.runs = int(previous.get("resume", {}).get("runs", 1)) + 1
    state.previous_drift = keep_previous_drift(out_dir)
    log.info("resuming in %s: %d row(s) in %d complete part(s) already done; %d corrupt part(s) to redo",
             out_dir, state.rows, len(state.parts), len(state.redone_parts))
    return state


def keep_previous_drift(out_dir: Path) -> list[str]:
    """Rename the previous runs' drift.arrow to drift.run-K.arrow (K = 1, 2, ...) so this run starts its own."""
    kept = sorted(p.name for p in out_dir.glob("drift.run-*.arrow"))
    current = out_dir / "drift.arrow"
    if current.exists():
        k = 1
        while (out_dir / f"drift.run-{k}.arrow").exists():
            k += 1
        current.rename(out_dir / f"drift.run-{k}.arrow")
        kept.append(f"drift.run-{k}.arrow")
    return kept


def scan_parts(out_dir: Path, embed_dim: int = 0, schema: pa.Schema | None = None, per_token: bool = False) -> ResumeState:
    """Validate every complete part, delete half-written and corrupt ones, and collect the done ordinals.

    With `per_token` a part must also point only at sound rows of token files: a token file that is missing,
    truncated or fails its checksum is deleted with every part pointing at it (one log line says which), and
    those parts' sequences are embedded again."""
    state = ResumeState()
    emb = out_dir / "embeddings"
    if not emb.is_dir():
        return state
    schema = schema if schema is not None else embedding_schema(embed_dim)
    highest = -1
    names = sorted(p.name for p in emb.iterdir())
    checksums = read_records(out_dir)
    # Every token file is read once, in full, against its checksum (several at a time): runner.output.tokens.
    token_checks = check_token_files(out_dir, list(token_files(out_dir)), checksums) if per_token else {}
    bad_tokens: dict[str, list[str]] = {}  # unusable token file -> the parts deleted because they point at it
    for name in names:
        tmp = TMP_PART_NAME.match(name)
        if tmp:
            highest = max(highest, int(tmp.group(1)))
            (emb / name).unlink()
            state.removed_tmp += 1
    for name in names:
        match = PART_NAME.match(name)
        if not match:
            continue
        highest = max(highest, int(match.group(1)))
        path = emb / name
        problem, ordinals = check_part(path, schema)
        record = checksums.get(f"embeddings/{name}")
        if problem is None and record is not None:  # parts of runner versions before checksums have none
            problem = check_file(path, record)
        bad_file = None
        if problem is None and per_token:
            problem, bad_file = check_pointers(path, token_checks)
        if problem is None and (np.unique(ordinals).size != ordinals.size or state.done.contains(ordinals).any()):
            problem = "rows already present in another part"
        if problem is not None:
            if bad_file is not None:
                bad_tokens.setdefault(bad_file, []).append(name)  # said once per token file, below
            else:
                log.warning("part %s is unusable (%s): deleting it; its sequences are embedded again", path, problem)
            path.unlink()
            state.redone_parts.append(name)
            continue
        state.done.add(ordinals)
        state.rows += len(ordinals)
        state.parts.append(name)
    for token_name, parts in bad_tokens.items():
        token_path = out_dir / TOKENS_DIR / token_name
        token_path.unlink(missing_ok=True)
        log.warning("per-token file %s is unusable (%s): deleted with the %d pooled part(s) pointing at it (%s); "
                    "their sequences are embedded again", token_path, token_checks.get(token_name, MISSING).problem,
                    len(parts), ", ".join(parts))
    state.bad_token_files = sorted(bad_tokens)
    state.next_part = highest + 1
    drop_records(out_dir, {f"embeddings/{name}" for name in state.redone_parts}
                 | {f"{TOKENS_DIR}/{name}" for name in bad_tokens})
    return state


MISSING = TokenFileCheck(None, "missing", False)


def check_pointers(path: Path, token_checks: dict[str, TokenFileCheck]) -> tuple[str | None, str | None]:
    """(None, None) when every row of part `path` points at an existing row of a sound token file, else (what is
    wrong, the token file to blame or None when the part itself is)."""
    try:
        names, rows = part_pointers(path)
    except (pa.ArrowException, OSError, ValueError, KeyError) as e:
        return f"unreadable per-token pointers ({type(e).__name__})", None
    highest: dict[str | None, int] = {}
    for name, row in zip(names, rows.tolist(), strict=True):
        highest[name] = max(highest.get(name, -1), row)
    for name, row in highest.items():
        if name is None or row < 0:
            return "a row without per-token data", None
        check = token_checks.get(name, MISSING)
        if check.problem is not None:
            return f"per-token file {name}: {check.problem}", name
        if check.rows is None or row >= check.rows:
            return f"per-token file {name} has {check.rows} rows, the part points at row {row}", name
    return None, None


def check_part(path: Path, schema: pa.Schema) -> tuple[str | None, np.ndarray]:
    """(None, ordinals) for a sound part, else (what is wrong, empty). Reads ids and ordinals, not vectors.

    The footer (missing when a file is truncated), the schema and each record batch's structure are
    checked; the id and ordinal columns are validated in full. Bit flips inside embedding values are found
    by the part's CRC-32 (scan_parts, runner verify), not here.
    """
    empty = np.zeros(0, dtype=np.int64)
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            if not reader.schema.equals(schema):
                return "unexpected schema", empty
            ordinals: list[np.ndarray] = []
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                batch.validate()
                ids, ords = batch.column("id"), batch.column("ordinal")
                ids.validate(full=True)
                ords.validate(full=True)
                if ids.null_count or ords.null_count:
                    return "null ids or ordinals", empty
                values = ords.to_numpy()
                if len(values) and values.min() < 0:
                    return "negative ordinals", empty
                ordinals.append(values)
    except (pa.ArrowException, OSError, ValueError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}", empty
    return None, np.concatenate(ordinals).astype(np.int64) if ordinals else empty
