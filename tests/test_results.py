"""Reading results back (`runner.open`) and `runner export`, on real `runner embed` outputs (CPU, tiny ESM-2)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import DATA, fair_esm_extract, invoke, read_fasta, running_ray

import runner
from runner.cli import EXPORT_FORMATS
from runner.config import EmbedConfig
from runner.errors import RunnerError
from runner.output.export import FORMATS
from runner.output.results import IncompleteResultsWarning


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module: `runner embed` reuses a Ray this process already started."""
    with running_ray(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_esm2_path: Path) -> Path:
    """`runner embed` of the 15 real proteins, 4 rows per part (so input order spans parts)."""
    out = tmp_path_factory.mktemp("job") / "emb"
    code, output = invoke("embed", str(DATA / "some_proteins.fasta"), "--model", str(tiny_esm2_path), "--out", str(out),
                          "--gpus", "0", "--rows-per-part", "4", "--no-progress")
    assert code == 0, output
    return out


def stored_rows(out: Path) -> dict[str, dict]:
    """Every stored row by id, read straight from the parts (the reader under test is not used)."""
    rows = {}
    for part in sorted((out / "embeddings").glob("part-*.arrow")):
        for row in pa.ipc.open_file(part).read_all().to_pylist():
            rows[row["id"]] = row
    return rows


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- the Python API on a real job -----------------------------------------------------------------------


def test_open_reads_a_real_job_in_input_order(job: Path) -> None:
    expected_ids = [sid for sid, _ in read_fasta(DATA / "some_proteins.fasta")]
    stored = stored_rows(job)
    results = runner.open(job)
    assert len(results) == 15 and results.ids == expected_ids  # ordinal order, not storage order
    assert len(list((job / "embeddings").glob("part-*.arrow"))) == 4
    assert (results.layers, results.poolings, results.dim) == ([2], ["mean"], 64)
    assert results.status == "complete" and results.model == str(results.manifest["model"]["name"])
    assert not results.has_per_token and results.per_token_dtype is None
    assert "rows=15" in repr(results) and "poolings=['mean']" in repr(results)
    vectors = results.pooled()
    assert vectors.dtype == np.float32 and vectors.shape == (15, 64)
    for i, sid in enumerate(expected_ids):
        np.testing.assert_array_equal(vectors[i], np.asarray(stored[sid]["embedding"], dtype=np.float32))
    np.testing.assert_array_equal(results.pooled(layer=-1, pooling="mean"), vectors)  # -1 = the last layer
    rows = results.rows.to_pydict()
    assert rows["id"] == expected_ids and rows["ordinal"] == list(range(15))
    assert rows["length"] == [len(s) for _, s in read_fasta(DATA / "some_proteins.fasta")]
    assert rows["truncated"] == [stored[sid]["truncated"] for sid in expected_ids]
    frame = results.to_pandas()
    assert list(frame["id"]) == expected_ids
    np.testing.assert_array_equal(np.stack(frame["embedding"].to_list()), vectors)
    table = results.to_arrow()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 64) and table.column("id").to_pylist() == expected_ids
    streamed = {sid: v for ids, block in results.iter_pooled() for sid, v in zip(ids, block, strict=True)}
    assert sorted(streamed) == sorted(expected_ids)
    for i, sid in enumerate(expected_ids):
        np.testing.assert_array_equal(streamed[sid], vectors[i])
    assert expected_ids[3] in results and "nope" not in results
    some = [expected_ids[9], expected_ids[0], expected_ids[14], expected_ids[9]]
    np.testing.assert_array_equal(results.pooled(ids=some), vectors[[9, 0, 14, 9]])  # any ids, in the order asked
    with pytest.raises(RunnerError, match="1 id\\(s\\) not in .* e.g. 'nope'"):
        results.pooled(ids=["nope"])


def test_pooled_fills_a_given_array_and_checks_its_shape(job: Path, tmp_path: Path) -> None:
    results = runner.open(job)
    on_disk = np.lib.format.open_memmap(tmp_path / "pooled.npy", mode="w+", dtype=np.float32, shape=(15, 64))
    assert results.pooled(out=on_disk) is on_disk
    on_disk.flush()
    np.testing.assert_array_equal(np.load(tmp_path / "pooled.npy"), results.pooled())
    with pytest.raises(RunnerError, match=r"shape \(3, 64\)"):
        results.pooled(out=np.empty((3, 64), np.float32))


