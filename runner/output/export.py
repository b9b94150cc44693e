"""`runner export`: a job's results in the formats other tools read (the library behind the command).

Every exporter streams: rows go out in input order, a block (`BLOCK_BYTES` of vectors) at a time, gathered
from the memory-mapped parts (`Results.iter_blocks`), so memory stays at a few blocks (plus one slab of
per-token arrays) whatever the job's size. Single-file outputs are written under a temporary name and renamed when complete.

Layouts (the same names in parquet, npz and hdf5):
- `id`, `ordinal`, `length`, `truncated` (and `windows` where stored): one value per row, input order;
- the pooled vectors, one [N, D] float32 array per stored column: `embedding` for a one-layer,
  one-pooling job, else `layer{L}_{pooling}` (e.g. `layer33_mean`);
- npz and hdf5 only, with per-token data: `per_token_offsets` int64 [N+1] and `per_token_layer{L}`
  [sum of lengths, D] in the stored dtype: row i's residues are `[offsets[i]:offsets[i+1]]`. (Parquet
  holds the pooled table; the per-token Arrow files under DIR/tokens/ are already readable by Arrow tools.)
- fair-esm: one `<id>.pt` per sequence, as fair-esm's scripts/extract.py writes it (see `export_fair_esm`).
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runner.errors import RunnerError

if TYPE_CHECKING:
    import pyarrow as pa

    from runner.output.results import Results

log = logging.getLogger("runner")

FORMATS: tuple[str, ...] = ("parquet", "npz", "hdf5", "fair-esm")
BLOCK_BYTES = 16 << 20  # vectors per block read from the parts and written out (bounds an export's memory)
MAX_BLOCK_ROWS = 65536  # rows per block when the block holds few or no vectors
ROW_COLUMNS = ("id", "ordinal", "length", "truncated", "windows")  # per-row columns exported (not tokens_*)
FAIR_ESM_WARN_ROWS = 100_000  # beyond this, one file per sequence is more than a file system likes


def human_bytes(n: float) -> str:
    """1,234 B / 12.1 KiB / 3.4 MiB / 5.6 GiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:,.0f} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


@dataclass
class ExportSummary:
    """What an export wrote."""

    path: Path
    format: str
    rows: int
    files: int = 1
    bytes: int = 0
    notes: list[str] = field(default_factory=list)  # what the user should know (left-out data, scaling)


def export(results: Results, fmt: str, to: str | Path, overwrite: bool = False) -> ExportSummary:
    """Write `results` to `to` in `fmt` (one of FORMATS)."""
    to = Path(to)
    if fmt not in FORMATS:
        raise RunnerError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "fair-esm":
        return export_fair_esm(results, to, overwrite)
    if to.exists() and not overwrite:
        raise RunnerError(f"{to} exists: pass --overwrite to replace it, or choose another --to")
    if to.is_dir():
        raise RunnerError(f"{to} is a folder: --format {fmt} writes one file; give a file name")
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = to.with_name(f".{to.name}.tmp")
    writer = {"parquet": _write_parquet, "npz": _write_npz, "hdf5": _write_hdf5}[fmt]
    try:
        notes = writer(results, tmp)
        os.replace(tmp, to)
    except OSError as e:
        raise RunnerError(f"cannot write {to} ({e.strerror or e}): free disk space or choose another --to") from None
    finally:
        tmp.unlink(missing_ok=True)
    return ExportSummary(to, fmt, len(results), 1, to.stat().st_size, notes)


def description(results: Results) -> dict[str, Any]:
    """What the numbers are, stored with every export (file metadata / attributes)."""
    return {
        "source": str(results.path.resolve()),
        "status": results.status,
        "model": results.manifest.get("model"),
        "layers": results.layers,
        "poolings": results.poolings,
        "columns": {name: {"layer": layer, "pooling": pooling} for (layer, pooling), name in results.columns.items()},
        "per_token": {"layers": results.per_token_layers, "dtype": str(results.per_token_dtype)}
        if results.has_per_token else None,
    }


def _row_columns(results: Results) -> list[str]:
    return [c for c in ROW_COLUMNS if c in results.schema.names]


def _blocks(results: Results, columns: list[str]) -> Iterator[pa.Table]:
    """The stored `columns` in input order, about BLOCK_BYTES of vectors (at most MAX_BLOCK_ROWS rows) at a time."""
    vectors = sum(c in results.columns.values() for c in columns)
    rows = BLOCK_BYTES // max(1, vectors * results.dim * 4)
    return results.iter_blocks(columns, min(MAX_BLOCK_ROWS, max(64, rows)))


