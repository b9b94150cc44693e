"""The read API and exports on the multi-layer / multi-pooling / per-token layout of issue 15 (docs/outputs.md).

The folder is written here file by file to the spec (pooled parts with `layer{L}_{pooling}` columns and
`tokens_file`/`tokens_row`, per-token Arrow files under tokens/<shard>/), from fair-esm's own forward,
stored out of input order, with what a killed job leaves behind (a hidden part, an orphan token file).
No Ray: these run in seconds.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from conftest import DATA, fair_esm_extract

import runner
from runner.cli import cli
from runner.errors import RunnerError

LAYERS = [0, 1, 2]
POOLINGS = ["mean", "cls", "max"]


def pooled(rep: dict, layer: int, pooling: str) -> np.ndarray:
    tokens = rep["representations"][layer]
    return {"mean": rep["mean_representations"][layer], "cls": rep["bos_representations"][layer],
            "max": tokens.max(0).values}[pooling].numpy()


def write_job(out: Path, reference: dict[str, dict], dtype: str = "float32") -> None:
    """A complete job folder in the issue-15 layout holding `reference` (fair_esm_extract's output)."""
    ids = list(reference)
    dim = 64
    rng = np.random.default_rng(0)
    storage = rng.permutation(len(ids))  # completion order, not input order
    # Three packed batches (one token file each, two actor shards); batch boundaries cross the pooled parts.
    batches = [storage[:4], storage[4:11], storage[11:]]
    where: dict[int, tuple[str, int]] = {}
    for b, batch in enumerate(batches):
        name = f"actor-{b % 2}/tok-{uuid.uuid4().hex}.arrow"
        rows = list(batch[::-1])  # a batch's rows in another order than the pooled parts'
        columns = {
            "id": pa.array([ids[i] for i in rows]),
            "ordinal": pa.array(rows, pa.int64()),
            "length": pa.array([len(reference[ids[i]]["representations"][0]) for i in rows], pa.int32()),
        }
        for layer in LAYERS:
            arrays = [reference[ids[i]]["representations"][layer].numpy().astype(dtype) for i in rows]
            inner = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(arrays).ravel()), dim)
            offsets = pa.array(np.concatenate([[0], np.cumsum([len(a) for a in arrays])]), pa.int32())
            columns[f"layer{layer}"] = pa.ListArray.from_arrays(offsets, inner)
        path = out / "tokens" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with pa.ipc.new_file(str(path), pa.table(columns).schema) as writer:
            writer.write_table(pa.table(columns))
        for row, i in enumerate(rows):
            where[int(i)] = (name, row)
    # What a killed job leaves: a token file no complete part references, a hidden half-written part.
    (out / "tokens" / "actor-1" / f"tok-{uuid.uuid4().hex}.arrow").write_bytes(b"orphan of a killed run")
    (out / "embeddings").mkdir()
    (out / "embeddings" / ".part-00002.arrow.tmp").write_bytes(b"half written")
    columns_of = {(layer, p): f"layer{layer}_{p}" for layer in LAYERS for p in POOLINGS}
    for part, chunk in enumerate((storage[:9], storage[9:])):
        table = {
            "id": pa.array([ids[i] for i in chunk]),
            "length": pa.array([len(reference[ids[i]]["representations"][0]) for i in chunk], pa.int32()),
            "truncated": pa.array([False] * len(chunk)),
            "ordinal": pa.array(chunk, pa.int64()),
            "windows": pa.array([1] * len(chunk), pa.int32()),
        }
        for (layer, p), name in columns_of.items():
            flat = np.stack([pooled(reference[ids[i]], layer, p) for i in chunk]).astype(np.float32).ravel()
            table[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)
        table["tokens_file"] = pa.array([where[int(i)][0] for i in chunk])
        table["tokens_row"] = pa.array([where[int(i)][1] for i in chunk], pa.int32())
        t = pa.table(table)
        with pa.ipc.new_file(str(out / "embeddings" / f"part-{part:05d}.arrow"), t.schema) as writer:
            for batch in t.to_batches(max_chunksize=4):  # several record batches per part, as the sink writes
                writer.write_batch(batch)
    manifest = {
        "status": "complete",
        "model": {"name": "esm2_tiny.pt", "family": "esm2", "embed_dim": dim, "num_layers": 2},
        "outputs": {"layers": LAYERS, "poolings": POOLINGS, "columns": {f"{k[0]}/{k[1]}": v for k, v in columns_of.items()},
                    "per_token": {"dtype": dtype, "layers": LAYERS, "files": 3, "bytes": 0}},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def reference(tiny_esm2_path: Path) -> dict[str, dict]:
    return fair_esm_extract(tiny_esm2_path, DATA / "some_proteins.fasta", LAYERS)


@pytest.fixture(scope="module", params=["float32", "float16"])
def job(request, tmp_path_factory: pytest.TempPathFactory, reference: dict[str, dict]) -> Path:
    out = tmp_path_factory.mktemp(f"layout-{request.param}") / "emb"
    out.mkdir()
    write_job(out, reference, request.param)
    return out


def test_every_layer_pooling_and_per_token_array(job: Path, reference: dict[str, dict]) -> None:
    results = runner.open(job)
    dtype = np.dtype(results.manifest["outputs"]["per_token"]["dtype"])
    assert results.ids == list(reference) and len(results) == 15
    assert (results.layers, results.poolings, results.per_token_layers, results.per_token_dtype) == (LAYERS, POOLINGS, LAYERS, dtype)
    assert results.rows.column_names == ["id", "ordinal", "length", "truncated", "windows", "tokens_file", "tokens_row"]
    for layer in LAYERS:
        for p in POOLINGS:
            expected = np.stack([pooled(reference[sid], layer, p) for sid in results.ids])
            np.testing.assert_array_equal(results.pooled(layer, p), expected)
        for sid in results.ids:
            got = results.per_token(sid, layer)
            assert got.dtype == dtype and got.shape == reference[sid]["representations"][layer].shape
            np.testing.assert_array_equal(got, reference[sid]["representations"][layer].numpy().astype(dtype))
    np.testing.assert_array_equal(results.pooled(-1, "bos"), results.pooled(2, "cls"))  # fair-esm's name, -1 = last
    assert results.per_token_lengths().tolist() == [len(reference[sid]["representations"][0]) for sid in results.ids]
    streamed = list(results.iter_per_token(layer=1))
    assert sorted(sid for sid, _ in streamed) == sorted(reference)  # each id once, orphans never seen
    for sid, array in streamed:
        np.testing.assert_array_equal(array, results.per_token(sid, 1))


def test_ambiguous_layer_or_pooling_names_the_choices(job: Path) -> None:
    results = runner.open(job)
    with pytest.raises(RunnerError, match="several pooled layers: pass layer= one of 0, 1, 2"):
        results.pooled()
    with pytest.raises(RunnerError, match="several poolings: pass pooling= one of mean, cls, max"):
        results.pooled(layer=2)
    with pytest.raises(RunnerError, match="several per-token layers: pass layer= one of 0, 1, 2"):
        results.per_token(results.ids[0])
    with pytest.raises(RunnerError, match="no pooled layer 3 in the job"):
        results.pooled(3, "mean")
    with pytest.raises(RunnerError, match="no id 'nope'"):
        results.per_token("nope", 0)


def test_a_stale_token_reference_is_an_error(job: Path, tmp_path: Path) -> None:
    """A per-token row is trusted only when it is the id the pooled part says it is."""
    import shutil

    copy = tmp_path / "emb"
    shutil.copytree(job, copy)
    results = runner.open(copy)
    sid = results.ids[0]
    token_file = copy / "tokens" / str(results.rows.column("tokens_file")[0])
    table = pa.ipc.open_file(token_file).read_all()
    rotated = table.take(pa.array([*range(1, table.num_rows), 0]))  # every row moves: the references are stale
    with pa.ipc.new_file(str(token_file), table.schema) as writer:
        writer.write_table(rotated)
    with pytest.raises(RunnerError, match=f"row .* is not '{sid}'"):
        runner.open(copy).per_token(sid, 0)
    # With --dedup, a repeated sequence's row points at its first record's per-token row (another id): allowed.
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "settings": {"dedup": True}}))
    row = results.rows.column("tokens_row")[0].as_py()
    np.testing.assert_array_equal(runner.open(copy).per_token(sid, 0), results._vectors(
        rotated.column("layer0").slice(row, 1).chunk(0).flatten()))


