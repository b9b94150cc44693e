"""GPU checks of issue 15's outputs (run on the GPU machine: `python -m pytest -m gpu -s tests/test_outputs_gpu.py`).

The compiled FP16 path with `--layers 0,15,30 --pooling mean,cls,max --per-token --per-token-dtype float16` on a
150M-shaped random checkpoint against fair-esm's own FP32 forward, real proteins: every pooled column and every
per-token array (cosine per sequence), and the multi-layer job's last-layer mean against a plain one-layer job.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from runner.cli import cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray

    ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def esm2_150m(tmp_path_factory: pytest.TempPathFactory, tiny_esm2_script) -> Path:
    return tiny_esm2_script.make_esm2(tmp_path_factory.mktemp("esm150") / "esm2_150m.pt", layers=30, dim=640,
                                      heads=20, seed=0)


def read_parts(out: Path) -> pa.Table:
    return pa.concat_tables(pa.ipc.open_file(p).read_all() for p in sorted((out / "embeddings").glob("part-*")))


def column(table: pa.Table, name: str) -> np.ndarray:
    dim = table.schema.field(name).type.list_size
    return table.column(name).combine_chunks().flatten().to_numpy().reshape(-1, dim)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_fp16_layers_poolings_and_per_token_match_fair_esm_fp32(tmp_path: Path, esm2_150m: Path, some_proteins) -> None:
    import esm

    out, plain = tmp_path / "emb", tmp_path / "plain"
    args = ["embed", str(DATA / "some_proteins.fasta"), "--model", str(esm2_150m), "--gpus", "1", "--shadow-rate", "1"]
    result = CliRunner().invoke(cli, [*args, "--out", str(out), "--layers", "0,15,-1", "--pooling", "mean,cls,max",
                                      "--per-token", "--per-token-dtype", "float16"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, [*args, "--out", str(plain)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    pooled, single = read_parts(out), read_parts(plain)
    ids = pooled.column("id").to_pylist()

    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(esm2_150m))
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
                worst[key] = min(worst.get(key, 1.0), cosine(column(pooled, key)[row], vector))
            cell = tables[name][f"layer{layer}"][token_row].values.flatten().to_numpy(zero_copy_only=False)
            got = cell.astype(np.float32).reshape(len(seqs[sid]), -1)
            worst[f"per-token layer{layer}"] = min(worst.get(f"per-token layer{layer}", 1.0), cosine(got, rep[1:-1]))
    print("\nFP16 compiled vs fair-esm FP32 (150M shape, min cosine over 15 real proteins): "
          + ", ".join(f"{k} {v:.6f}" for k, v in worst.items()))
    assert min(worst.values()) >= 0.99
    # The last layer's mean of the multi-layer job is the one-layer job's embedding (same kernels, same packing).
    plain_vectors = dict(zip(single.column("id").to_pylist(), column(single, "embedding"), strict=True))
    np.testing.assert_allclose(column(pooled, "layer30_mean"), np.stack([plain_vectors[i] for i in ids]), rtol=0, atol=2e-3)
    # The token files' checksums, summed by a GPU actor with two calls in flight, match the bytes on disk; and the
    # per-token rows are there exactly once (runner verify reads everything again).
    verified = CliRunner().invoke(cli, ["verify", str(out)])
    assert verified.exit_code == 0 and f"per-token files ({len(ids)} rows)" in verified.output, verified.output
