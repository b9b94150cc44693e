"""Finding and reading inputs: FASTA (plain or gzip), Parquet and CSV/TSV, streamed record by record.

Nothing here holds a whole file: FASTA is parsed from large binary chunks (only one record at a time is
ever assembled, so a single huge record is the most held), tables are read batch by batch through pyarrow.
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
from pathlib import Path
from typing import BinaryIO, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from runner.batch import InputRecord
from runner.errors import RunnerError

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
# Rows per Arrow batch for tables: big enough to amortise, small enough to stay streaming.
TABLE_BATCH_ROWS = 65536
# ASCII whitespace: what may precede the first '>' of a FASTA file.
_WHITESPACE = b" \t\r\n\v\f"
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
    return RunnerError(
        f"{path} is not a FASTA file (first line does not start with '>'); {note}{_FORMATS_HINT}"
    )


def _read_head(path: Path, n: int = 65536) -> bytes:
    try:
        with _open_binary(path) as f:
            return f.read(n)
    except (OSError, EOFError, zlib.error) as e:
        raise RunnerError(f"{path} could not be read ({e}): check the file is complete") from None


def _check_fasta_head(path: Path, head: bytes) -> None:
    """Raise unless the first non-blank bytes start a FASTA header. An empty file passes (no records)."""
    if b"\x00" in head:
        raise _not_fasta(path, "it looks like a binary file: ")
    text = head.removeprefix(UTF8_BOM).lstrip(_WHITESPACE)
    if text and not text.startswith(b">"):
        raise _not_fasta(path)


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


def _parse_fasta_text(text: bytes, source: str, ordinal: int) -> Iterator[InputRecord]:
    """Records of a buffer holding whole records; `text` starts right after a record's '>'."""
    for part in text.split(b"\n>"):
        nl = part.find(b"\n")
        if nl < 0:
            header, seq = part, b""
        else:
            # only line ends are removed here (replace is ~2x faster than translate); other whitespace is
            # the codec's job (`clean`), which removes it anyway
            header, seq = part[:nl], part[nl + 1 :].replace(b"\n", b"")
            if b"\r" in seq:
                seq = seq.replace(b"\r", b"")
        fields = header.split(None, 1)
        rid = fields[0].decode("utf-8", errors="replace") if fields else ""
        yield InputRecord(
            id=rid, sequence=seq.decode("utf-8", errors="replace"), source=source, ordinal=ordinal
        )
        ordinal += 1


def read_fasta(path: Path, start_ordinal: int = 0) -> Iterator[InputRecord]:
    """Stream the records of one FASTA file (multi-line, CRLF, blank lines, gzip by magic bytes).

    The id is the header up to its first whitespace; the sequence is the record's lines joined (line ends
    removed; any other whitespace is left for `SequenceCodec.clean`). Raises RunnerError as soon as the file turns out not to be FASTA.
    """
    path = Path(path)
    source = str(path)
    ordinal = start_ordinal
    # `pending` holds the unfinished record (starting after its '>') as a list of pieces, so that a record
    # spanning many chunks is joined once instead of re-copied per chunk.
    pending: list[bytes] = []
    started = False
    try:
        with _open_binary(path) as f:
            while True:
                chunk = f.read(CHUNK_BYTES)
                if not chunk:
                    break
                if not started:
                    if b"\x00" in chunk:
                        _check_fasta_head(path, chunk)
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
                        text = b"".join(pending)
                        for rec in _parse_fasta_text(text, source, ordinal):
                            ordinal += 1
                            yield rec
                        pending = [chunk[1:]]
                    else:
                        pending.append(chunk)
                    continue
                pending.append(chunk[:cut])
                text = b"".join(pending)
                pending = [chunk[cut + 2 :]]
                for rec in _parse_fasta_text(text, source, ordinal):
                    ordinal += 1
                    yield rec
                del text
            if started:
                yield from _parse_fasta_text(b"".join(pending), source, ordinal)
    except (OSError, EOFError, zlib.error) as e:
        raise RunnerError(f"{path} could not be read ({e}): check the file is complete") from None


def _column_strings(col: pa.ChunkedArray | pa.Array) -> list[str]:
    """A column as Python strings (numbers become their text, nulls become '')."""
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        try:
            col = col.cast(pa.string())
        except pa.ArrowException as e:
            raise RunnerError(f"column of type {col.type} cannot be read as text ({e})") from None
    return ["" if v is None else v for v in col.to_pylist()]


def _batches_to_records(
    batches: Iterator[pa.RecordBatch], path: Path, id_column: str, seq_column: str, ordinal: int
) -> Iterator[InputRecord]:
    source = str(path)
    for batch in batches:
        ids = _column_strings(batch.column(id_column))
        seqs = _column_strings(batch.column(seq_column))
        for rid, seq in zip(ids, seqs, strict=True):
            yield InputRecord(id=rid, sequence=seq, source=source, ordinal=ordinal)
            ordinal += 1


def read_parquet(
    path: Path, id_column: str = "id", seq_column: str = "sequence", start_ordinal: int = 0
) -> Iterator[InputRecord]:
    """Stream the rows of a Parquet file batch by batch, reading only the two columns."""
    path = Path(path)
    _check_columns(path, _table_columns(path, "parquet"), id_column, seq_column)
    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=TABLE_BATCH_ROWS, columns=[id_column, seq_column])
        yield from _batches_to_records(batches, path, id_column, seq_column, start_ordinal)
    except (pa.ArrowException, OSError) as e:
        raise RunnerError(f"{path} could not be read as Parquet ({e}): check the file is complete") from None


def read_csv(
    path: Path,
    id_column: str = "id",
    seq_column: str = "sequence",
    start_ordinal: int = 0,
    delimiter: str = ",",
) -> Iterator[InputRecord]:
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
            yield from _batches_to_records(iter(reader), path, id_column, seq_column, start_ordinal)
    except (pa.ArrowException, OSError) as e:
        raise RunnerError(
            f"{path} could not be read as {'TSV' if delimiter == chr(9) else 'CSV'} ({e})"
        ) from None


def read_file(
    path: Path | str, id_column: str = "id", seq_column: str = "sequence", start_ordinal: int = 0
) -> Iterator[InputRecord]:
    """Stream the records of one input file, whatever its format."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "parquet":
        return read_parquet(path, id_column, seq_column, start_ordinal)
    if fmt in ("csv", "tsv"):
        return read_csv(path, id_column, seq_column, start_ordinal, "\t" if fmt == "tsv" else ",")
    return read_fasta(path, start_ordinal)


def read_records(
    paths: Iterable[Path | str], id_column: str = "id", seq_column: str = "sequence", start_ordinal: int = 0
) -> Iterator[InputRecord]:
    """Every record of every file, in order, with a global 0-based ordinal (unless `start_ordinal`)."""
    ordinal = start_ordinal
    for path in paths:
        for rec in read_file(path, id_column, seq_column, ordinal):
            ordinal = rec.ordinal + 1
            yield rec
