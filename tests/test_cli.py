"""`runner embed` end to end through a local Ray on CPU (`--gpus 0`), as a user runs it."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import invoke

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module: `runner embed` reuses a Ray this process already started."""
    import ray

    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20)
    yield
    ray.shutdown()


def read_fasta(path: Path) -> list[tuple[str, str]]:
    out, name, seq = [], None, []
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            if name:
                out.append((name, "".join(seq)))
            name, seq = line[1:].split()[0], []
        elif line.strip():
            seq.append(line.strip())
    if name:
        out.append((name, "".join(seq)))
    return out


def read_parts(out: Path) -> pa.Table:
    parts = sorted((out / "embeddings").glob("part-*.arrow"))
    tables = [pa.ipc.open_file(p).read_all() for p in parts]
    return pa.concat_tables(tables)


def vectors(table: pa.Table) -> np.ndarray:
    dim = table.schema.field("embedding").type.list_size
    return table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)


def fair_esm_reference(checkpoint: Path, seqs: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Mean-pooled last layer (BOS/EOS excluded) from fair-esm's own padded forward, FP32."""
    from runner.models.esm2 import load_esm2

    model = load_esm2(str(checkpoint)).esm.eval()
    import esm

    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    _, _, tokens = alphabet.get_batch_converter()(seqs)
    with torch.inference_mode():
        rep = model(tokens, repr_layers=[model.num_layers])["representations"][model.num_layers]
    return {sid: rep[i, 1 : len(s) + 1].mean(0).numpy() for i, (sid, s) in enumerate(seqs)}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_embed_end_to_end_matches_fair_esm(tmp_path: Path, tiny_esm2_path: Path) -> None:
    out = tmp_path / "emb"
    code, output = invoke(
        "embed", str(DATA / "some_proteins.fasta"), str(DATA / "few_proteins.fasta"),
        "--model", str(tiny_esm2_path), "--out", str(out), "--gpus", "0", "--rows-per-part", "7",
    )
    assert code == 0, output
    table = read_parts(out)
    expected = read_fasta(DATA / "some_proteins.fasta")
    repeated = read_fasta(DATA / "few_proteins.fasta")  # the same ids again: rejected as duplicates
    assert {sid for sid, _ in repeated} <= {sid for sid, _ in expected}
    assert sorted(table.column("id").to_pylist()) == sorted(sid for sid, _ in expected)
    rejects = pa.ipc.open_file(out / "rejects.arrow").read_all().to_pydict()
    assert sorted(rejects["id"]) == sorted(sid for sid, _ in repeated)
    assert all("duplicate id (first seen in" in r and "some_proteins.fasta" in r for r in rejects["reason"])
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert table.schema.field("length").type == pa.int32()
    assert len(list((out / "embeddings").glob("part-*.arrow"))) == 3  # 15 rows, 7 per part
    assert not list((out / "embeddings").glob(".*tmp"))
    ref = fair_esm_reference(tiny_esm2_path, expected)
    got = dict(zip(table.column("id").to_pylist(), vectors(table), strict=True))
    lengths = dict(zip(table.column("id").to_pylist(), table.column("length").to_pylist(), strict=True))
    for sid, seq in expected:
        assert cosine(got[sid], ref[sid]) >= 0.9999, sid
        assert lengths[sid] == len(seq)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"]["rows"] == 15 and manifest["counts"]["rejects"] == 3
    assert manifest["counts"]["records_read"] == 18
    assert manifest["precision"] == "fp32" and manifest["attention_backend"] == ["exact"]
    assert manifest["pooling"] == "mean"
    assert len(manifest["model"]["checkpoint_sha256"]) == 64
    for name in ("runner", "torch", "ray", "fair-esm"):
        assert manifest["versions"][name]
    assert manifest["throughput"]["tokens"] == sum(len(s) + 2 for _, s in expected)
    assert 0 < manifest["throughput"]["packing_efficiency"] <= 1
    assert 0 < manifest["throughput"]["first_output_seconds"] < manifest["throughput"]["wall_seconds"]
    # The one CPU actor's own clock accounts for every batch and token of the job.
    thr = manifest["throughput"]
    assert list(thr["actors"]) == list(thr["windows_per_worker"])  # one actor, the one that embedded the windows
    (actor,) = thr["actors"].values()
    # Where Ray placed the actor (the GCS actor table): the local Ray's one node, the node its worker name carries.
    (node,) = manifest["cluster"]["nodes"]
    assert manifest["cluster"]["actors_per_node"] == {node: 1}
    assert node.split()[0] == next(iter(thr["actors"])).rsplit("@", 1)[1]
    assert thr["batches"] >= 2 and (actor["batches"], actor["tokens"]) == (thr["batches"], thr["tokens"])
    assert 0 < actor["busy_seconds"] <= actor["span_seconds"] <= thr["wall_seconds"]
    assert 0 < actor["busy_fraction"] <= 1
    assert 0 < actor["steady_tokens_per_second"] == thr["actor_steady_tokens_per_second"]
    assert 0 < actor["forward_tokens_per_second"] == thr["forward_tokens_per_second"]
    assert actor["busy_fraction"] == thr["actor_busy_fraction"]
    assert manifest["shadow"]["compared"] == 0 and thr["with_shadow"] is None  # the 1 % sample holds none of these ids


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_embed_with_compiled_layers(tmp_path: Path, tiny_esm2_path: Path) -> None:
    """--compile (the GPU default) through the whole job: the actor compiles in its constructor and the
    embeddings still match fair-esm; the manifest says the layers ran compiled."""
    out = tmp_path / "emb"
    code, output = invoke("embed", str(DATA / "some_proteins.fasta"), "--model", str(tiny_esm2_path),
                          "--out", str(out), "--gpus", "0", "--compile", "--shadow-rate", "0")
    assert code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["attention_backend"] == ["exact+compile"]
    assert manifest["settings"]["compile_layers"] is True
    assert manifest["throughput"]["with_shadow"] is None  # no shadow, no window with it running
    expected = read_fasta(DATA / "some_proteins.fasta")
    ref = fair_esm_reference(tiny_esm2_path, expected)
    table = read_parts(out)
    got = dict(zip(table.column("id").to_pylist(), vectors(table), strict=True))
    assert min(cosine(got[sid], ref[sid]) for sid, _ in expected) >= 0.9999


def test_rejects_and_accounting(tmp_path: Path, tiny_esm2_path: Path) -> None:
    fasta = tmp_path / "mixed.fasta"
    fasta.write_text(
        ">good1\nMKTAYIAKQR\n>empty\n\n>bad chars\nMKT123J\n>good1\nMKTAYIAKQQ\n"
        ">long\n" + "A" * 40 + "\n>star\nMKVLA*\n"
    )
    out = tmp_path / "emb"
    code, output = invoke("embed", str(fasta), "--model", str(tiny_esm2_path), "--out", str(out),
                          "--gpus", "0", "--max-residues", "30", "--long", "skip")
    assert code == 0, output
    rejects = pa.ipc.open_file(out / "rejects.arrow").read_all().to_pydict()
    reasons = dict(zip(rejects["id"], rejects["reason"], strict=True))
    assert set(reasons) == {"empty", "bad", "good1", "long"}
    assert "empty" in reasons["empty"]
    assert "123J" in reasons["bad"] or "1" in reasons["bad"]
    assert "duplicate" in reasons["good1"]
    assert "30" in reasons["long"]
    assert rejects["source"] == [str(fasta)] * 4
    table = read_parts(out)
    assert sorted(table.column("id").to_pylist()) == ["good1", "star"]
    star = table.filter(pa.compute.equal(table.column("id"), "star"))
    assert star.column("length").to_pylist() == [5]  # one trailing '*' dropped
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["rows"] + manifest["counts"]["rejects"] == manifest["counts"]["records_read"] == 6


def test_strict_fails_before_work(tmp_path: Path, tiny_esm2_path: Path) -> None:
    fasta = tmp_path / "bad.fasta"
    fasta.write_text(">a\nMKT\n>b\nMK1\n")
    out = tmp_path / "emb"
    code, output = invoke("embed", str(fasta), "--model", str(tiny_esm2_path), "--out", str(out),
                          "--gpus", "0", "--strict")
    assert code != 0
    assert "--strict" in output and "b (" in output
    assert "Traceback" not in output
    assert not (out / "embeddings").exists()


def test_truncate_and_chunk(tmp_path: Path, tiny_esm2_path: Path) -> None:
    seq = read_fasta(DATA / "some_proteins.fasta")[0][1]  # a real protein, longer than 60
    assert len(seq) > 60
    fasta = tmp_path / "one.fasta"
    fasta.write_text(f">p\n{seq}\n")
    trunc, chunk = tmp_path / "t", tmp_path / "c"
    assert invoke("embed", str(fasta), "--model", str(tiny_esm2_path), "--out", str(trunc), "--gpus", "0",
                  "--max-residues", "60")[0] == 0
    assert invoke("embed", str(fasta), "--model", str(tiny_esm2_path), "--out", str(chunk), "--gpus", "0",
                  "--max-residues", "60", "--long", "chunk", "--chunk-overlap", "20")[0] == 0
    t, c = read_parts(trunc), read_parts(chunk)
    assert t.column("truncated").to_pylist() == [True] and t.column("length").to_pylist() == [60]
    assert c.column("truncated").to_pylist() == [False] and c.column("length").to_pylist() == [len(seq)]
    ref_trunc = fair_esm_reference(tiny_esm2_path, [("p", seq[:60])])["p"]
    assert cosine(vectors(t)[0], ref_trunc) >= 0.9999
    # Chunk: residue-weighted mean of the windows, each embedded on its own by fair-esm.
    starts = list(range(0, len(seq) - 60, 40)) + [len(seq) - 60]
    windows = [(f"w{i}", seq[s : s + 60]) for i, s in enumerate(starts)]
    ref = fair_esm_reference(tiny_esm2_path, windows)
    expected = sum(ref[w] * len(s) for w, s in windows) / sum(len(s) for _, s in windows)
    assert cosine(vectors(c)[0], expected) >= 0.9999


def test_nonfinite_aborts_and_names_sequence(tmp_path: Path, overflow_esm2_path: Path) -> None:
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">fine1\nMKTAYIAKQR\n>boom\nMKTWAYIAK\n>fine2\nMKVLAAGIV\n")
    out = tmp_path / "emb"
    code, output = invoke("embed", str(fasta), "--model", str(overflow_esm2_path), "--out", str(out),
                          "--gpus", "0", "--rows-per-part", "1")
    assert code == 3, output
    assert "boom" in output and "--precision fp32" in output and "fp32" in output
    assert "Traceback" not in output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "aborted"
    for part in (out / "embeddings").glob("part-*.arrow"):
        table = pa.ipc.open_file(part).read_all()
        assert np.isfinite(vectors(table)).all()
        assert "boom" not in table.column("id").to_pylist()


