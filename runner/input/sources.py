"""Finding and reading inputs: FASTA (plain or gzip), Parquet and CSV/TSV, streamed record by record.

Nothing here holds a whole file: FASTA is parsed a large binary chunk at a time (a single huge record is the
most held), straight into Arrow columns by a few numpy passes over the bytes (`_fasta_columns`), and tables are
read batch by batch through pyarrow. The read task works on these runs of columns (`read_runs`); `read_records`
hands the same records out one by one.
`sniff_input` checks a file from its first bytes (or its metadata / header line) so that the CLI can fail
on a bad input before it starts Ray.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from runner.errors import RunnerError, first_line
from runner.input.batch import InputRecord

Format = Literal["fasta", "parquet", "csv", "tsv"]

FASTA_SUFFIXES: tuple[str, ...] = (".fa", ".fasta", ".faa", ".fna", ".ffn")
TABLE_SUFFIXES: tuple[str, ...] = (".csv", ".tsv")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet",)
# What a directory scan picks up; FASTA and CSV/TSV may also be gzipped, Parquet compresses internally.
SUPPORTED_SUFFIXES: tuple[str, ...] = (
    FASTA_SUFFIXES
    + tuple(s + ".gz" for s in FASTA_SUFFIXES)
    + TABLE_SUFFIXES
    + tuple(s + ".gz" for s in TABLE_SUFFIXES)
    + PARQUET_SUFFIXES
)

GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
UTF8_BOM = b"\xef\xbb\xbf"
# Large reads amortise Python overhead; a few MiB keeps memory flat even with many parallel readers.
CHUNK_BYTES = 4 << 20
# The most text one parse may hold: Arrow strings (int32 offsets) hold at most 2 GiB, and a parse holds whole records.
MAX_PARSE_BYTES = (1 << 31) - 1
# Rows per Arrow batch for tables: big enough to amortise, small enough to stay streaming.
TABLE_BATCH_ROWS = 65536
# ASCII whitespace: what may precede the first '>' of a FASTA file.
_WHITESPACE = b" \t\r\n\v\f"
# Control bytes that never occur in FASTA text (whitespace \t \n \v \f \r excepted): where one appears, the
# file turns binary (an archive, a database dump or random bytes appended, a corrupt copy). Found with
# bytes.translate (~350 MB/s on one core, far above any embedding rate) rather than a regex (~70 MB/s).
_CONTROL_BYTES = bytes([*range(0, 9), *range(14, 32), 127])
_FORMATS_HINT = (
    "give FASTA (.fa .fasta .faa .fna .ffn, optionally .gz), Parquet (.parquet) or CSV/TSV (.csv .tsv, "
    "optionally .gz) inputs"
)


# ---------------------------------------------------------------------------------------------- finding


def is_supported(path: Path) -> bool:
    """Whether a directory scan picks this file up (by name; content is checked later)."""
    return path.name.lower().endswith(SUPPORTED_SUFFIXES)


def _has_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _scan_dir(d: Path) -> list[Path]:
    found = sorted(p for p in d.rglob("*") if p.is_file() and is_supported(p))
    if not found:
        raise RunnerError(
            f"input directory {d} holds no supported file ({' '.join(SUPPORTED_SUFFIXES)}): "
            "check the path or name the files"
        )
    return found


def expand_inputs(specs: Iterable[str]) -> list[Path]:
    """Files, globs and directories to a de-duplicated, ordered list of files.

    An explicit file (named directly or matched by a glob) is taken whatever its extension (its content is
    checked by `sniff_input`); a directory contributes every supported file below it, recursively, sorted.
    """
    out: list[Path] = []
    seen: set[str] = set()

    def add(p: Path) -> None:
        key = os.path.realpath(p)  # the same file named twice (or via ./ or a symlink) is read once
        if key not in seen:
            seen.add(key)
            out.append(p)

    for spec in specs:
        spec = str(spec)
        expanded = os.path.expanduser(spec)
        p = Path(expanded)
        if p.exists():
            matches = [p]
        elif _has_glob(expanded):
            matches = [Path(m) for m in sorted(glob.glob(expanded, recursive=True))]
            if not matches:
                raise RunnerError(f"input {spec} not found: check the path (the pattern matched nothing)")
        else:
            raise RunnerError(f"input {spec} not found: check the path")
        for m in matches:
            if m.is_dir():
                for f in _scan_dir(m):
                    add(f)
            elif m.exists():
                add(m)
    return out


# ---------------------------------------------------------------------------------------------- sniffing


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _read_failure(path: Path, error: BaseException, lines: int, last_id: str | None = None) -> RunnerError:
    """One line for a read that failed part-way: what broke, after which line (and record), and the fix.

    gzip.BadGzipFile, zlib.error and Arrow's 'zlib inflate failed' are corrupt compressed data; EOFError and
    'Truncated compressed stream' are a file cut short (an interrupted download or copy).
    """
    text = first_line(error)
    where = f"after line {lines:,}" if lines else "near its start"
    where += f" (last complete record {last_id})" if last_id else ""
    if isinstance(error, EOFError) or "Truncated compressed stream" in text:
        return RunnerError(
            f"{path}: the gzip data ends early, {where}: the file is cut short (an interrupted download or copy); "
            f"re-create or re-download it, then rerun"
        )
    if isinstance(error, (zlib.error, gzip.BadGzipFile)) or "inflate failed" in text or "CRC" in text:
        return RunnerError(
            f"{path}: the gzip data is corrupt {where} ({text}): re-create or re-download the file, then rerun"
        )
    return RunnerError(f"{path} could not be read {where} ({text}): check the file is complete and readable")


def _open_binary(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when it starts with the gzip magic (whatever its extension)."""
    if _is_gzip(path):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def detect_format(path: Path) -> Format:
    """The reader a file goes to: Parquet by magic bytes or extension, CSV/TSV by extension, else FASTA."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    with open(path, "rb") as f:
        if f.read(4) == PARQUET_MAGIC:
            return "parquet"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".tsv"):
        return "tsv"
    return "fasta"


def _not_fasta(path: Path, note: str = "") -> RunnerError:
    if path.name.lower().endswith(".gz") and not _is_gzip(path):
        return RunnerError(
            f"{path} is named .gz but is not gzip data (no gzip header), nor plain FASTA text: re-create it "
            f"with gzip, or give the right file"
        )
    return RunnerError(f"{path} is not a FASTA file (first line does not start with '>'); {note}{_FORMATS_HINT}")


def _read_head(path: Path, n: int = 65536) -> bytes:
    pieces: list[bytes] = []
    try:
        with _open_binary(path) as f:
            while n > 0 and (piece := f.read1(n)):
                pieces.append(piece)
                n -= len(piece)
    except (OSError, EOFError, zlib.error) as e:
        raise _read_failure(path, e, b"".join(pieces).count(b"\n")) from None
    return b"".join(pieces)


class _PartialRead(Exception):
    """A read that failed part-way: the bytes that arrived before `error`."""

    def __init__(self, data: bytes, error: BaseException) -> None:
        super().__init__(str(error))
        self.data, self.error = data, error


def _read_chunk(f: BinaryIO) -> bytes:
    """About CHUNK_BYTES of the file ('' at its end), gathered with read1 so that a gzip stream that fails
    part-way (cut short, corrupt) still hands over what it decompressed before (_PartialRead)."""
    pieces: list[bytes] = []
    size = 0
    try:
        while size < CHUNK_BYTES:
            piece = f.read1(CHUNK_BYTES - size)
            if not piece:
                break
            pieces.append(piece)
            size += len(piece)
    except (OSError, EOFError, zlib.error) as e:
        raise _PartialRead(b"".join(pieces), e) from None
    return b"".join(pieces)


def _binary_line(chunk: bytes, lines_before: int) -> tuple[int, int] | None:
    """(line number, byte) of the first control byte of a chunk of text, or None when it has none."""
    if len(chunk.translate(None, _CONTROL_BYTES)) == len(chunk):
        return None
    at = next(i for i, b in enumerate(chunk) if b in _CONTROL_BYTES)
    return lines_before + chunk.count(b"\n", 0, at) + 1, chunk[at]


def _binary_error(path: Path, line: int, byte: int) -> RunnerError:
    if line <= 1:
        return _not_fasta(path, "it looks like a binary file: ")
    return RunnerError(
        f"{path} line {line:,}: binary data (byte 0x{byte:02x}) where FASTA text was expected: the file is FASTA "
        f"only up to line {line - 1:,} (binary appended, or a corrupt copy); cut it there or re-create it, then rerun"
    )


def _check_fasta_head(path: Path, head: bytes) -> None:
    """Raise unless the first non-blank bytes start a FASTA header. An empty file passes (no records)."""
    binary = _binary_line(head, 0)
    text = head.removeprefix(UTF8_BOM).lstrip(_WHITESPACE)
    if text and not text.startswith(b">"):
        raise _not_fasta(path, "it looks like a binary file: " if binary else "")
    if binary:
        raise _binary_error(path, *binary)


def _table_columns(path: Path, fmt: Format) -> list[str]:
    """Column names of a Parquet file (from its footer) or a CSV/TSV file (from its header line)."""
    if fmt == "parquet":
        try:
            return list(pq.ParquetFile(path).schema_arrow.names)
        except (pa.ArrowException, OSError) as e:
            raise RunnerError(f"{path} is not a readable Parquet file ({e}); {_FORMATS_HINT}") from None
    head = _read_head(path, 1 << 20)
    if b"\x00" in head:
        raise RunnerError(f"{path} is not a {fmt.upper()} file (it looks binary); {_FORMATS_HINT}")
    first = head.removeprefix(UTF8_BOM).split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")
    delimiter = "\t" if fmt == "tsv" else ","
    return next(csv.reader(io.StringIO(first), delimiter=delimiter), [])


def _check_columns(path: Path, names: list[str], id_column: str, seq_column: str) -> None:
    missing = [c for c in (id_column, seq_column) if c not in names]
    if missing:
        found = ", ".join(repr(n) for n in names) or "none"
        raise RunnerError(
            f"{path} has no column {' or '.join(repr(m) for m in missing)} (columns found: {found}); "
            "name the right ones with --id-column / --seq-column"
        )


def sniff_input(path: Path | str, id_column: str = "id", seq_column: str = "sequence") -> Format:
    """Cheaply check that a file can be read as an input; return its format or raise a RunnerError.

    FASTA: the first non-blank line starts with '>'. Parquet: the footer opens and has both columns.
    CSV/TSV: the header line has both columns. Reads at most about a MiB.
    """
    path = Path(path)
    if not path.is_file():
        raise RunnerError(f"input {path} not found: check the path")
    fmt = detect_format(path)
    if fmt == "fasta":
        _check_fasta_head(path, _read_head(path))
    else:
        _check_columns(path, _table_columns(path, fmt), id_column, seq_column)
    return fmt


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class RecordRun:
    """Consecutive records of one input file as Arrow columns: what the read task works on (one Arrow
    operation per column instead of one Python object per record)."""

    ids: pa.StringArray  # each record's id ('' when it has none)
    sequences: pa.StringArray  # each record's raw sequence text, as read
    source: str  # the input file
    first_ordinal: int  # ordinal of the first record; the others follow one by one

    def __len__(self) -> int:
        return len(self.ids)

    def records(self) -> Iterator[InputRecord]:
        """The same records one by one."""
        for i, (rid, seq) in enumerate(zip(self.ids.to_pylist(), self.sequences.to_pylist(), strict=True)):
            yield InputRecord(id=rid, sequence=seq, source=self.source, ordinal=self.first_ordinal + i)


def _string_array(data: np.ndarray, lengths: np.ndarray) -> pa.StringArray:
    """Arrow strings from their concatenated bytes; text that is not UTF-8 is decoded as Python's
    errors="replace" does (U+FFFD), one string at a time (that path only)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    binary = pa.Array.from_buffers(pa.binary(), len(lengths), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    try:
        return binary.cast(pa.string())
    except pa.ArrowInvalid:
        return pa.array([b.decode("utf-8", errors="replace") for b in binary.to_pylist()], pa.string())


def _fasta_columns(text: bytes) -> tuple[pa.StringArray, pa.StringArray]:
    """(ids, sequences) of a buffer holding whole records; `text` starts right after a record's '>'.

    The buffer is split where a line starts with '>' (as `text.split(b"\n>")` does); a record's id is its
    header up to the first whitespace (leading whitespace skipped), its sequence the following lines with line
    ends (LF, CR) removed; any other whitespace is left for `SequenceCodec.clean`, which removes it anyway.
    The work is a few numpy passes over the bytes, not Python per record. `text` must hold no control bytes
    (`_binary_line` is checked first): every byte <= 0x20 is then ASCII whitespace, as bytes.split() has it.
    """
    n = len(text)
    buf = np.frombuffer(text, dtype=np.uint8)
    space = np.flatnonzero(buf <= 32)  # whitespace, line ends included
    newline = space[buf[space] == 10]
    after = newline[newline + 1 < n] + 1
    gt = after[buf[after] == 62]  # each '>' that starts a line starts a record
    starts = np.concatenate(([0], gt + 1))  # first header byte of each record
    ends = np.concatenate((gt - 1, [n]))  # the 'newline' before the next '>', or the end of the buffer
    # header end: the first line end at or after the start (within the record), else the record's end
    at = np.searchsorted(newline, starts)
    header_end = np.minimum(np.append(newline, n)[at], ends)
    seq_start = np.minimum(header_end + 1, ends)
    # ids: from the first non-blank header byte to the next whitespace
    id_start = starts.copy()
    blank = np.flatnonzero((starts == header_end) | (buf[np.minimum(starts, n - 1)] <= 32) if n else starts == 0)
    for r in blank.tolist():  # empty headers or ones with leading whitespace: rare, done one by one
        header = text[starts[r] : header_end[r]]
        id_start[r] = header_end[r] - len(header.lstrip())
    space_end = np.append(space, n)
    id_end = np.minimum(space_end[np.searchsorted(space, id_start)], header_end)
    id_len = id_end - id_start
    take = np.repeat(id_start - np.concatenate(([0], np.cumsum(id_len)[:-1])), id_len) + np.arange(id_len.sum())
    ids = _string_array(buf[take], id_len)
    # sequences: every byte after the header line, line ends removed
    spans = np.empty(2 * len(starts), dtype=np.int64)  # alternately: bytes up to a sequence, the sequence's bytes
    spans[0::2] = seq_start - np.concatenate(([0], ends[:-1]))
    spans[1::2] = ends - seq_start
    keep = np.repeat(np.tile(np.array([False, True]), len(starts)), spans)  # ~6x faster than a cumsum of marks
    keep &= buf != 10
    line_end_positions = newline
    if b"\r" in text:
        keep &= buf != 13
        line_end_positions = np.sort(np.concatenate((newline, np.flatnonzero(buf == 13))))
    seq_len = (ends - seq_start) - (np.searchsorted(line_end_positions, ends) -
                                    np.searchsorted(line_end_positions, seq_start))
    sequences = _string_array(buf[keep], seq_len)
    return ids, sequences


def read_fasta(path: Path, start_ordinal: int = 0) -> Iterator[InputRecord]:
    """Stream the records of one FASTA file (multi-line, CRLF, blank lines, gzip by magic bytes).

    The id is the header up to its first whitespace; the sequence is the record's lines joined (line ends
    removed; any other whitespace is left for `SequenceCodec.clean`). Raises RunnerError as soon as the file
    turns out not to be FASTA, turns binary (naming the line), or its gzip data ends early or is corrupt
    (naming the last line read).
    """
    for run in read_fasta_runs(path, start_ordinal):
        yield from run.records()


def read_fasta_runs(path: Path, start_ordinal: int = 0) -> Iterator[RecordRun]:
    """`read_fasta`'s records as runs of Arrow columns, one run per chunk of about CHUNK_BYTES."""
    path = Path(path)
    source = str(path)
    ordinal = start_ordinal
    # `pending` holds the unfinished record (starting after its '>') as a list of pieces, so that a record
    # spanning many chunks is joined once instead of re-copied per chunk.
    pending: list[bytes] = []
    started = False
    lines = 0  # lines of the (decompressed) file before the current chunk, for error messages
    last_id: str | None = None  # the last record yielded whole, for error messages

    def run_of(text: bytes) -> RecordRun:
        nonlocal ordinal, last_id
        if len(text) > MAX_PARSE_BYTES:  # only a record larger than all the chunks around it gets here
            header = text[: text.find(b"\n")].split(None, 1)
            rid = header[0].decode("utf-8", errors="replace") if header else ""
            raise RunnerError(
                f"{path}: record {rid!r} is too large to read ({len(text):,} bytes from its header on; at most "
                f"{MAX_PARSE_BYTES:,}): split it into smaller records, then rerun"
            )
        ids, sequences = _fasta_columns(text)
        run = RecordRun(ids, sequences, source, ordinal)
        ordinal += len(run)
        last_id = ids[-1].as_py()
        return run

    try:
        with _open_binary(path) as f:
            while True:
                try:
                    chunk = _read_chunk(f)
                except _PartialRead as cut:  # count the lines that did arrive, for the message
                    lines += cut.data.count(b"\n")
                    raise cut.error from None
                if not chunk:
                    break
                binary = _binary_line(chunk, lines)
                if binary is not None:
                    if not started:
                        _check_fasta_head(path, chunk)
                    raise _binary_error(path, *binary)
                lines += chunk.count(b"\n")
                if not started:
                    chunk = chunk.removeprefix(UTF8_BOM).lstrip(_WHITESPACE)
                    if not chunk:
                        continue  # only blank lines so far
                    if not chunk.startswith(b">"):
                        raise _not_fasta(path)
                    started = True
                    chunk = chunk[1:]
                cut = chunk.rfind(b"\n>")
                if cut < 0:
                    if chunk.startswith(b">") and pending and pending[-1].endswith(b"\n"):
                        # a record boundary falls exactly between two chunks
                        yield run_of(b"".join(pending))
                        pending = [chunk[1:]]
                    else:
                        pending.append(chunk)
                    continue
                pending.append(chunk[:cut])
                text = b"".join(pending)
                pending = [chunk[cut + 2 :]]
                yield run_of(text)
                del text
            if started:
                yield run_of(b"".join(pending))
    except (OSError, EOFError, zlib.error) as e:
        raise _read_failure(path, e, lines, last_id) from None


def _column_text(col: pa.Array) -> pa.StringArray:
    """A column as Arrow strings (numbers become their text, nulls become '')."""
    if not pa.types.is_string(col.type):
        try:
            col = col.cast(pa.string())
        except pa.ArrowException as e:
            raise RunnerError(f"column of type {col.type} cannot be read as text ({e})") from None
    return col.fill_null("") if col.null_count else col


def _batches_to_runs(
    batches: Iterator[pa.RecordBatch], path: Path, id_column: str, seq_column: str, ordinal: int
) -> Iterator[RecordRun]:
    source = str(path)
    for batch in batches:
        run = RecordRun(_column_text(batch.column(id_column)), _column_text(batch.column(seq_column)), source, ordinal)
        ordinal += len(run)
        yield run


def read_parquet_runs(
    path: Path, id_column: str = "id", seq_column: str = "sequence", start_ordinal: int = 0
) -> Iterator[RecordRun]:
    """Stream the rows of a Parquet file batch by batch, reading only the two columns."""
    path = Path(path)
    _check_columns(path, _table_columns(path, "parquet"), id_column, seq_column)
    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=TABLE_BATCH_ROWS, columns=[id_column, seq_column])
        yield from _batches_to_runs(batches, path, id_column, seq_column, start_ordinal)
    except (pa.ArrowException, OSError) as e:
        raise RunnerError(f"{path} could not be read as Parquet ({e}): check the file is complete") from None