def _vectors(block: pa.Table, name: str) -> np.ndarray:
    column = block.column(name).combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def _per_token_rows(results: Results, layer: int, lengths: np.ndarray) -> Iterator[np.ndarray]:
    """Every row's [length, D] per-token array at `layer`, input order (`lengths`: per_token_lengths())."""
    i = 0
    for block in _blocks(results, ["id", "tokens_file", "tokens_row"]):
        for sequence_id, tokens_file, tokens_row in zip(*(block.column(c).to_pylist() for c in block.column_names), strict=True):
            array = results.per_token_at(tokens_file, tokens_row, sequence_id, layer)
            if len(array) != lengths[i]:
                raise RunnerError(
                    f"{sequence_id!r} has {len(array)} per-token vectors at layer {layer}, its token file says "
                    f"{lengths[i]}: the output is inconsistent; rerun the job with --overwrite"
                )
            i += 1
            yield array


# --- parquet ---------------------------------------------------------------------------------------------


def _write_parquet(results: Results, path: Path) -> list[str]:
    import pyarrow.parquet as pq

    notes = []
    writer = None
    try:
        for block in _blocks(results, _row_columns(results) + list(results.columns.values())):
            if writer is None:
                schema = block.schema.with_metadata({"runner": json.dumps(description(results))})
                writer = pq.ParquetWriter(str(path), schema)
            writer.write_table(block.replace_schema_metadata(schema.metadata))
        if writer is None:  # no rows: an empty table with the job's columns
            pq.write_table(_empty_table(results), str(path))
    finally:
        if writer is not None:
            writer.close()
    if results.has_per_token:
        notes.append("per-token vectors are not in the parquet file (use --format hdf5 or npz, or read "
                     "DIR/tokens/ with runner.open(DIR).per_token)")
    return notes


def _empty_table(results: Results) -> pa.Table:
    import pyarrow as pa

    fields = [results.schema.field(c) for c in _row_columns(results)] if results.schema.names else [
        pa.field("id", pa.string()), pa.field("ordinal", pa.int64()), pa.field("length", pa.int32()),
        pa.field("truncated", pa.bool_()),
    ]
    fields += [pa.field(name, pa.list_(pa.float32(), results.dim)) for name in results.columns.values()]
    schema = pa.schema(fields, metadata={"runner": json.dumps(description(results))})
    return schema.empty_table()


# --- npz -------------------------------------------------------------------------------------------------


def _write_npz(results: Results, path: Path) -> list[str]:
    """np.savez's layout (a zip of .npy files), written entry by entry, block by block (np.savez itself
    needs every array in memory). Readable with np.load(path) (add mmap_mode=None; .npz is not mappable)."""
    n = len(results)
    rows = results.rows
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        ids = np.asarray(results.ids, dtype=str) if n else np.zeros(0, dtype="<U1")
        _npz_entry(archive, "id", ids)
        for name in _row_columns(results)[1:]:
            _npz_entry(archive, name, rows.column(name).to_numpy(zero_copy_only=False))
        for name in results.columns.values():
            with _NpyStream(archive, name, np.dtype(np.float32), (n, results.dim)) as stream:
                for block in _blocks(results, [name]):
                    stream.write(_vectors(block, name))
        if results.has_per_token:
            lengths = results.per_token_lengths()
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            _npz_entry(archive, "per_token_offsets", offsets)
            for layer in results.per_token_layers:
                shape = (int(offsets[-1]), results.dim)
                with _NpyStream(archive, f"per_token_layer{layer}", results.per_token_dtype, shape) as stream:
                    for array in _per_token_rows(results, layer, lengths):
                        stream.write(array)
        _npz_entry(archive, "description", np.asarray(json.dumps(description(results))))
    return []


