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
from concurrent.futures import ThreadPoolExecutor
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


PARALLEL_BYTES = 16 << 20  # with a pool, a write this large is summed in pieces on its threads
PIECES = 4  # pieces of such a write: one per pool thread (make the pool this size)


class ChecksummedFile:
    """A write-only binary file that keeps the CRC-32 and size of what was written (for pa.PythonFile).

    With `pool` (an actor's per-token files: ~0.85 GB/s per H200), a large write is summed in PIECES pieces on
    the pool's threads while this thread hands the bytes to the OS, and the pieces' CRCs are combined
    (crc32_combine): crc32 and file writes release the GIL, so the checksum adds about a quarter of its
    single-thread time to the write instead of all of it.
    """

    def __init__(self, path: Path, pool: ThreadPoolExecutor | None = None, summed: bool = True) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close(), which the writer calls
        self._pool = pool
        self._summed = summed  # False only for the checksum's A/B benchmark: crc stays 0
        self.crc = 0
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")  # flat bytes: pieces are slices
        if not self._summed:
            written = self._file.write(view)
        elif self._pool is None or view.nbytes < PARALLEL_BYTES:
            self.crc = crc32(view, self.crc)
            written = self._file.write(view)
        else:
            step = -(-view.nbytes // PIECES)
            pieces = [view[i : i + step] for i in range(0, view.nbytes, step)]
            sums = [self._pool.submit(crc32, piece) for piece in pieces]
            written = self._file.write(view)  # meanwhile: the buffer stays alive until the sums are in
            for piece, piece_crc in zip(pieces, sums, strict=True):
                self.crc = crc32_combine(self.crc, piece_crc.result(), piece.nbytes)
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



def write_checksummed(path: Path, table: pa.Table, pool: ThreadPoolExecutor | None = None,
                      summed: bool = True) -> tuple[int, str]:
    """Write `table` as an Arrow IPC file at `path`, fsynced and closed; its CRC-32 computed as the bytes go out.
    Returns (bytes, CRC-32 hex). Where the file becomes visible is the caller's (publish_checksummed, or a journal
    record first and then the rename)."""
    sink = ChecksummedFile(path, pool, summed)
    try:
        with sink.open_arrow_file(table.schema) as writer:
            writer.write_table(table)
        sink.fsync()
    finally:
        sink.close()
    return sink.size, crc_hex(sink.crc)


def publish_checksummed(directory: Path, name: str, table: pa.Table,
                        pool: ThreadPoolExecutor | None = None, summed: bool = True) -> tuple[int, str]:
    """write_checksummed to the hidden temp name `.NAME.tmp`, then rename it to `directory/name`: the file is
    visible only whole. A failure removes the temp file and re-raises. Returns (bytes, CRC-32 hex)."""
    tmp = directory / f".{name}.tmp"
    try:
        written = write_checksummed(tmp, table, pool, summed)
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return written

def _mult_mod_p(a: int, b: int) -> int:
    """a * b modulo CRC-32's polynomial (bit-reflected, as zlib's multmodp)."""
    m, product = 1 << 31, 0
    while m:
        if a & m:
            product ^= b
            if not a & (m - 1):
                break
        m >>= 1
        b = (b >> 1) ^ 0xEDB88320 if b & 1 else b >> 1
    return product


# x^(2^k) modulo the polynomial, k = 0..31 (zlib's x2n_table): x^(8 * n) is a product of these.
_X2N = [1 << 30]
for _ in range(31):
    _X2N.append(_mult_mod_p(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A + B from crc1 = crc32(A), crc2 = crc32(B) and len(B) in bytes (zlib's crc32_combine, which
    Python's zlib does not expose): crc1 shifted by len2 zero bytes (x^(8 * len2) mod p) xor crc2."""
    shift, k, n = 1 << 31, 3, len2  # x^0, and 8 * len2 = len2 * 2^3
    while n:
        if n & 1:
            shift = _mult_mod_p(_X2N[k & 31], shift)
        n >>= 1
        k += 1
    return _mult_mod_p(shift, crc1) ^ crc2


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
