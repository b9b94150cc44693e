"""Reading a job's results back: `runner.open(DIR)` -> `Results`.

What is visible is what the job committed: the rows of the complete pooled parts
(`DIR/embeddings/part-NNNNN.arrow`; half-written parts have hidden temporary names and are never
listed) and, with `--per-token`, only the per-token rows those parts point at (`tokens_file`,
`tokens_row`). A job that is still running, was interrupted or aborted stays readable: a warning names
its status and the rows read are those committed so far.

Memory: opening reads only the small per-row columns (ordinal; id and the per-token index on first use).
Vectors are read through memory maps (`pa.memory_map`), zero-copy: `iter_pooled`, `per_token` and
`iter_per_token` return read-only views of the mapped files. `pooled()` returns one [N, D] array in input
order, which needs one copy (rows are stored in completion order, spread over parts); give it `out=` (e.g.
a `np.lib.format.open_memmap`) to fill an array on disk instead of in memory. See docs/reading.md.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from runner.errors import RunnerError

PART_GLOB = "part-*.arrow"
PART_NAME = re.compile(r"^part-(\d+)\.arrow$")
# Vector columns of a job with several layers or poolings: `layer{L}_{pooling}` (L resolved, >= 0).
VECTOR_COLUMN = re.compile(r"^layer(\d+)_([a-z_]+)$")
TOKEN_COLUMN = re.compile(r"^layer(\d+)$")
SINGLE_COLUMN = "embedding"  # the one vector column of a one-layer, one-pooling job
# Per-row columns that are not vectors, in the order tables built here show them.
META_COLUMNS = ("id", "ordinal", "length", "truncated", "windows", "tokens_file", "tokens_row")
POOLING_ALIASES = {"bos": "cls"}  # fair-esm calls the BOS vector `bos`
OPEN_PARTS = 16  # memory-mapped parts / token files kept open at once (mappings, not memory)


class IncompleteResultsWarning(UserWarning):
    """The job is not complete (running, interrupted, aborted, failed): only its committed rows are read."""


def user_stacklevel() -> int:
    """The `stacklevel` of a warning that points at the first caller outside the runner package."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "runner":
        frame, level = frame.f_back, level + 1
    return level


def open_results(path: str | Path, model: str | None = None) -> Results:
    """Open the output of `runner embed --out DIR` (`runner.open`).

    For a multi-model job (`--model A --model B`), `model` picks one (its name as given to --model, its
    sub-folder's name, or the manifest's model name); passing `DIR/<model>` works too.
    """
    return Results(job_dir(Path(path), model))


def job_dir(path: Path, model: str | None) -> Path:
    """The folder of one model's job inside PATH (PATH itself for a one-model job)."""
    if not path.is_dir():
        raise RunnerError(f"{path} does not exist or is not a folder: pass the --out DIR of `runner embed`")
    if is_job_dir(path):
        if model is not None and not _names_model(path, model):
            raise RunnerError(f"{path} holds the output of model {_model_name(path)!r}, not {model!r}")
        return path
    jobs = sorted(d for d in path.iterdir() if d.is_dir() and is_job_dir(d))
    if not jobs:
        raise RunnerError(
            f"{path} is not a runner output (no manifest.json or embeddings/): pass the --out DIR of `runner embed`"
        )
    if model is None:
        if len(jobs) == 1:
            return jobs[0]
        names = ", ".join(repr(d.name) for d in jobs)
        raise RunnerError(f"{path} holds the outputs of {len(jobs)} models: pass model= one of {names}")
    for d in jobs:
        if _names_model(d, model):
            return d
    names = ", ".join(repr(d.name) for d in jobs)
    raise RunnerError(f"no model {model!r} in {path}: its models are {names}")


def is_job_dir(path: Path) -> bool:
    return (path / "manifest.json").is_file() or (path / "embeddings").is_dir()