def read_csv_runs(
    path: Path,
    id_column: str = "id",
    seq_column: str = "sequence",
    start_ordinal: int = 0,
    delimiter: str = ",",
) -> Iterator[RecordRun]:
    """Stream the rows of a CSV/TSV file (gzip by magic bytes) through pyarrow's streaming reader."""
    path = Path(path)
    _check_columns(path, _table_columns(path, "tsv" if delimiter == "\t" else "csv"), id_column, seq_column)
    compression = "gzip" if _is_gzip(path) else None
    try:
        stream = pa.input_stream(str(path), compression=compression)
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=CHUNK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            # read only the two columns, as text: ids like 001 must not turn into numbers
            convert_options=pacsv.ConvertOptions(
                include_columns=[id_column, seq_column],
                column_types={id_column: pa.string(), seq_column: pa.string()},
                strings_can_be_null=False,
            ),
        )
        with stream:
            yield from _batches_to_runs(iter(reader), path, id_column, seq_column, start_ordinal)
    except (pa.ArrowException, OSError) as e:
        raise _table_failure(path, delimiter, e) from None


def _table_failure(path: Path, delimiter: str, error: BaseException) -> RunnerError:
    """One line for a CSV/TSV that failed part-way. pyarrow's messages rarely say where (its row numbers are
    per block), so the file is scanned again line by line (this error path only) to find the first line that
    is undecodable or has the wrong number of fields, or how far the gzip data goes."""
    kind = "TSV" if delimiter == "\t" else "CSV"
    lines, problem, read_error = _scan_table_lines(path, delimiter)
    if read_error is not None:
        return _read_failure(path, read_error, lines)
    if isinstance(error, OSError) and _is_gzip(path):  # corrupt gzip whose garbage parsed as text before
        return _read_failure(path, error, _count_lines(path))
    if problem is not None:
        return RunnerError(
            f"{path} line {lines:,}: {problem}: fix or remove that line (quote fields that hold the delimiter), "
            f"then rerun"
        )
    return RunnerError(f"{path} could not be read as {kind} ({first_line(error)}): check the file")


