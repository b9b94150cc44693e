"""GPU checks of the whole pipeline (run on the GPU machine: `python -m pytest -m gpu -s`).

- FP16 packed through `runner embed --gpus 1` against fair-esm's own FP32 padded forward, real proteins.
- With two or more GPUs: every GPU embeds, and every id comes back exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import embeddings_by_id, invoke, read_parts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.usefixtures("gpu_ray"),
]
DATA = Path(__file__).parent / "data"


def test_fp16_pipeline_matches_fair_esm_fp32(tmp_path: Path, esm2_150m: Path, some_proteins) -> None:
    import esm

    from runner.models.esm2 import load_esm2

    out = tmp_path / "emb"
    code, output = invoke("embed", str(DATA / "some_proteins.fasta"), "--model", str(esm2_150m), "--out", str(out),
                          "--gpus", "1", "--shadow-rate", "1", "--compile")  # a job this small runs eager unasked
    assert code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "fp16"
    kernel, *options = manifest["attention_backend"][0].split("+")
    assert kernel in ("flash_attn", "torch_varlen") and "compile" in options
    assert "fused_gelu" in options  # ESM-2 in FP16 on a GPU: fc1 + tanh GELU as one GEMM by default
    assert manifest["shadow"]["fp32_math"] == "fp16x3"
    got = embeddings_by_id(out)

    model = load_esm2(str(esm2_150m)).esm.cuda().float().eval()
    batch = esm.data.Alphabet.from_architecture("ESM-1b").get_batch_converter()
    cosines = []
    for sid, seq in some_proteins:
        _, _, tokens = batch([(sid, seq)])
        with torch.inference_mode():
            rep = model(tokens.cuda(), repr_layers=[30])["representations"][30]
        ref = rep[0, 1 : len(seq) + 1].mean(0).cpu().numpy()
        cosines.append(float(got[sid] @ ref / (np.linalg.norm(got[sid]) * np.linalg.norm(ref))))
    cosines = np.array(cosines)
    shadow = manifest["shadow"]
    print(
        f"\nFP16 packed vs FP32 padded (150M shape, {len(cosines)} real proteins): "
        f"mean {cosines.mean():.6f} min {cosines.min():.6f}; shadow: {shadow}; "
        f"tokens/s {manifest['throughput']['tokens_per_second']}"
    )
    assert cosines.mean() >= 0.999 and cosines.min() >= 0.99
    assert shadow["compared"] == len(some_proteins)
    assert abs(shadow["cosine_min"] - cosines.min()) < 1e-3  # the shadow measures the same drift


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more GPUs")
def test_every_gpu_embeds_and_every_id_once(tmp_path: Path, tiny_esm2_path: Path) -> None:
    gpus = torch.cuda.device_count()
    rng = np.random.default_rng(0)
    fasta = tmp_path / "many.fasta"
    with fasta.open("w") as fh:
        for i in range(20000):
            fh.write(
                f">s{i}\n{''.join(rng.choice(list('ACDEFGHIKLMNPQRSTVWY'), int(rng.integers(30, 600))))}\n"
            )
    out = tmp_path / "emb"
    code, output = invoke("embed", str(fasta), "--model", str(tiny_esm2_path), "--out", str(out), "--gpus", str(gpus),
                          "--token-budget", "4096")
    assert code == 0, output
    ids = read_parts(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 20000
    workers = json.loads((out / "manifest.json").read_text())["throughput"]["windows_per_worker"]
    print(f"\nwindows per worker on {gpus} GPUs: {workers}")
    assert len({w.split(":")[1] for w in workers}) == gpus  # one distinct CUDA device per actor


def test_actor_written_parts_on_gpus_equal_driver_written_ones(tmp_path: Path, tiny_esm2_path: Path) -> None:
    """--part-writer actors on the GPU actors (two calls in flight each): the same rows and vectors as the driver
    writing them, every id once, the shadow fed, `runner verify` clean, nothing left staged (docs/scaling.md)."""
    rng = np.random.default_rng(1)
    fasta = tmp_path / "short.fasta"
    with fasta.open("w") as fh:
        for i in range(20000):
            fh.write(f">s{i}\n{''.join(rng.choice(list('ACDEFGHIKLMNPQRSTVWY'), int(rng.integers(20, 120))))}\n")
    runs = {}
    for writer in ("driver", "actors"):
        out = tmp_path / writer
        code, output = invoke("embed", str(fasta), "--model", str(tiny_esm2_path), "--out", str(out), "--gpus",
                              str(torch.cuda.device_count()), "--token-budget", "8192", "--shadow-rate", "0.01",
                              "--part-writer", writer)
        assert code == 0, output
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["part_writer"] == writer and manifest["shadow"]["compared"] > 0
        code, output = invoke("verify", str(out))
        assert code == 0, output
        assert not list((out / "embeddings").glob(".staged/*/*"))
        runs[writer] = embeddings_by_id(out)
        print(f"\n--part-writer {writer}: {len(manifest['parts'])} parts, "
              f"{manifest['throughput']['tokens_per_second']} tok/s")
    assert len(runs["actors"]) == len(runs["driver"]) == 20000
    for sid, vector in runs["driver"].items():
        np.testing.assert_allclose(runs["actors"][sid], vector, rtol=0, atol=1e-3, err_msg=sid)  # FP16, batching