def test_wrong_layer_pooling_or_per_token_are_clear_errors(job: Path) -> None:
    results = runner.open(job)
    with pytest.raises(RunnerError, match="no pooled layer 1 in the job: pass layer= one of 2"):
        results.pooled(layer=1)
    with pytest.raises(RunnerError, match=r"no pooling 'cls' at layer 2: the job stored \(layer/pooling\) 2/mean"):
        results.pooled(pooling="cls")
    with pytest.raises(RunnerError, match="no per-token embeddings: embed with --per-token"):
        results.per_token(results.ids[0])
    with pytest.raises(RunnerError, match="no per-token embeddings"):
        next(results.iter_per_token())


def test_open_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(RunnerError, match="does not exist"):
        runner.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunnerError, match="not a runner output"):
        runner.open(tmp_path / "empty")


def test_an_incomplete_job_is_readable_with_a_warning(job: Path, tmp_path: Path) -> None:
    """An interrupted job: the rows of its complete parts, a warning naming the status; a half-written
    (hidden) part is never read."""
    copy = tmp_path / "emb"
    shutil.copytree(job, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["status"] = "interrupted"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    last = sorted((copy / "embeddings").glob("part-*.arrow"))[-1]
    kept_out = set(pa.ipc.open_file(last).read_all().column("id").to_pylist())
    last.rename(last.with_name(f".{last.name}.tmp"))  # as a killed job leaves its open part
    with pytest.warns(IncompleteResultsWarning, match="status is 'interrupted'.*reading the 12 rows"):
        results = runner.open(copy)
    assert len(results) == 12 and not kept_out & set(results.ids)
    all_ids = runner.open(job).ids
    assert results.ids == [sid for sid in all_ids if sid not in kept_out]


@pytest.mark.slow  # two embedding jobs
def test_multi_model_job_picks_a_model(tmp_path: Path, tiny_esm2_path: Path, tiny_esm2_script) -> None:
    other = tiny_esm2_script.make_esm2(tmp_path / "ckpt" / "esm2_other.pt", seed=1)
    out = tmp_path / "multi"
    code, output = invoke("embed", str(DATA / "few_proteins.fasta"), "--model", str(tiny_esm2_path), "--model", str(other),
                          "--out", str(out), "--gpus", "0", "--no-progress")
    assert code == 0, output
    with pytest.raises(RunnerError, match="holds the outputs of 2 models: pass model= one of 'esm2_other', 'esm2_tiny'"):
        runner.open(out)
    with pytest.raises(RunnerError, match="no model 'esm2_t6_8M_UR50D' in"):
        runner.open(out, model="esm2_t6_8M_UR50D")
    by_path = runner.open(out, model=str(other))  # the name given to --model
    by_folder = runner.open(out / "esm2_other")
    assert by_path.path == by_folder.path == out / "esm2_other"
    np.testing.assert_array_equal(by_path.pooled(), by_folder.pooled())
    tiny = runner.open(out, model="esm2_tiny")
    assert tiny.ids == by_path.ids == [sid for sid, _ in read_fasta(DATA / "few_proteins.fasta")]
    assert not np.allclose(tiny.pooled(), by_path.pooled())  # two models, two sets of vectors
    with pytest.raises(RunnerError, match="holds the output of model"):
        runner.open(out / "esm2_tiny", model=str(other))
    code, output = invoke("export", str(out), "--format", "npz", "--to", str(tmp_path / "x.npz"))
    assert code == 1 and "pass model= one of" in output and "Traceback" not in output
    code, output = invoke("export", str(out), "--model", "esm2_other", "--format", "npz", "--to", str(tmp_path / "x.npz"))
    assert code == 0, output
    np.testing.assert_array_equal(np.load(tmp_path / "x.npz")["embedding"], by_path.pooled())


# --- export ---------------------------------------------------------------------------------------------


def test_cli_formats_are_the_library_formats() -> None:
    assert EXPORT_FORMATS == FORMATS


def test_export_round_trips(job: Path, tmp_path: Path) -> None:
    import h5py
    import pyarrow.parquet as pq

    results = runner.open(job)
    ids, vectors, rows = results.ids, results.pooled(), results.rows.to_pydict()
    for fmt, name in (("parquet", "e.parquet"), ("npz", "e.npz"), ("hdf5", "e.h5")):
        code, output = invoke("export", str(job), "--format", fmt, "--to", str(tmp_path / name))
        assert code == 0 and f"15 rows -> {tmp_path / name} ({fmt}" in output, output
        assert not list(tmp_path.glob(".*tmp"))
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column_names == ["id", "ordinal", "length", "truncated", "windows", "embedding"]
    assert table.column("id").to_pylist() == ids and table.column("length").to_pylist() == rows["length"]
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_pylist()).astype(np.float32), vectors)
    assert json.loads(table.schema.metadata[b"runner"])["columns"] == {"embedding": {"layer": 2, "pooling": "mean"}}
    npz = np.load(tmp_path / "e.npz")
    assert npz["id"].tolist() == ids and npz["ordinal"].tolist() == rows["ordinal"]
    assert npz["truncated"].tolist() == rows["truncated"] and npz["embedding"].dtype == np.float32
    np.testing.assert_array_equal(npz["embedding"], vectors)
    with h5py.File(tmp_path / "e.h5") as f:
        assert [s.decode() for s in f["id"][:]] == ids and f["length"][:].tolist() == rows["length"]
        np.testing.assert_array_equal(f["embedding"][:], vectors)
        assert json.loads(f.attrs["runner"])["layers"] == [2]
    code, output = invoke("export", str(job), "--format", "npz", "--to", str(tmp_path / "e.npz"))
    assert code == 1 and "exists: pass --overwrite" in output
    assert invoke("export", str(job), "--format", "npz", "--to", str(tmp_path / "e.npz"), "--overwrite")[0] == 0


