"""Pooled parts written by the embedding actors and committed by the driver (`--part-writer actors`).

Why: with the driver writing every part, all pooled vectors travel to one process, which copies them into parts
and checksums them: about 12 us a row at D=1280 on one core (~82k rows/s, ~19 H200s of 650M short reads;
docs/scaling.md). Here each actor writes the whole sequences of each packed batch it embedded into a *staged*
part itself, and the driver only commits it: a journal line and a rename, no vector bytes.

The protocol (exactly once, like the driver's own parts):

1. The actor writes `DIR/embeddings/.staged/<actor-shard>/.stg-<uuid>.arrow.tmp` with the parts' schema (CRC-32
   kept as the bytes go out), fsyncs it and renames it to `stg-<uuid>.arrow`, BEFORE it returns the batch. It
   returns, instead of those rows' vectors, one *staged record* per file: its name, rows, bytes, CRC-32, the
   ordinals of its rows and how many were truncated (`StagedPart`). Non-finite windows are never staged: they
   come back as rows of their own and the driver aborts naming them, as before.
2. The driver drops ordinals it already holds (a batch delivered twice, a retried batch): a staged part all of
   whose rows are written is deleted, one written in part is rewritten by the driver without them (rare).
3. The driver commits a staged part by appending its checksum line to `DIR/checksums.jsonl` (fsynced) and
   renaming it to `DIR/embeddings/part-NNNNN.arrow`: from then on it is a part like any other. Commits are
   grouped (one journal fsync per group, `PartWriter`), so a group is at most `rows_per_part` rows or one second.
4. Anything left in `.staged/` is uncommitted: an actor killed after its rename and before its batch reached the
   driver (Ray retries the batch, which stages a new file), a driver killed before its commit, a dropped
   duplicate. Those files are deleted at the end of a run and when a run resumes; their ordinals are in no part,
   so the resumed run embeds them again.

The rename needs `.staged/` and `embeddings/` on one filesystem, and every actor must see the driver's --out:
the job checks --out on every node that may run an actor (runner.driver.nodes.check_out_on_nodes).
"""

from __future__ import annotations

import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from runner.output.checksums import publish_checksummed

STAGED_DIR = ".staged"  # under DIR/embeddings: hidden, so no reader lists it as a part
STAGED_FILE = re.compile(r"^stg-[0-9a-f]{32}\.arrow$")
PART_WRITERS: tuple[str, ...] = ("driver", "actors", "auto")
AUTO_ACTORS_FROM = 8  # --part-writer auto: the actors write the parts from this many embedding actors on


@dataclass(frozen=True)
class StagedPart:
    """What an actor returns for one staged part instead of its rows' vectors."""

    path: str  # absolute path of the staged file (`.../embeddings/.staged/<shard>/stg-<uuid>.arrow`)
    rows: int
    bytes: int
    crc32: str  # 8 hex digits, as in DIR/checksums.jsonl
    ordinals: np.ndarray  # int64 [rows]: input ordinals of its rows, in file order
    truncated: int  # rows of it whose sequence was truncated


def resolve_part_writer(setting: str, actors: int) -> bool:
    """Whether the embedding actors write the pooled parts (else the driver does), for `--part-writer`."""
    if setting == "auto":
        return actors >= AUTO_ACTORS_FROM
    return setting == "actors"


def staged_dir(out_dir: Path) -> Path:
    return out_dir / "embeddings" / STAGED_DIR


def open_staged_shard(directory: Path) -> Path:
    """Create an actor's staged folder (OSError when --out is not writable from its node)."""
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def write_staged_part(directory: Path, table: pa.Table) -> tuple[str, int, str]:
    """Write `table` (the parts' schema) as `directory/stg-<uuid>.arrow`: hidden temp name, CRC-32 as the bytes
    go out, fsync, rename. Returns (its absolute path, bytes, CRC-32 hex)."""
    name = f"stg-{uuid.uuid4().hex}.arrow"
    size, crc = publish_checksummed(directory, name, table)
    return str(directory / name), size, crc


def remove_staged(out_dir: Path) -> int:
    """Delete every uncommitted staged part (and the temp files of ones being written); returns the files deleted.

    Only call it when no actor of this --out is writing (the end of a run, or a run starting)."""
    root = staged_dir(out_dir)
    if not root.is_dir():
        return 0
    removed = sum(1 for p in root.rglob("*") if p.is_file())
    shutil.rmtree(root, ignore_errors=True)
    return removed


def staged_records(table: pa.Table, ids_valid: np.ndarray) -> list[StagedPart]:
    """The staged-part records in a table of stage output: its rows without an id that name a staged file
    (`ids_valid`: bool [N], which rows have an id)."""
    index = table.schema.get_field_index("staged_file")
    if index < 0 or table.column(index).null_count == table.num_rows:
        return []
    is_record = ~ids_valid & table.column(index).is_valid().to_numpy(zero_copy_only=False)
    if not is_record.any():
        return []
    sub = table if is_record.all() else table.filter(pa.array(is_record))
    column = sub.column("staged_ordinals").combine_chunks()
    offsets = column.offsets.to_numpy()  # [files + 1]
    values = column.values.to_numpy()  # every file's ordinals back to back
    paths = sub.column("staged_file").to_pylist()
    sizes = sub.column("staged_bytes").to_pylist()
    crcs = sub.column("staged_crc").to_pylist()
    truncated = sub.column("staged_truncated").to_pylist()
    return [
        StagedPart(paths[i], int(offsets[i + 1] - offsets[i]), int(sizes[i]), crcs[i],
                   values[offsets[i] : offsets[i + 1]].astype(np.int64), int(truncated[i]))
        for i in range(sub.num_rows)
    ]


def read_staged(path: str) -> pa.Table:
    """A staged part's rows (read into memory: the driver only does this for the rare partly written one)."""
    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).read_all().combine_chunks()