def test_exports_hold_every_layer_pooling_and_per_token_array(job: Path, tmp_path: Path, reference: dict[str, dict]) -> None:
    import h5py
    import pyarrow.parquet as pq

    results = runner.open(job)
    dtype = results.per_token_dtype
    for fmt in ("parquet", "npz", "hdf5"):
        result = CliRunner().invoke(cli, ["export", str(job), "--format", fmt, "--to", str(tmp_path / f"e.{fmt}")])
        assert result.exit_code == 0, result.output
    assert "per-token vectors are not in the parquet file" in CliRunner().invoke(
        cli, ["export", str(job), "--format", "parquet", "--to", str(tmp_path / "f.parquet")]).output
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column("id").to_pylist() == results.ids
    npz = np.load(tmp_path / "e.npz")
    with h5py.File(tmp_path / "e.hdf5") as h5:
        for layer in LAYERS:
            for p in POOLINGS:
                name = f"layer{layer}_{p}"
                expected = results.pooled(layer, p)
                np.testing.assert_array_equal(np.stack(table.column(name).to_pylist()).astype(np.float32), expected)
                np.testing.assert_array_equal(npz[name], expected)
                np.testing.assert_array_equal(h5[name][:], expected)
            for stored in (npz, h5):
                offsets = stored["per_token_offsets"][:]
                tokens = stored[f"per_token_layer{layer}"]
                assert tokens.dtype == dtype and offsets[-1] == sum(results.rows.column("length").to_pylist())
                for i, sid in enumerate(results.ids):
                    np.testing.assert_array_equal(tokens[offsets[i] : offsets[i + 1]], results.per_token(sid, layer))