def test_fair_esm_export_equals_extract_py(job: Path, tmp_path: Path, tiny_esm2_path: Path) -> None:
    """`--format fair-esm` of a one-layer mean job: the files extract.py writes with `--repr_layers 2
    --include mean` for the same sequences (keys, label, layer keys, shapes; values to FP32 accuracy)."""
    code, output = invoke("export", str(job), "--format", "fair-esm", "--to", str(tmp_path / "esm"))
    assert code == 0 and "one file per sequence (15 files)" in output, output
    reference = fair_esm_extract(tiny_esm2_path, DATA / "some_proteins.fasta", [2])
    assert sorted(p.name for p in (tmp_path / "esm").iterdir()) == sorted(f"{label}.pt" for label in reference)
    worst = 0.0
    for label, expected in reference.items():
        got = torch.load(tmp_path / "esm" / f"{label}.pt", weights_only=True)
        assert list(got) == ["label", "mean_representations"] and got["label"] == label
        assert list(got["mean_representations"]) == [2]
        mean, ref = got["mean_representations"][2], expected["mean_representations"][2]
        assert mean.dtype == torch.float32 and mean.shape == ref.shape == (64,)
        assert cosine(mean.numpy(), ref.numpy()) >= 0.9999, label
        worst = max(worst, float((mean - ref).abs().max()))
    assert worst < 1e-4  # measured 1.4e-6 (cosine >= 0.9999998): packed varlen forward vs fair-esm padded
    code, output = invoke("export", str(job), "--format", "fair-esm", "--to", str(tmp_path / "esm"))
    assert code == 1 and "is not empty: pass --overwrite" in output


