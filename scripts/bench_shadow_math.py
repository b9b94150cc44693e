"""How the FP32 shadow's matmuls should run on a GPU: IEEE FP32, plain TF32, or 3xTF32 (runner's default).

One CUDA GPU, plain torch + fair-esm (no Ray). A random ESM-2 of the real 650M (or 3B) shape is built in
fair-esm's format, saved, and loaded through runner's own loader; synthetic proteins (the reference
script's generator: lognormal lengths, median 300) are packed into one shadow-sized batch. Each mode runs
runner's packed FP32 forward (`ESM2Embedder.forward_packed`, the shadow actor's code):

- "ieee": IEEE FP32 matmuls on CUDA cores (torch's default);
- "tf32": plain TF32 tensor cores for every FP32 matmul (10-bit mantissa: not an FP32 reference);
- "tf32x3": `runner.models.tf32x3`, three TF32 products per projection (FP32-accurate).

Prints one JSON line per mode: tok_per_s, and max relative difference / 1 - cosine of the mean-pooled
embeddings against "ieee".

    python3 scripts/bench_shadow_math.py [--arch 650M] [--tokens 16384] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
ARCH = {"150M": (30, 640, 20), "650M": (33, 1280, 20), "3B": (36, 2560, 40)}


def synth_lengths(total_tokens: int, seed: int = 0) -> list[int]:
    """Residue counts (median 300, sigma 0.65, 30..1022) until total_tokens (with BOS/EOS) are reached."""
    g = torch.Generator().manual_seed(seed)
    lengths, used = [], 0
    while True:
        n = int(math.exp(torch.randn(1, generator=g).item() * 0.65 + math.log(300)))
        n = min(max(n, 30), 1022)
        if used + n + 2 > total_tokens:
            return lengths
        lengths.append(n)
        used += n + 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="650M", choices=sorted(ARCH))
    ap.add_argument("--tokens", type=int, default=16384, help="tokens in the packed batch (runner's shadow_batch_tokens)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "scripts"))
    from bench import cmd_make_ckpt  # the benchmark's own random fair-esm checkpoint writer

    from runner.models.esm2 import load_esm2
    from runner.models.tf32x3 import Tf32x3Linear, tf32_matmuls
    from runner.pooling import pool_packed

    layers, dim, heads = ARCH[args.arch]
    device = torch.device("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"esm2-{args.arch}.pt"
        cmd_make_ckpt(argparse.Namespace(path=str(ckpt), layers=layers, dim=dim, heads=heads, seed=0, dtype="fp32"))
        model = load_esm2(str(ckpt)).to(device).eval()
    model.select_attention(device)
    lengths = synth_lengths(args.tokens)
    g = torch.Generator().manual_seed(1)
    pieces, positions = [], []
    for n in lengths:
        residues = torch.randint(4, 24, (n,), generator=g)  # the 20 standard amino-acid tokens
        pieces.append(torch.cat([torch.tensor([0]), residues, torch.tensor([2])]))  # <cls> ... <eos>
        positions.append(torch.arange(n + 2))
    tokens = torch.cat(pieces).to(device)  # [T]
    pos = torch.cat(positions).to(device)  # [T]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor([n + 2 for n in lengths]).cumsum(0)
    cu = cu.to(device)
    max_len = max(lengths) + 2

    def run(mode: str) -> tuple[torch.Tensor, float]:
        model.linear = Tf32x3Linear() if mode == "tf32x3" else F.linear
        ctx = tf32_matmuls() if mode == "tf32" else torch.inference_mode()
        with torch.inference_mode(), ctx:
            out = pool_packed(model.forward_packed(tokens, pos, cu, max_len, -1), cu, "mean", 1, 1)  # warm-up
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(args.reps):
                out = pool_packed(model.forward_packed(tokens, pos, cu, max_len, -1), cu, "mean", 1, 1)
            torch.cuda.synchronize()
        return out.double(), (time.perf_counter() - started) / args.reps

    reference, _ = run("ieee")
    for mode in ("ieee", "tf32", "tf32x3"):
        pooled, seconds = run(mode)
        cosine = F.cosine_similarity(pooled, reference, dim=-1)
        print(json.dumps({
            "arch": args.arch, "mode": mode, "tokens": int(cu[-1]), "sequences": len(lengths),
            "tok_per_s": round(int(cu[-1]) / seconds),
            "max_rel_diff_vs_ieee": float((pooled - reference).abs().max() / reference.abs().max()),
            "one_minus_cos_max_vs_ieee": float((1 - cosine).max()),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
        }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