@pytest.mark.parametrize(
    "make_args, expected",
    [
        (lambda d, m: ["embed", str(d / "nope.fasta"), "--model", m, "--out", str(d / "o"), "--gpus", "0"],
         "not found"),
        (lambda d, m: ["embed", str(DATA / "few_proteins.fasta"), "--model", "esm2_t99_nonsense", "--out",
                       str(d / "o"), "--gpus", "0"], "esm2_t33_650M_UR50D"),
        (lambda d, m: ["embed", str(DATA / "few_proteins.fasta"), "--model", str(d / "missing.pt"), "--out",
                       str(d / "o"), "--gpus", "0"], "missing.pt"),
        (lambda d, m: ["embed", str(DATA / "few_proteins.fasta"), "--model", m, "--out", str(d / "o"),
                       "--gpus", "2"], "--gpus 0"),
        (lambda d, m: ["embed", str(DATA / "few_proteins.fasta"), "--model", m, "--out",
                       str(DATA / "few_proteins.fasta" / "sub"), "--gpus", "0"], "--out"),
    ],
    ids=["missing-input", "unknown-model", "missing-checkpoint", "too-many-gpus", "unwritable-out"],
)
def test_errors_are_one_line(tmp_path: Path, tiny_esm2_path: Path, make_args, expected: str) -> None:
    code, output = invoke(*make_args(tmp_path, str(tiny_esm2_path)))
    assert code != 0
    assert "Traceback" not in output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("Error:") and expected in lines[0], output


