"""DNABERT-S through the whole `runner embed` pipeline on CPU: same outputs, rejects and manifest as ESM-2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import invoke, read_parts, vectors

from runner.models.dnabert import load_dnabert
from runner.stages.pooling import pool_packed


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray

    ray.init(
        num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20
    )
    yield
    ray.shutdown()


def random_dna(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("ACGT"), size=int(rng.integers(20, 300)))) for _ in range(n)]


def test_dnabert_embed_end_to_end(tmp_path: Path, tiny_dnabert_dir: Path) -> None:
    reads = random_dna(40, seed=1)
    fasta = tmp_path / "reads.fa"
    body = "".join(f">r{i}\n{s.lower() if i % 2 else s}\n" for i, s in enumerate(reads))
    body += ">rna\nACGUACGUNNACGU\n>bad\nACGTXYZ\n"
    fasta.write_text(body)
    out = tmp_path / "dna"
    code, output = invoke("embed", str(fasta), "--model", str(tiny_dnabert_dir), "--out", str(out), "--gpus", "0",
                          "--shadow-rate", "0")
    assert code == 0, output
    table = read_parts(out)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted([f"r{i}" for i in range(40)] + ["rna"])
    rejects = pa.ipc.open_file(out / "rejects.arrow").read_all().to_pydict()
    assert rejects["id"] == ["bad"] and "XYZ" in rejects["reason"][0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["family"] == "dnabert" and manifest["pooling"] == "mean_all"
    assert (
        manifest["counts"]["rows"] + manifest["counts"]["rejects"] == manifest["counts"]["records_read"] == 42
    )

    # Each stored vector equals a one-sequence forward of the same weights (U->T, uppercase applied).
    model = load_dnabert(str(tiny_dnabert_dir))
    got = dict(zip(ids, vectors(table), strict=True))
    for sid, seq in [("r0", reads[0]), ("r1", reads[1]), ("rna", "ACGTACGTNNACGT")]:
        tokens = torch.from_numpy(model.codec.encode(seq)).long()
        cu = torch.tensor([0, len(tokens)], dtype=torch.int32)
        with torch.inference_mode():
            hidden = model.forward_packed(tokens, torch.arange(len(tokens)), cu, len(tokens), -1)
        ref = pool_packed(hidden, cu, "mean_all", 1, 1)[0].numpy()
        cos = float(got[sid] @ ref / (np.linalg.norm(got[sid]) * np.linalg.norm(ref)))
        assert cos >= 0.9999, (sid, cos)


def test_two_models_one_job(tmp_path: Path, tiny_dnabert_dir: Path, tiny_esm2_path: Path) -> None:
    """`--model` repeated: one folder per model over the same input (here DNA that is also valid protein text)."""
    fasta = tmp_path / "reads.fa"
    fasta.write_text("".join(f">r{i}\n{s}\n" for i, s in enumerate(random_dna(12, seed=2))))
    out = tmp_path / "both"
    code, output = invoke("embed", str(fasta), "--model", str(tiny_dnabert_dir), "--model", str(tiny_esm2_path),
                          "--out", str(out), "--gpus", "0")
    assert code == 0, output
    for folder, family in (("dnabert_tiny", "dnabert"), ("esm2_tiny", "esm2")):
        manifest = json.loads((out / folder / "manifest.json").read_text())
        assert manifest["model"]["family"] == family and manifest["counts"]["rows"] == 12