def _count_lines(path: Path) -> int:
    """Lines that can be read from a (possibly cut or corrupt) file before it fails."""
    lines = 0
    try:
        with _open_binary(path) as f:
            while chunk := _read_chunk(f):
                lines += chunk.count(b"\n")
    except _PartialRead as cut:
        lines += cut.data.count(b"\n")
    return lines


def _scan_table_lines(path: Path, delimiter: str) -> tuple[int, str | None, BaseException | None]:
    """(line, what is wrong, read error) at the first bad line of a CSV/TSV; (lines, None, None) if none is."""
    line = 0

    def text_lines() -> Iterator[str]:
        nonlocal line
        with _open_binary(path) as f:
            for raw in f:
                line += 1
                yield raw.decode("utf-8")

    try:
        reader = csv.reader(text_lines(), delimiter=delimiter)
        width = len(next(reader, []))
        for fields in reader:
            if fields and len(fields) != width:
                return line, f"{len(fields)} fields where the header has {width}", None
    except UnicodeDecodeError as e:
        return line, f"undecodable text (byte 0x{e.object[e.start]:02x} is not UTF-8)", None
    except csv.Error as e:
        return line, f"malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({e})", None
    except (OSError, EOFError, zlib.error) as e:
        return line, None, e
    return line, None, None


