"""Checksums of the files a job writes, so that corruption on disk is detected (on resume and by `runner verify`).

Each part's CRC-32 is
computed by the writer as the bytes go out (`ChecksummedFile`), so it costs no extra read. It is appended, with
the part's rows and bytes, to `DIR/checksums.jsonl` (paths relative to DIR) and fsynced BEFORE the part is renamed
into place: every visible part has its line. The manifest's `checksums` section repeats the journal at the end of
the run.

Per-token files (`tokens/<shard>/tok-<uuid>.arrow`) are summed the same way by the embedding actor that writes
them, but only the driver writes this journal: the record travels back with the batch's rows and is journaled
in the same fsynced append as the pooled part that commits those rows (runner.output.tokens says why).
The CRC-32 is zlib's (polynomial 0xEDB88320, the values zlib.crc32 gives), computed by `crc32` below: ISA-L's
(the `isal` package: carry-less-multiply instructions, ~3x zlib.crc32 on one core here, and it releases the GIL
as zlib's does) where it imports, else zlib.crc32 itself. Either gives the same value for the same bytes, so
a file written with one verifies with the other.
CRC-32 detects every burst error up to 32 bits and any other corruption with probability 1 - 2^-32; it is not
a defence against deliberate tampering (nothing here is).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

log = logging.getLogger("runner")


def fastest_crc32() -> tuple[Callable[..., int], str]:
    """(crc32(data, value=0) -> int, its name): ISA-L's where the `isal` package imports and gives zlib's check
    value, else zlib.crc32 (the same polynomial and values, ~3x slower on one core). Chosen once, below."""
    try:
        from isal.isal_zlib import crc32 as isal_crc32
    except ImportError:  # a bundle without isal (pyproject.toml lists it): the same values, slower
        return zlib.crc32, "zlib"
    if isal_crc32(b"123456789") != 0xCBF43926 or isal_crc32(b"6789", isal_crc32(b"12345")) != 0xCBF43926:
        log.warning("isal's crc32 does not give zlib's values here: checksums use zlib.crc32")
        return zlib.crc32, "zlib"
    return isal_crc32, "isal"


# What every writer and verifier here sums with (crc32(data, value)); CRC32_IMPL names it for benchmarks and logs.
crc32, CRC32_IMPL = fastest_crc32()

JOURNAL_NAME = "checksums.jsonl"
READ_BYTES = 8 << 20  # a file is re-read in pieces this large to check it (memory stays flat)


class ChecksummedFile:
    """A write-only binary file that keeps the CRC-32 and size of what was written (for pa.PythonFile).

    Each write is summed on the writing thread, then handed to the OS; both release the GIL on large buffers.
    An actor's per-token files (~0.85 GB/s per H200) were once summed in pieces on a 4-thread pool beside the
    write: with ISA-L's CRC the pool no longer paid for the threads it woke next to the one launching the next
    forward (scripts/bench_crc_contention.py, docs/fault-tolerance.md).
    """

    def __init__(self, path: Path, summed: bool = True) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close(), which the writer calls
        self._summed = summed  # False only for the checksum's A/B benchmark: crc stays 0
        self.crc = 0
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")  # flat bytes, whatever buffer pyarrow hands over
        if self._summed:
            self.crc = crc32(view, self.crc)
        written = self._file.write(view)
        self.size += view.nbytes
        return written

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._file.flush()

    def fsync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def open_arrow_file(self, schema: pa.Schema) -> pa.ipc.RecordBatchFileWriter:
        """An Arrow IPC file writer writing through this file."""
        return pa.ipc.new_file(pa.PythonFile(self, mode="w"), schema)



def write_checksummed(path: Path, table: pa.Table, summed: bool = True) -> tuple[int, str]:
    """Write `table` as an Arrow IPC file at `path`, fsynced and closed; its CRC-32 computed as the bytes go out.
    Returns (bytes, CRC-32 hex). Where the file becomes visible is the caller's (publish_checksummed, or a journal
    record first and then the rename)."""
    sink = ChecksummedFile(path, summed)
    write_through(sink, table)
    return sink.size, crc_hex(sink.crc)


def write_through(sink: ChecksummedFile, table: pa.Table) -> None:
    """`table` as an Arrow IPC file through `sink` (its CRC-32 summed as the bytes go out), fsynced and closed."""
    try:
        with sink.open_arrow_file(table.schema) as writer:
            writer.write_table(table)
        sink.fsync()
    finally:
        sink.close()


def publish_checksummed(directory: Path, name: str, table: pa.Table, summed: bool = True) -> tuple[int, str]:
    """write_checksummed to the hidden temp name `.NAME.tmp`, then rename it to `directory/name`: the file is
    visible only whole. A failure removes the temp file and re-raises. Returns (bytes, CRC-32 hex)."""
    tmp = directory / f".{name}.tmp"
    try:
        written = write_checksummed(tmp, table, summed)
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return written

def crc_hex(crc: int) -> str:
    return f"{crc & 0xFFFFFFFF:08x}"


def file_crc(path: Path) -> tuple[str, int]:
    """(CRC-32 as 8 hex digits, size in bytes) of a file, read in pieces."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while piece := f.read(READ_BYTES):
            crc = crc32(piece, crc)
            size += len(piece)
    return crc_hex(crc), size