def test_fair_esm_export_equals_extract_py(job: Path, tmp_path: Path, reference: dict[str, dict]) -> None:
    """`--format fair-esm` = extract.py `--repr_layers 0 1 2 --include mean per_tok bos`: the same files,
    keys in the same order, layer keys, float32 tensors; max (no fair-esm name) left out with a note."""
    result = CliRunner().invoke(cli, ["export", str(job), "--format", "fair-esm", "--to", str(tmp_path / "esm")])
    assert result.exit_code == 0 and "pooling max left out" in result.output, result.output
    assert sorted(p.name for p in (tmp_path / "esm").iterdir()) == sorted(f"{label}.pt" for label in reference)
    float16 = runner.open(job).per_token_dtype == np.float16
    worst = 0.0
    for label, expected in reference.items():
        got = torch.load(tmp_path / "esm" / f"{label}.pt", weights_only=True)
        assert list(got) == ["label", "representations", "mean_representations", "bos_representations"]
        assert got["label"] == label
        for key in ("representations", "mean_representations", "bos_representations"):
            assert list(got[key]) == LAYERS
            for layer in LAYERS:
                a, b = got[key][layer], expected[key][layer]
                assert a.dtype == torch.float32 and a.shape == b.shape
                assert a.untyped_storage().nbytes() == a.numel() * 4  # no file carries a larger array's storage
                if key == "representations" and float16:
                    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-3)  # stored as float16
                    continue
                worst = max(worst, float((a - b).abs().max()))
    assert worst == 0.0  # the stored numbers are extract.py's own: the export adds nothing
