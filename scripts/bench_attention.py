"""The shadow's FP32 attention kernels on one GPU, side by side: which one, and which launch configuration.

One packed batch of the reference's synthetic protein lengths (`bench_data.synth_arrays`: lognormal, median
300, 30..1022, +2 for BOS/EOS), random q, k, v of an ESM-2 layer's shape, timed with CUDA events:

- "fp16 torch_varlen": the main path's FlashAttention-2 kernel in FP16 (the unit the shadow is paid in);
- "fp32 nested": IEEE FP32, PyTorch's memory-efficient kernel over jagged tensors (the shadow before fp16x3);
- "fp32 flex": flex_attention with 3xTF32 products;
- "fp32 fp16x3 BMxBN/wW/sS": runner.kernels.fp16x3_attention under each launch configuration of `--configs`.

Accuracy is the max |error| relative to the largest |output|, against float64 attention computed one sequence
at a time. One JSON line per kernel; `--out FILE` also writes them all as one JSON document.

    python3 scripts/bench_attention.py [--shapes 650M,3B] [--tokens 32768] [--reps 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"650M": (20, 64), "3B": (40, 64), "15B": (40, 128), "dnabert": (12, 64)}  # heads, head_dim
DEFAULT_CONFIGS = "128x64/w8/s3,128x64/w8/s2,128x64/w4/s2,64x64/w4/s2,128x32/w8/s2,64x32/w4/s3,128x128/w8/s2"


def parse_config(text: str) -> dict[str, int]:
    """'128x64/w8/s2' -> BLOCK_M 128, BLOCK_N 64, 8 warps, 2 stages."""
    blocks, warps, stages = text.split("/")
    block_m, block_n = blocks.split("x")
    return {"BLOCK_M": int(block_m), "BLOCK_N": int(block_n), "num_warps": int(warps[1:]), "num_stages": int(stages[1:])}


def timed(fn: Callable[[], torch.Tensor], reps: int) -> float:
    """Milliseconds per call of fn on the GPU (CUDA events, after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def bench_shape(shape: str, cu: torch.Tensor, max_len: int, args: argparse.Namespace) -> list[dict]:
    """Every kernel on one layer's q, k, v of `shape` over the packed lengths `cu`: one row per kernel."""
    from runner.kernels.attention import _exact, plan_attention, varlen_attention
    from runner.kernels.fp16x3_attention import block_sizes, fp16x3_attention

    device = cu.device
    heads, head_dim = SHAPES[shape]
    used = int(cu[-1])
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(used, 3, heads, head_dim, device=device, generator=gen) * 3  # [T, 3, H, hd]
    q, k, v = qkv.unbind(1)  # v stays a strided view, as the models hand it over
    q, k = q.contiguous(), k.contiguous()
    scale = head_dim**-0.5
    truth = _exact(q.double(), k.double(), v.double(), cu, scale, None)  # [T, H, hd] float64
    top = truth.abs().max().item()
    base = {"shape": shape, "heads": heads, "head_dim": head_dim, "tokens": used, "sequences": cu.numel() - 1,
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    rows: list[dict] = []

    def run(name: str, fn: Callable[[], torch.Tensor], unit_ms: float | None = None) -> float:
        try:
            out = fn()
            ms = timed(fn, args.reps)
        except Exception as exc:  # one kernel failing (a missing backend) must not lose the others
            rows.append({**base, "kernel": name, "error": f"{type(exc).__name__}: {exc}"[:400]})
            print(json.dumps(rows[-1]), flush=True)
            return float("nan")
        row = {**base, "kernel": name, "ms": round(ms, 3),
               "max_rel_err_vs_fp64": float((out.double() - truth).abs().max().item() / top)}
        if unit_ms:
            row["x_fp16_flash"] = round(ms / unit_ms, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        return ms

    half = [t.half() for t in (q, k, v)]
    unit = run("fp16 torch_varlen", lambda: varlen_attention(*half, cu, max_len, scale, "torch_varlen"))
    run("fp32 nested", lambda: varlen_attention(q, k, v, cu, max_len, scale, "nested"), unit)
    flex_plan = plan_attention(cu, used, "flex", device)
    run("fp32 flex", lambda: varlen_attention(q, k, v, cu, max_len, scale, "flex", plan=flex_plan), unit)
    for text in args.configs.split(","):
        config = parse_config(text)
        default = " (default)" if config == block_sizes(head_dim) else ""
        run(f"fp32 fp16x3 {text}{default}",
            lambda config=config: fp16x3_attention(q, k, v, cu, max_len, scale, config=config), unit)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="650M,3B", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--tokens", type=int, default=32768, help="tokens in the packed batch")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="fp16x3 launch configurations, BMxBN/wWARPS/sSTAGES")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_data import synth_arrays

    device = torch.device("cuda")
    lengths, _ = synth_arrays(max(16, args.tokens // 150))
    kept, used = [], 0
    for n in (int(x) + 2 for x in lengths):
        if used + n > args.tokens:
            break
        kept.append(n)
        used += n
    cu = torch.tensor([0, *torch.tensor(kept).cumsum(0).tolist()], dtype=torch.int32, device=device)
    max_len = max(kept)
    results: list[dict] = []
    for shape in args.shapes.split(","):
        results += bench_shape(shape, cu, max_len, args)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