@dataclass(frozen=True)
class FileChecksum:
    """One written file's checksum record, as its writer computed it."""

    name: str  # path relative to the job's --out (`embeddings/part-00003.arrow`, `tokens/<shard>/tok-<uuid>.arrow`)
    rows: int  # Arrow rows in the file
    bytes: int  # its size
    crc32: str  # CRC-32 of its bytes, 8 hex digits (crc_hex)


def append_record(directory: Path, name: str, rows: int, size: int, crc: str) -> None:
    """Add one file's checksum to `directory/checksums.jsonl` (fsynced: it must be on disk before the file is);
    `name` is the file's path relative to `directory` (the job's --out)."""
    append_records(directory, [FileChecksum(name, rows, size, crc)])


def append_records(directory: Path, records: Sequence[FileChecksum]) -> None:
    """Add several checksums to `directory/checksums.jsonl` with one write and one fsync (a pooled part's line
    and the lines of the per-token files it commits: runner.output.sink.PartWriter)."""
    if not records:
        return
    lines = "".join(json.dumps({"file": r.name, "rows": r.rows, "bytes": r.bytes, "crc32": r.crc32}) + "\n"
                    for r in records)
    fd = os.open(directory / JOURNAL_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = memoryview(lines.encode())
        while data:  # a regular file takes it whole; a short write (a full disk) continues where it stopped
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(directory: Path) -> dict[str, dict[str, Any]]:
    """{file name: {rows, bytes, crc32}} from `directory/checksums.jsonl` (the last line of a name wins; a torn
    last line, from a crash mid-append, is ignored: its file was never renamed into place)."""
    path = directory / JOURNAL_NAME
    records: dict[str, dict[str, Any]] = {}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return records
    for line in lines:
        try:
            entry = json.loads(line)
            records[str(entry["file"])] = {"rows": int(entry["rows"]), "bytes": int(entry["bytes"]),
                                           "crc32": str(entry["crc32"])}
        except (ValueError, KeyError, TypeError):
            continue
    return records


def drop_records(directory: Path, names: set[str]) -> None:
    """Rewrite the journal without the files in `names` (parts a resume deleted, to be written again)."""
    records = read_records(directory)
    kept = {n: r for n, r in records.items() if n not in names}
    if len(kept) == len(records):
        return
    tmp = directory / f".{JOURNAL_NAME}.tmp"
    with open(tmp, "w") as f:
        for name, r in sorted(kept.items()):
            f.write(json.dumps({"file": name, **r}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / JOURNAL_NAME)


def check_file(path: Path, record: dict[str, Any] | None) -> str | None:
    """None when `path` matches its checksum record, else what is wrong (a missing record is reported too)."""
    if record is None:
        return "no checksum recorded"
    crc, size = file_crc(path)
    if size != record["bytes"]:
        return f"{size} bytes where {record['bytes']} were written"
    if crc != record["crc32"]:
        return f"checksum mismatch (CRC-32 {crc}, written as {record['crc32']})"
    return None