def _npz_entry(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with archive.open(f"{name}.npy", "w", force_zip64=True) as fh:
        np.lib.format.write_array(fh, np.asarray(array), allow_pickle=False)


class _NpyStream:
    """One .npy entry of a zip written in row blocks: the header first, then the rows as they come."""

    def __init__(self, archive: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.archive, self.name, self.dtype, self.shape = archive, name, np.dtype(dtype), shape
        self.rows = 0

    def __enter__(self) -> _NpyStream:
        self.fh = self.archive.open(f"{self.name}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(self.fh, header)
        return self

    def write(self, rows: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(rows, dtype=self.dtype).reshape(-1).view(np.uint8))  # no bytes copy
        self.rows += len(rows)

    def __exit__(self, *exc: object) -> None:
        self.fh.close()
        if exc[0] is None and self.rows != self.shape[0]:
            raise RunnerError(f"{self.name}: wrote {self.rows} rows, expected {self.shape[0]} (the output changed while exporting?)")


# --- hdf5 ------------------------------------------------------------------------------------------------


def _write_hdf5(results: Results, path: Path) -> list[str]:
    """h5py datasets named as in the module docstring; the description as a JSON attribute `runner`."""
    import h5py

    n = len(results)
    rows = results.rows
    with h5py.File(path, "w") as f:
        f.attrs["runner"] = json.dumps(description(results))
        f.create_dataset("id", data=np.asarray(results.ids, dtype=object), dtype=h5py.string_dtype())
        for name in _row_columns(results)[1:]:
            f.create_dataset(name, data=rows.column(name).to_numpy(zero_copy_only=False))
        for name in results.columns.values():
            dataset = f.create_dataset(name, shape=(n, results.dim), dtype=np.float32)
            start = 0
            for block in _blocks(results, [name]):
                vectors = _vectors(block, name)
                dataset[start : start + len(vectors)] = vectors
                start += len(vectors)
        if results.has_per_token:
            lengths = results.per_token_lengths()
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            f.create_dataset("per_token_offsets", data=offsets)
            for layer in results.per_token_layers:
                dataset = f.create_dataset(
                    f"per_token_layer{layer}", shape=(int(offsets[-1]), results.dim), dtype=results.per_token_dtype
                )
                buffered, nbytes, start = [], 0, 0
                for array in _per_token_rows(results, layer, lengths):  # written in ~64 MiB slabs, not row by row
                    buffered.append(array)
                    nbytes += array.nbytes
                    if nbytes >= 64 << 20:
                        start = _write_rows(dataset, start, buffered)
                        buffered, nbytes = [], 0
                _write_rows(dataset, start, buffered)
    return []


def _write_rows(dataset: Any, start: int, arrays: list[np.ndarray]) -> int:
    if not arrays:
        return start
    rows = np.concatenate(arrays)
    dataset[start : start + len(rows)] = rows
    return start + len(rows)


# --- fair-esm --------------------------------------------------------------------------------------------


def export_fair_esm(results: Results, to: Path, overwrite: bool = False) -> ExportSummary:
    """One `<id>.pt` per sequence in `to/`, as fair-esm's `scripts/extract.py` writes:
    {"label": id, "representations": {layer: [L, D]} (with per-token data), "mean_representations":
    {layer: [D]} (layers pooled with `mean`), "bos_representations": {layer: [D]} (layers pooled with
    `cls`)}, float32 tensors keyed by the non-negative layer index. `mean_all` and `max` have no place in
    that layout and are left out. Differences from extract.py: the label is the id (the FASTA header up to
    its first space; extract.py keeps the whole header), per-token float16 is widened to float32."""
    import torch

    if to.exists() and not to.is_dir():
        raise RunnerError(f"{to} is a file: --format fair-esm writes a folder of .pt files")
    if to.is_dir() and any(to.iterdir()) and not overwrite:
        raise RunnerError(f"{to} is not empty: pass --overwrite to write into it, or choose another --to")
    mean_layers = [layer for layer in results.layers if (layer, "mean") in results.columns]
    bos_layers = [layer for layer in results.layers if (layer, "cls") in results.columns]
    if not (mean_layers or bos_layers or results.has_per_token):
        raise RunnerError(
            "fair-esm's layout holds mean and BOS (cls) vectors and per-token arrays; this job stored "
            f"{', '.join(results.poolings)} only: export --format parquet/npz/hdf5 instead"
        )
    notes = [f"fair-esm's layout writes one file per sequence ({len(results):,} files): slow and inode-hungry "
             "past ~100k sequences; prefer --format parquet, npz or hdf5 for large jobs"]
    left_out = [p for p in results.poolings if p not in ("mean", "cls")]
    if left_out:
        notes.append(f"pooling {', '.join(left_out)} left out: fair-esm's layout has no place for it")
    if len(results) > FAIR_ESM_WARN_ROWS:
        log.warning(notes[0])
    to.mkdir(parents=True, exist_ok=True)
    root = to.resolve()
    files = written = 0
    columns = ["id"] + [results.columns[(layer, "mean")] for layer in mean_layers]
    columns += [results.columns[(layer, "cls")] for layer in bos_layers]
    columns += ["tokens_file", "tokens_row"] if results.has_per_token else []
    for block in _blocks(results, columns):
        ids = block.column("id").to_pylist()
        mean = {layer: _vectors(block, results.columns[(layer, "mean")]) for layer in mean_layers}
        bos = {layer: _vectors(block, results.columns[(layer, "cls")]) for layer in bos_layers}
        refs = (block.column("tokens_file").to_pylist(), block.column("tokens_row").to_pylist()) \
            if results.has_per_token else None
        for i, label in enumerate(ids):
            result: dict[str, Any] = {"label": label}
            if refs is not None:
                result["representations"] = {
                    layer: torch.from_numpy(
                        np.array(results.per_token_at(refs[0][i], refs[1][i], label, layer), dtype=np.float32)
                    )
                    for layer in results.per_token_layers
                }
            if mean_layers:  # copies: a saved view would carry the whole block's storage into each file
                result["mean_representations"] = {layer: torch.from_numpy(mean[layer][i].copy()) for layer in mean_layers}
            if bos_layers:
                result["bos_representations"] = {layer: torch.from_numpy(bos[layer][i].copy()) for layer in bos_layers}
            path = (to / f"{label}.pt").resolve()
            if not path.is_relative_to(root):
                raise RunnerError(f"id {label!r} would be written outside {to}: rename it, or export --format hdf5")
            path.parent.mkdir(parents=True, exist_ok=True)  # an id with '/' makes folders, as in extract.py
            torch.save(result, path)
            files += 1
            written += path.stat().st_size
    return ExportSummary(to, "fair-esm", len(results), files, written, notes)