def _model_name(path: Path) -> str | None:
    try:
        return json.loads((path / "manifest.json").read_text())["model"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _names_model(path: Path, model: str) -> bool:
    """Does `model` (as given to --model, a folder name or the manifest's name) name the job in `path`?"""
    from runner.cli import model_folder  # the rule that named the folder in the first place

    return model in (path.name, _model_name(path)) or model_folder(model) == path.name


class Results:
    """One model's results in a `runner embed` output folder. See the module docstring and docs/reading.md."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest: dict[str, Any] = self._read_manifest()
        self.status: str = self.manifest.get("status", "unknown")
        model = self.manifest.get("model") or {}
        self.model: str | None = model.get("name")
        self.num_layers: int | None = model.get("num_layers")
        self._parts = sorted(
            (p for p in (self.path / "embeddings").glob(PART_GLOB) if PART_NAME.match(p.name)),
            key=lambda p: int(PART_NAME.match(p.name).group(1)),  # type: ignore[union-attr]
        )
        self._cache: OrderedDict[Path, pa.Table] = OrderedDict()  # memory-mapped tables, least recent first
        self.schema = self._common_schema()
        self._starts, ordinals = self._read_index()
        self.columns: dict[tuple[int, str], str] = self._vector_columns()
        self.layers: list[int] = sorted({layer for layer, _ in self.columns})
        self.poolings: list[str] = list(dict.fromkeys(p for _, p in self.columns))
        self.dim: int = self._dim()
        # Input order: `order[i]` is the stored row (parts concatenated in name order) of the i-th id.
        self._order = np.argsort(ordinals, kind="stable")
        self._ordinals = ordinals[self._order]
        if len(self._ordinals) > 1 and not (np.diff(self._ordinals) > 0).all():
            dup = int(self._ordinals[:-1][np.diff(self._ordinals) == 0][0])
            raise RunnerError(
                f"{self.path}: input record {dup} is stored twice in embeddings/: the output is inconsistent; "
                "rerun the job with --overwrite"
            )
        self._rank = np.empty_like(self._order)
        self._rank[self._order] = np.arange(len(self._order))  # stored row -> position in input order
        self._columns_cache: dict[str, np.ndarray] = {}
        self._id_index: dict[str, int] | None = None
        self._ids: list[str] | None = None
        self._dedup = bool((self.manifest.get("settings") or {}).get("dedup"))  # copies share a per-token row
        self.per_token_layers: list[int]
        self.per_token_dtype: np.dtype | None
        self.per_token_layers, self.per_token_dtype = self._per_token_info()
        if self.status != "complete":
            hint = (
                "it is still running, or was killed before it could say so"
                if self.status == "running"
                else "rerun the same `runner embed` command to finish it"
            )
            warnings.warn(
                f"{self.path}: the job's status is {self.status!r}, not 'complete': reading the {len(self):,} rows "
                f"it committed ({hint})",
                IncompleteResultsWarning,
                stacklevel=user_stacklevel(),
            )

    # --- what is there ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, sequence_id: object) -> bool:
        return sequence_id in self._ids_index()

    def __repr__(self) -> str:
        per_token = (
            f"per_token={self.per_token_layers} {self.per_token_dtype}" if self.per_token_layers else "per_token=None"
        )
        return (
            f"<Results {str(self.path)!r} model={self.model!r} rows={len(self):,} layers={self.layers} "
            f"poolings={self.poolings} dim={self.dim} {per_token} status={self.status!r}>"
        )

    @property
    def ids(self) -> list[str]:
        """The ids in input order (the order of `pooled()`'s rows). Built once, then shared: do not modify."""
        if self._ids is None:
            self._ids = self._column("id").tolist()
        return self._ids

    @property
    def rows(self) -> pa.Table:
        """Per-row metadata in input order: id, ordinal (the record's 0-based position in the input),
        length (residues embedded), truncated, and windows / tokens_file / tokens_row where stored."""
        names = [c for c in META_COLUMNS if c in self.schema.names]
        return pa.table({c: self._column(c) for c in names})

    @property
    def has_per_token(self) -> bool:
        return bool(self.per_token_layers)

    def column(self, layer: int | None = None, pooling: str | None = None) -> str:
        """The name of the stored vector column of (layer, pooling); defaults: the job's only ones."""
        layer = self._pick_layer(layer, self.layers, "pooled layer")
        if pooling is None:
            if len(self.poolings) != 1:
                raise RunnerError(f"the job has several poolings: pass pooling= one of {', '.join(self.poolings)}")
            pooling = self.poolings[0]
        pooling = POOLING_ALIASES.get(pooling, pooling)
        name = self.columns.get((layer, pooling))
        if name is None:
            choices = ", ".join(f"{lay}/{p}" for lay, p in self.columns)
            raise RunnerError(f"no pooling {pooling!r} at layer {layer}: the job stored (layer/pooling) {choices}")
        return name

    # --- pooled vectors ------------------------------------------------------------------------------

    def pooled(
        self, layer: int | None = None, pooling: str | None = None, out: np.ndarray | None = None,
        ids: list[str] | None = None,
    ) -> np.ndarray:
        """float32 [N, D]: row i is the vector of `ids[i]` (input order).

        A zero-copy read-only view of the memory-mapped part when the job is one in-order stored chunk;
        otherwise one copy, filled part by part (memory: the result plus one part's rows). `out`: an
        array of shape [N, D] to fill instead (e.g. `np.lib.format.open_memmap` for a job larger than RAM).
        `ids`: only these ids' vectors, [len(ids), D] in that order (read from the parts that hold them).
        """
        name = self.column(layer, pooling)
        if ids is not None and not len(ids):
            return np.zeros((0, self.dim), np.float32)
        if ids is not None:
            index = self._ids_index()
            missing = [sequence_id for sequence_id in ids if sequence_id not in index]
            if missing:
                raise RunnerError(f"{len(missing)} id(s) not in {self.path}'s rows, e.g. {missing[0]!r}")
            stored = self._order[np.fromiter((index[i] for i in ids), np.int64, len(ids))]
            column = self._take(stored, [name]).column(name)
            vectors = self._vectors(column.chunk(0)) if column.num_chunks else np.zeros((0, self.dim), np.float32)
            if out is not None:
                out[...] = vectors
                return out
            return vectors.copy()
        n = len(self)
        if out is None and n and self._one_chunk_in_order(name):
            return self._vectors(self._table(self._parts[0]).column(name).chunk(0))
        if out is None:
            out = np.empty((n, self.dim), dtype=np.float32)
        elif out.shape != (n, self.dim):
            raise RunnerError(f"out= has shape {out.shape}, the job's pooled vectors are {(n, self.dim)}")
        for part, offset in self._part_starts():
            for chunk in self._table(part).column(name).chunks:
                out[self._rank[offset : offset + len(chunk)]] = self._vectors(chunk)
                offset += len(chunk)
        return out

    def iter_pooled(self, layer: int | None = None, pooling: str | None = None) -> Iterator[tuple[list[str], np.ndarray]]:
        """(ids, float32 [n, D]) per stored record batch, part by part (storage order, not input order):
        read-only zero-copy views of the memory-mapped parts, so memory stays at one batch."""
        name = self.column(layer, pooling)
        for part, _ in self._part_starts():
            table = self._table(part)
            for ids, vectors in zip(table.column("id").chunks, table.column(name).chunks, strict=True):
                yield ids.to_pylist(), self._vectors(vectors)

    def to_arrow(self, vectors: bool = True) -> pa.Table:
        """The pooled table in input order: the `rows` columns, then the vector columns (fixed_size_list
        float32) unless `vectors=False`. A copy (the reorder); for polars: `polars.from_arrow(r.to_arrow())`."""
        table = self.rows
        if vectors:
            for name in self.columns.values():
                table = table.append_column(name, self._fixed_list(self.pooled_by_name(name)))
        return table

    def to_pandas(self, vectors: bool = True) -> Any:
        """The pooled table in input order as a pandas DataFrame (each vector cell a float32 array)."""
        return self.to_arrow(vectors).to_pandas()

    def pooled_by_name(self, name: str) -> np.ndarray:
        """`pooled()` of a stored column given by its name (`embedding`, `layer33_mean`, ...)."""
        layer_pooling = next((k for k, v in self.columns.items() if v == name), None)
        if layer_pooling is None:
            raise RunnerError(f"no vector column {name!r}: the job's are {', '.join(self.columns.values())}")
        return self.pooled(*layer_pooling)

    # --- per-token vectors -----------------------------------------------------------------------------

    def per_token(self, sequence_id: str, layer: int | None = None) -> np.ndarray:
        """[length, D] in the stored dtype (float32, or float16 with --per-token-dtype float16): one
        vector per residue (BOS/EOS excluded) of `sequence_id` at `layer`. A read-only view of the
        memory-mapped token file: only that row's pages are read."""
        layer = self._pick_layer(layer, self._need_per_token(), "per-token layer")
        position = self._ids_index().get(sequence_id)
        if position is None:
            raise RunnerError(f"no id {sequence_id!r} in {self.path}'s {len(self):,} rows")
        row = int(self._order[position])
        tokens_file = str(self._column("tokens_file", stored=True)[row])
        tokens_row = int(self._column("tokens_row", stored=True)[row])
        return self._token_row(tokens_file, tokens_row, sequence_id, layer)

    def iter_per_token(self, layer: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(id, [length, D]) for every row, pooled part by pooled part (storage order; `rows` maps ids to
        input order). Read-only views of memory-mapped token files: memory stays at what the caller keeps."""
        layer = self._pick_layer(layer, self._need_per_token(), "per-token layer")
        for part, _ in self._part_starts():
            table = self._table(part).select(["id", "tokens_file", "tokens_row"])
            for sequence_id, tokens_file, tokens_row in zip(
                table.column("id").to_pylist(),
                table.column("tokens_file").to_pylist(),
                table.column("tokens_row").to_pylist(),
                strict=True,
            ):
                yield sequence_id, self._token_row(tokens_file, tokens_row, sequence_id, layer)

    def per_token_lengths(self) -> np.ndarray:
        """int64 [N], input order: rows of each id's per-token arrays (residues for ESM-2, BPE tokens for
        DNABERT), from the token files' `length` column (no vector is read)."""
        self._need_per_token()
        files = self._column("tokens_file", stored=True)
        rows = self._column("tokens_row", stored=True).astype(np.int64)
        lengths = np.zeros(len(rows), dtype=np.int64)
        names, which = np.unique(files, return_inverse=True) if len(files) else ([], np.zeros(0, np.int64))
        for k, name in enumerate(names):
            stored = np.flatnonzero(which == k)
            lengths[stored] = self._table(self.path / "tokens" / str(name)).column("length").to_numpy()[rows[stored]]
        return lengths[self._order]

    # --- input-order blocks (for exporters) -------------------------------------------------------------

    def iter_blocks(self, columns: list[str], block_rows: int = 8192) -> Iterator[pa.Table]:
        """The stored columns `columns` in input order, `block_rows` rows at a time. Memory: one block;
        each block takes its rows from the memory-mapped parts it touches."""
        for start in range(0, len(self), block_rows):
            yield self._take(self._order[start : start + block_rows], columns)

    def _take(self, stored: np.ndarray, columns: list[str]) -> pa.Table:
        """`columns` of the stored rows `stored` (indices into the parts concatenated), in that order.

        Vector columns are gathered with numpy straight from the memory-mapped parts into one block array
        (one copy); the small per-row columns with Arrow's take."""
        vector_names = set(self.columns.values())
        part_of = np.searchsorted(self._starts, stored, side="right") - 1
        by_part = np.argsort(part_of, kind="stable")
        back = np.empty_like(by_part)
        back[by_part] = np.arange(len(by_part))  # position in the block of each row, grouped by part
        meta = [c for c in columns if c not in vector_names]
        pieces = [self.schema.empty_table().select(meta)]
        vectors = {c: np.empty((len(stored), self.dim), np.float32) for c in columns if c in vector_names}
        for p in np.unique(part_of):
            rows = by_part[part_of[by_part] == p]  # block positions of this part's rows
            local = stored[rows] - self._starts[p]
            table = self._table(self._parts[p])
            pieces.append(table.select(meta).take(pa.array(local, pa.int64())))
            for name, out in vectors.items():
                chunk_starts = np.cumsum([0] + [len(c) for c in table.column(name).chunks])
                chunk_of = np.searchsorted(chunk_starts, local, side="right") - 1
                for k, chunk in enumerate(table.column(name).chunks):
                    mine = chunk_of == k
                    if mine.any():
                        out[rows[mine]] = self._vectors(chunk)[local[mine] - chunk_starts[k]]
        grouped = pa.concat_tables(pieces).combine_chunks()  # rows grouped by part
        block = grouped.take(pa.array(back, pa.int64())) if len(meta) else pa.table({})
        arrays = {c: block.column(c) for c in meta}
        arrays.update({c: self._fixed_list(v) for c, v in vectors.items()})
        return pa.table({c: arrays[c] for c in columns}) if columns else pa.table({})

    def per_token_at(self, tokens_file: str, tokens_row: int, sequence_id: str, layer: int) -> np.ndarray:
        """The per-token row a pooled row points at (its `tokens_file`, `tokens_row` columns), checked to
        be `sequence_id`'s; for readers that walk `iter_blocks`. A few token files stay mapped."""
        return self._token_row(tokens_file, tokens_row, sequence_id, layer)

    # --- internals ------------------------------------------------------------------------------------

    def _read_manifest(self) -> dict[str, Any]:
        path = self.path / "manifest.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise RunnerError(f"{self.path} has no manifest.json: not a runner output, or its job never started") from None
        except (OSError, ValueError) as e:
            raise RunnerError(f"cannot read {path} ({e})") from None

    def _common_schema(self) -> pa.Schema:
        schemas = {}
        for part in self._parts:
            schema = self._table(part).schema
            schemas.setdefault(schema, part)
        if len(schemas) > 1:
            (a, b) = list(schemas.values())[:2]
            raise RunnerError(
                f"{a.name} and {b.name} in {self.path / 'embeddings'} have different columns: the folder mixes "
                "outputs of different jobs; rerun with --overwrite"
            )
        if schemas:
            return next(iter(schemas))
        return pa.schema([])  # no row committed yet

    def _read_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Each part's first stored row, and every row's ordinal (parts in name order)."""
        starts, ordinals, total = [], [], 0
        for part in self._parts:
            column = self._table(part).column("ordinal")
            starts.append(total)
            total += len(column)
            ordinals.append(column.to_numpy())
        starts.append(total)
        return np.asarray(starts, dtype=np.int64), (
            np.concatenate(ordinals).astype(np.int64) if ordinals else np.zeros(0, np.int64)
        )

    def _part_starts(self) -> Iterator[tuple[Path, int]]:
        """Each part with the stored row it starts at."""
        for i, part in enumerate(self._parts):
            yield part, int(self._starts[i])

    def _table(self, part: Path) -> pa.Table:
        """A part (or token file) as a memory-mapped table; the file descriptor is closed at once (the
        mapping lives as long as the arrays that use it)."""
        table = self._cache.get(part)
        if table is not None:
            self._cache.move_to_end(part)
            return table
        try:
            with pa.memory_map(str(part)) as source:
                table = pa.ipc.open_file(source).read_all()
        except (OSError, pa.ArrowInvalid) as e:
            raise RunnerError(f"cannot read {part} ({e}): rerun the job to redo it") from None
        self._cache[part] = table
        if len(self._cache) > OPEN_PARTS:
            self._cache.popitem(last=False)
        return table

    def _column(self, name: str, stored: bool = False) -> np.ndarray:
        """A per-row column of every part, in storage order (`stored`) or input order; cached."""
        if name not in self._columns_cache:
            if self._parts and name not in self.schema.names:
                raise RunnerError(f"{self.path}'s parts have no {name!r} column")
            chunks = [self._table(p).column(name).to_numpy() for p in self._parts] if self._parts else []
            self._columns_cache[name] = np.concatenate(chunks) if chunks else np.zeros(0, object)
        values = self._columns_cache[name]
        return values if stored else values[self._order]

    def _ids_index(self) -> dict[str, int]:
        if self._id_index is None:
            self._id_index = {sequence_id: i for i, sequence_id in enumerate(self.ids)}
        return self._id_index

    def _vector_columns(self) -> dict[tuple[int, str], str]:
        """(layer, pooling) -> stored column, from the parts' schema (the manifest when nothing is stored)."""
        outputs = self.manifest.get("outputs") or {}
        names = self.schema.names
        if not names:  # nothing committed yet: what the manifest says the job stores
            layers = outputs.get("layers") or [self.manifest.get("layer")]
            poolings = outputs.get("poolings") or [self.manifest.get("pooling")]
            if len(layers) == 1 and len(poolings) == 1:
                return {(int(layers[0]), str(poolings[0])): SINGLE_COLUMN} if layers[0] is not None else {}
            return {(int(lay), str(p)): f"layer{lay}_{p}" for lay in layers for p in poolings}
        if SINGLE_COLUMN in names:
            layer = (outputs.get("layers") or [self.manifest.get("layer")])[0]
            pooling = (outputs.get("poolings") or [self.manifest.get("pooling")])[0]
            if layer is None or pooling is None:
                raise RunnerError(f"{self.path}/manifest.json does not say which layer and pooling were stored")
            return {(int(layer), str(pooling)): SINGLE_COLUMN}
        columns = {}
        for name in names:
            match = VECTOR_COLUMN.match(name)
            if match:
                columns[(int(match.group(1)), match.group(2))] = name
        if not columns:
            raise RunnerError(f"{self.path}'s parts hold no embedding column (columns: {', '.join(names)})")
        return columns

    def _dim(self) -> int:
        if self.columns and self.schema.names:
            return self.schema.field(next(iter(self.columns.values()))).type.list_size
        return int((self.manifest.get("model") or {}).get("embed_dim") or 0)

    def _per_token_info(self) -> tuple[list[int], np.dtype | None]:
        """Per-token layers and dtype: from a token file the parts point at (what is stored), else from the
        manifest (nothing committed yet)."""
        if self._parts and "tokens_file" not in self.schema.names:
            return [], None
        if not self._parts:
            per_token = (self.manifest.get("outputs") or {}).get("per_token") or {}
            layers = [int(layer) for layer in per_token.get("layers") or []]
            return layers, np.dtype(per_token.get("dtype", "float32")) if layers else None
        first = self._table(self._parts[0]).column("tokens_file")[0].as_py()
        schema = self._table(self.path / "tokens" / first).schema
        layers = sorted(int(m.group(1)) for m in map(TOKEN_COLUMN.match, schema.names) if m)
        if not layers:
            raise RunnerError(f"tokens/{first} holds no layer column: rerun the job with --overwrite")
        value_type = schema.field(f"layer{layers[0]}").type.value_type.value_type  # list<fixed_size_list<T>>
        return layers, np.dtype(value_type.to_pandas_dtype())

    def _need_per_token(self) -> list[int]:
        if not self.per_token_layers:
            raise RunnerError(f"{self.path} holds no per-token embeddings: embed with --per-token to store them")
        return self.per_token_layers

    def _pick_layer(self, layer: int | None, choices: list[int], what: str) -> int:
        """A requested layer, negatives counted from the end as in `--layers` (-1 = the last)."""
        if layer is None:
            if len(choices) != 1:
                raise RunnerError(f"the job has several {what}s: pass layer= one of {', '.join(map(str, choices))}")
            return choices[0]
        if layer < 0 and self.num_layers is not None:
            layer = self.num_layers + 1 + layer
        if layer not in choices:
            raise RunnerError(f"no {what} {layer} in the job: pass layer= one of {', '.join(map(str, choices))}")
        return layer

    def _one_chunk_in_order(self, name: str) -> bool:
        return (
            len(self._parts) == 1
            and self._table(self._parts[0]).column(name).num_chunks == 1
            and bool((self._order == np.arange(len(self))).all())
        )

    def _token_row(self, tokens_file: str, tokens_row: int, sequence_id: str, layer: int) -> np.ndarray:
        table = self._table(self.path / "tokens" / tokens_file)
        inside = 0 <= tokens_row < table.num_rows
        stored_id = table.column("id")[tokens_row].as_py() if inside else None
        # With --dedup a repeated sequence shares its first record's row, stored under that record's id;
        # otherwise the row must be the id's own (the pooled part's reference is the commit record: a
        # mismatch means the folder was edited).
        if not inside or (stored_id != sequence_id and not self._dedup):
            raise RunnerError(
                f"tokens/{tokens_file} row {tokens_row} is not {sequence_id!r}: the per-token files do not match "
                "the pooled parts; rerun the job with --overwrite"
            )
        return self._vectors(table.column(f"layer{layer}").slice(tokens_row, 1).chunk(0).flatten())

    @staticmethod
    def _vectors(column: pa.Array) -> np.ndarray:
        """A fixed_size_list<T>[D] array as a read-only [n, D] numpy view (no copy)."""
        dim = column.type.list_size
        values = column.flatten()  # respects the array's offset, unlike `.values`
        return values.to_numpy(zero_copy_only=True).reshape(-1, dim)

    @staticmethod
    def _fixed_list(vectors: np.ndarray) -> pa.FixedSizeListArray:
        flat = pa.array(np.ascontiguousarray(vectors).ravel())
        return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])