def read_file_runs(
    path: Path | str, id_column: str = "id", seq_column: str = "sequence", start_ordinal: int = 0
) -> Iterator[RecordRun]:
    """Stream the records of one input file, whatever its format, as runs of Arrow columns."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "parquet":
        return read_parquet_runs(path, id_column, seq_column, start_ordinal)
    if fmt in ("csv", "tsv"):
        return read_csv_runs(path, id_column, seq_column, start_ordinal, "\t" if fmt == "tsv" else ",")
    return read_fasta_runs(path, start_ordinal)


def read_runs(
    paths: Iterable[Path | str], id_column: str = "id", seq_column: str = "sequence", start_ordinal: int = 0
) -> Iterator[RecordRun]:
    """Every record of every file, in order, with a global 0-based ordinal (unless `start_ordinal`), as runs of
    Arrow columns (each within one file): what the read task parses, without a Python object per record."""
    ordinal = start_ordinal
    for path in paths:
        for run in read_file_runs(path, id_column, seq_column, ordinal):
            ordinal = run.first_ordinal + len(run)
            yield run


def read_records(
    paths: Iterable[Path | str], id_column: str = "id", seq_column: str = "sequence", start_ordinal: int = 0
) -> Iterator[InputRecord]:
    """`read_runs`, one record at a time."""
    for run in read_runs(paths, id_column, seq_column, start_ordinal):
        yield from run.records()
