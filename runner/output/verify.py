"""`runner verify DIR`: check that an output directory is whole and honest, without trusting the run that wrote it.

Every part is read in full: its CRC-32 against the one its writer recorded (runner.output.checksums), its Arrow
structure, finite vectors, non-null ids and ordinals. Then the counts against the manifest (rows, rejects,
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
    for name in on_disk:
        path = emb / name
        problem = check_file(path, checksums.get(f"embeddings/{name}"))
        if problem == "no checksum recorded":
            report.notes.append(f"{path}: no checksum recorded (written by a runner without checksums)")
        elif problem is not None:
            report.problems.append(f"{path}: {problem}")
            continue
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            table.validate(full=True)
        except (pa.ArrowException, OSError, ValueError) as e:
            report.problems.append(f"{path}: not a readable Arrow file ({first_line(e)})")
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


def verify_rejects(out_dir: Path, parts: OrdinalSet, report: VerifyReport) -> None:
    """rejects.arrow readable, and no rejected ordinal also stored as a row."""
    path = out_dir / "rejects.arrow"
    if not path.exists():
        return
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        report.problems.append(f"{path}: not a readable Arrow file ({first_line(e)})")
        return
    report.rejects = table.num_rows
    if "ordinal" in table.column_names:
        ordinals = table.column("ordinal").to_numpy(zero_copy_only=False)
        both = int(parts.contains(ordinals).sum())
        if both:
            report.problems.append(f"{path}: {both} rejected record(s) also stored as rows")
        if len(np.unique(ordinals)) != len(ordinals):
            report.problems.append(f"{path}: a record rejected more than once")
