"""`runner verify DIR`: check that an output directory is whole and honest, without trusting the run that wrote it.

Every part is read in full: its CRC-32 against the one its writer recorded (runner.output.checksums), its Arrow
structure, finite vectors, non-null ids and ordinals. So is every per-token file (--per-token): its CRC-32 (recorded
by the driver from the actor's count: runner.output.tokens), structure and finite vectors; then each stored row must
point at an existing per-token row of its own sequence, and each per-token row must be pointed at by its sequence's
row and hold an ordinal no other per-token row holds (exactly once). Then the counts against the manifest (rows, rejects,
rows + rejects = records read), the part list against the files on disk, and the exactly-once invariant:
every input ordinal at most once across parts and rejects, every id at most once across parts.
A directory of a multi-model job (one sub-folder per model) is checked folder by folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from runner.errors import RunnerError, first_line
from runner.output.checksums import check_file, read_records
from runner.output.resume import PART_NAME, OrdinalSet
from runner.output.staged import staged_dir
from runner.output.tokens import TOKENS_DIR, check_token_files, token_files

# Ids are checked for uniqueness in a Python set up to this many rows (~100 bytes each); past it only the
# ordinals are (a bitmap, 1 bit per record), which is what resume and the driver key exactly-once on.
MAX_IDS_CHECKED = 20_000_000


class VerifyFailed(RunnerError):
    """`runner verify` found something wrong (each problem was printed on its own line)."""

    exit_code = 6


@dataclass
class VerifyReport:
    """What `verify_dir` found in one output directory."""

    out_dir: Path
    parts: int = 0
    rows: int = 0
    rejects: int = 0
    bytes: int = 0
    token_files: int = 0  # --per-token: sound token files
    token_rows: int = 0  # their rows
    token_bytes: int = 0  # their size
    problems: list[str] = field(default_factory=list)  # each one line naming the file and what is wrong
    notes: list[str] = field(default_factory=list)  # what was not checked, and why

    @property
    def ok(self) -> bool:
        return not self.problems


def output_dirs(path: Path) -> list[Path]:
    """The job directories under `path`: itself when it holds a manifest, else its sub-folders that do."""
    if (path / "manifest.json").is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if (p / "manifest.json").is_file()) if path.is_dir() else []
    if not found:
        raise RunnerError(f"{path} holds no manifest.json (nor do its sub-folders): give a runner --out directory")
    return found


def verify_dir(out_dir: Path) -> VerifyReport:
    """Check one job directory; problems are collected, not raised."""
    report = VerifyReport(out_dir)
    try:
        manifest: dict[str, Any] = json.loads((out_dir / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        report.problems.append(f"{out_dir / 'manifest.json'}: unreadable ({first_line(e)})")
        return report
    status = manifest.get("status")
    if status != "complete":
        report.problems.append(f"{out_dir}: the job is not complete (status {status}"
                               f"{': ' + manifest['error'] if manifest.get('error') else ''}): rerun it to finish")
    checksums = read_records(out_dir)
    emb = out_dir / "embeddings"
    on_disk = sorted(p.name for p in emb.iterdir() if PART_NAME.match(p.name)) if emb.is_dir() else []
    listed = list(manifest.get("parts") or [])
    for name in sorted(set(listed) - set(on_disk)):
        report.problems.append(f"{emb / name}: listed in the manifest but missing")
    for name in sorted(set(on_disk) - set(listed)):
        report.problems.append(f"{emb / name}: on disk but not in the manifest (from a run that did not finish?)")

    seen = OrdinalSet()
    ids: set[str] | None = set()
    schema: pa.Schema | None = None
    pointers = TokenPointers()  # --per-token: where each stored row's per-token row is
    for name in on_disk:
        path = emb / name
        problem = check_file(path, checksums.get(f"embeddings/{name}"))
        if problem == "no checksum recorded":
            report.notes.append(f"{path}: no checksum recorded (written by a runner without checksums)")
        elif problem is not None:
            report.problems.append(f"{path}: {problem}")
            continue
        table = read_validated(path, report)
        if table is None:
            continue
        if schema is None:
            schema = table.schema
        elif not table.schema.equals(schema):
            report.problems.append(f"{path}: its columns differ from the first part's")
        report.parts += 1
        report.rows += table.num_rows
        report.bytes += path.stat().st_size
        problem = check_rows(table)
        if problem:
            report.problems.append(f"{path}: {problem}")
            continue
        ordinals = table.column("ordinal").to_numpy()
        if "tokens_file" in table.column_names:
            pointers.add(name, table)
        before = seen.count
        seen.add(ordinals)
        if seen.count - before != len(ordinals):
            report.problems.append(f"{path}: {len(ordinals) - (seen.count - before)} row(s) whose input ordinal is "
                                   "already in another part (a sequence stored twice)")
        if ids is not None:
            names = table.column("id").to_pylist()
            new = set(names)
            if len(new) != len(names) or not ids.isdisjoint(new):
                report.problems.append(f"{path}: an id stored more than once")
            ids |= new
            if len(ids) > MAX_IDS_CHECKED:
                ids = None
                report.notes.append(f"ids not checked for uniqueness past {MAX_IDS_CHECKED:,} rows (ordinals are)")

    verify_rejects(out_dir, seen, report)
    if pointers.parts or (out_dir / TOKENS_DIR).is_dir():
        dedup = manifest.get("dedup") is not None  # the section a --dedup job's manifest has
        verify_tokens(out_dir, checksums, pointers, dedup, report)
    staged = staged_dir(out_dir)
    leftover = sum(1 for p in staged.rglob("*") if p.is_file()) if staged.is_dir() else 0
    if leftover:  # never read as output; the next run of the job deletes them
        report.notes.append(f"{staged}: {leftover} staged part(s) no run committed (not part of the output)")
    counts = manifest.get("counts") or {}
    if counts.get("rows") is not None and counts["rows"] != report.rows:
        report.problems.append(f"{out_dir}: the parts hold {report.rows:,} rows, the manifest says {counts['rows']:,}")
    if counts.get("rejects") is not None and counts["rejects"] != report.rejects:
        report.problems.append(f"{out_dir / 'rejects.arrow'}: {report.rejects:,} rejects, the manifest says "
                               f"{counts['rejects']:,}")
    if status == "complete" and counts.get("records_read") is not None and \
            report.rows + report.rejects != counts["records_read"]:
        report.problems.append(f"{out_dir}: {report.rows:,} rows + {report.rejects:,} rejects != "
                               f"{counts['records_read']:,} records read")
    return report


@dataclass
class TokenPointers:
    """The per-token pointers of the parts read so far, as int64 arrays (~24 bytes per row, like reconcile's)."""

    files: dict[str, int] = field(default_factory=dict)  # token file (relative to DIR/tokens) -> code
    parts: list[str] = field(default_factory=list)  # part names, by part index
    codes: list[np.ndarray] = field(default_factory=list)  # per part: token file code of each row (-1: none)
    rows: list[np.ndarray] = field(default_factory=list)  # per part: row in that file (-1: none)
    ordinals: list[np.ndarray] = field(default_factory=list)  # per part: the row's input ordinal

    def add(self, part: str, table: pa.Table) -> None:
        names = table.column("tokens_file").to_pylist()
        self.parts.append(part)
        self.codes.append(np.array([-1 if n is None else self.files.setdefault(n, len(self.files)) for n in names],
                                   dtype=np.int64))
        self.rows.append(table.column("tokens_row").fill_null(-1).to_numpy().astype(np.int64))
        self.ordinals.append(table.column("ordinal").to_numpy().astype(np.int64))


def verify_tokens(out_dir: Path, checksums: dict[str, dict[str, Any]], pointers: TokenPointers, dedup: bool,
                  report: VerifyReport) -> None:
    """--per-token: every token file against its CRC-32 and finite, each stored row pointing at an existing
    per-token row of its own sequence (with --dedup a repeat may point at its first record's), and every
    per-token row on disk exactly once: pointed at by its sequence, its ordinal in no other token file."""
    root = out_dir / TOKENS_DIR
    on_disk = sorted(token_files(out_dir))
    checks = check_token_files(out_dir, on_disk, checksums)
    token_ordinals: dict[str, np.ndarray] = {}  # sound token files: the ordinal of each row
    stored = OrdinalSet()
    for name in on_disk:
        path, check = root / name, checks[name]
        if check.problem is not None:
            report.problems.append(f"{path}: {check.problem}")
            continue
        if not check.summed:
            report.notes.append(f"{path}: no checksum recorded (written by a runner without per-token checksums)")
        problem, ordinals = check_token_rows(path)
        if problem is not None:
            report.problems.append(f"{path}: {problem}")
            continue
        report.token_files += 1
        report.token_rows += len(ordinals)
        report.token_bytes += path.stat().st_size
        before = stored.count
        stored.add(ordinals)
        if stored.count - before != len(np.unique(ordinals)) or len(np.unique(ordinals)) != len(ordinals):
            report.problems.append(f"{path}: a per-token row whose input ordinal is in another row or token file "
                                   "(a sequence's per-token arrays stored twice)")
        token_ordinals[name] = ordinals
    # One flat index over the sound token files' rows: base[code] + row.
    names = list(pointers.files)
    sizes = np.array([len(token_ordinals.get(n, ())) for n in names], dtype=np.int64)
    base = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    flat = np.concatenate([token_ordinals.get(n, np.zeros(0, np.int64)) for n in names] + [np.zeros(0, np.int64)])
    owners = np.zeros(len(flat), dtype=np.int64)  # per token row: stored rows of its own sequence pointing at it
    sound = np.array([n in token_ordinals for n in names], dtype=bool)  # by code
    foreign: list[tuple[int, np.ndarray]] = []  # (part index, flat indices of rows pointing at another sequence's)
    for i, part in enumerate(pointers.parts):
        codes, rows, ordinals = pointers.codes[i], pointers.rows[i], pointers.ordinals[i]
        path = out_dir / "embeddings" / part
        if (codes < 0).any():
            report.problems.append(f"{path}: {int((codes < 0).sum())} row(s) without a per-token row")
        ok = codes >= 0
        known = np.zeros(len(codes), dtype=bool)
        known[ok] = sound[codes[ok]]
        inside = known & (rows >= 0)
        inside[known] &= rows[known] < sizes[codes[known]]
        for code in np.unique(codes[ok & ~inside]):
            report.problems.append(f"{path}: points at per-token file {root / names[code]}, which is missing, unusable "
                                   "or shorter than the rows pointed at")
        index = base[codes[inside]] + rows[inside]
        own = flat[index] == ordinals[inside]
        np.add.at(owners, index[own], 1)
        if (~own).any():
            foreign.append((i, index[~own]))
    for i, index in foreign:
        path = out_dir / "embeddings" / pointers.parts[i]
        if not dedup:
            report.problems.append(f"{path}: {len(index)} row(s) point at another sequence's per-token row")
        elif (owners[index] != 1).any():
            report.problems.append(f"{path}: a --dedup repeat points at a per-token row its first record does not")
    for code in np.unique(np.searchsorted(base, np.flatnonzero(owners == 0), side="right") - 1):
        count = int((owners[base[code] : base[code + 1]] == 0).sum())
        report.problems.append(f"{root / names[code]}: {count} per-token row(s) no stored row of their sequence "
                               "points at (left by a run that did not finish: rerun the job to clean up)")
    for name in sorted(set(token_ordinals) - set(names)):
        report.problems.append(f"{root / name}: no part points at it (left by a run that did not finish: rerun the "
                               "job to clean up)")


def check_token_rows(path: Path) -> tuple[str | None, np.ndarray]:
    """(None, ordinals) for a token file whose rows are sound (Arrow structure, non-null ids and ordinals, each
    layer's vectors finite and `length` per row), else (what is wrong, empty)."""
    empty = np.zeros(0, dtype=np.int64)
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            ordinals: list[np.ndarray] = []
            for b in range(reader.num_record_batches):  # one batch at a time: memory stays at one batch
                batch = reader.get_batch(b)
                batch.validate(full=True)
                if batch.column("id").null_count or batch.column("ordinal").null_count:
                    return "null ids or ordinals", empty
                lengths = batch.column("length").to_numpy(zero_copy_only=False)
                for field_ in batch.schema:
                    if not field_.name.startswith("layer"):
                        continue
                    column = batch.column(field_.name)
                    if not np.array_equal(np.diff(column.offsets.to_numpy()), lengths):
                        return f"{field_.name}: a row's vector count differs from its length", empty
                    values = column.flatten().flatten().to_numpy(zero_copy_only=False)
                    if not np.isfinite(values).all():
                        return f"non-finite (NaN/Inf) values in column {field_.name}", empty
                ordinals.append(batch.column("ordinal").to_numpy().astype(np.int64))
    except (pa.ArrowException, OSError, ValueError, KeyError) as e:
        return f"not a readable per-token file ({first_line(e)})", empty
    return None, np.concatenate(ordinals) if ordinals else empty


def check_rows(table: pa.Table) -> str | None:
    """What is wrong with a part's rows (null ids or ordinals, negative ordinals, non-finite vectors), or None."""
    if table.column("id").null_count or table.column("ordinal").null_count:
        return "null ids or ordinals"
    ordinals = table.column("ordinal").to_numpy()
    if len(ordinals) and ordinals.min() < 0:
        return "negative ordinals"
    for field_ in table.schema:
        if pa.types.is_fixed_size_list(field_.type) and pa.types.is_floating(field_.type.value_type):
            values = table.column(field_.name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            if not np.isfinite(values).all():
                return f"non-finite (NaN/Inf) values in column {field_.name}"
    return None


def read_validated(path: Path, report: VerifyReport) -> pa.Table | None:
    """The whole Arrow file at `path`, fully validated; None (and a problem in `report`) when it is not one."""
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        report.problems.append(f"{path}: not a readable Arrow file ({first_line(e)})")
        return None
    return table


def verify_rejects(out_dir: Path, parts: OrdinalSet, report: VerifyReport) -> None:
    """rejects.arrow readable, and no rejected ordinal also stored as a row."""
    path = out_dir / "rejects.arrow"
    if not path.exists():
        return
    table = read_validated(path, report)
    if table is None:
        return
    report.rejects = table.num_rows
    if "ordinal" in table.column_names:
        ordinals = table.column("ordinal").to_numpy(zero_copy_only=False)
        both = int(parts.contains(ordinals).sum())
        if both:
            report.problems.append(f"{path}: {both} rejected record(s) also stored as rows")
        if len(np.unique(ordinals)) != len(ordinals):
            report.problems.append(f"{path}: a record rejected more than once")
