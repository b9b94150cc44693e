"""GPU checks of issue 15's outputs (run on the GPU machine: `python -m pytest -m gpu -s tests/test_outputs_gpu.py`).

The compiled FP16 path with `--layers 0,15,30 --pooling mean,cls,max --per-token --per-token-dtype float16` on a
150M-shaped random checkpoint against fair-esm's own FP32 forward, real proteins: every pooled column and every
per-token array (cosine per sequence), and the multi-layer job's last-layer mean against a plain one-layer job.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import invoke, load_fair_esm, read_parts, vectors

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.usefixtures("gpu_ray")]
DATA = Path(__file__).parent / "data"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_fp16_layers_poolings_and_per_token_match_fair_esm_fp32(tmp_path: Path, esm2_150m: Path, some_proteins) -> None:
    out, plain = tmp_path / "emb", tmp_path / "plain"
    args = ["embed", str(DATA / "some_proteins.fasta"), "--model", str(esm2_150m), "--gpus", "1", "--shadow-rate", "1"]
    code, output = invoke(*args, "--out", str(out), "--layers", "0,15,-1", "--pooling", "mean,cls,max", "--per-token",
                          "--per-token-dtype", "float16")
    assert code == 0, output
    code, output = invoke(*args, "--out", str(plain))
    assert code == 0, output
    pooled, single = read_parts(out), read_parts(plain)
    ids = pooled.column("id").to_pylist()

    model, alphabet = load_fair_esm(esm2_150m)
    model = model.cuda().float().eval()
    convert = alphabet.get_batch_converter()
    seqs = dict(some_proteins)
    worst: dict[str, float] = {}
    tables: dict[str, pa.Table] = {}
    for row, sid in enumerate(ids):
        _, _, tokens = convert([(sid, seqs[sid])])
        with torch.inference_mode():
            reps = model(tokens.cuda(), repr_layers=[0, 15, 30])["representations"]
        name, token_row = pooled["tokens_file"][row].as_py(), pooled["tokens_row"][row].as_py()
        tables.setdefault(name, pa.ipc.open_file(out / "tokens" / name).read_all())
        for layer in (0, 15, 30):
            rep = reps[layer][0, : len(seqs[sid]) + 2].cpu().numpy()  # [L+2, D]
            want = {"mean": rep[1:-1].mean(0), "cls": rep[0], "max": rep[1:-1].max(0)}
            for pooling, vector in want.items():
                key = f"layer{layer}_{pooling}"
                worst[key] = min(worst.get(key, 1.0), cosine(vectors(pooled, key)[row], vector))
            cell = tables[name][f"layer{layer}"][token_row].values.flatten().to_numpy(zero_copy_only=False)
            got = cell.astype(np.float32).reshape(len(seqs[sid]), -1)
            worst[f"per-token layer{layer}"] = min(worst.get(f"per-token layer{layer}", 1.0), cosine(got, rep[1:-1]))
    print("\nFP16 compiled vs fair-esm FP32 (150M shape, min cosine over 15 real proteins): "
          + ", ".join(f"{k} {v:.6f}" for k, v in worst.items()))
    assert min(worst.values()) >= 0.99
    # The last layer's mean of the multi-layer job is the one-layer job's embedding (same kernels, same packing).
    plain_vectors = dict(zip(single.column("id").to_pylist(), vectors(single, "embedding"), strict=True))
    np.testing.assert_allclose(vectors(pooled, "layer30_mean"), np.stack([plain_vectors[i] for i in ids]), rtol=0, atol=2e-3)
    # The token files' checksums, summed by a GPU actor with two calls in flight, match the bytes on disk; and the
    # per-token rows are there exactly once (runner verify reads everything again).
    code, output = invoke("verify", str(out))
    assert code == 0 and f"per-token files ({len(ids)} rows)" in output, output
