"""`runner embed --layers --pooling --per-token` end to end through a local Ray on CPU, against fair-esm's own forward.

Every stored pooled column and every per-token array is compared with fair-esm's
`model(tokens, repr_layers=[0, 1, 2])["representations"]` (its mean over the residues, its BOS vector, its
per-channel max over the residues, its residue rows): FP32 cosine >= 0.9999 and max |diff| below 1e-4 (measured
on this tiny checkpoint: about 1e-6; the figure is printed with -s).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import invoke, load_fair_esm, read_parts, running_ray, vectors

from runner.input.prepare import chunk_starts

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module: `runner embed` reuses a Ray this process already started."""
    with running_ray(num_cpus=4):
        yield


def per_token_rows(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """id -> {layerL: [length, D] float32} through the pooled parts' pointers; asserts each id's row exists once
    across ALL token files on disk (no unreferenced or duplicate rows)."""
    pooled = read_parts(out)
    cache: dict[str, pa.Table] = {}
    found: dict[str, dict[str, np.ndarray]] = {}
    for sid, name, row in zip(pooled.column("id").to_pylist(), pooled.column("tokens_file").to_pylist(),
                              pooled.column("tokens_row").to_pylist(), strict=True):
        if name not in cache:
            cache[name] = pa.ipc.open_file(out / "tokens" / name).read_all()
        table = cache[name]
        assert table.column("id")[row].as_py() == sid
        length = table.column("length")[row].as_py()
        arrays = {}
        for f in table.schema:
            if f.name.startswith("layer"):
                cell = table.column(f.name)[row].values.flatten().to_numpy(zero_copy_only=False)
                arrays[f.name] = cell.astype(np.float32).reshape(length, -1)
        found[sid] = arrays
    on_disk = [i for p in (out / "tokens").glob("*/tok-*.arrow") for i in pa.ipc.open_file(p).read_all()["id"].to_pylist()]
    assert sorted(on_disk) == sorted(found), "token files hold rows no pooled part points at, or an id twice"
    assert not list((out / "tokens").glob("*/.*")), "a hidden (half-written) token file was left behind"
    return found


@pytest.fixture(scope="module")
def fair_esm(tiny_esm2_path: Path):

    model, alphabet = load_fair_esm(tiny_esm2_path)
    return model.eval(), alphabet


def fair_esm_representations(fair_esm, seqs: list[tuple[str, str]], layers: list[int]) -> dict[str, dict[int, np.ndarray]]:
    """id -> layer -> [L+2, D] (BOS, residues, EOS) from fair-esm's own padded forward, FP32, one sequence at a time."""
    model, alphabet = fair_esm
    converter = alphabet.get_batch_converter()
    out = {}
    for sid, seq in seqs:
        _, _, tokens = converter([(sid, seq)])
        with torch.no_grad():
            reps = model(tokens, repr_layers=layers)["representations"]
        out[sid] = {layer: reps[layer][0, : len(seq) + 2].numpy() for layer in layers}
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_layers_poolings_and_per_token_equal_fair_esm(tiny_esm2_path: Path, fair_esm, some_proteins, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = invoke("embed", str(DATA / "some_proteins.fasta"), "--model", str(tiny_esm2_path), "--out", str(out),
                          "--gpus", "0", "--layers", "0,1,2", "--pooling", "mean,cls,max", "--per-token",
                          "--shadow-rate", "0.5", "--no-progress")
    assert code == 0, output
    pooled = read_parts(out)
    ids = pooled.column("id").to_pylist()
    assert sorted(ids) == sorted(sid for sid, _ in some_proteins)
    columns = [f"layer{layer}_{p}" for layer in (0, 1, 2) for p in ("mean", "cls", "max")]
    assert [f.name for f in pooled.schema if f.name.startswith("layer")] == columns
    reference = fair_esm_representations(fair_esm, some_proteins, [0, 1, 2])
    tokens = per_token_rows(out)
    worst_cos, worst_diff = 1.0, 0.0
    for name in columns:
        layer, pooling = int(name[5:].split("_")[0]), name.split("_", 1)[1]
        stored = vectors(pooled, name)
        for sid, vector in zip(ids, stored, strict=True):
            rep = reference[sid][layer]  # [L+2, D]
            want = {"mean": rep[1:-1].mean(0), "cls": rep[0], "max": rep[1:-1].max(0)}[pooling]
            worst_cos = min(worst_cos, cosine(vector, want))
            worst_diff = max(worst_diff, float(np.abs(vector - want).max()))
    for sid in ids:
        for layer in (0, 1, 2):
            got, want = tokens[sid][f"layer{layer}"], reference[sid][layer][1:-1]
            assert got.shape == want.shape  # residues only: BOS and EOS excluded
            worst_cos = min(worst_cos, cosine(got, want))
            worst_diff = max(worst_diff, float(np.abs(got - want).max()))
    print(f"\nfair-esm vs runner, pooled columns and per-token arrays: min cosine {worst_cos:.9f}, "
          f"max abs diff {worst_diff:.2e}")
    assert worst_cos >= 0.9999 and worst_diff < 1e-4
    manifest = json.loads((out / "manifest.json").read_text())
    outputs = manifest["outputs"]
    assert outputs["layers"] == [0, 1, 2] and outputs["poolings"] == ["mean", "cls", "max"]
    assert outputs["columns"]["2"]["max"] == "layer2_max"
    files = list((out / "tokens").glob("*/tok-*.arrow"))
    assert outputs["per_token"]["dtype"] == "float32" and outputs["per_token"]["layers"] == [0, 1, 2]
    assert outputs["per_token"]["files"] == len(files) and outputs["per_token"]["bytes"] == sum(f.stat().st_size for f in files)
    assert manifest["fingerprint"]["settings"]["layer"] == [0, 1, 2]
    assert manifest["shadow"]["compared"] > 0 and manifest["shadow"]["violations"] == 0
    drift = pa.ipc.open_file(out / "drift.arrow").read_all()
    assert set(drift.column("column").to_pylist()) <= set(columns)


def midpoint_stitch(windows: list[np.ndarray], starts: list[int], total: int, width: int) -> np.ndarray:
    """The documented rule, written out residue by residue: each residue from the window whose centre is nearest
    (equivalently: farthest from that window's edges); on a tie the later window."""
    out = []
    for p in range(total):
        holding = [i for i, s in enumerate(starts) if s <= p < s + width]
        best = min(holding, key=lambda i: (abs(p - (starts[i] + (width - 1) / 2)), -i))
        out.append(windows[best][p - starts[best]])
    return np.stack(out)


def test_chunked_per_token_is_stitched_by_the_midpoint_rule(tiny_esm2_path: Path, fair_esm, some_proteins,
                                                            tmp_path: Path) -> None:
    width, overlap = 100, 30
    long = [(sid, seq) for sid, seq in some_proteins if len(seq) > 300][:3]
    fasta = tmp_path / "long.fasta"
    fasta.write_text("".join(f">{sid}\n{seq}\n" for sid, seq in long))
    out = tmp_path / "out"
    code, output = invoke("embed", str(fasta), "--model", str(tiny_esm2_path), "--out", str(out), "--gpus", "0",
                          "--layers", "1,-1", "--pooling", "mean,max", "--per-token", "--per-token-dtype", "float16",
                          "--max-residues", str(width), "--long", "chunk", "--chunk-overlap", str(overlap),
                          "--shadow-rate", "0", "--no-progress")
    assert code == 0, output
    pooled = read_parts(out)
    tokens = per_token_rows(out)
    for row, sid in enumerate(pooled.column("id").to_pylist()):
        seq = dict(long)[sid]
        starts = chunk_starts(len(seq), width, overlap)
        windows = [(f"{sid}_{i}", seq[s : s + width]) for i, s in enumerate(starts)]
        reps = fair_esm_representations(fair_esm, windows, [1, 2])  # each window's own forward
        for layer in (1, 2):
            residues = [reps[w][layer][1:-1] for w, _ in windows]  # [width, D] each
            want = midpoint_stitch(residues, starts, len(seq), width)
            got = tokens[sid][f"layer{layer}"]
            assert got.shape == (len(seq), want.shape[1])
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)  # stored as float16
            assert cosine(got, want) >= 0.9999
            # pooled: max over every window's residues; mean weighted by the windows' residues
            np.testing.assert_allclose(vectors(pooled, f"layer{layer}_max")[row], np.max([r.max(0) for r in residues], 0),
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(vectors(pooled, f"layer{layer}_mean")[row], np.mean([r.mean(0) for r in residues], 0),
                                       rtol=1e-5, atol=1e-5)
    table = pa.ipc.open_file(next((out / "tokens").glob("*/tok-*.arrow"))).read_all()
    assert table.schema.field("layer1").type.value_type.value_type == pa.float16()


def test_dnabert_per_token_and_layers(tiny_dnabert_dir: Path, tmp_path: Path) -> None:
    from runner.models.dnabert import load_dnabert

    rng = np.random.default_rng(3)
    seqs = [(f"d{i}", "".join(rng.choice(list("ACGT"), size=int(rng.integers(30, 120))))) for i in range(6)]
    fasta = tmp_path / "dna.fasta"
    fasta.write_text("".join(f">{sid}\n{seq}\n" for sid, seq in seqs))
    out = tmp_path / "out"
    code, output = invoke("embed", str(fasta), "--model", str(tiny_dnabert_dir), "--out", str(out), "--gpus", "0",
                          "--layers", "0,-1", "--pooling", "mean_all,cls,max", "--per-token", "--shadow-rate", "0",
                          "--no-progress")
    assert code == 0, output
    model = load_dnabert(str(tiny_dnabert_dir))
    pooled = read_parts(out)
    tokens = per_token_rows(out)
    last = model.num_layers
    for row, sid in enumerate(pooled.column("id").to_pylist()):
        ids = torch.from_numpy(model.codec.encode(dict(seqs)[sid])).long()  # [CLS] BPE... [SEP]
        cu = torch.tensor([0, len(ids)], dtype=torch.int32)
        with torch.no_grad():
            hidden = model.forward_layers(ids, torch.arange(len(ids)), cu, len(ids), [0, last])
        for layer, h in zip((0, last), hidden, strict=True):
            h = h.numpy()
            got = tokens[sid][f"layer{layer}"]
            assert got.shape == (len(ids) - 2, h.shape[1])  # one row per BPE token, [CLS]/[SEP] excluded
            np.testing.assert_allclose(got, h[1:-1], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(vectors(pooled, f"layer{layer}_mean_all")[row], h.mean(0), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(vectors(pooled, f"layer{layer}_cls")[row], h[0], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(vectors(pooled, f"layer{layer}_max")[row], h[1:-1].max(0), rtol=1e-6, atol=1e-6)
    code, output = invoke("embed", str(fasta), "--model", str(tiny_dnabert_dir), "--out", str(tmp_path / "o2"),
                          "--gpus", "0", "--per-token", "--long", "chunk", "--max-residues", "40", "--chunk-overlap", "10")
    assert code != 0 and "--per-token with --long chunk needs one token per residue" in output