def test_not_fasta_is_one_line_error(tmp_path: Path, tiny_esm2_path: Path) -> None:
    junk = tmp_path / "junk.fasta"
    junk.write_bytes(b"\x00\x01binary junk\n")
    code, output = invoke("embed", str(junk), "--model", str(tiny_esm2_path), "--out", str(tmp_path / "o"),
                          "--gpus", "0")
    assert code != 0 and "Traceback" not in output
    assert "junk.fasta" in output and "FASTA" in output


def test_tables_gzip_and_config_file(tmp_path: Path, tiny_esm2_path: Path) -> None:
    seqs = read_fasta(DATA / "few_proteins.fasta")
    pq.write_table(pa.table({"name": [s for s, _ in seqs], "aa": [q for _, q in seqs]}), tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text("name,aa\n" + "".join(f"c{s},{q}\n" for s, q in seqs))
    with gzip.open(tmp_path / "g.fasta.gz", "wt") as fh:
        fh.write("".join(f">g{s}\r\n{q[:30]}\r\n{q[30:]}\r\n" for s, q in seqs))
    config = tmp_path / "job.yaml"
    config.write_text(f"model: {tiny_esm2_path}\ngpus: 0\nid-column: name\nseq_column: aa\nlayer: 1\n")
    out = tmp_path / "emb"
    code, output = invoke("embed", str(tmp_path / "t.parquet"), str(tmp_path / "t.csv"), str(tmp_path / "g.fasta.gz"),
                          "--config", str(config), "--out", str(out), "--layer", "2")
    assert code == 0, output
    table = read_parts(out)
    assert table.num_rows == 3 * len(seqs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layer"] == 2  # the flag wins over the file's layer: 1
    by_id = dict(zip(table.column("id").to_pylist(), vectors(table), strict=True))
    for sid, _ in seqs:  # the same protein from three formats gives the same embedding
        np.testing.assert_allclose(by_id[sid], by_id[f"c{sid}"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(by_id[sid], by_id[f"g{sid}"], rtol=1e-5, atol=1e-6)


def test_python_dash_m_help() -> None:
    result = subprocess.run([sys.executable, "-m", "runner", "embed", "--help"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0
    assert "Example" in result.stdout and "--token-budget" in result.stdout