def test_export_of_an_empty_interrupted_job(job: Path, tmp_path: Path) -> None:
    """No part committed yet: every format writes an empty result with the job's columns."""
    empty = tmp_path / "emb"
    empty.mkdir()
    manifest = json.loads((job / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    (empty / "embeddings").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteResultsWarning)
        results = runner.open(empty)
        assert len(results) == 0 and results.pooled().shape == (0, 64) and results.ids == []
        import pyarrow.parquet as pq

        for fmt in ("parquet", "npz", "hdf5"):
            assert invoke("export", str(empty), "--format", fmt, "--to", str(tmp_path / f"e.{fmt}"))[0] == 0
    assert pq.read_table(tmp_path / "e.parquet").column_names == ["id", "ordinal", "length", "truncated", "embedding"]
    assert np.load(tmp_path / "e.npz")["embedding"].shape == (0, 64)


@pytest.mark.slow  # one embedding job with three layers, three poolings and per-token output
@pytest.mark.skipif(not any(f.name == "per_token" for f in dataclasses.fields(EmbedConfig)),
                    reason="runner embed --layers/--pooling lists/--per-token not on this branch yet (issue 15)")
def test_layers_poolings_and_per_token_of_a_real_job(tmp_path: Path, tiny_esm2_path: Path) -> None:
    """`runner embed --layers 0,1,2 --pooling mean,cls,max --per-token`, read back and exported as fair-esm,
    against what fair-esm's extract.py computes (`--repr_layers 0 1 2 --include mean per_tok bos`)."""
    out = tmp_path / "emb"
    code, output = invoke("embed", str(DATA / "some_proteins.fasta"), "--model", str(tiny_esm2_path), "--out", str(out),
                          "--gpus", "0", "--layers", "0,1,2", "--pooling", "mean,cls,max", "--per-token",
                          "--rows-per-part", "4", "--no-progress")
    assert code == 0, output
    reference = fair_esm_extract(tiny_esm2_path, DATA / "some_proteins.fasta", [0, 1, 2])
    results = runner.open(out)
    assert results.ids == list(reference)
    assert (results.layers, results.poolings, results.per_token_layers) == ([0, 1, 2], ["mean", "cls", "max"], [0, 1, 2])
    assert results.per_token_dtype == np.float32
    worst = 0.0
    for layer in (0, 1, 2):
        tokens = {sid: reference[sid]["representations"][layer].numpy() for sid in results.ids}
        expected = {
            "mean": np.stack([reference[sid]["mean_representations"][layer].numpy() for sid in results.ids]),
            "cls": np.stack([reference[sid]["bos_representations"][layer].numpy() for sid in results.ids]),
            "max": np.stack([tokens[sid].max(0) for sid in results.ids]),
        }
        for pooling, want in expected.items():
            got = results.pooled(layer, pooling)
            assert min(cosine(a, b) for a, b in zip(got, want, strict=True)) >= 0.9999, (layer, pooling)
            worst = max(worst, float(np.abs(got - want).max()))
        for sid in results.ids:
            got = results.per_token(sid, layer)
            assert got.shape == tokens[sid].shape
            worst = max(worst, float(np.abs(got - tokens[sid]).max()))
    assert worst < 1e-4  # measured 1.6e-6
    code, output = invoke("export", str(out), "--format", "fair-esm", "--to", str(tmp_path / "esm"))
    assert code == 0 and "pooling max left out" in output, output
    for label, expected in reference.items():
        got = torch.load(tmp_path / "esm" / f"{label}.pt", weights_only=True)
        assert list(got) == list(expected) == ["label", "representations", "mean_representations", "bos_representations"]
        assert got["label"] == label
        for key in ("representations", "mean_representations", "bos_representations"):
            assert list(got[key]) == [0, 1, 2]
            for layer in (0, 1, 2):
                a, b = got[key][layer], expected[key][layer]
                assert a.dtype == torch.float32 and a.shape == b.shape
                assert cosine(a.reshape(-1).numpy(), b.reshape(-1).numpy()) >= 0.9999
                assert float((a - b).abs().max()) < 1e-4
    code, output = invoke("export", str(out), "--format", "hdf5", "--to", str(tmp_path / "e.h5"))
    assert code == 0, output
    import h5py

    with h5py.File(tmp_path / "e.h5") as f:
        offsets = f["per_token_offsets"][:]
        for i, sid in enumerate(results.ids):
            np.testing.assert_array_equal(f["per_token_layer2"][offsets[i] : offsets[i + 1]], results.per_token(sid, 2))
        np.testing.assert_array_equal(f["layer1_max"][:], results.pooled(1, "max"))
